"""`xmdpt generate`: single and batch mode on a tiny saved pipeline; bad input is one line and exit code 2."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipeline import SIZE, save_tiny_default

from xmdpt.cli import main
from xmdpt.data.synthetic import draw_figure, make_identity, random_pose
from xmdpt.default_model import (
    ENV_VAR,
    INFO_FILE,
    default_model_path,
    load_pipeline,
    resolve_device,
)
from xmdpt.errors import InputError
from xmdpt.pipeline import SAMPLING_DEFAULTS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_default(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def files(tmp_path, model_dir, monkeypatch):
    """A reference photo, two keypoint files, and the tiny model as the default."""
    monkeypatch.setenv(ENV_VAR, str(model_dir))
    for index in (1, 2):
        identity = make_identity(0, index)
        pose, front = random_pose(identity, np.random.default_rng([0, index]), (256, 176))
        Image.fromarray(draw_figure(identity, pose, front)[0]).save(tmp_path / f"person{index}.png")
        pose.save_json(tmp_path / f"pose{index}.json")
    return tmp_path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_single_writes_the_image_and_seeds_repeat(files, capsys):
    out = files / "out" / "a.png"
    main(["generate", "--reference", str(files / "person1.png"), "--pose", str(files / "pose2.json"),
          "--out", str(out), "--steps", "3"])  # fmt: skip
    assert f"wrote {out}" in capsys.readouterr().out
    assert Image.open(out).size == (SIZE[1], SIZE[0])
    again, other = files / "again.png", files / "other.png"
    base = ["generate", "--reference", str(files / "person1.png"), "--pose", str(files / "pose2.json"), "--steps", "3"]
    main([*base, "--out", str(again)])
    main([*base, "--out", str(other), "--seed", "5"])
    np.testing.assert_array_equal(pixels(again), pixels(out))
    assert not np.array_equal(pixels(other), pixels(out))
    main([*base, "--out", str(files / "dpm.png"), "--sampler", "dpmsolver++", "--device", "cpu"])
    assert Image.open(files / "dpm.png").size == (SIZE[1], SIZE[0])


def test_batch_equals_single_runs_and_skips_bad_lines(files, capsys):
    (files / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (files / "pairs.csv").write_text(
        "reference,pose,out\n"
        "person1.png,pose2.json,first.png\n"
        "missing.png,pose1.json,x.png\n"
        "person2.png,pose1.json,sub/second.png\n"
        "broken.png,pose1.json,y.png\n"
        "person2.png,pose2.json,../escape.png\n"
        "person2.png,pose2.json,\n"
    )
    with pytest.raises(SystemExit) as done:
        main(["generate", "--pairs", str(files / "pairs.csv"), "--out-dir", str(files / "batch"), "--steps", "3",
              "--seed", "7", "--batch-size", "2"])  # fmt: skip
    assert done.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 3, errors
    assert any("pairs.csv:3" in e and "image file not found" in e for e in errors), errors
    assert any("pairs.csv:5" in e and "not a readable image" in e for e in errors)
    assert any("pairs.csv:6" in e and "inside --out-dir" in e for e in errors)
    assert "wrote 3 images" in captured.out and "3 lines failed" in captured.out
    written = sorted(p.relative_to(files / "batch").as_posix() for p in (files / "batch").rglob("*.png"))
    assert written == ["0007-person2-pose2.png", "first.png", "sub/second.png"]
    # line i samples with seed + i: the batch's images are the single runs' images
    for name, ref, pose, seed in (("first.png", 1, 2, 7), ("sub/second.png", 2, 1, 9)):
        single = files / f"single-{seed}.png"
        main(["generate", "--reference", str(files / f"person{ref}.png"), "--pose", str(files / f"pose{pose}.json"),
              "--out", str(single), "--steps", "3", "--seed", str(seed)])  # fmt: skip
        np.testing.assert_array_equal(pixels(files / "batch" / name), pixels(single))


def test_batch_skips_lines_that_cannot_be_read_or_written(files, capsys):
    (files / "zero.json").write_text('{"height": 0, "width": 0, "keypoints": [[0, 0]' + ", null" * 17 + "]}")
    (files / "out" / "taken.png").mkdir(parents=True)
    (files / "pairs.csv").write_text(
        "reference,pose,out\n"
        "person1.png,zero.json,a.png\n"  # a malformed pose file
        "person1.png,pose1.json,b.png\n"
        "person2.png,pose2.json,b.png\n"  # the same output as the line before
        "person2.png,pose1.json,taken.png\n"  # a folder stands where the image goes
        "person2.png,pose2.json,c.png\n"
    )
    with pytest.raises(SystemExit) as done:
        main(["generate", "--pairs", str(files / "pairs.csv"), "--out-dir", str(files / "out"), "--steps", "2"])
    assert done.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 3 and "Traceback" not in captured.err
    assert any("pairs.csv:2" in e and "height" in e for e in errors)
    assert any("pairs.csv:4" in e and "already line 3's output" in e for e in errors)
    assert any("pairs.csv:5" in e and "is a folder" in e for e in errors)
    assert sorted(p.name for p in (files / "out").glob("*.png") if p.is_file()) == ["b.png", "c.png"]


def test_batch_of_good_lines_exits_normally(files, capsys):
    (files / "pairs.csv").write_text("reference,pose\nperson1.png,pose1.json\n")
    main(["generate", "--pairs", str(files / "pairs.csv"), "--out-dir", str(files / "ok"), "--steps", "2"])
    assert "wrote 1 images" in capsys.readouterr().out
    assert len(list((files / "ok").glob("*.png"))) == 1


def bad_case(files, name):
    (files / "garbage.png").write_bytes(b"GIF89a but not really an image")
    (files / "short.json").write_text('{"height": 256, "width": 176, "keypoints": [[1, 2], [3, 4]]}')
    (files / "notours").mkdir(exist_ok=True)
    (files / "notours" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (files / "headless.csv").write_text("a,b\nperson1.png,pose1.json\n")
    (files / "d.png").mkdir(exist_ok=True)
    (files / "zero.json").write_text('{"height": 0, "width": 0, "keypoints": [[0, 0]' + ", null" * 17 + "]}")
    ref, pose, out = str(files / "person1.png"), str(files / "pose1.json"), str(files / "o.png")
    return {
        "missing reference": (["--reference", str(files / "nope.png"), "--pose", pose, "--out", out], "not found"),
        "missing pose": (["--reference", ref, "--pose", str(files / "nope.json"), "--out", out], "not found"),
        "unreadable image": (["--reference", str(files / "garbage.png"), "--pose", pose, "--out", out], "garbage"),
        "pose of wrong shape": (["--reference", ref, "--pose", str(files / "short.json"), "--out", out], "18 joints"),
        "model not ours": (
            ["--reference", ref, "--pose", pose, "--out", out, "--model", str(files / "notours")],
            "not an xmdpt pipeline",
        ),  # fmt: skip
        "model folder missing": (
            ["--reference", ref, "--pose", pose, "--out", out, "--model", str(files / "x")],
            "not a folder",
        ),  # fmt: skip
        "unknown sampler": (
            ["--reference", ref, "--pose", pose, "--out", out, "--sampler", "euler"],
            "is not one of",
        ),
        "bad output suffix": (["--reference", ref, "--pose", pose, "--out", str(files / "o.txt")], "output must be"),
        "no pose": (["--reference", ref, "--out", out], "give --reference, --pose and --out"),
        "pairs without header": (["--pairs", str(files / "headless.csv"), "--out-dir", str(files / "b")], "header"),
        "guidance not a number": (["--reference", ref, "--pose", pose, "--out", out, "--guidance", "nan"], "finite"),
        "too many steps": (
            ["--reference", ref, "--pose", pose, "--out", out, "--steps", "5000"],
            "less than or equal to 1000",
        ),
        "guidance interval reversed": (
            ["--reference", ref, "--pose", pose, "--out", out, "--guidance-interval", "800,200"],
            "--guidance-interval '800,200': guidance_interval=(800, 200) must satisfy 0 <= lo <= hi <= 1000",
        ),
        "guidance interval not two numbers": (
            ["--reference", ref, "--pose", pose, "--out", out, "--guidance-interval", "200"],
            "--guidance-interval '200': give two timesteps",
        ),
        "cache unknown": (
            ["--reference", ref, "--pose", pose, "--out", out, "--cache", "fora:0"],
            "cache='fora:0': FORA's interval N must be a whole number",
        ),
        "output is a folder": (["--reference", ref, "--pose", pose, "--out", str(files / "d.png")], "is a folder"),
        "output under a file": (
            ["--reference", ref, "--pose", pose, "--out", str(files / "pose1.json" / "o.png")],
            "cannot create the output folder",
        ),
        "zero-size pose frame": (
            ["--reference", ref, "--pose", str(files / "zero.json"), "--out", out],
            "[1, 100000]",
        ),
        "device that computes nothing": (
            ["--reference", ref, "--pose", pose, "--out", out, "--device", "meta"],
            "meta",
        ),
    }[name]


@pytest.mark.parametrize(
    "name",
    ["missing reference", "missing pose", "unreadable image", "pose of wrong shape", "model not ours",
     "model folder missing", "unknown sampler", "bad output suffix", "no pose", "pairs without header",
     "guidance not a number", "too many steps", "guidance interval reversed", "guidance interval not two numbers",
     "cache unknown", "output is a folder", "output under a file", "zero-size pose frame",
     "device that computes nothing"],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_code_2(files, capsys, name):
    args, message = bad_case(files, name)
    with pytest.raises(SystemExit) as done:
        main(["generate", "--steps", "2", *args])  # a later --steps wins
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (files / "o.png").exists()


def test_default_model_and_device(monkeypatch, tmp_path, model_dir):
    monkeypatch.setenv(ENV_VAR, str(model_dir))
    assert default_model_path() == model_dir
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(InputError, match="is missing"):
        default_model_path()
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("toaster")


def test_file_system_errors_are_one_line_and_exit_code_2(files, capsys):
    # `xmdpt pose` makes its output folder where a file stands: the OSError becomes one line, not a traceback.
    for args in (
        ["pose", str(files / "person1.png"), "--out", str(files / "pose1.json")],
        ["pose", str(files), "--out", str(files / "poses")],  # a folder given as a photo, found before MediaPipe
        ["demo", "--seed", "-1", "--out", str(files / "demo.png")],
    ):
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err


def test_a_hub_id_that_cannot_be_fetched_is_one_line(files, capfd, monkeypatch):
    # diffusers warns on its own stderr handler before failing offline; capfd sees that descriptor too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(files / "hf-home"))  # an empty cache
    args = [
        "--reference",
        str(files / "person1.png"),
        "--pose",
        str(files / "pose1.json"),
        "--out",
        str(files / "o.png"),
    ]
    with pytest.raises(SystemExit) as done:
        main(["generate", "--model", "someone/not-cached", *args])
    err = capfd.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: someone/not-cached: cannot load the pipeline") and "Hugging Face cache" in err[0]


def test_guidance_interval_comes_from_the_model_and_the_command_line(files, model_dir, tmp_path, monkeypatch):
    """The model's `guidance_interval` is the default; --guidance-interval overrides it, `all` guides every step."""
    base = ["generate", "--reference", str(files / "person1.png"), "--pose", str(files / "pose2.json"), "--steps", "3"]
    every, middle = files / "every.png", files / "middle.png"
    main([*base, "--out", str(every), "--guidance", "4"])
    main([*base, "--out", str(middle), "--guidance", "4", "--guidance-interval", "200,800"])
    assert not np.array_equal(pixels(every), pixels(middle))
    with_interval = save_tiny_default(tmp_path / "with-interval")
    index = with_interval / "model_index.json"
    config = json.loads(index.read_text())
    index.write_text(json.dumps({**config, "guidance_interval": [200, 800]}))  # the pipeline's own default
    monkeypatch.setenv(ENV_VAR, str(with_interval))
    assert load_pipeline().sampling_settings().guidance_interval == (200.0, 800.0)
    main([*base, "--out", str(files / "model.png"), "--guidance", "4"])
    np.testing.assert_array_equal(pixels(files / "model.png"), pixels(middle))
    main([*base, "--out", str(files / "all.png"), "--guidance", "4", "--guidance-interval", "all"])
    np.testing.assert_array_equal(pixels(files / "all.png"), pixels(every))
    main(
        [*base, "--out", str(files / "fora.png"), "--guidance", "4", "--guidance-interval", "all", "--cache", "fora:2"]
    )
    assert not np.array_equal(pixels(files / "fora.png"), pixels(every))  # the cache reached the sampler
    index.write_text(json.dumps({**config, "guidance_interval": [900, 100]}))
    with pytest.raises(InputError, match="guidance_interval"):
        load_pipeline()
    # A folder saved before the pipeline owned its defaults kept them in xmdpt_default.json: they still apply.
    legacy = {k: v for k, v in config.items() if k not in SAMPLING_DEFAULTS}
    index.write_text(json.dumps(legacy))
    info = json.loads((with_interval / INFO_FILE).read_text())
    (with_interval / INFO_FILE).write_text(
        json.dumps({**info, "guidance_interval": [150, 850], "num_inference_steps": 7})
    )
    settings = load_pipeline().sampling_settings()
    assert settings.guidance_interval == (150.0, 850.0) and settings.num_inference_steps == 7


def test_no_output_ever_replaces_an_input(files, capsys):
    """--out equal to the reference or pose, or a batch line whose output is another line's input, is refused in one
    line before any sampling, and the input stays as it was."""
    photo = files / "person1.png"
    before = photo.read_bytes()
    driving = files / "person2.png"  # a driving photo as the pose
    for pose, target, what in ((files / "pose2.json", photo, "reference image"), (driving, driving, "pose file")):
        with pytest.raises(SystemExit) as done:
            main(["generate", "--reference", str(photo), "--pose", str(pose), "--out", str(target)])
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and len(err) == 1 and f"--out is the {what}" in err[0]
    (files / "pairs.csv").write_text(
        "reference,pose,out\nperson2.png,pose2.json,a.png\nperson1.png,pose2.json,person2.png\n"
    )
    with pytest.raises(SystemExit) as done:
        main(["generate", "--pairs", str(files / "pairs.csv"), "--out-dir", str(files), "--steps", "2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert done.value.code == 2 and any("is an input of this batch" in line for line in err), err
    assert photo.read_bytes() == before and Image.open(files / "person2.png").size != (SIZE[1], SIZE[0])  # intact


def test_a_symbolic_link_inside_the_out_dir_cannot_lead_outside_it(files, tmp_path, capsys):
    outside, out_dir = tmp_path / "elsewhere", files / "batch"
    outside.mkdir()
    out_dir.mkdir()
    (out_dir / "link").symlink_to(outside, target_is_directory=True)
    (files / "pairs.csv").write_text("reference,pose,out\nperson1.png,pose2.json,link/x.png\n")
    with pytest.raises(SystemExit) as done:
        main(["generate", "--pairs", str(files / "pairs.csv"), "--out-dir", str(out_dir), "--steps", "2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert done.value.code == 2 and any("leads outside --out-dir" in line for line in err), err
    assert not list(outside.iterdir())
