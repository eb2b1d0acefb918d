"""The synthetic data set: deterministic, fast, any size, held-out test identities, masks that match the figures."""

import hashlib
import json
import time

import numpy as np
import pytest
from PIL import Image

from xmdpt.cli import main
from xmdpt.data.synthetic import SynthConfig, generate, make_identity
from xmdpt.errors import InputError


def digest(root) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_set(tmp_path):
    config = SynthConfig(num_identities=4, poses_per_identity=3, size=(64, 44), seed=7)
    generate(tmp_path / "a", config, progress=False)
    generate(tmp_path / "b", config, progress=False)
    generate(
        tmp_path / "c", SynthConfig(num_identities=4, poses_per_identity=3, size=(64, 44), seed=8), progress=False
    )
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    # an identity does not depend on how many others there are
    assert make_identity(7, 2) == make_identity(7, 2) != make_identity(7, 3)


def test_test_identities_are_held_out_and_pairs_stay_within_an_identity(tmp_path):
    counts = generate(tmp_path, SynthConfig(num_identities=20, poses_per_identity=3, seed=1), progress=False)
    assert counts == {"train_images": 54, "train_pairs": 108, "test_images": 6, "test_pairs": 6}

    def ident(name: str) -> str:
        return name.split("id")[-1][:8]

    train = {ident(p.name) for p in (tmp_path / "train").iterdir()}
    test = {ident(p.name) for p in (tmp_path / "test").iterdir()}
    assert len(train) == 18 and len(test) == 2 and not train & test
    for split in ("train", "test"):
        rows = (tmp_path / f"fasion-resize-pairs-{split}.csv").read_text().splitlines()
        assert rows[0] == "from,to"
        assert all(ident(a) == ident(b) and a != b for a, b in (r.split(",") for r in rows[1:]))
    assert json.loads((tmp_path / "synth.json").read_text())["seed"] == 1


def test_masks_cover_the_figure_and_only_the_figure(tmp_path):
    generate(tmp_path, SynthConfig(num_identities=3, poses_per_identity=2, size=(256, 176), seed=2), progress=False)
    for path in (tmp_path / "train").iterdir():
        image = np.asarray(Image.open(path), dtype=np.int16)
        mask = np.asarray(Image.open(tmp_path / "masks" / path.name)) > 0
        assert image.shape == (256, 176, 3) and mask.shape == (256, 176)
        assert 0.04 < mask.mean() < 0.5
        # the background is a vertical gradient: each row of background pixels has a single colour
        for row in (5, 128, 250):
            background = image[row][~mask[row]]
            assert (np.abs(background - background[0]).max(axis=1) <= 1).all()


def test_identity_keeps_its_clothes_across_poses(tmp_path):
    generate(tmp_path, SynthConfig(num_identities=2, poses_per_identity=3, size=(128, 88), seed=4), progress=False)
    identity = make_identity(4, 0)
    for path in sorted((tmp_path / "train").iterdir()):
        if "id00000000" in path.name:
            pixels = np.asarray(Image.open(path)).reshape(-1, 3)
            assert (pixels == identity.shirt[0]).all(axis=1).sum() > 20
            assert (pixels == identity.skin).all(axis=1).sum() > 20


def test_thousands_of_pairs_per_minute(tmp_path):
    start = time.perf_counter()
    counts = generate(tmp_path, SynthConfig(num_identities=100, poses_per_identity=4, seed=0), progress=False)
    seconds = time.perf_counter() - start
    assert counts["train_pairs"] == 90 * 12
    assert counts["train_pairs"] / seconds * 60 > 3000, f"{seconds:.1f} s for {counts['train_pairs']} pairs"


def test_cli_synth(tmp_path, capsys):
    main(["data", "synth", str(tmp_path), "--num-identities", "3", "--size", "64x44", "--seed", "9"])
    assert "train pairs" in capsys.readouterr().out
    assert Image.open(next((tmp_path / "train").iterdir())).size == (44, 64)
    with pytest.raises(SystemExit) as exc:
        main(["data", "synth", str(tmp_path / "x"), "--size", "64by44"])
    assert exc.value.code == 2


def test_a_second_set_is_not_written_over_the_first_and_settings_are_checked(tmp_path, capsys):
    generate(tmp_path / "s", SynthConfig(num_identities=3, poses_per_identity=2, seed=1), progress=False)
    with pytest.raises(InputError, match="already holds a data set"):
        generate(tmp_path / "s", SynthConfig(num_identities=4, poses_per_identity=2, seed=1), progress=False)
    with pytest.raises(InputError, match="test_fraction"):
        SynthConfig(test_fraction=1.5)
    with pytest.raises(InputError, match="seed"):
        SynthConfig(seed=-1)
    # From the command line: one line, exit 2, and the first set is left as it was.
    before = sorted(p.name for p in (tmp_path / "s").rglob("*"))
    with pytest.raises(SystemExit) as done:
        main(["data", "synth", str(tmp_path / "s"), "--num-identities", "4"])
    assert done.value.code == 2 and "already holds" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "s").rglob("*")) == before


def stripe_runs(identity, config) -> list[int]:
    """Lengths of the vertical runs of the shirt's two colours down the torso's centre line, in a front view."""
    from xmdpt.data.synthetic import draw_figure, random_pose

    pose, front = random_pose(identity, np.random.default_rng(0), config.size)
    image, _ = draw_figure(identity, pose, front)
    neck, hip = pose.xy[1], (pose.xy[8] + pose.xy[11]) / 2
    x = int(round(neck[0]))
    column = image[int(neck[1]) + 2 : int(hip[1]) - 1, x]
    colours = [tuple(c) for c in column if tuple(c) in identity.shirt]
    runs, length = [], 1
    for a, b in zip(colours[:-1], colours[1:], strict=True):
        if a == b:
            length += 1
        else:
            runs.append(length)
            length = 1
    return runs[1:]  # whole runs only: the first may be cut by the neckline


def test_pattern_cell_sets_the_stripe_width_in_pixels(tmp_path):
    from dataclasses import replace

    size = (256, 176)  # big enough that a run's length measures the cell size to a pixel or two
    bold, fine = SynthConfig(size=size, pattern_cell=(0.08, 0.14)), SynthConfig(size=size, pattern_cell=(0.025, 0.025))
    identity = replace(
        make_identity(0, 1, bold.pattern_cell), shirt_pattern="stripes", shirt=((250, 0, 0), (0, 0, 250))
    )
    unit = identity.height * size[0]
    assert 0.08 <= identity.period <= 0.14
    runs = stripe_runs(identity, bold)
    assert runs and all(abs(r - identity.period * unit) <= 1.5 for r in runs), (runs, identity.period * unit)
    fine_identity = replace(identity, period=make_identity(0, 1, fine.pattern_cell).period)
    assert fine_identity.period == 0.025
    fine_runs = stripe_runs(fine_identity, fine)
    assert len(fine_runs) > len(runs) and all(abs(r - 0.025 * unit) <= 1.5 for r in fine_runs)
    # The same seed and index draw the same clothes at either scale; only the cell size differs.
    assert replace(make_identity(0, 1), period=0.0) == replace(make_identity(0, 1, (0.08, 0.14)), period=0.0)
    assert 0.025 <= make_identity(0, 1).period <= 0.06  # the default range
    # The range is recorded beside the set, validated, and settable from the command line.
    generate(
        tmp_path / "s", SynthConfig(num_identities=2, poses_per_identity=2, pattern_cell=(0.1, 0.12)), progress=False
    )
    assert json.loads((tmp_path / "s" / "synth.json").read_text())["pattern_cell"] == [0.1, 0.12]
    for bad in ((0.0, 0.1), (0.2, 0.1), (0.1,), "wide", "12", (0.1, float("inf")), (float("nan"), 0.1)):
        with pytest.raises(InputError, match="pattern_cell"):
            SynthConfig(pattern_cell=bad)
    main(["data", "synth", str(tmp_path / "c"), "--num-identities", "2", "--pattern-cell", "0.05", "0.06"])
    assert json.loads((tmp_path / "c" / "synth.json").read_text())["pattern_cell"] == [0.05, 0.06]
