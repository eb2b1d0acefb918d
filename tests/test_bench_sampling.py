"""The sampling benchmarks run end to end in their tiny modes and print every row they promise."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, cwd=BENCH
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("|---") and cells[0] not in ("setting", "path"):
            rows[cells[0]] = cells[1:]
    return rows


def test_sampling_benchmark_has_every_lever_and_the_quality_columns():
    out = run("sampling.py", "--tiny", "--models", "S/2", "default", "--skip", "compile")
    assert "## X-MDPT-S/2" in out and "## embedded default" in out
    rows = table_rows(out)
    for label in ("public schedule", "ours, fp32", "bf16", "DPM-Solver++ 20", "[200, 800]", "FORA", "TeaCache"):
        assert any(label in row for row in rows), (label, out)
    assert any(row.startswith("all levers") for row in rows) and any(row.startswith("shipped") for row in rows)
    shipped = next(cells for row, cells in rows.items() if row.startswith("shipped"))
    seconds, speed_up, ssim, psnr, pose, pattern = shipped
    assert float(seconds) > 0 and speed_up.endswith("x") and 0 < float(ssim) <= 1 and pose.endswith("/4")
    assert not any("compile" in row for row in rows)


def test_end_to_end_benchmark_reports_a_further_pose_of_the_same_reference():
    out = run("pipeline.py", "--tiny", "--no-stages", "--dtype", "fp32")
    rows = table_rows(out)
    assert len(rows) == 4 and any("further pose" in row for row in rows), out
    assert all(cells[-1].endswith("x") for cells in rows.values())


def test_gpu_script_runs_its_tiny_mode_on_the_cpu():
    """bench/gpu.py, which runs whenever a GPU is lent, works end to end before that day comes."""
    out = run("gpu.py", "--tiny")
    lines = out.splitlines()
    for setting in ("| DDIM 50, guided every step | ", "| DPM-Solver++ 20, [200, 800], fora:3 | "):
        rows = [line for line in lines if line.startswith(setting)]
        assert [row.split(" | ")[1] for row in rows] == ["1", "2"], out  # batches 1 and 2 (1, 16, 64 on a GPU)
        assert all(float(row.split(" | ")[2]) > 0 for row in rows)
    assert "## training" in out and "speed-up synthetic 64x48 stage 1, routing" in out
