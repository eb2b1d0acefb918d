"""Pose from a photo with MediaPipe (offline, complexity 1): a real photo that scikit-image ships."""

import json
import os
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from xmdpt.cli import main
from xmdpt.data.deepfashion import FolderPairs
from xmdpt.errors import InputError
from xmdpt.pose.extract import BLAZEPOSE_TO_COCO18, PoseExtractor, fit_image, native_stderr_silenced
from xmdpt.pose.keypoints import Pose

os.environ.setdefault("HF_HUB_OFFLINE", "1")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")
try:
    import mediapipe  # noqa: F401

    MEDIAPIPE = True
except ImportError:
    MEDIAPIPE = False
needs_mediapipe = pytest.mark.skipif(
    not MEDIAPIPE, reason="mediapipe 0.10.21 is not installed (pip install 'xmdpt[pose]')"
)


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    return path


@needs_mediapipe
def test_keypoints_land_on_the_astronaut(astronaut):
    with PoseExtractor() as extractor:
        found = extractor(Image.open(astronaut).convert("RGB"))
    pose = found.pose
    assert (pose.height, pose.width) == (512, 512)
    nose, neck = pose.xy[0], pose.xy[1]
    assert pose.present[[0, 1, 2, 5, 14, 15]].all()
    assert nose[1] < neck[1]  # image y grows downwards
    assert (pose.xy[pose.present] >= 0).all() and (pose.xy[pose.present] <= 512).all()
    # the face is in the upper half, left of centre where the astronaut's head is
    assert 150 < nose[0] < 300 and 60 < nose[1] < 200
    # right shoulder on the image's left for a person facing the camera
    assert pose.xy[2, 0] < neck[0] < pose.xy[5, 0]
    assert found.scores[0] > 0.9
    assert all(s is None or s >= 0.5 for s in found.scores)  # hidden joints are dropped, not guessed


@needs_mediapipe
def test_cli_writes_json_preview_and_a_folder_data_set(astronaut, tmp_path, capsys):
    out = tmp_path / "poses"
    main(["pose", str(astronaut), "--out", str(out), "--size", "256x176"])
    assert "of 18 joints" in capsys.readouterr().out
    pose = Pose.load_json(out / "astronaut.json")
    assert (pose.height, pose.width) == (256, 176)
    nose, neck = pose.xy[0], pose.xy[1]
    hips = pose.xy[[8, 11]][pose.present[[8, 11]]]
    assert len(hips) >= 1 and nose[1] < neck[1] < hips[:, 1].min()
    assert (pose.xy[pose.present] >= 0).all() and (pose.xy[pose.present][:, 0] <= 176).all()
    assert Image.open(out / "astronaut.png").size == (176, 256)
    preview = np.asarray(Image.open(out / "astronaut_skeleton.png"))
    assert preview.shape == (256, 176, 3) and preview[int(neck[1]), int(neck[0])].any()
    assert json.loads((out / "astronaut.json").read_text())["image"] == "astronaut.png"
    # the output folder is a data set of one's own photos
    Image.open(out / "astronaut.png").transpose(Image.FLIP_LEFT_RIGHT).save(out / "mirror.png")
    pose.flipped().save_json(out / "mirror.json")
    item = FolderPairs(root=out, image_size=(256, 176))[0]
    assert item["target_image"].shape == (3, 256, 176)


def test_missing_mediapipe_is_one_clear_line(monkeypatch, astronaut, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # import fails as if not installed
    with pytest.raises(InputError, match=r"pose extraction needs mediapipe 0.10.21.*pip install"):
        PoseExtractor()
    with pytest.raises(SystemExit) as exc:
        main(["pose", str(astronaut), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "needs mediapipe" in capsys.readouterr().err


@needs_mediapipe
def test_cli_bad_photo_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(SystemExit) as exc:
        main(["pose", str(bad), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "bad.jpg" in err[0]


def test_fit_image_frames():
    photo = Image.new("RGB", (300, 200), (255, 0, 0))
    assert fit_image(photo, (256, 176), "crop").size == (176, 256)
    padded = fit_image(photo, (256, 176), "pad")
    assert padded.size == (176, 256) and padded.getpixel((88, 2)) == (255, 255, 255)
    assert fit_image(photo, None) is photo
    assert BLAZEPOSE_TO_COCO18[2] == 12 and BLAZEPOSE_TO_COCO18[5] == 11  # mediapipe's right shoulder is 12


def test_native_stderr_is_silenced_inside_only(capfd):
    # MediaPipe's C++ side writes to descriptor 2 itself; inside the block (nested, or from several threads at once)
    # such writes vanish, and the descriptor is the real stderr again afterwards.
    def native(text):
        with native_stderr_silenced():
            os.write(2, text)

    os.write(2, b"before\n")
    with native_stderr_silenced():
        os.write(2, b"hidden\n")
        threads = [threading.Thread(target=native, args=(b"thread\n",)) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    native(b"again\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "before\nafter\n"


def test_outputs_never_replace_an_input_photo(astronaut, tmp_path, capsys):
    # `--out` beside the photo: the cropped copy astronaut.png would replace the photo itself (issue 18 item 4).
    # Refused before MediaPipe opens, so this holds with or without it installed.
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(astronaut.read_bytes())
    before = photo.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["pose", str(photo), "--out", str(tmp_path), "--size", "256x176", "--fit", "crop"])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {photo}: ") and "write over this input" in err[0]
    assert photo.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["astronaut.png"]
    # relative paths, as typed: `xmdpt pose astronaut.png --out .`
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit):
            main(["pose", "astronaut.png", "--out", "."])
    finally:
        os.chdir(cwd)
    assert "astronaut.png: --out . would write over this input" in capsys.readouterr().err
    assert photo.read_bytes() == before
    # another photo's preview name is an input too
    preview = tmp_path / "astronaut_skeleton.png"
    preview.write_bytes(before)
    with pytest.raises(SystemExit):
        main(["pose", str(photo), str(preview), "--out", str(tmp_path)])
    assert "would write over this input" in capsys.readouterr().err


def test_two_photos_of_one_name_do_not_share_outputs(astronaut, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "person.png").write_bytes(astronaut.read_bytes())
    first, second = tmp_path / "a" / "person.png", tmp_path / "b" / "person.png"
    with pytest.raises(SystemExit) as exc:
        main(["pose", str(first), str(second), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {second}: its outputs would overwrite those of {first} (person.png)")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_output_names_keep_the_whole_stem(tmp_path):
    from xmdpt.cli.pose import output_paths

    photo, keypoints, preview = output_paths(tmp_path, tmp_path / "in" / "look.v2.jpg")
    assert (photo.name, keypoints.name, preview.name) == ("look.v2.png", "look.v2.json", "look.v2_skeleton.png")


def run_cli(*args, cwd):
    """`xmdpt` in a fresh process: MediaPipe's native code writes to the process's file descriptor 2."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "xmdpt", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@needs_mediapipe
def test_pose_cli_prints_nothing_of_mediapipe(astronaut, tmp_path):
    # Before, four native lines (TFLite's XNNPACK INFO, absl's pre-init WARNING and its W-lines) came out, some from
    # the graph's own threads after the model had started, racing the silenced calls.
    empty = tmp_path / "empty.png"
    Image.new("RGB", (200, 300), (120, 160, 200)).save(empty)
    done = run_cli("pose", str(astronaut), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "of 18 joints" in done.stdout
    failed = run_cli("pose", str(empty), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr == f"error: {empty}: no person found in the image\n"
