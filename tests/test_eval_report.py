"""The evaluation report: strict metrics.json, best/worst choice, published table, grid and histogram files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmdpt.evaluation.generate import EvalPair, EvalSet
from xmdpt.evaluation.metrics import EvaluationResult
from xmdpt.evaluation.report import (
    GRID_FILE,
    PUBLISHED,
    best_and_worst,
    ranking_score,
    render_markdown,
    write_grid,
    write_report,
)

SIZE = (32, 24)


def _result(rows: list[dict], fid: dict | None = None) -> EvaluationResult:
    keys = [k for k in rows[0] if k != "name"]
    means = {k: float(np.mean([row[k] for row in rows])) for k in keys}
    return EvaluationResult(per_pair=rows, means=means, image_size=SIZE, fid=fid or {})


def _rows(count: int, lpips: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        row = {"name": f"p{i}.png", "ssim_256": float(rng.uniform()), "psnr": float(rng.uniform(5, 30))}
        if lpips:
            row["lpips"] = float(rng.uniform())
        rows.append(row)
    return rows


def _eval_set(folder: Path, names: list[str]) -> EvalSet:
    """Real and generated images for `names`: reference grey 50, generated 150, target 250."""
    pairs = []
    (folder / "generated").mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        paths = {}
        for role, value in (("reference", 50), ("target", 250)):
            paths[role] = folder / f"{role}-{index}.png"
            Image.fromarray(np.full((*SIZE, 3), value, np.uint8)).save(paths[role])
        Image.fromarray(np.full((*SIZE, 3), 150, np.uint8)).save(folder / "generated" / name)
        pairs.append(EvalPair(index, name, "r", "t", paths["reference"], paths["target"], None))
    return EvalSet(dataset=None, pairs=pairs, total=len(pairs))


def test_best_and_worst_follow_each_scores_direction() -> None:
    rows = [
        {"name": "a", "lpips": 0.3, "ssim_256": 0.2},
        {"name": "b", "lpips": 0.1, "ssim_256": 0.9},
        {"name": "c", "lpips": float("nan"), "ssim_256": 0.5},
        {"name": "d", "lpips": 0.2, "ssim_256": 0.1},
        {"name": "e", "lpips": 0.1, "ssim_256": 0.7},
    ]
    result = _result(rows)
    best, worst = best_and_worst(result, "lpips", count=2)
    assert [r["name"] for r in best] == ["b", "e"]  # lower is better; the tie goes by name
    assert [r["name"] for r in worst] == ["c", "a"]  # NaN counts as the worst
    best, worst = best_and_worst(result, "ssim_256", count=2)
    assert [r["name"] for r in best] == ["b", "e"] and [r["name"] for r in worst] == ["d", "a"]
    assert ranking_score(result) == "lpips"
    assert ranking_score(_result(_rows(3, lpips=False))) == "ssim_256"
    one = _result(rows[:1])
    assert best_and_worst(one, "lpips") == ([rows[0]], [rows[0]])


def test_report_files(tmp_path) -> None:
    rows = _rows(6)
    rows[0]["psnr"] = math.inf  # an exact copy: scikit-image's PSNR is inf
    result = _result(rows, fid={"fid": 12.5})
    eval_set = _eval_set(tmp_path, [row["name"] for row in rows])
    run_info = {"layout": "deepfashion", "generated_dir": str(tmp_path / "generated"), "test_pairs": 8, "limit": 6}
    files = write_report(tmp_path / "out", result, run_info, eval_set, progress=False)

    body = json.loads(files["metrics"].read_text())  # strict JSON: json.loads would accept Infinity, so check text
    assert "Infinity" not in files["metrics"].read_text() and "NaN" not in files["metrics"].read_text()
    assert body["per_pair"][0]["psnr"] is None and body["means"]["psnr"] is None
    assert body["fid"] == {"fid": 12.5} and body["count"] == 6 and body["run"]["layout"] == "deepfashion"
    assert set(body) == {"count", "image_size", "means", "fid", "per_pair", "run"}

    assert {k for k in files if k.startswith("hist_")} == {"hist_ssim_256", "hist_psnr", "hist_lpips"}
    for key in ("grid", "hist_psnr", "hist_lpips"):
        with Image.open(files[key]) as image:
            assert image.format == "PNG" and min(image.size) > 100
    report = files["report"].read_text()
    assert "| **this run** | 32x24 | 12.5000 |" in report
    assert "not comparable" not in report and "partial run" in report
    assert f"]({GRID_FILE})" in report and "](hist_psnr.png)" in report
    assert "by lpips" in report
    for name, *_ in PUBLISHED:
        assert f"| {name} |" in report


def test_grid_shows_reference_generated_target(tmp_path) -> None:
    """Each row holds the three images in order: the grid's middle is the generated grey, its sides the real."""
    names = ["p0.png", "p1.png"]
    eval_set = _eval_set(tmp_path, names)
    result = _result([{"name": n, "ssim_256": v} for n, v in zip(names, (0.1, 0.2), strict=True)])
    path = write_grid(tmp_path / "grid.png", result, eval_set.pairs, tmp_path / "generated", "ssim_256")
    grid = np.asarray(Image.open(path).convert("L")).astype(int)
    levels = {int(v) for v in np.unique(grid)}
    assert {50, 150, 250} <= levels
    # Columns where a level fills a whole image height (text labels are anti-aliased into stray greys).
    columns = [np.where((grid == value).sum(axis=0) >= 2 * 100)[0] for value in (50, 150, 250)]
    assert columns[0].max() < columns[1].min() and columns[1].max() < columns[2].min()
    four = _result([{"name": f"q{i}.png", "ssim_256": i / 10} for i in range(8)])
    more = write_grid(
        tmp_path / "grid8.png",
        four,
        _eval_set(tmp_path / "x", [f"q{i}.png" for i in range(8)]).pairs,
        tmp_path / "x" / "generated",
        "ssim_256",
    )
    assert Image.open(more).size[1] > 3 * Image.open(path).size[1]  # 8 rows (4 best, 4 worst) against 2


@pytest.mark.parametrize("layout", ["synthetic", "market"])
def test_published_numbers_are_flagged_as_not_comparable(layout, tmp_path) -> None:
    result = _result(_rows(4, lpips=False))
    files = {"grid": tmp_path / GRID_FILE, "hist_psnr": tmp_path / "hist_psnr.png"}
    report = render_markdown(result, {"layout": layout, "test_pairs": 4}, "ssim_256", files)
    assert f"on the {layout} test set: the published numbers below are on DeepFashion and are not comparable" in report
    assert "this run**" not in report
    assert "FID" not in report.split("## Published")[0]  # no FID computed, none shown
