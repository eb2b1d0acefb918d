"""`prepare-deepfashion`: In-shop paths from flat names, resizing, resuming, and reporting missing images."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmdpt.cli import main
from xmdpt.data.names import flat_to_inshop
from xmdpt.data.prepare import prepare_deepfashion, split_names
from xmdpt.errors import InputError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "deepfashion"
if not SHARED.is_dir():
    SHARED = Path(__file__).resolve().parents[1] / "shared" / "data" / "deepfashion"


@pytest.fixture
def inshop(tmp_path):
    """Five real test pairs, their high-res sources (750x1101 gradients) in the In-shop folder tree."""
    if not (SHARED / "fasion-resize-pairs-test.csv").is_file():
        pytest.skip(f"shared DeepFashion split files not found at {SHARED}")
    splits = tmp_path / "splits"
    splits.mkdir()
    lines = (SHARED / "fasion-resize-pairs-test.csv").read_text().splitlines()[:6]
    (splits / "fasion-resize-pairs-test.csv").write_text("\n".join(lines) + "\n")
    names = sorted({n for line in lines[1:] for n in line.split(",")})
    source = tmp_path / "img_highres"
    ramp = np.linspace(0, 255, 750, dtype=np.uint8)
    for i, name in enumerate(names):
        path = source / flat_to_inshop(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([np.tile(ramp, (1101, 1))] * 2 + [np.full((1101, 750), i, np.uint8)], -1)).save(path)
    return source, splits, names


def test_prepare_writes_resized_flat_named_images_and_resumes(inshop, tmp_path):
    source, splits, names = inshop
    out = tmp_path / "out"
    report = prepare_deepfashion(source, splits, out, sizes=((256, 176), (512, 352)), progress=False)
    assert report.written == 2 * len(names) and not report.missing
    for name in names:
        small, big = Image.open(out / "test" / name), Image.open(out / "test_512x352" / name)
        assert small.size == (176, 256) and big.size == (352, 512) and small.format == "JPEG"
    assert (out / "fasion-resize-pairs-test.csv").read_text() == (splits / "fasion-resize-pairs-test.csv").read_text()
    (out / "test" / names[0]).unlink()  # an interrupted run: one image short
    again = prepare_deepfashion(source, splits, out, sizes=((256, 176), (512, 352)), progress=False)
    assert again.written == 1 and again.skipped_existing == 2 * len(names) - 1


def test_missing_sources_are_listed_and_fail_the_cli(inshop, tmp_path, capsys):
    source, splits, names = inshop
    (source / flat_to_inshop(names[2])).unlink()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["data", "prepare-deepfashion", str(source), str(out), "--splits", str(splits)])
    assert exc.value.code == 2
    err = [
        line for line in capsys.readouterr().err.splitlines() if line.strip() and "resize" not in line
    ]  # no progress bar
    assert (
        len(err) == 1
        and err[0].startswith("error: ")
        and "1 images named in the split files are missing" in err[0]
        and names[2] in err[0]
    )
    assert names[2] in (out / "missing-images.txt").read_text()
    report = prepare_deepfashion(source, splits, out, progress=False, strict=False)
    assert len(report.missing) == 1 and report.skipped_existing == len(names) - 1


def test_square_inshop_images_lose_their_side_bands(inshop, tmp_path):
    source, splits, names = inshop
    for name in names:  # the 256x256 In-shop `img` set: white bands 40 px wide either side of the person
        square = np.full((256, 256, 3), 255, np.uint8)
        square[:, 40:216] = 0
        Image.fromarray(square).save(source / flat_to_inshop(name))
    prepare_deepfashion(source, splits, tmp_path / "out", progress=False)
    image = np.asarray(Image.open(tmp_path / "out" / "test" / names[0]))
    assert image.shape == (256, 176, 3) and image.max() < 40


def test_split_files_are_required_and_checked(tmp_path):
    with pytest.raises(InputError, match="no split files found"):
        split_names(tmp_path)
    (tmp_path / "fasion-resize-pairs-test.csv").write_text("from,to\n")  # a header and no pairs
    with pytest.raises(InputError, match=r"the split files name no images \(fasion-resize-pairs-test.csv\)"):
        split_names(tmp_path)
    (tmp_path / "fasion-resize-pairs-test.csv").unlink()
    (tmp_path / "fasion-resize-pairs-train.csv").write_text("from,to\na.jpg,b.jpg\nonly-one-name.jpg\n")
    with pytest.raises(InputError, match=r"fasion-resize-pairs-train.csv:3: expected 'from,to'"):
        split_names(tmp_path)
