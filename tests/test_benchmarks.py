"""Smoke test of benchmarks/vs_trl.py: one repetition of DPO and GRPO on the tiny config, JSON schema checked.
Timings are never asserted: benchmarks print tables, tests check behaviour."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"workload", "unit", "ours_per_s", "trl_per_s", "ratio", "ours_peak_mb", "trl_peak_mb", "ours_quality",
            "trl_quality", "device", "memory_ratio"}


@pytest.mark.slow
def test_vs_trl_writes_one_row_per_workload_with_the_documented_fields(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "latest.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--device", "cpu", "--model-size", "tiny", "--quick",
         "--reps", "1", "--workloads", "dpo,grpo,ppo", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["workload"] for r in rows] == ["dpo", "grpo", "ppo-gae"]
    for row in rows:
        assert REQUIRED <= row.keys(), REQUIRED - row.keys()
        assert row["errors"] == [], row["errors"]
        assert row["device"].startswith("cpu")
        for key in ("ours_per_s", "trl_per_s", "ours_peak_mb", "trl_peak_mb"):
            assert row[key] > 0, key
        assert row["ratio"] == pytest.approx(row["ours_per_s"] / row["trl_per_s"])  # one repetition: one pair
        assert row["memory_ratio"] == pytest.approx(row["ours_peak_mb"] / row["trl_peak_mb"])
        assert isinstance(row["ours_quality"], float) and isinstance(row["trl_quality"], float)
    assert rows[0]["unit"] == "pairs" and rows[1]["unit"] == rows[2]["unit"] == "completions"
    assert rows[2]["trl"] == "GRPOTrainer" and rows[2]["trl_runs"] == rows[1]["trl_runs"]  # PPO shares GRPO's TRL runs
    assert 0 < rows[1]["ours_gen_fraction"] < 1 and 0 < rows[1]["trl_gen_fraction"] < 1
    assert "| dpo vs DPOTrainer" in proc.stdout  # the printed table
    assert out.with_suffix(".txt").read_text().startswith("| workload")
