"""Every bad input of issue 3 item 7: one clear InputError naming the file (and line); the CLI exits 2 with one
line; a training data set skips, counts and reports, or fails fast when asked."""

import io
import json
import logging
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from xmdpt.cli import main
from xmdpt.data import Augment, deepfashion_csv, load_image
from xmdpt.data.synthetic import SynthConfig, generate
from xmdpt.errors import InputError
from xmdpt.pose.keypoints import Pose


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    generate(root, SynthConfig(num_identities=6, poses_per_identity=2, seed=11, test_fraction=0.5), progress=False)
    return root


@pytest.fixture
def synth(pristine, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(pristine, root)
    return root


def first_test_image(root):
    return sorted((root / "test").iterdir())[0]


def cli_error(args, capsys) -> str:
    """Run the CLI, expect exit code 2 and exactly one error line on stderr; return it."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a few bytes of data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


# ---- images -----------------------------------------------------------------------------------------------------
def test_corrupt_truncated_and_bomb_images_name_the_file(tmp_path, synth, capsys):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a JPEG at all" * 10)
    with pytest.raises(InputError, match=r"corrupt.jpg: not a readable image"):
        load_image(corrupt)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match=r"truncated.jpg: corrupt or truncated image"):
        load_image(truncated)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(10_000, 10_000))  # 100 megapixels in 120 bytes: refused from the header
    with pytest.raises(InputError, match=r"bomb.png: image is 10000x10000 = 100,000,000 pixels, over the limit"):
        load_image(bomb)
    bomb.write_bytes(bomb_png(100_000, 100_000))
    with pytest.raises(InputError, match=r"bomb.png: refused as a decompression bomb"):
        load_image(bomb)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)
    with pytest.raises(InputError, match=r"small.png: image is 40x30 = 1,200 pixels, over the limit of 1,000"):
        load_image(small, max_pixels=1000)
    with pytest.raises(InputError, match="image file not found"):
        load_image(tmp_path / "nowhere.png")
    # and through the CLI: a data set whose image is corrupt
    image = first_test_image(synth)
    shutil.copyfile(truncated, image)
    assert image.name in cli_error(["data", "check", str(synth)], capsys)


def test_non_rgb_modes_become_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (4, 3), 90).save(grey)
    assert load_image(grey).mode == "RGB" and load_image(grey).getpixel((0, 0)) == (90, 90, 90)
    rgba = Image.new("RGBA", (4, 3), (200, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent -> white backdrop
    rgba.save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 0)) == (200, 0, 0)
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red = load_image(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    sixteen = np.full((3, 4), 65535, np.uint16)
    sixteen[0, 0] = 32896  # mid-grey in 16 bits
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    deep = load_image(tmp_path / "sixteen.png")
    assert deep.getpixel((1, 0)) == (255, 255, 255) and deep.getpixel((0, 0)) == (128, 128, 128)
    Image.new("P", (4, 3), 3).save(tmp_path / "palette.gif")
    assert load_image(tmp_path / "palette.gif").mode == "RGB"


def test_exif_rotation_is_applied(tmp_path):
    stored = np.zeros((10, 20, 3), np.uint8)  # stored landscape, left half red
    stored[:, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    shown = load_image(tmp_path / "phone.jpg")
    assert shown.size == (10, 20)  # portrait, as the phone showed it
    top, bottom = shown.getpixel((5, 2)), shown.getpixel((5, 17))
    assert top[0] > 200 and bottom[0] < 60  # the red half is now on top


# ---- keypoints and CSV lines ------------------------------------------------------------------------------------
def rewrite_annotation(root, transform) -> int:
    """Apply `transform(ys, xs) -> (ys, xs) or raw line` to the first test annotation; return its line number."""
    path = root / "fasion-resize-annotation-test.csv"
    lines = path.read_text().splitlines()
    name, ys, xs = lines[1].split(":")
    out = transform(json.loads(ys), json.loads(xs))
    lines[1] = out if isinstance(out, str) else f"{name}:{json.dumps(out[0])}:{json.dumps(out[1])}"
    path.write_text("\n".join(lines) + "\n")
    return 2


BAD_KEYPOINTS = {
    "wrong length": (lambda ys, xs: (ys[:17], xs), "expected 18 y values, got 17"),
    "NaN": (lambda ys, xs: (ys[:3] + [float("nan")] + ys[4:], xs), "contain NaN"),
    "out of frame": (lambda ys, xs: (ys, xs[:1] + [300] + xs[2:]), "joint 1 (neck) at x=300"),
    "all missing": (lambda ys, xs: ([-1] * 18, [-1] * 18), "every joint is missing"),
    "malformed line": (lambda ys, xs: "just-a-name-without-keypoints", "expected 'name:[18 ys]:[18 xs]'"),
}


@pytest.mark.parametrize("case", list(BAD_KEYPOINTS))
def test_bad_keypoints_fail_the_cli_with_file_and_line(synth, capsys, case):
    transform, message = BAD_KEYPOINTS[case]
    line = rewrite_annotation(synth, transform)
    error = cli_error(["data", "check", str(synth)], capsys)
    assert f"fasion-resize-annotation-test.csv:{line}: " in error and message in error


@pytest.mark.parametrize("case", ["malformed pair line", "missing file"])
def test_bad_pairs_fail_the_cli(synth, capsys, case):
    path = synth / "fasion-resize-pairs-test.csv"
    lines = path.read_text().splitlines()
    if case == "malformed pair line":
        lines[2] = "only-one-name.png"
        expected = "fasion-resize-pairs-test.csv:3: expected 'from,to'"
    else:
        missing = first_test_image(synth)
        missing.unlink()
        expected = f"{missing}: image file not found"
    path.write_text("\n".join(lines) + "\n")
    assert expected in cli_error(["data", "check", str(synth)], capsys)


def test_bad_json_keypoints(tmp_path):
    pose = Pose(np.full((18, 2), 10.0), 64, 44)
    obj = pose.to_json()
    for edit, message in (
        (lambda o: o.update(keypoints=o["keypoints"][:5]), "must list 18 joints, got 5"),
        (lambda o: o["keypoints"].__setitem__(3, [float("nan"), 1]), "joint 3 (right_elbow) is NaN"),
        (lambda o: o["keypoints"].__setitem__(3, [1, 99]), "outside the 64x44 frame"),
        (lambda o: o.update(keypoints=[None] * 18), "every joint is missing"),
        (lambda o: o.pop("height"), "needs integer 'height' and 'width'"),
    ):
        bad = json.loads(json.dumps(obj))
        edit(bad)
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(InputError, match=rf"bad.json: .*{message.replace('(', '.').replace(')', '.')}"):
            Pose.load_json(path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="broken.json: not valid JSON"):
        Pose.load_json(tmp_path / "broken.json")


def test_pidm_pose_file_errors(tmp_path):
    path = tmp_path / "pose.txt"
    path.write_text("1 2\n" * 17)
    with pytest.raises(InputError, match="pose.txt: expected 18 rows"):
        Pose.from_pidm_file(path)
    path.write_text("1 2\n" * 17 + "3 x\n")
    with pytest.raises(InputError, match="pose.txt:18: not numbers"):
        Pose.from_pidm_file(path)
    path.write_text("-1 -1\n" * 18)
    with pytest.raises(InputError, match="every joint is missing"):
        Pose.from_pidm_file(path)


# ---- training: skip, count, report; or fail fast -----------------------------------------------------------------
def test_training_skips_counts_and_reports_bad_samples(synth, caplog):
    rewrite_annotation(synth, lambda ys, xs: ([-1] * 18, [-1] * 18))
    lines = (synth / "fasion-resize-pairs-test.csv").read_text().splitlines()
    (synth / "fasion-resize-pairs-test.csv").write_text("\n".join([*lines, "broken line"]) + "\n")
    with caplog.at_level(logging.WARNING):
        data = deepfashion_csv(synth, "test", image_size=(64, 44), train=True, augment=Augment.off())
        assert data.skipped == 1  # the malformed pair line
        items = [data[i] for i in range(len(data))]
    bad_name = (synth / "fasion-resize-annotation-test.csv").read_text().splitlines()[1].split(":")[0]
    assert all(bad_name not in (item["reference_name"], item["target_name"]) for item in items)
    # and the two pairs (lines 2 and 3) that use the image without keypoints: index 0 skips both lines, index 1 one
    assert data.skipped == 1 + 3
    assert "skipped bad sample (4 so far)" in caplog.text and "every joint is missing" in caplog.text
    assert len(data.validate()) == 1
    strict = deepfashion_csv(synth, "test", image_size=(64, 44), train=True, fail_fast=False)
    strict.fail_fast = True
    with pytest.raises(InputError, match="every joint is missing"):
        [strict[i] for i in range(len(strict))]
    with pytest.raises(InputError, match="fasion-resize-pairs-test.csv:8: expected 'from,to'"):
        deepfashion_csv(synth, "test", fail_fast=True)


@pytest.mark.parametrize("lists", ["[" * 50_000 + "]" * 50_000, "[" + "9" * 5000 + "]"])
def test_keypoint_lists_that_break_the_json_parser_are_one_line(synth, capsys, lists):
    """Nesting deeper than the parser's recursion, or an integer of thousands of digits, is that line's error."""
    path = synth / "fasion-resize-annotation-test.csv"
    lines = path.read_text().splitlines()
    name = lines[1].split(":")[0]
    lines[1] = f"{name}:{lists}:{lists}"
    path.write_text("\n".join(lines) + "\n")
    error = cli_error(["data", "check", str(synth)], capsys)
    assert "fasion-resize-annotation-test.csv:2: keypoint lists are not valid JSON" in error


def test_an_annotation_field_beyond_the_csv_limit_is_one_line(synth, capsys):
    path = synth / "fasion-resize-annotation-test.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].split(":")[0] + ":" + '"' + "1" * 200_000 + '"' + ":[]"
    path.write_text("\n".join(lines) + "\n")
    error = cli_error(["data", "check", str(synth)], capsys)
    assert "fasion-resize-annotation-test.csv:2: not a valid CSV line" in error
