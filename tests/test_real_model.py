"""A real model on a real photo, offline: stand-ins with the real shapes where they matter (DINOv2 widths 768 and
1536 with 257 tokens, an SD-VAE-like AutoencoderKL with 8x downsampling, a public-format checkpoint for 256x256
images) go through `xmdpt convert` and `xmdpt generate --model`, as the README's "Use a real model" says."""

import numpy as np
import pytest
import torch
from conftest import randomize
from PIL import Image
from public_reference import PublicXMDPT

from xmdpt.cli import main
from xmdpt.default_model import ENV_VAR
from xmdpt.settings import native_bf16


def dinov2(folder, width, heads):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=width, num_hidden_layers=1, num_attention_heads=heads, mlp_ratio=1, image_size=224, patch_size=14
    )
    Dinov2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def real_shapes(tiny_hub, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    checkpoint = root / "ema_0.9999_300000.pt"
    public = PublicXMDPT(
        input_size=32, D=64, depth=2, heads=2, pose_dim=768, pose_tokens=257, img_dim=1536, img_tokens=257
    )
    torch.save(randomize(public, std=0.02, seed=3).state_dict(), checkpoint)
    import skimage.data

    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.png")  # a real photograph of a person
    return dict(
        checkpoint=checkpoint,
        photo=root / "astronaut.png",
        vae=tiny_hub / "vae",
        pose=dinov2(root / "dinov2-b", 768, 12),
        reference=dinov2(root / "dinov2-g", 1536, 24),
    )


def test_convert_then_generate_on_a_real_photo(real_shapes, tmp_path, monkeypatch, capsys):
    s = real_shapes
    out = tmp_path / "xmdpt-s"
    main(["convert", str(s["checkpoint"]), str(out), "--vae", str(s["vae"]), "--pose-encoder", str(s["pose"]),
          "--reference-encoder", str(s["reference"])])  # fmt: skip
    assert "a pipeline for 256x256 images" in capsys.readouterr().out
    from xmdpt import load_pipeline

    pipe = load_pipeline(out, "cpu")
    settings = pipe.sampling_settings()  # the published ones
    assert (settings.sampler, settings.num_inference_steps, settings.guidance_scale) == ("ddim-public", 50, 2.0)
    assert settings.guidance_interval is None and pipe.image_size == (256, 256)
    assert (pipe.pose_encoder.feature_dim, pipe.reference_encoder.feature_dim) == (768, 1536)
    # From another folder, with a shipped pose by name: the README's command as written.
    monkeypatch.chdir(tmp_path)
    main(["generate", "--model", str(out), "--reference", str(s["photo"]), "--pose", "pose-02-front",
          "--out", "out.png", "--steps", "2", "--device", "cpu"])  # fmt: skip
    assert "out.png (256x256 pixels)" in capsys.readouterr().out
    image = np.asarray(Image.open(tmp_path / "out.png"))
    assert image.shape == (256, 256, 3) and image.std() > 0
    # The fast defaults instead of the published ones: one option at conversion.
    main(["convert", str(s["checkpoint"]), str(tmp_path / "fast"), "--vae", str(s["vae"]), "--pose-encoder",
          str(s["pose"]), "--reference-encoder", str(s["reference"]), "--sampling", "fast"])  # fmt: skip
    fast = load_pipeline(tmp_path / "fast", "cpu").sampling_settings()
    assert (fast.sampler, fast.num_inference_steps, fast.guidance_interval, fast.cache) == (
        "dpmsolver++",
        20,
        (200.0, 800.0),
        "fora:3",
    )
    assert settings.precision == fast.precision == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")


def test_a_missing_component_is_one_line_naming_it_and_its_option(real_shapes, tmp_path, capfd):
    s = real_shapes
    base = ["convert", str(s["checkpoint"]), str(tmp_path / "out")]
    for option, what in (("--vae", "VAE"), ("--pose-encoder", "pose encoder"), ("--reference-encoder", "reference")):
        given = {"--vae": s["vae"], "--pose-encoder": s["pose"], "--reference-encoder": s["reference"]}
        given[option] = "someone/not-cached"
        args = [*base, *(a for k, v in given.items() for a in (k, str(v)))]
        with pytest.raises(SystemExit) as done:
            main(args)
        err = capfd.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: {what}") and "someone/not-cached" in err[0] and option in err[0]
    # Encoders that do not fit the checkpoint (the tiny DINOv2 has width 32) are one line too.
    with pytest.raises(SystemExit):
        main([*base, "--vae", str(s["vae"]), "--pose-encoder", str(s["vae"].parent / "dinov2"),
              "--reference-encoder", str(s["reference"])])  # fmt: skip
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expects a pose encoder of width 768 with 257 tokens" in err[0], err


def test_the_embedded_model_says_what_it_is(monkeypatch, tmp_path, capfd):
    """Used on the user's own images, the embedded default says it knows only synthetic figures, and the output
    size is stated where the image is written."""
    import skimage.data

    monkeypatch.delenv(ENV_VAR, raising=False)
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "photo.png")
    main(["generate", "--reference", str(tmp_path / "photo.png"), "--pose", "pose-01-front",
          "--out", str(tmp_path / "o.png"), "--steps", "1", "--device", "cpu"])  # fmt: skip
    captured = capfd.readouterr()
    assert "trained only on synthetic 64x48 figures" in captured.err and "--model" in captured.err
    assert "(48x64 pixels)" in captured.out


def test_example_poses_by_name_from_python():
    from xmdpt import example_pose, example_pose_names
    from xmdpt.errors import InputError

    assert "pose-02-front" in example_pose_names() and len(example_pose_names()) == 8
    pose = example_pose("pose-02-front")
    assert pose.present.sum() >= 10
    with pytest.raises(InputError, match="no such example pose"):
        example_pose("pose-99")
