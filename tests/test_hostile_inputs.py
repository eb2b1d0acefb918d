"""Issue 18: hostile and broken inputs end as one `InputError` line naming the file, with bounded memory.

Images too large or too thin to be a person photo, and pose files beyond a few kB, are refused before they are
decoded or parsed; a pose file that breaks the parser, a `None`, a NaN tensor or a degenerate `Pose` in the Python API,
and a training config that cannot run (also under `--dry-run`) are bad input, not a traceback.
"""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import xmdpt.pose.extract as extract
import xmdpt.pose.keypoints as keypoints
from xmdpt.cli import main
from xmdpt.data.images import MAX_ASPECT, MAX_PIXELS, load_image
from xmdpt.errors import InputError
from xmdpt.inputs import fit_pose, prepare_inputs, reference_tensor
from xmdpt.pose.extract import fit_image
from xmdpt.pose.keypoints import MAX_POSE_FILE_BYTES, Pose
from xmdpt.training.config import load_config

SIZE = (64, 44)


def person() -> tuple[Image.Image, Pose]:
    xy = np.full((18, 2), np.nan)
    xy[0], xy[1], xy[2], xy[5] = (88, 40), (88, 80), (60, 80), (116, 80)
    return Image.new("RGB", (176, 256), (200, 180, 160)), Pose(xy, 256, 176)


def one_line_exit_2(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    return lines[0]


def pose_json(**changes) -> dict:
    obj = person()[1].to_json()
    obj.update(changes)
    return obj


# ---- item 3: images ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(20_000, 1), (1, 9_000), (900, 100)])
def test_strips_are_refused_from_the_header(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (255, 255, 255)).save(path)  # a few hundred bytes on disk
    assert path.stat().st_size < 2_000
    with pytest.raises(
        InputError, match=rf"^{re.escape(str(path))}: image is {size[0]}x{size[1]} pixels, .*within {MAX_ASPECT:g}:1"
    ):
        load_image(path)
    with pytest.raises(InputError, match=r"strip.png: image is"):
        prepare_inputs(path, person()[1], SIZE)


def test_strips_are_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "strip.png"
    Image.new("RGB", (20_000, 1)).save(path)

    def no_decoding(self, *args):
        raise AssertionError("decoded a picture that its header already refuses")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(InputError, match="pixels"):
        load_image(path)


def test_an_ordinary_photo_and_a_tall_person_still_load(tmp_path):
    for size in ((176, 256), (100, 790), (3000, 2000)):
        Image.new("RGB", size).save(tmp_path / "ok.png")
        assert load_image(tmp_path / "ok.png").size == size


def test_too_many_pixels_is_refused_under_the_named_limit(tmp_path):
    from test_data_bad_input import bomb_png

    (tmp_path / "big.png").write_bytes(bomb_png(8_000, 7_000))  # 56 MP: over 50 MP, under PIL's own 89 MP
    with pytest.raises(InputError, match=r"big.png: image is 8000x7000 = 56,000,000 pixels, over the limit of "):
        load_image(tmp_path / "big.png")
    assert MAX_PIXELS == 50_000_000


def test_in_memory_pictures_meet_the_same_limits():
    _, pose = person()
    for strip in (Image.new("RGB", (2_000, 1)), Image.new("RGB", (1, 2_000))):
        with pytest.raises(InputError, match=r"^reference image: image is .* pixels, 2,000.0:1"):
            prepare_inputs(strip, pose, SIZE)
        with pytest.raises(InputError, match=r"^driving photo: image is"):
            prepare_inputs(person()[0], strip, SIZE)


def test_padding_a_large_photo_never_builds_a_huge_canvas(monkeypatch):
    """A wide photo padded into a portrait frame: the white canvas is bounded, and the result and the keypoints'
    place in it are those of the exact (unbounded) padding to well under a pixel."""
    canvases = []
    new = Image.new

    def recording_new(mode, size, *args, **kwargs):
        canvases.append(size[0] * size[1])
        return new(mode, size, *args, **kwargs)

    def red_centre(image: np.ndarray) -> np.ndarray:
        weight = np.clip(image[..., 0] - image[..., 1], 0, None).astype(float)  # red over white: R - G
        ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
        return np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()

    height, width = 100, 600
    canvas = np.full((height, width, 3), 255, np.uint8)
    canvas[30:70, 240:300] = (255, 0, 0)  # a red marker centred on (269.5, 49.5)
    photo = Image.fromarray(canvas)
    exact = np.asarray(fit_image(photo, SIZE, "pad")).astype(int)
    monkeypatch.setattr(extract, "MAX_PAD_CANVAS", 20_000)  # the exact canvas would be 600 x 873
    monkeypatch.setattr(Image, "new", recording_new)
    bounded = np.asarray(fit_image(photo, SIZE, "pad")).astype(int)
    assert canvases and max(canvases) <= 20_000
    assert bounded.shape == exact.shape == (*SIZE, 3)
    assert np.abs(bounded - exact).mean() < 2
    np.testing.assert_allclose(red_centre(bounded), red_centre(exact), atol=0.25)
    xy = np.full((18, 2), np.nan)
    xy[0] = (269.5, 49.5)
    np.testing.assert_allclose(fit_pose(Pose(xy, height, width), SIZE, "pad").xy[0], red_centre(bounded), atol=0.5)


# ---- item 3: pose files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".txt"])
def test_large_pose_files_are_refused_before_parsing(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"big{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(pose_json(note="x" * MAX_POSE_FILE_BYTES)))
    else:
        path.write_text("10 20\n" * (MAX_POSE_FILE_BYTES // 6 + 1))

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed a file that its size already refuses")

    monkeypatch.setattr(keypoints.json, "loads", no_parsing)
    monkeypatch.setattr(Pose, "from_pidm_text", no_parsing)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: (pose|keypoint) file is over 1,000,000 bytes"):
        prepare_inputs(person()[0], path, SIZE)


def test_a_small_pose_file_still_loads(tmp_path):
    path = tmp_path / "ok.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(pose_json()).encode())  # with a Windows editor's byte-order mark
    assert Pose.load_json(path) == person()[1]


# ---- items 5 and 11: pose files that break the parser -----------------------------------------------------------
def broken_json(case: str) -> str:
    good = json.dumps(pose_json())
    return {
        "a number of 5000 digits": good.replace("[88.0, 40.0]", "[" + "1" * 5000 + ", 40]"),
        "a frame of 5000 digits": good.replace('"height": 256', '"height": ' + "9" * 5000),
        "nested 100000 deep": '{"keypoints": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "a nested joint": good.replace("[88.0, 40.0]", "[" * 900 + "1" + "]" * 900),
        "a 400-digit integer": good.replace("[88.0, 40.0]", "[" + "7" * 400 + ", 40]"),
        "a float beyond range": good.replace("[88.0, 40.0]", "[1e999, 40]"),
        "true and false": good.replace("[88.0, 40.0]", "[true, false]"),
        "numbers as strings": good.replace("[88.0, 40.0]", '["88", "40"]'),
        "a number as a string": good.replace("[88.0, 40.0]", '[88, "40"]'),
    }[case]


@pytest.mark.parametrize(
    "case, message",
    [
        ("a number of 5000 digits", "a number of 5,000 digits"),
        ("a frame of 5000 digits", "a number of 5,000 digits"),
        ("nested 100000 deep", "JSON nested too deeply"),
        ("a nested joint", "joint 0 \\(nose\\) must be \\[x, y\\] or null, got \\[\\[\\[\\[...\\]\\]\\]\\]"),
        ("a 400-digit integer", "a number of 400 digits"),
        ("a float beyond range", "joint 0 \\(nose\\) is NaN or infinite"),
        ("true and false", "joint 0 \\(nose\\) is not two numbers: \\[True, False\\]"),
        ("numbers as strings", "joint 0 \\(nose\\) is not two numbers"),
        ("a number as a string", "joint 0 \\(nose\\) is not two numbers"),
    ],
)
def test_pose_json_that_breaks_the_parser_is_one_line(tmp_path, capsys, case, message):
    path = tmp_path / "pose.json"
    path.write_text(broken_json(case))
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: {message}") as info:
        Pose.load_json(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    with pytest.raises(InputError, match=message):
        prepare_inputs(person()[0], path, SIZE)


def test_pose_objects_made_in_code_meet_the_same_checks():
    obj = pose_json()
    obj["keypoints"][0] = [10**400, 5]  # float() of it overflows
    with pytest.raises(InputError, match="joint 0 \\(nose\\) is NaN or infinite"):
        Pose.from_json(obj)
    obj["keypoints"][0] = [np.int64(3), np.float32(4.5)]  # numpy numbers are numbers
    assert Pose.from_json(obj).xy[0].tolist() == [3.0, 4.5]
    obj["height"] = 10**5000  # no repr: Python refuses to print an int of over 4300 digits
    with pytest.raises(InputError, match="needs integer 'height'"):
        Pose.from_json(obj)


@pytest.mark.parametrize(
    "values, message",
    [
        ([True] + [10] * 17, "not all numbers"),
        (["10"] * 18, "not all numbers"),
        ([10**400] + [10] * 17, "beyond any frame"),
    ],
)
def test_annotation_lists_take_numbers_only(values, message):
    with pytest.raises(InputError, match=f"line 3: the y keypoints .*{message}"):
        Pose.from_gfla(values, [10] * 18, source="line 3")


def test_pidm_text_with_huge_numbers_is_one_line(tmp_path):
    path = tmp_path / "pose.txt"
    path.write_text(("1" * 5000 + " 2\n") + "-1 -1\n" * 17)
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: keypoints contain NaN or infinity$"):
        Pose.from_pidm_file(path)
    path.write_text("x" * 100_000 + "\n" + "-1 -1\n" * 17)
    with pytest.raises(
        InputError, match=f"^{re.escape(str(path))}:1: expected two numbers 'x y', got 'x+\\.\\.\\.x+'$"
    ):
        Pose.from_pidm_file(path)


# ---- item 11: unreadable files ----------------------------------------------------------------------------------
def test_a_file_without_read_permission_is_reported_as_such(tmp_path, monkeypatch):
    # Tests run as root, where chmod 000 does not stop reads: the refusal is simulated where the file is opened.
    photo = tmp_path / "locked.png"
    person()[0].save(photo)
    pose = tmp_path / "locked.json"
    person()[1].save_json(pose)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(InputError, match=f"^{re.escape(str(photo))}: cannot read the image file: permission denied$"):
        load_image(photo)
    with pytest.raises(InputError, match="permission denied"):
        prepare_inputs(photo, person()[1], SIZE)
    monkeypatch.setattr(keypoints, "open", denied, raising=False)
    with pytest.raises(
        InputError, match=f"^{re.escape(str(pose))}: cannot read the keypoint file: permission denied$"
    ):
        Pose.load_json(pose)
    with pytest.raises(InputError, match="cannot read the pose file: permission denied"):
        Pose.from_pidm_file(tmp_path / "locked.txt")


# ---- item 6: the Python API -------------------------------------------------------------------------------------
def nan_pose() -> Pose:
    return Pose(np.full((18, 2), np.nan), 256, 176)


def inf_pose() -> Pose:
    xy = person()[1].xy.copy()
    xy[0] = (np.inf, 3)
    return Pose(xy, 256, 176)


def far_pose() -> Pose:
    xy = person()[1].xy.copy()
    xy[0] = (1e15, 3)
    return Pose(xy, 256, 176)


@pytest.mark.parametrize(
    "reference, pose, message",
    [
        (None, "pose", "no reference image given"),
        ([None], "pose", "reference_image: got None"),
        (3, "pose", "reference_image: got int"),
        ([], "pose", "reference_image: an empty list"),
        ("image", None, "no target pose given"),
        ("image", [None], "pose: got None"),
        ("image", nan_pose, "pose: every joint is missing"),
        ("image", inf_pose, "pose: keypoints contain infinity"),
        ("image", far_pose, "pose: joint 0 \\(nose\\) at x=1e\\+15, y=3 lies far outside the 256x176 frame"),
        (torch.full((3, *SIZE), float("nan")), "pose", "reference_image tensor holds NaN or infinite values"),
        ("image", torch.full((1, 3, *SIZE), float("nan")), "pose_image tensor holds NaN"),
        (torch.zeros(0, 3, *SIZE), "pose", "reference_image tensor is empty"),
    ],
)
def test_degenerate_api_inputs_are_input_errors(reference, pose, message):
    image, good = person()
    reference = image if isinstance(reference, str) else reference
    pose = good if isinstance(pose, str) else pose() if callable(pose) else pose
    with pytest.raises(InputError, match=message):
        prepare_inputs(reference, pose, SIZE)


def test_a_nan_inside_an_otherwise_valid_reference_tensor_is_refused():
    image, pose = person()
    reference = reference_tensor(image, SIZE)
    reference[0, 1, 10, 10] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        prepare_inputs(reference, pose, SIZE)


def test_zero_size_poses_cannot_be_made():
    for height, width in ((0, 0), (256, 0), (-4, 10), (float("nan"), 10)):
        with pytest.raises(InputError, match="positive height and width"):
            Pose(person()[1].xy, height, width)


def test_frames_larger_than_any_photo_are_refused():
    big = Pose(person()[1].xy, 200_000, 176)
    with pytest.raises(InputError, match="frame 200000x176 is larger than any photo"):
        prepare_inputs(person()[0], big, SIZE)


# ---- item 6: training configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("- model\n- data\n", "the top level must map sections to settings .*not a list"),
        ("42\n", "the top level must map sections to settings .*not a single value"),
        ("run:\n  out_dir: ${nowhere}\n", "Interpolation key 'nowhere' not found"),
        ("run:\n  out_dir: ${run.out_dir}\n", "Recursive interpolation"),
        ("optim:\n  lr: ${run.out_dir}\n", "While dereferencing interpolation .* could not be converted"),
    ],
)
def test_config_files_that_cannot_resolve_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: {message}"):
        load_config(path)
    assert str(path) in one_line_exit_2(["train", "--dry-run", "-c", str(path)], capsys)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.depth=0", "model.depth=0 must be >= 1"),
        ("model.num_heads=0", "model.num_heads=0 must be >= 1"),
        ("model.hidden_size=100", "model.hidden_size=100 is not divisible by model.num_heads=6"),
        ("model.hidden_size=390", "must be a multiple of 4"),
        ("model.patch_size=0", "model.patch_size=0"),
        ("model.decode_layers=0", "model.decode_layers=0"),
        ("model.preset=null", "model.preset is null: give model.hidden_size, model.depth, model.num_heads"),
        ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),
        ("optim.lr=-0.1", "optim.lr=-0.1"),
        ("optim.lr=inf", "optim.lr=inf"),
        ("optim.weight_decay=nan", "optim.weight_decay=nan"),
        ("optim.ema_decay=1.5", "optim.ema_decay=1.5"),
        ("optim.grad_clip=0", "optim.grad_clip=0"),
        ("objective.condition_dropout=nan", "objective.condition_dropout=nan"),
        ("data.scale=-1", "data.scale=-1"),
        ("run.checkpoint_every=0", "run.checkpoint_every=0"),
        ("run.log_every=0", "run.log_every=0"),
        ("run.seed=-1", "run.seed=-1 must lie in \\[0, 999,999\\]"),
        ("run.seed=36893488147419103232", "run.seed=36893488147419103232"),
        ("run.out_dir=${oops}", "override: Interpolation key 'oops' not found"),
    ],
)
def test_config_values_the_run_cannot_use_fail_the_dry_run(capsys, override, message):
    with pytest.raises(InputError, match=message):
        load_config(None, [override])
    assert message.replace("\\", "") in one_line_exit_2(["train", "--dry-run", override], capsys)


def test_pixel_codec_size_must_divide_and_good_configs_still_resolve():
    with pytest.raises(InputError, match="data.size 250x176 is not divisible by conditioning.pixel_factor 4"):
        load_config(None, ["conditioning.codec=pixel", "data.size=[250,176]"])
    small = ["model.preset=null", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "run.seed=999999"]
    assert load_config(None, small).model.hidden_size == 32
    assert load_config(None, ["conditioning.learned_width=0"]).conditioning.learned_width == 0  # unused by dinov2
