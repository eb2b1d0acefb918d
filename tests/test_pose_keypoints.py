"""Keypoints: exact conversions between GFLA CSV, PIDM txt, our JSON and resized frames; flips; In-shop names."""

import json
from pathlib import Path

import numpy as np
import pytest

from xmdpt.data.names import flat_to_inshop, inshop_to_flat
from xmdpt.errors import InputError
from xmdpt.pose.keypoints import FLIP_PERMUTATION, JOINT_NAMES, Pose

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "deepfashion"
if not SHARED.is_dir():  # CI clones main with shared/ beside it
    SHARED = Path(__file__).resolve().parents[1] / "shared" / "data" / "deepfashion"

# A GFLA annotation line (256x176 frame, y list first, -1 missing).
YS = [41, 62, 62, 98, 130, 63, 99, 131, 128, 178, 224, 129, 180, 226, 36, 37, 39, -1]
XS = [88, 88, 68, 62, 60, 108, 113, 116, 76, 74, 72, 100, 102, 104, 84, 92, 78, -1]


def gfla_pose() -> Pose:
    return Pose.from_gfla(YS, XS)


def test_gfla_reads_y_first_and_marks_missing():
    pose = gfla_pose()
    assert (pose.height, pose.width) == (256, 176)
    assert pose.xy[0].tolist() == [88, 41]  # nose: x from the second list
    assert pose.present.tolist() == [True] * 17 + [False]
    assert np.isnan(pose.array()[17]).all() and pose.array(missing=-1)[17].tolist() == [-1, -1]


def test_gfla_pidm_round_trip_is_exact():
    text = gfla_pose().to_pidm_text()
    rows = text.splitlines()
    assert rows[0] == "128 41"  # x + 40 pad, then y
    assert rows[17] == "-1 -1"
    back = Pose.from_pidm_text(text)
    assert back == gfla_pose()
    assert back.to_gfla() == (YS, XS)


def test_pidm_floats_survive_round_trip():
    xy = np.random.default_rng(0).uniform([0, 0], [176, 256], size=(18, 2))
    pose = Pose(xy, 256, 176)
    # integers (what the files hold) are exact; other floats come back within the last bit of adding the 40 px pad
    assert Pose.from_pidm_text(pose.to_pidm_text()).allclose(pose, atol=1e-12)


def test_json_round_trip_and_schema(tmp_path):
    pose = gfla_pose().resized(512, 352)
    path = tmp_path / "p.json"
    pose.save_json(path, scores=[0.9] * 18, image="p.png")
    obj = json.loads(path.read_text())
    assert obj["format"] == "openpose-18" and (obj["height"], obj["width"]) == (512, 352)
    assert obj["keypoints"][17] is None and obj["scores"][17] is None and obj["joints"] == list(JOINT_NAMES)
    assert Pose.load_json(path) == pose


def test_resize_scales_each_axis_and_inverts():
    pose = gfla_pose()
    big = pose.resized(512, 352)
    assert big.xy[0].tolist() == [176, 82]
    square = pose.resized(256, 256)  # the public code's stretched square
    assert square.xy[0, 0] == pytest.approx(88 * 256 / 176) and square.xy[0, 1] == 41
    assert square.resized(256, 176).allclose(pose)


def test_flip_mirrors_and_swaps_left_right():
    pose = gfla_pose()
    flipped = pose.flipped()
    # the right shoulder (2) of the flipped pose is the mirrored left shoulder (5) of the original
    assert flipped.xy[2].tolist() == [175 - 108, 63]
    assert flipped.xy[5].tolist() == [175 - 68, 62]
    assert flipped.xy[0].tolist() == [175 - 88, 41]
    assert not flipped.present[16] and flipped.present[17]  # the missing left ear became the right one
    assert flipped.flipped() == pose
    assert sorted(FLIP_PERMUTATION) == list(range(18))


def test_crop_shifts_origin():
    pose = gfla_pose().resized(268, 184).cropped(5, 7, 256, 176)
    assert pose.xy[0] == pytest.approx([88 * 184 / 176 - 5, 41 * 268 / 256 - 7])


def test_flat_names_round_trip_on_the_real_split_lists():
    if not (SHARED / "train.lst").is_file():
        pytest.skip(f"shared DeepFashion split files not found at {SHARED}")
    names = (SHARED / "train.lst").read_text().split() + (SHARED / "test.lst").read_text().split()
    assert len(names) == 48674 + 4038
    for name in names:
        assert inshop_to_flat(flat_to_inshop(name)) == name
    assert flat_to_inshop("fashionWOMENBlouses_Shirtsid0000337203_3back.jpg") == (
        "WOMEN/Blouses_Shirts/id_00003372/03_3_back.jpg"
    )
    with pytest.raises(InputError, match="not a DeepFashion flat image name"):
        flat_to_inshop("holiday.jpg")


@pytest.mark.parametrize("height, width", [(0, 0), (1.5, 176), (True, True), (1e400, 176), ("256", 176), (-3, 176)])
def test_json_frame_must_be_positive_integers(height, width):
    obj = {"height": height, "width": width, "keypoints": [[1, 2]] + [None] * 17}
    with pytest.raises(InputError, match="integer 'height' and 'width'"):
        Pose.from_json(obj, "p.json")
    assert Pose.from_json({**obj, "height": 256, "width": 176}, "p.json").height == 256
