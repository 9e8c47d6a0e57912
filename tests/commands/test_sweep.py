"""Sweeps: ``train -m`` runs one job per combination in its own directory; ``summary`` tabulates them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detector.commands.summary import SweepError, format_table, summarize

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "detector", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_multirun_trains_each_job_in_its_own_dir_and_summary_lists_them(tmp_path):
    sweep = tmp_path / "sweep"
    result = _cli("train", "-m", "experiment=synthetic_tiny", "seed=0,1", "schedule.iterations=2", "device=cpu",
                  f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, seed in (("0", 0), ("1", 1)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["seed"] == seed and metrics["run_dir"] == str(sweep / job)
        assert (sweep / job / "final.pt").is_file() and (sweep / job / "log.jsonl").is_file()
    assert not (tmp_path / "runs").exists()  # nothing went to the default run root

    summary = _cli("summary", f"sweep={sweep}", cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    lines = summary.stdout.strip().splitlines()
    assert lines[0].split() == ["job", "arch", "seed", "AP", "AP50", "time_s", "status"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [("0", "fcos", "0", "finished"), ("1", "fcos", "1", "finished")]


def test_summary_lists_unfinished_jobs_and_orders_by_job_number(tmp_path):
    for job, finished in (("10", True), ("2", False), ("1", True)):
        folder = tmp_path / job
        folder.mkdir()
        (folder / "config.yaml").write_text(f"arch: nasfcos\nseed: {job}\n")
        if finished:
            (folder / "metrics.json").write_text(json.dumps(
                {"arch": "x", "arch_name": "nasfcos", "seed": int(job), "AP": 0.25, "AP50": 0.5, "train_seconds": 3.0}))
    rows = summarize(tmp_path)
    assert [r["job"] for r in rows] == ["1", "2", "10"]
    assert rows[0]["AP"] == 25.0 and rows[0]["AP50"] == 50.0 and rows[1]["status"] == "unfinished"
    table = format_table(rows)
    assert "25.0" in table and "unfinished" in table


def test_summary_of_a_folder_without_runs_is_a_one_line_error(tmp_path):
    with pytest.raises(SweepError, match="holds no training runs"):
        summarize(tmp_path)
    result = _cli("summary", f"sweep={tmp_path / 'missing'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "is not a folder" in result.stderr
