"""The evaluation report: metrics.json, report.md beside the published table, a best/worst grid, histograms.

Files written to the output folder:

* ``metrics.json``: ``EvaluationResult.as_dict()`` (count, image size, means, FID by label, per-pair rows) plus
  ``"run"`` (model, sampler, steps, guidance, seed, sizes, counts, protocol version, timings). Strict JSON: a
  non-finite score (PSNR of an exact copy is inf) is written as null.
* ``report.md``: this run's metrics, the published DeepFashion table (reference section 9) with this run beside it,
  the grid and the histograms.
* ``pairs_best_worst.png``: the best and the worst pairs by LPIPS (by SSIM_256 when LPIPS was not computed), each
  row reference | generated | target.
* ``hist_<score>.png``: the distribution of each per-pair score.

Plots use matplotlib's object API on the Agg canvas (no display, no global backend switch).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xmdpt.errors import InputError
from xmdpt.evaluation.generate import EvalPair, EvalSet
from xmdpt.evaluation.metrics import HIGHER_IS_BETTER, EvaluationResult
from xmdpt.evaluation.protocol import load_generated_image, load_real_image

logger = logging.getLogger(__name__)

#: Published DeepFashion numbers (reference section 9): system, resolution, FID, SSIM, LPIPS, params, s/image.
PUBLISHED: tuple[tuple[str, str, float | None, float | None, float | None, str, str], ...] = (
    ("X-MDPT-S (README, 300k steps)", "256x256", 7.42, None, None, "33.5M", "1.1 s"),
    ("X-MDPT-B (README)", "256x256", 6.72, None, None, "131.9M", "1.3 s"),
    ("X-MDPT-L (README)", "256x256", 6.60, None, None, "460.2M", "3.1 s"),
    ("X-MDPT-L (paper, as quoted elsewhere)", "256x176", 6.25, 0.729, 0.167, "", ""),
    ("PIDM (CVPR 2023, pixel U-Net)", "256x176", 6.36, 0.731, 0.168, "~688M", "16.9 s"),
    ("PoCoLD (ICCV 2023, latent U-Net)", "256x176", 8.07, 0.731, 0.164, "~396M", "3.2 s"),
    ("CFLD (CVPR 2024, SD U-Net)", "256x176", 6.80, 0.737, 0.152, "", ""),
    ("MCLD (CVPR 2025)", "256x176", 6.69, 0.751, 0.148, "1717M", ""),
)

#: Row labels of the metrics table, in display order.
SCORE_LABELS: dict[str, str] = {
    "fid": "FID (torchvision Inception-v3, the protocol's)",
    "fid_tf": "FID (TF-Inception, torch-fidelity's)",
    "ssim": "SSIM (RGB, 51x51 uniform window)",
    "ssim_256": "SSIM_256 (gaussian sigma 1.5, 0-255)",
    "lpips": "LPIPS (AlexNet)",
    "psnr": "PSNR (dB)",
    "l1": "L1 (mean abs. error on [0, 1])",
    "color_de": "colour error on the figure (mean CIE76 Delta E)",
    "color_hist": "colour histogram distance on the figure (1 - intersection)",
}

GRID_FILE = "pairs_best_worst.png"
GRID_PAIRS = 4  # best and worst pairs shown each


def write_report(
    out_dir: Path, result: EvaluationResult, run_info: dict, eval_set: EvalSet, *, progress: bool = True
) -> dict[str, Path]:
    """Write metrics.json, report.md, the grid and the histograms; return their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md"}
    write_metrics_json(files["metrics"], result, run_info)
    ranking = ranking_score(result)
    generated_dir = Path(run_info["generated_dir"])
    files["grid"] = write_grid(out_dir / GRID_FILE, result, eval_set.pairs, generated_dir, ranking)
    for score, path in write_histograms(out_dir, result).items():
        files[f"hist_{score}"] = path
    files["report"].write_text(render_markdown(result, run_info, ranking, files))
    logger.info("wrote the report to %s", files["report"])
    return files


# ---------------------------------------------------------------------------------------------------- metrics.json


def write_metrics_json(path: Path, result: EvaluationResult, run_info: dict) -> None:
    body = {**result.as_dict(), "run": run_info}
    path.write_text(json.dumps(_finite_or_null(body), indent=1, allow_nan=False) + "\n")


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------- ranking, grid


def ranking_score(result: EvaluationResult) -> str:
    """LPIPS when it was computed, else SSIM_256 (always computed)."""
    return "lpips" if result.per_pair and "lpips" in result.per_pair[0] else "ssim_256"


def best_and_worst(result: EvaluationResult, score: str, count: int = GRID_PAIRS) -> tuple[list[dict], list[dict]]:
    """The `count` best and worst per-pair rows by `score`, best first and worst first (NaN counts as worst;
    ties are broken by name, so the choice is stable)."""

    def badness(row: dict) -> float:
        value = float(row[score])
        if math.isnan(value):
            return math.inf
        return -value if HIGHER_IS_BETTER[score] else value

    rows = sorted(result.per_pair, key=lambda row: (badness(row), row["name"]))
    count = min(count, max(1, len(rows) // 2))
    worst = sorted(rows, key=lambda row: (-badness(row), row["name"]))
    return rows[:count], worst[:count]


def write_grid(
    path: Path, result: EvaluationResult, pairs: Sequence[EvalPair], generated_dir: Path, score: str
) -> Path:
    """Rows of reference | generated | target for the best, then the worst pairs, titled with their score."""
    from matplotlib.figure import Figure

    by_name = {pair.name: pair for pair in pairs}
    best, worst = best_and_worst(result, score)
    rows = [("best", row) for row in best] + [("worst", row) for row in worst]
    height, width = result.image_size
    cell = 2.2  # inches per image row
    figure = Figure(figsize=(3 * cell * width / height + 0.4, cell * len(rows) + 0.3), layout="constrained")
    axes = figure.subplots(len(rows), 3, squeeze=False)
    for (kind, row), line in zip(rows, axes, strict=True):
        pair = by_name.get(str(row["name"]))
        if pair is None:
            raise InputError(f"pair {row['name']!r} is not in the test set")
        images = (
            load_real_image(pair.reference_path, result.image_size),
            load_generated_image(generated_dir / pair.name, result.image_size),
            load_real_image(pair.target_path, result.image_size),
        )
        for ax, image, label in zip(line, images, ("reference", "generated", "target"), strict=True):
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=7)
        line[0].set_ylabel(f"{kind}\n{score} {row[score]:.3f}", fontsize=7)
        line[1].set_title(f"generated: {_shorten(pair.name)}", fontsize=6)
    figure.suptitle(f"best and worst pairs by {score}", fontsize=9)
    figure.savefig(path, dpi=100)
    return path


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit // 2 - 1] + "..." + text[-(limit // 2 - 2) :]


# ------------------------------------------------------------------------------------------------------ histograms


def write_histograms(out_dir: Path, result: EvaluationResult) -> dict[str, Path]:
    """One PNG per per-pair score: hist_<score>.png (non-finite values are counted in the title, not plotted)."""
    from matplotlib.figure import Figure

    if not result.per_pair:
        return {}
    out = {}
    scores = [key for key in result.per_pair[0] if key != "name"]
    for score in scores:
        values = np.array([row[score] for row in result.per_pair], dtype=np.float64)
        finite = values[np.isfinite(values)]
        figure = Figure(figsize=(4.5, 3.0), layout="constrained")
        ax = figure.subplots()
        if finite.size:
            ax.hist(finite, bins=min(30, max(5, finite.size // 3)), color="#4c72b0", edgecolor="white")
            ax.axvline(float(finite.mean()), color="#c44e52", linestyle="--", label=f"mean {finite.mean():.4g}")
            ax.legend(fontsize=7)
        dropped = values.size - finite.size
        title = f"{SCORE_LABELS.get(score, score)}\n{values.size} pairs"
        ax.set_title(title + (f", {dropped} non-finite not shown" if dropped else ""), fontsize=8)
        ax.set_xlabel(score, fontsize=8)
        ax.set_ylabel("pairs", fontsize=8)
        path = out_dir / f"hist_{score}.png"
        figure.savefig(path, dpi=100)
        out[score] = path
    return out


# ---------------------------------------------------------------------------------------------------- report.md


def render_markdown(result: EvaluationResult, run_info: dict, ranking: str, files: dict[str, Path]) -> str:
    """The Markdown report: run, metrics, the published table with this run, best/worst pairs, histograms."""
    layout = run_info.get("layout", "?")
    parts = [f"# X-MDPT evaluation: {layout} test set", "", *_run_lines(run_info, result), ""]
    parts += ["## Metrics", "", "| metric | value | better |", "|---|---|---|"]
    for key, label in SCORE_LABELS.items():
        value = result.fid.get(key, result.means.get(key))
        if value is not None:
            parts.append(f"| {label} | {_fmt(value)} | {'higher' if HIGHER_IS_BETTER[key] else 'lower'} |")
    parts += ["", *_published_section(result, run_info), ""]
    best, worst = best_and_worst(result, ranking)
    parts += [f"## Best and worst pairs by {ranking}", "", f"![best and worst pairs]({files['grid'].name})", ""]
    parts += ["Rows: reference | generated | target.", ""]
    for kind, rows in (("best", best), ("worst", worst)):
        parts.append(f"- {kind}: " + ", ".join(f"`{row['name']}` ({_fmt(row[ranking])})" for row in rows))
    parts += ["", "## Per-pair score distributions", ""]
    for key, path in files.items():
        if key.startswith("hist_"):
            parts.append(f"![{key[5:]}]({path.name})")
    return "\n".join(parts) + "\n"


def _run_lines(run_info: dict, result: EvaluationResult) -> list[str]:
    generation = run_info.get("generation") or {}
    pairs = f"{result.count} of {run_info.get('test_pairs', result.count)} test pairs"
    if run_info.get("limit"):
        pairs += f" (--limit {run_info['limit']}: a partial run, whose numbers are not those of the full test set)"
    lines = [
        f"- model: `{generation.get('model', 'not recorded (scored an existing folder)')}`",
        f"- sampler: {generation.get('sampler', '?')}, {generation.get('steps', '?')} steps, "
        f"guidance {generation.get('guidance', '?')}, seed {generation.get('seed', '?')}"
        + (f", {generation['precision']} autocast" if generation.get("precision", "fp32") != "fp32" else "")
        + (f", feature cache {generation['cache']}" if generation.get("cache", "none") != "none" else ""),
        f"- sizes: evaluated at {result.image_size[0]}x{result.image_size[1]}"
        + (f", model output {generation['model_size']}" if generation.get("model_size") else ""),
        f"- pairs: {pairs}",
        f"- generated images: `{run_info.get('generated_dir', '?')}`",
        f"- protocol: {run_info.get('protocol', '?')}",
    ]
    if run_info.get("real_set_images"):
        lines.append(f"- FID real set: the whole training split, {run_info['real_set_images']} images")
    return lines


def _published_section(result: EvaluationResult, run_info: dict) -> list[str]:
    layout = run_info.get("layout")
    lines = ["## Published numbers (DeepFashion, copied from the papers, not re-measured)", ""]
    if layout != "deepfashion" and layout != "pidm":
        lines += [
            f"**This run is on the {layout} test set: the published numbers below are on DeepFashion and are not "
            "comparable with it.** They are shown for orientation only.",
            "",
        ]
    else:
        lines += [
            "The X-MDPT README models run at 256x256 (the person stretched); the others at 256x176. The papers "
            "report one SSIM; the lineage's scripts compute both variants, so this run shows SSIM / SSIM_256.",
            "",
        ]
    lines += [
        "| system | resolution | FID | SSIM | LPIPS | params | time / image (A100) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, size, fid, ssim, lpips, params, seconds in PUBLISHED:
        lines.append(f"| {name} | {size} | {_fmt(fid)} | {_fmt(ssim)} | {_fmt(lpips)} | {params} | {seconds} |")
    if layout in ("deepfashion", "pidm"):
        ssim_pair = f"{_fmt(result.means.get('ssim'))} / {_fmt(result.means.get('ssim_256'))}"
        size = f"{result.image_size[0]}x{result.image_size[1]}"
        lines.append(
            f"| **this run** | {size} | {_fmt(result.fid.get('fid'))} | {ssim_pair} | "
            f"{_fmt(result.means.get('lpips'))} | | |"
        )
    return lines


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
