"""Per-pair metrics (SSIM variants, PSNR, L1, LPIPS, colour fidelity) and the pair accumulator, offline and tiny."""

from __future__ import annotations

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from xmdpt.errors import InputError
from xmdpt.evaluation.metrics import (
    LPIPSMetric,
    PairMetrics,
    color_fidelity,
    l1,
    load_mask,
    match_generated_folder,
    psnr,
    ssim,
    ssim_256,
)
from xmdpt.evaluation.protocol import save_png

SIZE = (64, 56)


def _images(seed: int, n: int = 3, size: tuple[int, int] = SIZE) -> torch.Tensor:
    """Smooth random uint8 images with some texture (B, 3, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, 6, 5, generator=generator), size=size, mode="bicubic")
    noisy = base + 0.08 * torch.randn(n, 3, *size, generator=generator)
    return (noisy.clamp(0, 1) * 255).to(torch.uint8)


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    target = _images(0, 1)[0]
    # Range 10..239, so SSIM_256's data_range (pred.max() - pred.min()) is not 255.
    pred = (target.float() * 0.7 + _images(1, 1)[0].float() * 0.2 + 10).to(torch.uint8)
    return pred, target


def _hwc_unit(image: torch.Tensor) -> np.ndarray:
    """uint8 (3, H, W) -> float32 (H, W, 3) / 255: PIDM's layout (imread / 255, multichannel)."""
    return image.permute(1, 2, 0).numpy().astype(np.float32) / 255.0


# ------------------------------------------------------------------------------------------- scikit-image parity


def test_ssim_equals_scikit_image_protocol_call() -> None:
    pred, target = _pair()
    expected = structural_similarity(_hwc_unit(target), _hwc_unit(pred), data_range=1, win_size=51, channel_axis=-1)
    assert ssim(pred, target) == pytest.approx(expected, abs=1e-7)
    assert 0.2 < ssim(pred, target) < 0.999
    # A 7x7 window (scikit-image's default) gives another number: the 51 window is really used.
    default_window = structural_similarity(_hwc_unit(target), _hwc_unit(pred), data_range=1, channel_axis=-1)
    assert abs(ssim(pred, target) - default_window) > 1e-3


def test_ssim_256_equals_scikit_image_protocol_call() -> None:
    pred, target = _pair()
    p256, t256 = _hwc_unit(pred) * 255.0, _hwc_unit(target) * 255.0
    kwargs = dict(gaussian_weights=True, use_sample_covariance=False, channel_axis=-1)
    expected = structural_similarity(t256, p256, sigma=1.5, data_range=p256.max() - p256.min(), **kwargs)
    assert ssim_256(pred, target) == pytest.approx(expected, abs=1e-7)
    # It is not SSIM, not PIDM's sigma 1.2 and not data_range 255: each choice changes the number.
    assert abs(ssim_256(pred, target) - ssim(pred, target)) > 1e-3
    sigma_12 = structural_similarity(t256, p256, sigma=1.2, data_range=p256.max() - p256.min(), **kwargs)
    range_255 = structural_similarity(t256, p256, sigma=1.5, data_range=255.0, **kwargs)
    assert abs(ssim_256(pred, target) - sigma_12) > 1e-4
    assert p256.max() - p256.min() < 255 and abs(ssim_256(pred, target) - range_255) > 1e-4


def test_psnr_and_l1() -> None:
    pred, target = _pair()
    expected = peak_signal_noise_ratio(_hwc_unit(target), _hwc_unit(pred), data_range=1)
    assert psnr(pred, target) == pytest.approx(expected, rel=1e-6)
    assert l1(pred, target) == pytest.approx(np.abs(_hwc_unit(pred) - _hwc_unit(target)).mean(), rel=1e-6)
    assert psnr(target, target) == float("inf")
    assert l1(target, target) == 0.0


def test_metrics_reject_floats_and_shape_mismatch() -> None:
    pred, target = _pair()
    with pytest.raises(InputError, match="uint8"):
        ssim(pred.float(), target)
    with pytest.raises(InputError, match=r"generated image is \(3, 64, 50\), target is \(3, 64, 56\)"):
        psnr(pred[:, :, :50], target)


# ------------------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture
def alexnet_files(tmp_path) -> tuple:
    """Two seeded torchvision AlexNet checkpoints (random weights, built with weights=None: no download)."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"alexnet-{seed}.pth"
        torch.save(tvm.alexnet(weights=None).state_dict(), path)
        paths.append(path)
    return tuple(paths)


def test_lpips_equals_lpips_package_with_same_backbone(alexnet_files, monkeypatch) -> None:
    calls = []
    real_alexnet = lpips.pretrained_networks.tv.alexnet

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_alexnet(*args, **kwargs)

    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", spy)
    ours = LPIPSMetric(alexnet_weights=alexnet_files[0])
    # lpips built its AlexNet without pretrained weights: nothing was (or could have been) downloaded.
    assert calls and all(call.get("pretrained") is False for call in calls)

    def hub_alexnet(pretrained: bool = False, **kwargs):
        # What lpips would get from the hub if these were torchvision's weights.
        assert pretrained is True
        net = real_alexnet(weights=None)
        net.load_state_dict(torch.load(alexnet_files[0], weights_only=True))
        return net

    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", hub_alexnet)
    reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=False, verbose=False).eval()
    pred, target = _images(2, 4), _images(3, 4)
    with torch.no_grad():
        expected = reference(pred.float() / 255, target.float() / 255, normalize=True).reshape(-1)
    got = ours(pred, target)
    assert got.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert (got > 0).all()
    # Different backbone weights give different distances: the file is really used.
    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", real_alexnet)
    other = LPIPSMetric(alexnet_weights=alexnet_files[1])(pred, target)
    assert (other - got).abs().max() > 1e-4
    assert torch.allclose(ours(target, target), torch.zeros(4), atol=1e-7)


def test_lpips_offline_errors_name_the_file(tmp_path, monkeypatch) -> None:
    with pytest.raises(InputError, match="does not exist"):
        LPIPSMetric(alexnet_weights=tmp_path / "nope.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="not a torchvision AlexNet checkpoint"):
        LPIPSMetric(alexnet_weights=tmp_path / "wrong.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(InputError, match="alexnet-owt-7be5be79.pth"):
        LPIPSMetric(alexnet_weights=None)


# -------------------------------------------------------------------------------------------- colour fidelity


def test_color_fidelity_known_values() -> None:
    target = torch.zeros(3, 8, 8, dtype=torch.uint8)
    target[:, 2:6, 2:6] = 255
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True
    assert color_fidelity(target, target, mask) == {"color_de": 0.0, "color_hist": 0.0}
    black = torch.zeros_like(target)
    scores = color_fidelity(black, target, mask)
    assert scores["color_de"] == pytest.approx(100.0, abs=1e-3)  # L* 0 vs 100
    assert scores["color_hist"] == pytest.approx(1.0)
    # Changes outside the figure do not count.
    outside = target.clone()
    outside[:, 0, 0] = 17
    assert color_fidelity(outside, target, mask) == {"color_de": 0.0, "color_hist": 0.0}


def test_color_hist_ignores_placement_inside_the_mask_but_delta_e_does_not() -> None:
    target = _images(4, 1, (16, 16))[0]
    mask = torch.ones(16, 16, dtype=torch.bool)
    shuffled = target.flatten(1)[:, torch.randperm(256, generator=torch.Generator().manual_seed(0))].view(3, 16, 16)
    scores = color_fidelity(shuffled, target, mask)
    assert scores["color_hist"] == pytest.approx(0.0, abs=1e-12)
    assert scores["color_de"] > 1.0


def test_color_fidelity_rejects_bad_masks() -> None:
    image = _images(5, 1, (8, 8))[0]
    with pytest.raises(InputError, match="empty"):
        color_fidelity(image, image, torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(InputError, match="boolean"):
        color_fidelity(image, image, torch.ones(8, 8))
    with pytest.raises(InputError, match=r"figure mask is \(4, 4\), expected \(8, 8\)"):
        color_fidelity(image, image, torch.ones(4, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ accumulator


def test_pair_metrics_rows_and_means() -> None:
    pred, target = _images(6, 4), _images(7, 4)
    scorer = PairMetrics(SIZE)
    scorer.add(["a", "b"], pred[:2], target[:2])
    scorer.add(["c", "d"], pred[2:], target[2:])
    rows = scorer.per_pair()
    assert [row["name"] for row in rows] == ["a", "b", "c", "d"]
    assert rows[2]["ssim"] == pytest.approx(ssim(pred[2], target[2]))
    assert rows[3]["ssim_256"] == pytest.approx(ssim_256(pred[3], target[3]))
    means = scorer.means()
    assert set(means) == {"ssim", "ssim_256", "psnr", "l1"}
    assert means["psnr"] == pytest.approx(np.mean([psnr(p, t) for p, t in zip(pred, target, strict=True)]))
    result = scorer.result().as_dict()
    assert result["count"] == 4 and result["image_size"] == "64x56" and result["fid"] == {}


def test_pair_metrics_refuses_bad_batches() -> None:
    pred, target = _images(8, 2), _images(9, 2)
    scorer = PairMetrics(SIZE)
    scorer.add(["a", "b"], pred, target)
    with pytest.raises(InputError, match="'a' was given twice"):
        scorer.add(["a", "c"], pred, target)
    with pytest.raises(InputError, match="images are 32x28, expected the evaluation size 64x56"):
        scorer.add(["x", "y"], pred[..., :32, :28], target[..., :32, :28])
    with pytest.raises(InputError, match="target batch"):
        scorer.add(["x", "y"], pred, target[:1])
    with pytest.raises(InputError, match="2 names for a batch of 1"):
        scorer.add(["x", "y"], pred[:1], target[:1])
    with pytest.raises(InputError, match="masks were given for some pairs"):
        scorer.add(["x", "y"], pred, target, torch.ones(2, *SIZE, dtype=torch.bool))


def test_pair_metrics_with_masks_and_lpips(alexnet_files) -> None:
    pred, target = _images(10, 2), _images(11, 2)
    masks = torch.zeros(2, *SIZE, dtype=torch.bool)
    masks[:, 10:50, 10:40] = True
    scorer = PairMetrics(SIZE, lpips=LPIPSMetric(alexnet_weights=alexnet_files[0]))
    rows = scorer.add(["a", "b"], pred, target, masks)
    assert set(rows[0]) == {"name", "ssim", "ssim_256", "psnr", "l1", "lpips", "color_de", "color_hist"}
    assert rows[1]["color_de"] == pytest.approx(color_fidelity(pred[1], target[1], masks[1])["color_de"])
    with pytest.raises(InputError, match="masks were given for some pairs and not for others"):
        scorer.add(["c", "d"], pred, target)


def _write_folder(tmp_path, names, pred, target):
    generated, real = tmp_path / "generated", tmp_path / "real"
    generated.mkdir()
    real.mkdir()
    targets = {}
    for name, p, t in zip(names, pred, target, strict=True):
        save_png(p, generated / name)
        save_png(t, real / name)
        targets[name] = real / name
    return generated, targets


def test_add_folder_equals_tensors_and_ignores_non_images(tmp_path) -> None:
    names = ["p0.png", "p1.png", "p2.png"]
    pred, target = _images(12, 3), _images(13, 3)
    generated, targets = _write_folder(tmp_path, names, pred, target)
    (generated / "metrics.json").write_text("{}")
    from_folder = PairMetrics(SIZE)
    from_folder.add_folder(generated, targets, batch_size=2, progress=False)
    from_tensors = PairMetrics(SIZE)
    from_tensors.add(names, pred, target)
    assert from_folder.per_pair() == from_tensors.per_pair()


def test_folder_with_missing_extra_or_resized_images_is_refused(tmp_path) -> None:
    names = ["p0.png", "p1.png", "p2.png"]
    generated, targets = _write_folder(tmp_path, names, _images(14, 3), _images(15, 3))
    (generated / "p1.png").unlink()
    with pytest.raises(InputError, match=r"1 of 3 expected images missing \(first: p1\.png\)"):
        PairMetrics(SIZE).add_folder(generated, targets, progress=False)
    save_png(_images(16, 1)[0], generated / "p1.png")
    save_png(_images(16, 1)[0], generated / "stray.png")
    with pytest.raises(InputError, match=r"1 images not in the test list \(first: stray\.png\)"):
        match_generated_folder(generated, targets)
    (generated / "stray.png").unlink()
    save_png(_images(17, 1, (32, 28))[0], generated / "p2.png")
    with pytest.raises(InputError, match=r"p2\.png is 32x28, expected the evaluation size 64x56"):
        PairMetrics(SIZE).add_folder(generated, targets, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        match_generated_folder(tmp_path / "nowhere", targets)
    with pytest.raises(InputError, match="no figure mask for 1 of 3 pairs"):
        masks = {n: np.ones(SIZE, dtype=bool) for n in names[:2]}
        PairMetrics(SIZE).add_folder(generated, targets, masks=masks, progress=False)


def test_small_images_score_without_the_51_window_ssim(tmp_path, caplog) -> None:
    size = (64, 44)  # the synthetic set's default size: the 51x51 window does not fit
    pred, target = _images(18, 2, size), _images(19, 2, size)
    with caplog.at_level("WARNING", logger="xmdpt.evaluation.metrics"):
        scorer = PairMetrics(size)
    assert "SSIM (51x51 window) is not defined on 64x44 images" in caplog.text
    masks = torch.zeros(2, *size, dtype=torch.bool)
    masks[:, 8:40, 10:30] = True
    scorer.add(["a", "b"], pred, target, masks)
    assert set(scorer.means()) == {"ssim_256", "psnr", "l1", "color_de", "color_hist"}
    with pytest.raises(InputError, match="window does not fit 64x44 images"):
        PairMetrics(size, pair_metrics=["ssim", "l1"])
    with pytest.raises(InputError, match="unknown pair metrics"):
        PairMetrics(SIZE, pair_metrics=["fid"])
    with pytest.raises(InputError, match="window needs images of at least that size"):
        ssim(pred[0], target[0])
    assert PairMetrics(SIZE, pair_metrics=["l1"]).pair_metrics == ("l1",)


def test_load_mask(tmp_path) -> None:
    from PIL import Image

    mask = np.zeros((16, 12), dtype=np.uint8)
    mask[4:10, 3:8] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    loaded = load_mask(tmp_path / "m.png", (16, 12))
    assert loaded.dtype == np.bool_ and loaded.sum() == 30
    with pytest.raises(InputError, match=r"m\.png is 16x12, expected 64x44"):
        load_mask(tmp_path / "m.png", (64, 44))
