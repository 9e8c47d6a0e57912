"""`python -m search report`: report.md (top-k table, stages, failures), PNG plots, the best
architecture's diagram and the retrain command."""
from __future__ import annotations

import re

import pytest

from detector.cli import compose
from detector.errors import UserError
from search.report import report_command, write_report
from search.run import run_command
from search_runs import rows_of, toy_cfg

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def top_table_codes(markdown: str) -> list[str]:
    section = markdown.split("## Top", 1)[1].split("##", 1)[0]
    return re.findall(r"^\| \d+ \| `([^`]+)` \|", section, flags=re.MULTILINE)


def test_run_writes_the_report_and_report_rewrites_it_from_history(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_command(toy_cfg(run_dir, "search.budget=4", "proxy_eval.fail_prob=0.3", "search.retries=0",
                        "proxy_eval.noise=0.05"))
    out = capsys.readouterr().out
    assert f"python -m detector train arch={run_dir}" in out  # run ends with the report and the command
    for name in ("report.md", "reward_per_trial.png", "best_so_far.png", "best_arch.png"):
        (run_dir / name).unlink()

    report_command(compose("search", [f"run={run_dir}", "search.top_k=3"]))
    assert f"python -m detector train arch={run_dir}" in capsys.readouterr().out
    for name in ("reward_per_trial.png", "best_so_far.png", "best_arch.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC, name
    markdown = (run_dir / "report.md").read_text()
    rows = rows_of(run_dir)
    ok = sorted((r for r in rows if r["status"] == "ok" and not r["reused"]), key=lambda r: -r["reward"])
    assert top_table_codes(markdown) == [r["code"] for r in ok[:3]]  # best first, distinct codes, k rows
    assert (run_dir / "best.txt").read_text().strip() == ok[0]["code"]
    failed = [r for r in rows if r["status"] != "ok"]
    assert failed and f"{len(failed)} error" in markdown  # failures are counted in the report
    assert "| 0 | fpn | 4 |" in markdown and "| 1 | head | 4 |" in markdown  # per-stage table


def test_report_of_a_run_without_finished_trials(tmp_path, capsys):
    from search.run_dir import create_run_dir

    run = create_run_dir(tmp_path / "run")
    run.write_config({"search": {"stages": ["fpn"], "budget": 3}})
    run.unlock()
    path = write_report(run.path)
    text = path.read_text()
    assert "No trial has finished yet" in text and "no best code" in text
    assert not (run.path / "reward_per_trial.png").exists()
    assert "retrain" not in capsys.readouterr().out


@pytest.mark.parametrize("value, message", [(None, "give a search run directory"),
                                            ("missing", "not a directory"), ("plain", "no config.yaml")])
def test_report_needs_a_run_dir(tmp_path, value, message):
    (tmp_path / "plain").mkdir()
    overrides = [] if value is None else [f"run={tmp_path / value}"]
    with pytest.raises(UserError, match=message):
        report_command(compose("search", overrides))
