"""Pair data sets: the synthetic set through the DeepFashion loader, both DeepFashion layouts, Market-1501, folders,
deterministic test pairs and the training augmentation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from xmdpt.data import Augment, FolderPairs, PidmPairs, deepfashion_csv, market1501
from xmdpt.data.layouts import csv_to_pidm, pidm_to_csv
from xmdpt.data.synthetic import SynthConfig, generate
from xmdpt.pose.keypoints import MARKET_FRAME, Pose
from xmdpt.pose.render import skeleton_tensor

KEYS = {
    "reference_image", "reference_pose", "target_image", "target_pose", "reference_keypoints",
    "target_keypoints", "reference_name", "target_name", "target_mask",
    "skipped",  # bad samples passed over for this item (summed over workers by the trainer)
}  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(num_identities=6, poses_per_identity=3, size=(64, 44), seed=3), progress=False)
    return root


def test_synthetic_set_loads_through_the_deepfashion_loader(synth):
    data = deepfashion_csv(synth, "test", image_size=(64, 44))
    assert len(data) == 3  # one held-out identity, a ring of its 3 images
    item = data[0]
    assert set(item) == KEYS
    assert item["reference_image"].shape == item["target_image"].shape == (3, 64, 44)
    assert item["reference_pose"].shape == (3, 64, 44) and item["target_keypoints"].shape == (18, 2)
    assert item["target_mask"].shape == (1, 64, 44) and set(item["target_mask"].unique().tolist()) == {0.0, 1.0}
    assert -1 <= item["target_image"].min() < item["target_image"].max() <= 1
    assert item["reference_pose"].max() == 1 and item["reference_pose"].min() == 0
    # test items are the stored pixels, untouched
    stored = np.asarray(Image.open(synth / "test" / item["target_name"]), dtype=np.float32)
    assert torch.allclose(item["target_image"], torch.from_numpy(stored).permute(2, 0, 1) / 127.5 - 1)
    # the pose tensor is the rendering of the keypoints handed out
    pose = Pose(item["target_keypoints"].double().numpy(), 64, 44)
    assert torch.equal(item["target_pose"], skeleton_tensor(pose))
    # keypoints sit on the figure: neck and hips are inside the mask
    for joint in (1, 8, 11):
        x, y = item["target_keypoints"][joint].round().long().tolist()
        assert item["target_mask"][0, y, x] == 1


def test_test_pairs_are_deterministic_and_train_augmentation_varies(synth):
    test = deepfashion_csv(synth, "test", image_size=(64, 44))
    a, b = test[1], test[1]
    assert a["reference_name"] == b["reference_name"] and torch.equal(a["target_image"], b["target_image"])
    train = deepfashion_csv(synth, "train", image_size=(64, 44), train=True)
    seen = {tuple(train[0]["reference_keypoints"].nan_to_num(-1).flatten().tolist()) for _ in range(12)}
    assert len(seen) > 3  # scale, crop, flip and swap all move the keypoints


def test_pidm_layout_picks_the_first_source_for_testing(synth, tmp_path):
    csv_to_pidm(synth, tmp_path, "train")
    lines = (tmp_path / "train_pairs.txt").read_text().splitlines()
    targets = [line.split(",")[0] for line in lines]
    sources = {t: [line.split(",")[1] for line in lines if line.startswith(t + ",")] for t in targets}
    multi = [f"{t},{','.join(s)}" for t, s in sources.items()][:4]
    (tmp_path / "test_pairs.txt").write_text("\n".join(multi) + "\n")
    test = PidmPairs(root=tmp_path, split="test", image_size=(64, 44))
    assert [len(r.sources) for r in test.pairs] == [2, 2, 2, 2]
    assert [test[i]["reference_name"] for i in range(4)] == [m.split(",")[1] for m in multi]
    train = PidmPairs(root=tmp_path, split="test", image_size=(64, 44), train=True, augment=Augment.off())
    assert {train[0]["reference_name"] for _ in range(20)} == set(multi[0].split(",")[1:])


def test_round_trip_between_the_two_deepfashion_layouts(synth, tmp_path):
    pidm, back = tmp_path / "pidm", tmp_path / "back"
    for split in ("train", "test"):
        csv_to_pidm(synth, pidm, split)
        pidm_to_csv(pidm, back, split)
        assert (back / f"fasion-resize-pairs-{split}.csv").read_text() == (
            synth / f"fasion-resize-pairs-{split}.csv"
        ).read_text()
        original = (synth / f"fasion-resize-annotation-{split}.csv").read_text().splitlines()
        again = (back / f"fasion-resize-annotation-{split}.csv").read_text().splitlines()
        assert sorted(original) == sorted(again)
    first_pose = next((pidm / "pose").rglob("*.txt")).read_text().splitlines()
    assert len(first_pose) == 18 and all(len(row.split()) == 2 for row in first_pose)
    # both layouts yield the same tensors, pair by pair
    a = deepfashion_csv(synth, "test", image_size=(64, 44))
    b = PidmPairs(root=pidm, split="test", image_size=(64, 44))
    for i in range(len(a)):
        x, y = a[i], b[i]
        for key in ("reference_image", "target_image", "reference_pose", "target_pose", "target_mask"):
            assert torch.equal(x[key], y[key]), key
        assert torch.equal(x["target_keypoints"].nan_to_num(-1), y["target_keypoints"].nan_to_num(-1))


def test_flip_mirrors_image_mask_and_keypoints_together(synth):
    plain = deepfashion_csv(synth, "test", image_size=(64, 44))[0]
    data = deepfashion_csv(synth, "test", image_size=(64, 44), train=True, augment=Augment(0, flip=True, swap=False))
    flipped = [
        item for item in (data[0] for _ in range(16)) if not torch.equal(item["target_image"], plain["target_image"])
    ]
    assert 2 <= len(flipped) <= 14  # p = 0.5
    item = flipped[0]
    assert torch.equal(item["target_image"], plain["target_image"].flip(-1))
    assert torch.equal(item["target_mask"], plain["target_mask"].flip(-1))
    mirrored = Pose(plain["target_keypoints"].double().numpy(), 64, 44).flipped()
    assert torch.equal(item["target_keypoints"].nan_to_num(-1), torch.from_numpy(mirrored.array(-1)))


def test_swap_exchanges_reference_and_target(synth):
    data = deepfashion_csv(synth, "test", image_size=(64, 44), train=True, augment=Augment(0, flip=False, swap=True))
    pairs = {(item["reference_name"], item["target_name"]) for item in (data[0] for _ in range(16))}
    (a, b), *_ = pairs
    assert pairs == {(a, b), (b, a)}


def test_scale_augmentation_keeps_keypoints_on_the_figure(synth):
    data = deepfashion_csv(synth, "train", image_size=(64, 44), train=True, augment=Augment(0.05, False, False))
    plain = deepfashion_csv(synth, "train", image_size=(64, 44))
    moved = 0
    for i in range(0, len(data), 3):
        item, ref = data[i], plain[i]
        moved += not torch.equal(item["target_keypoints"].nan_to_num(0), ref["target_keypoints"].nan_to_num(0))
        shift = (item["target_keypoints"] - ref["target_keypoints"]).abs().nan_to_num(0)
        assert shift.max() <= 0.05 * 64 + 1  # at most the 5 % scale plus the crop
        x, y = item["target_keypoints"][1].round().long().tolist()
        assert item["target_mask"][0, y, x] == 1
    assert moved > 0


def test_square_stretch_and_native_sizes(synth):
    square = deepfashion_csv(synth, "test", image_size=(64, 64))[0]
    native = deepfashion_csv(synth, "test", image_size=(64, 44))[0]
    assert square["target_image"].shape == (3, 64, 64)
    ratio = square["target_keypoints"][:, 0] / native["target_keypoints"][:, 0]
    assert torch.allclose(ratio[~ratio.isnan()], torch.tensor(64 / 44, dtype=torch.float32))
    big = deepfashion_csv(synth, "test", image_size=(128, 88))[0]
    assert big["target_image"].shape == (3, 128, 88)


def test_market_layout_reads_128x64(tmp_path):
    generate(tmp_path, SynthConfig(num_identities=3, poses_per_identity=2, size=(128, 64), seed=5), progress=False)
    for split in ("train", "test"):
        (tmp_path / f"fasion-resize-pairs-{split}.csv").rename(tmp_path / f"market-pairs-{split}.csv")
        lines = (tmp_path / f"fasion-resize-annotation-{split}.csv").read_text().splitlines()
        out = [lines[0]]
        for line in lines[1:]:  # re-express the annotation in Market's 128x64 frame
            name, ys, xs = line.split(":")
            ys, xs = Pose.from_gfla(json.loads(ys), json.loads(xs)).to_gfla(MARKET_FRAME)
            out.append(f"{name}:{json.dumps(ys)}:{json.dumps(xs)}")
        (tmp_path / f"market-annotation-{split}.csv").write_text("\n".join(out) + "\n")
    data = market1501(tmp_path, "train")
    item = data[0]
    assert item["target_image"].shape == (3, 128, 64) and len(data) == 4
    x, y = item["target_keypoints"][1].round().long().tolist()
    assert item["target_mask"][0, y, x] == 1


def test_folder_of_own_images_with_json_keypoints(synth, tmp_path):
    data = deepfashion_csv(synth, "test", image_size=(64, 44))
    for name in data.annotations:
        Image.open(synth / "test" / name).save(tmp_path / name)
        data.pose(name).resized(64, 44).save_json((tmp_path / name).with_suffix(".json"), image=name)
    folder = FolderPairs(root=tmp_path, image_size=(64, 44))
    assert len(folder) == 3 * 2  # every ordered pair
    item = folder[0]
    assert item["reference_name"] != item["target_name"] and "target_mask" not in item
    (tmp_path / "pairs.csv").write_text(f"from,to\n{item['target_name']},{item['reference_name']}\n")
    assert len(FolderPairs(root=tmp_path)) == 1


def test_dataloader_collates_batches(synth):
    data = deepfashion_csv(synth, "train", image_size=(64, 44), train=True)
    batch = next(iter(DataLoader(data, batch_size=4, shuffle=True)))
    assert batch["target_image"].shape == (4, 3, 64, 44) and len(batch["target_name"]) == 4
