"""`xmdpt evaluate` end to end: the synthetic benchmark, the DeepFashion path with tiny networks, bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from PIL import Image
from test_eval_generate import synthetic_set
from tiny_pipeline import tiny_pipeline

from xmdpt.cli import main
from xmdpt.evaluation import run as run_module
from xmdpt.evaluation.fid import ModuleFeatureExtractor, load_stats
from xmdpt.evaluation.metrics import LPIPSMetric
from xmdpt.evaluation.run import EvalConfig, evaluate

SYNTH_SCORES = {"ssim_256", "psnr", "l1", "color_de", "color_hist"}  # 32x24: SSIM's 51x51 window does not fit
DEEPFASHION_SCORES = {"ssim", "ssim_256", "psnr", "l1", "lpips"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthetic_set(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory) -> Path:
    """Random AlexNet convolutions in torchvision's layout (LPIPS reads only `features.*`)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "alexnet-features.pth"
    torch.save({f"features.{k}": v for k, v in tvm.alexnet(weights=None).features.state_dict().items()}, path)
    return path


def tiny_extractor(seed: int) -> ModuleFeatureExtractor:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ModuleFeatureExtractor(net, name=f"tiny-{seed}", dim=6)


def cli(args: list[str], capsys) -> tuple[int, str, list[str]]:
    """Run `xmdpt ...`; return the exit code, stdout, and the `error:` lines of stderr."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("error:")]


def perfect_folder(synth: Path, generated: Path, out: Path) -> Path:
    """A copy of a generated folder whose images are the targets themselves, named by the documented convention."""
    out.mkdir()
    for path in generated.glob("*.png"):
        target = path.name.split("___")[1]
        shutil.copyfile(synth / "test" / target, out / path.name)
    return out


# --------------------------------------------------------------------------------------------- synthetic benchmark


def test_synthetic_benchmark_end_to_end(synth, model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    args = ["evaluate", "--model", model_dir, "--data-root", synth, "--layout", "synthetic", "--out-dir", out]
    code, stdout, errors = cli([*args, "--steps", "2", "--batch-size", "4"], capsys)
    assert (code, errors) == (0, [])
    assert "6 pairs at 32x24" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["means"]) == SYNTH_SCORES and metrics["fid"] == {}  # offline: no pretrained network
    assert metrics["count"] == 6 and len(metrics["per_pair"]) == 6
    assert all(math.isfinite(v) for row in metrics["per_pair"] for k, v in row.items() if k != "name")
    assert 0 < metrics["means"]["l1"] < 1 and metrics["means"]["color_de"] > 0
    run = metrics["run"]
    assert run["generation"]["num_inference_steps"] == 2 and run["generation"]["sampler"] == "ddim"
    assert run["generation"]["guidance_scale"] == 2.0 and run["generation"]["guidance_interval"] is None  # the model's
    assert run["image_size"] == "32x24" and run["test_pairs"] == 6
    assert run["generation_main_process"] == {"written": 6, "skipped": 0, "share": 6}
    assert "not comparable" in (out / "report.md").read_text()
    for name in ("report.md", "pairs_best_worst.png", "hist_l1.png", "hist_color_de.png"):
        assert (out / name).stat().st_size > 0
    generated = out / "generated"
    assert len(list(generated.glob("*.png"))) == 6
    assert all(Image.open(p).size == (24, 32) for p in generated.glob("*.png"))

    # The same command again: every image is there, nothing is regenerated, the numbers are the same.
    code, _, errors = cli([*args, "--steps", "2", "--batch-size", "3"], capsys)
    again = json.loads((out / "metrics.json").read_text())
    assert (code, errors) == (0, [])
    assert again["run"]["generation_main_process"] == {"written": 0, "skipped": 6, "share": 6}
    assert again["means"] == metrics["means"]

    # A perfect model, scored through --generated: every pair is matched with its own target.
    perfect = perfect_folder(synth, generated, tmp_path / "perfect")
    code, _, errors = cli(
        [
            "evaluate",
            "--data-root",
            synth,
            "--layout",
            "synthetic",
            "--out-dir",
            tmp_path / "p",
            "--generated",
            perfect,
        ],
        capsys,
    )
    scores = json.loads((tmp_path / "p" / "metrics.json").read_text())["means"]
    assert (code, errors) == (0, [])
    assert scores["l1"] == 0 and scores["color_de"] == 0 and scores["color_hist"] == 0 and scores["ssim_256"] == 1
    assert scores["psnr"] is None  # inf for exact copies, written as null


# ------------------------------------------------------------------------------------------------ DeepFashion path


def test_deepfashion_path_with_tiny_networks(synth, model_dir, alexnet_file, tmp_path) -> None:
    """The synthetic set is in the DeepFashion CSV layout: the protocol's path at 256x176, FID vs the train split."""
    config = EvalConfig(
        data_root=synth,
        layout="deepfashion",
        out_dir=tmp_path / "out",
        model=str(model_dir),
        steps=2,
        batch_size=6,
        stats_cache=tmp_path / "stats",
        progress=False,
    )
    networks = dict(lpips=LPIPSMetric(alexnet_weights=alexnet_file))
    outcome = evaluate(config, fid_extractors={"fid": tiny_extractor(0), "fid_tf": tiny_extractor(1)}, **networks)
    result = outcome.result
    assert result.image_size == (256, 176) and result.count == 6
    assert set(result.means) == DEEPFASHION_SCORES  # no colour fidelity outside the synthetic benchmark
    assert set(result.fid) == {"fid", "fid_tf"} and all(v > 0 and math.isfinite(v) for v in result.fid.values())
    assert result.fid["fid"] != result.fid["fid_tf"]
    assert all(Image.open(p).size == (176, 256) for p in (tmp_path / "out" / "generated").glob("*.png"))
    cached = sorted((tmp_path / "stats").glob("*.safetensors"))
    assert len(cached) == 2
    assert {load_stats(p).count for p in cached} == {outcome.run_info["real_set_images"]} == {18}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| **this run** | 256x176 |" in report and "not comparable" not in report

    # Scoring the folder again (statistics now from the cache) gives the same numbers.
    rescored = evaluate(
        EvalConfig(**{**config.__dict__, "generated": tmp_path / "out" / "generated", "out_dir": tmp_path / "again"}),
        fid_extractors={"fid": tiny_extractor(0), "fid_tf": tiny_extractor(1)},
        **networks,
    ).result
    assert rescored.fid == result.fid and rescored.means == result.means


def test_deepfashion_cli_fid_lpips_and_a_foreign_statistics_file(
    synth, model_dir, alexnet_file, tmp_path, capsys, monkeypatch
) -> None:
    # The CLI builds torchvision's Inception-v3 (100 MB of weights); a tiny network stands in for it here.
    monkeypatch.setattr(run_module, "build_fid_extractors", lambda config: {"fid": tiny_extractor(0)})
    out, stats = tmp_path / "out", tmp_path / "stats"
    common = ["--data-root", synth, "--alexnet-weights", alexnet_file, "--stats-cache", stats]
    code, stdout, errors = cli(["evaluate", "--model", model_dir, "--out-dir", out, "--steps", "2", *common], capsys)
    assert (code, errors) == (0, [])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["means"]) == DEEPFASHION_SCORES and set(metrics["fid"]) == {"fid"}
    assert metrics["image_size"] == "256x176" and "fid:" in stdout.replace(" ", "")
    (stats_file,) = stats.glob("*.safetensors")

    # The statistics of the 256x176 training set given for a 128x88 evaluation: refused, naming the difference.
    code, _, errors = cli(
        ["evaluate", "--generated", out / "generated", "--out-dir", tmp_path / "o2", "--size", "128x88", *common]
        + ["--real-stats", stats_file],
        capsys,
    )
    assert code == 2 and len(errors) == 1
    assert "image size '256x176' in the file, '128x88' expected" in errors[0]


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def scored_folder(synth, model_dir, tmp_path_factory) -> Path:
    """A complete generated folder of the synthetic test set (6 images at 32x24)."""
    folder = tmp_path_factory.mktemp("generated")
    pipe = tiny_pipeline()
    config = EvalConfig(data_root=synth, layout="synthetic", out_dir=folder, steps=1, model="tiny", progress=False)
    evaluate(config, pipe=pipe)
    return folder / "generated"


def _broken_copy(source: Path, target: Path, how: str) -> Path:
    shutil.copytree(source, target)
    first = sorted(target.glob("*.png"))[0]
    if how == "missing":
        first.unlink()
    elif how == "extra":
        shutil.copyfile(first, target / "someone___else.png")
    elif how == "size":
        Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(first)
    return target


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", r"1 of 6 expected images missing \(first: fashion"),
        ("extra", r"1 images not in the test list \(first: someone___else.png\)"),
        ("size", r"is 30x20, expected the evaluation size 32x24"),
    ],
)
def test_bad_generated_folders(how, message, synth, scored_folder, tmp_path, capsys) -> None:
    broken = _broken_copy(scored_folder, tmp_path / how, how)
    args = ["evaluate", "--data-root", synth, "--layout", "synthetic", "--out-dir", tmp_path / "o"]
    code, _, errors = cli([*args, "--generated", broken], capsys)
    assert code == 2 and len(errors) == 1
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_bad_paths_and_options(synth, tmp_path, capsys, monkeypatch) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    base = ["evaluate", "--out-dir", tmp_path / "o"]
    cases = [
        ([*base, "--data-root", tmp_path / "nowhere", "--model", not_a_model], "data root .*nowhere does not exist"),
        ([*base, "--data-root", synth, "--model", not_a_model], "not-a-model: not an xmdpt pipeline folder"),
        ([*base, "--data-root", synth, "--size", "256by176"], "'256by176' is not HEIGHTxWIDTH"),
        ([*base, "--data-root", tmp_path, "--layout", "synthetic"], "test holds no images: not a synthetic set"),
        ([*base, "--data-root", tmp_path, "--model", not_a_model], "test: image folder not found"),
    ]
    monkeypatch.setenv("XMDPT_DEFAULT_MODEL", str(tmp_path / "no-default"))
    cases.append(([*base, "--data-root", synth, "--layout", "synthetic"], "XMDPT_DEFAULT_MODEL=.* is missing"))
    for args, message in cases:
        code, _, errors = cli(args, capsys)
        assert code == 2 and len(errors) == 1, (args, errors)
        assert re.search(message, errors[0]), errors[0]


def test_scoring_inputs_are_checked_before_generation(synth, model_dir, tmp_path, capsys, monkeypatch) -> None:
    """A missing weights file or training folder fails at once, before hours of sampling, in one line."""
    args = ["evaluate", "--data-root", synth, "--model", model_dir, "--out-dir", tmp_path / "o", "--steps", "1"]
    code, _, errors = cli([*args, "--inception-weights", tmp_path / "missing.pth"], capsys)
    assert code == 2 and errors == [f"error: weights file {tmp_path / 'missing.pth'} does not exist"]
    assert not list((tmp_path / "o").rglob("*.png"))
    monkeypatch.setattr(run_module, "build_fid_extractors", lambda config: {"fid": tiny_extractor(0)})
    no_train = tmp_path / "no-train"
    shutil.copytree(synth, no_train, ignore=shutil.ignore_patterns("train"))
    args[2] = no_train
    code, _, errors = cli([*args, "--no-lpips", "--real-list", tmp_path / "train.lst"], capsys)
    assert code == 2 and len(errors) == 1 and f"training image folder {no_train / 'train'} does not exist" in errors[0]
    assert not list((tmp_path / "o").rglob("*.png"))


def test_evaluation_guides_with_the_models_interval_and_records_it(synth, model_dir, tmp_path, capsys) -> None:
    """`xmdpt evaluate` samples with the model's own guidance interval, as generate, demo and serve do, and
    generation.json records every sampling setting; --guidance-interval overrides it."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "guidance_interval": [200, 800]}))
    args = [
        "evaluate",
        "--model",
        model,
        "--data-root",
        synth,
        "--layout",
        "synthetic",
        "--steps",
        "2",
        "--limit",
        "2",
    ]
    for out, extra, interval in (("a", [], [200.0, 800.0]), ("b", ["--guidance-interval", "all"], [0.0, 1000.0])):
        code, _, errors = cli([*args, "--out-dir", tmp_path / out, *extra], capsys)
        assert (code, errors) == (0, [])
        record = json.loads((tmp_path / out / "generated" / "generation.json").read_text())
        assert record["guidance_interval"] == interval and record["guidance_scale"] == 2.0
        assert record["sampler"] == "ddim" and record["num_inference_steps"] == 2 and record["guidance_power"] == 0.01
        assert record["precision"] == "fp32"


def test_an_evaluation_size_the_masks_do_not_have_is_refused_before_generating(synth, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["evaluate", "--model", model_dir, "--data-root", synth, "--layout", "synthetic", "--out-dir", out]
    code, _, errors = cli([*args, "--size", "7x7", "--steps", "1"], capsys)
    assert code == 2 and len(errors) == 1 and "figure masks are 32x24" in errors[0], errors
    assert not list(out.glob("generated/*.png"))  # refused before any image was generated
