"""FID: Frechet distance against closed forms, parity with torchmetrics, Inception input handling, stats files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchmetrics.image.fid import FrechetInceptionDistance

from xmdpt.errors import InputError
from xmdpt.evaluation import fid as fid_module
from xmdpt.evaluation.fid import (
    FeatureAccumulator,
    FeatureStats,
    InceptionV3Features,
    ModuleFeatureExtractor,
    StatsKey,
    TFInceptionFeatures,
    default_stats_path,
    fid_from_stats,
    fingerprint_names,
    frechet_distance,
    load_stats,
    real_set_stats,
    save_stats,
)
from xmdpt.evaluation.metrics import PairMetrics
from xmdpt.evaluation.protocol import save_png

SIZE = (56, 52)  # SSIM's 51x51 window needs at least 51 pixels a side


def _tiny_extractor(seed: int = 0) -> ModuleFeatureExtractor:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 12),
    )
    with torch.no_grad():
        net[-1].weight.mul_(30.0)  # features of order 1-10, so FID values are far from 0
    return ModuleFeatureExtractor(net, name=f"tiny-seed{seed}", dim=12)


def _images(seed: int, n: int, size: tuple[int, int] = SIZE, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, 4, 3, generator=generator), size=size, mode="bilinear")
    noisy = base + shift + 0.1 * torch.randn(n, 3, *size, generator=generator)
    return (noisy.clamp(0, 1) * 255).to(torch.uint8)


def _key(**changes) -> StatsKey:
    fields = dict(set_name="deepfashion-train", set_fingerprint="n=3:abc", image_size=(256, 176), feature="tiny@1")
    return StatsKey(**{**fields, **changes})


# ----------------------------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_closed_form_commuting_covariances() -> None:
    rng = np.random.default_rng(0)
    dim = 6
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # shared eigenvectors: sigma1 sigma2 commute
    d1, d2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    sigma1, sigma2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)
    diagonal = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(diagonal, rel=1e-10)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_general_matches_eigenvalue_form() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 5)) * 1.5 + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    m1, m2 = a.mean(0), b.mean(0)
    eig = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * eig
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(InputError, match="different dimensions"):
        frechet_distance(m1, s1, m2[:4], s2[:4, :4])


def test_accumulator_equals_numpy_cov() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(23, 7)) * 3 + 5
    accumulator = FeatureAccumulator(7)
    for chunk in np.array_split(features, 4):
        accumulator.update(torch.from_numpy(chunk).float())
    stats = accumulator.stats(_key())
    as_float32 = features.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats.mu, as_float32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(as_float32, rowvar=False), rtol=1e-9, atol=1e-10)
    assert stats.count == 23
    with pytest.raises(InputError, match="at least 2 images"):
        FeatureAccumulator(7).stats(_key())


# ------------------------------------------------------------------------------------------- torchmetrics parity


def test_fid_equals_torchmetrics_with_same_feature_network(tmp_path) -> None:
    extractor = _tiny_extractor()
    real, fake = _images(0, 40), _images(1, 30, shift=0.3)
    # Ours: real-set statistics from files (protocol reader, cached), generated features through PairMetrics.
    real_dir = tmp_path / "train"
    real_dir.mkdir()
    paths = []
    for i, image in enumerate(real):
        paths.append(real_dir / f"r{i:03d}.png")
        save_png(image, paths[-1])
    real_stats = real_set_stats(paths, set_name="toy", image_size=SIZE, extractor=extractor, progress=False)
    scorer = PairMetrics(SIZE, fid_extractors={"fid": extractor})
    scorer.add([f"g{i}" for i in range(30)], fake, _images(2, 30))
    ours = scorer.fid({"fid": real_stats})["fid"]

    reference = FrechetInceptionDistance(feature=_tiny_extractor(), normalize=False)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert ours == pytest.approx(float(reference.compute()), rel=1e-5)
    assert ours > 0.05  # the sets really differ
    # Another seed of the feature network gives another number: the parameter is really used.
    other = PairMetrics(SIZE, fid_extractors={"fid": _tiny_extractor(1)})
    other.add([f"g{i}" for i in range(30)], fake, _images(2, 30))
    other_real = real_set_stats(paths, set_name="toy", image_size=SIZE, extractor=_tiny_extractor(1), progress=False)
    assert abs(other.fid({"fid": other_real})["fid"] - ours) > 1e-4


def test_fid_needs_statistics_of_the_same_feature_network_and_size() -> None:
    scorer = PairMetrics(SIZE, fid_extractors={"fid": _tiny_extractor()})
    scorer.add(["a", "b", "c"], _images(3, 3), _images(4, 3))
    generated = scorer.generated_stats("fid")
    assert generated.key.feature.startswith("tiny-seed0@")
    foreign = FeatureStats(generated.mu, generated.sigma, 3, _key(feature="other@1", image_size=SIZE))
    with pytest.raises(InputError, match="feature network 'other@1' for the real set"):
        fid_from_stats(foreign, generated)
    with pytest.raises(InputError, match=r"no real-set FID statistics for \['fid'\]"):
        scorer.fid({})


# ---------------------------------------------------------------------------------------------- statistics files


def test_stats_file_round_trip_and_mismatches_are_named(tmp_path) -> None:
    rng = np.random.default_rng(3)
    stats = FeatureStats(rng.normal(size=4), np.eye(4) * 2.0, 11, _key())
    path = default_stats_path(tmp_path, stats.key)
    assert path.name == "fid-stats_deepfashion-train_256x176_tiny@1.safetensors"
    save_stats(stats, path)
    loaded = load_stats(path, expected=_key())
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.mu.dtype == np.float64 and loaded.count == 11 and loaded.key == stats.key
    with pytest.raises(InputError, match="image size '256x176' in the file, '512x352' expected"):
        load_stats(path, expected=_key(image_size=(512, 352)))
    with pytest.raises(InputError, match="set 'deepfashion-train' in the file, 'market-train' expected"):
        load_stats(path, expected=_key(set_name="market-train"))
    with pytest.raises(InputError, match="set file list 'n=3:abc' in the file, 'n=4:abd' expected"):
        load_stats(path, expected=_key(set_fingerprint="n=4:abd"))
    with pytest.raises(InputError, match="feature network 'tiny@1' in the file, 'tf@2' expected"):
        load_stats(path, expected=_key(feature="tf@2"))
    with pytest.raises(InputError, match="does not exist"):
        load_stats(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot be read"):
        load_stats(tmp_path / "junk.safetensors")


def test_real_set_stats_are_computed_once_and_checked(tmp_path, monkeypatch) -> None:
    extractor = _tiny_extractor()
    paths = []
    for i, image in enumerate(_images(5, 6, size=(40, 30))):
        paths.append(tmp_path / f"{i}.png")
        save_png(image, paths[-1])
    cache = tmp_path / "stats.safetensors"
    first = real_set_stats(
        paths, set_name="toy", image_size=SIZE, extractor=extractor, cache_path=cache, progress=False
    )
    assert cache.is_file() and first.count == 6

    def no_reading(*args, **kwargs):
        raise AssertionError("cached statistics must not read images again")

    monkeypatch.setattr(fid_module, "load_real_image", no_reading)
    again = real_set_stats(
        paths, set_name="toy", image_size=SIZE, extractor=extractor, cache_path=cache, progress=False
    )
    np.testing.assert_array_equal(again.sigma, first.sigma)
    with pytest.raises(InputError, match="image size '56x52' in the file, '64x48' expected"):
        real_set_stats(paths, set_name="toy", image_size=(64, 48), extractor=extractor, cache_path=cache)
    with pytest.raises(InputError, match="set file list"):
        real_set_stats(paths[:5], set_name="toy", image_size=SIZE, extractor=extractor, cache_path=cache)
    with pytest.raises(InputError, match="feature network 'tiny-seed0@.*' in the file, 'tiny-seed1@"):
        real_set_stats(paths, set_name="toy", image_size=SIZE, extractor=_tiny_extractor(1), cache_path=cache)


def test_real_set_stats_with_workers_and_a_broken_file(tmp_path) -> None:
    paths = []
    for i, image in enumerate(_images(8, 4, size=(40, 30))):
        paths.append(tmp_path / f"{i}.png")
        save_png(image, paths[-1])
    extractor = _tiny_extractor()
    serial = real_set_stats(paths, set_name="toy", image_size=SIZE, extractor=extractor, batch_size=3, progress=False)
    parallel = real_set_stats(
        paths, set_name="toy", image_size=SIZE, extractor=extractor, batch_size=3, num_workers=1, progress=False
    )
    np.testing.assert_allclose(parallel.sigma, serial.sigma, rtol=1e-12)
    paths[2].write_bytes(b"broken")
    with pytest.raises(InputError, match=r"^image .*2\.png cannot be read"):
        real_set_stats(paths, set_name="toy", image_size=SIZE, extractor=extractor, num_workers=1, progress=False)


def test_fingerprint_is_order_independent() -> None:
    assert fingerprint_names(["b", "a"]) == fingerprint_names(["a", "b"])
    assert fingerprint_names(["a", "b"]) != fingerprint_names(["a", "c"])
    assert fingerprint_names(["a", "b"]).startswith("n=2:")


# -------------------------------------------------------------------------------------------- Inception networks


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    """Random weights with torchvision's ImageNet Inception-v3 layout (constructed with weights=None).

    Batch-norm statistics are set from one batch of the protocol's input range, so the pool features are O(1-10)
    rather than vanishing (a parity check on near-zero features could pass by accident).
    """
    torch.manual_seed(0)
    net = tvm.inception_v3(weights=None, aux_logits=True, init_weights=False)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 1.0
    aux, net.AuxLogits = net.AuxLogits, None  # the aux head needs 299 px inputs in train mode; it is unused
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 160, 160) * 0.46 - 0.03)
    net.AuxLogits = aux
    return net.eval().state_dict()


def test_inception_features_equal_torchvision_transform_input_on_unit_images(inception_state, tmp_path) -> None:
    path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(inception_state, path)
    ours = InceptionV3Features(weights=path)
    images = _images(6, 2, size=(64, 44))
    features = ours(images)
    assert features.shape == (2, 2048) and features.abs().mean() > 0.1

    # Reference: torchvision's own Inception3 with transform_input=True, fed the [0, 1] image resized bilinearly to
    # 299 (GFLA/PIDM/CFLD), features read at the average pool.
    reference = tvm.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True).eval()
    reference.load_state_dict(inception_state)
    pooled = {}
    reference.avgpool.register_forward_hook(lambda module, args, out: pooled.setdefault("x", out))
    with torch.no_grad():
        reference(F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear"))
    torch.testing.assert_close(features, pooled["x"].flatten(1), rtol=1e-4, atol=1e-5)
    # The textbook Normalize(mean, std) before the network is another input: the lineage's map is what we use.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pooled.clear()
    with torch.no_grad():
        reference((F.interpolate(images[:1].float() / 255, size=(299, 299), mode="bilinear") - mean) / std)
    assert (pooled["x"].flatten(1) - features[:1]).abs().max() > 1e-3
    assert ours.identity.startswith("torchvision-inception-v3-imagenet1k-v1-pool@")


def test_inception_weights_errors_name_the_file(inception_state, tmp_path, monkeypatch, capfd, caplog) -> None:
    with pytest.raises(InputError, match="does not exist"):
        InceptionV3Features(weights=tmp_path / "missing.pth")
    broken = {k: v for k, v in inception_state.items() if not k.startswith("Mixed_7c")}
    with pytest.raises(InputError, match="missing keys"):
        InceptionV3Features(weights=broken)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))

    def offline(url, *args, **kwargs):
        raise OSError(f"<urlopen error [Errno -3] Temporary failure in name resolution> for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    capfd.readouterr()
    with caplog.at_level("DEBUG", logger="xmdpt"):
        with pytest.raises(InputError, match="inception_v3_google-0cc3c7bd.pth"):
            InceptionV3Features(weights=None)
    # Neither torch.hub's "Downloading: ..." line nor a log line of ours before the CLI's one-line error.
    assert capfd.readouterr() == ("", "") and not caplog.records


def test_tf_inception_features_from_a_local_file(tmp_path, monkeypatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    # Random weights with torch-fidelity's (= pytorch-fid's pt_inception) layout, built without loading anything.
    with monkeypatch.context() as patch:
        patch.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        random_net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_net.state_dict(), path)
    ours = TFInceptionFeatures(weights=path)
    images = _images(7, 2, size=(64, 44))
    features = ours(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    torch.testing.assert_close(features, random_net(images)[0])
    assert ours.identity.startswith("tf-inception-2015-12-05-pool@")
    with pytest.raises(InputError, match="does not exist"):
        TFInceptionFeatures(weights=tmp_path / "nope.pth")
