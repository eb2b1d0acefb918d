"""Protocol preprocessing: resize-then-quantise order, filters and truncation (reference section 10, CFLD's script)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from xmdpt.errors import InputError
from xmdpt.evaluation.protocol import (
    load_generated_image,
    load_real_image,
    model_output_to_uint8,
    parse_size,
    save_png,
    unit_to_uint8,
)


def _model_output(seed: int = 0, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """A smooth-plus-noise batch in [-1, 1], as a generator would emit (slightly out of range, like a VAE decode)."""
    generator = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(2, 3, 8, 8, generator=generator), size=size, mode="bilinear")
    return (base * 2.2 - 1.1) + 0.05 * torch.randn(2, 3, *size, generator=generator)


def _cfld_reference(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CFLD pose_transfer_test.py: x*0.5+0.5, clamp, bicubic antialias resize, *255, clamp, .to(uint8)."""
    unit = (images * 0.5 + 0.5).clamp(0, 1)
    resized = F.interpolate(unit, size, mode="bicubic", antialias=True)
    return (resized.float() * 255.0).clamp(0, 255).to(dtype=torch.uint8)


def test_model_output_matches_cfld_resize_then_quantise() -> None:
    images = _model_output()
    ours = model_output_to_uint8(images, (48, 33))
    assert ours.dtype == torch.uint8 and ours.shape == (2, 3, 48, 33)
    assert torch.equal(ours, _cfld_reference(images, (48, 33)))


def test_quantising_before_resizing_is_detectably_different() -> None:
    images = _model_output(1)
    ours = model_output_to_uint8(images, (48, 33))
    quantised_first = unit_to_uint8((images * 0.5 + 0.5).clamp(0, 1)).float() / 255.0
    wrong_order = unit_to_uint8(F.interpolate(quantised_first, (48, 33), mode="bicubic", antialias=True))
    assert (ours != wrong_order).sum() > 50


def test_filter_is_bicubic_antialiased_not_bilinear() -> None:
    images = _model_output(2)
    ours = model_output_to_uint8(images, (48, 33))
    unit = (images * 0.5 + 0.5).clamp(0, 1)
    bilinear = unit_to_uint8(F.interpolate(unit, (48, 33), mode="bilinear", antialias=True))
    no_antialias = unit_to_uint8(F.interpolate(unit, (48, 33), mode="bicubic", antialias=False))
    assert not torch.equal(ours, bilinear)
    assert not torch.equal(ours, no_antialias)


def test_quantisation_truncates_by_default_and_can_round() -> None:
    unit = torch.full((1, 3, 4, 4), (100 + 0.7) / 255.0)
    assert unit_to_uint8(unit).unique().tolist() == [100]
    assert unit_to_uint8(unit, rounding="round").unique().tolist() == [101]
    assert unit_to_uint8(torch.tensor([-0.2, 1.3])).tolist() == [0, 255]


def test_same_size_output_is_only_quantised() -> None:
    images = _model_output(3, (16, 12))
    expected = ((images * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    assert torch.equal(model_output_to_uint8(images, (16, 12)), expected)


def test_real_images_are_resized_like_cfld_pil_bicubic(tmp_path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (128, 88, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "real.jpg", quality=95)
    ours = load_real_image(tmp_path / "real.jpg", (64, 44))
    with Image.open(tmp_path / "real.jpg") as image:
        cfld = transforms.Resize((64, 44), interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)(
            image.convert("RGB")
        )
    assert torch.equal(ours, torch.from_numpy(np.array(cfld)).permute(2, 0, 1))
    bilinear = np.asarray(Image.fromarray(array).resize((44, 64), Image.BILINEAR))
    assert not np.array_equal(ours.permute(1, 2, 0).numpy(), bilinear)


def test_generated_images_round_trip_and_wrong_size_is_named(tmp_path) -> None:
    image = model_output_to_uint8(_model_output(4), (32, 22))[0]
    save_png(image, tmp_path / "a.png")
    assert torch.equal(load_generated_image(tmp_path / "a.png", (32, 22)), image)
    with pytest.raises(InputError, match=r"a\.png is 32x22, expected the evaluation size 256x176"):
        load_generated_image(tmp_path / "a.png", (256, 176))
    with pytest.raises(InputError, match="does not exist"):
        load_generated_image(tmp_path / "missing.png", (32, 22))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot be read"):
        load_generated_image(tmp_path / "broken.png", (32, 22))


def test_parse_size() -> None:
    assert parse_size("256x176") == (256, 176)
    assert parse_size((512, 352)) == (512, 352)
    with pytest.raises(InputError, match="HEIGHTxWIDTH"):
        parse_size("256")
