"""Resuming a search: after SIGKILL of the driver, after a history line cut mid-write, a finished
run, bad run dirs; the lock against a live search; the CLI's exit code 2 on bad input."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detector.cli import compose
from detector.errors import UserError
from search.history import History, read_history
from search.run import run_search
from search.run_dir import open_run_dir
from search_runs import check_completed_run, rows_of, toy_cfg

ROOT = Path(__file__).resolve().parents[2]


def search_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-m", "search", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def wait_for_rows(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "history.jsonl").exists() and len(rows_of(run_dir)) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the search ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {count} history rows after {timeout} s")


def test_resume_after_sigkill_completes_the_budget_and_trains_nothing_twice(tmp_path):
    run_dir = tmp_path / "run"
    proc = search_cli("run", "proxy_eval=toy", "proxy_eval.sleep_s=0.3", "executor=local", "search.workers=1",
                      "search.budget=4", f"search.run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}")
    try:
        wait_for_rows(run_dir, 2, proc)
        with pytest.raises(UserError, match=f"in use by another search \\(pid {proc.pid}\\)"):
            open_run_dir(run_dir)  # the lock refuses a second search while the first is alive
        time.sleep(0.1)  # land inside the next trial's sleep
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    before = rows_of(run_dir)
    assert 2 <= len(before) < 8, "the kill must land mid-run"
    searcher_files = [run_dir / "searcher-0-fpn.pt", run_dir / "searcher-1-head.pt"]
    pending_at_kill = {index: [p["id"] for p in torch.load(path, weights_only=True)["pending"]]
                       for index, path in enumerate(searcher_files) if path.exists()}

    run_search(compose("search", [f"resume={run_dir}"]))

    after = check_completed_run(run_dir, ["fpn", "head"], 4)  # exact budget, no code trained twice
    assert after[: len(before)] == before  # no finished trial was lost or rewritten
    for index, ids in pending_at_kill.items():  # proposals pending at the kill: re-run, or told from history
        assert set(ids) <= {r["proposal_id"] for r in after if r["stage_index"] == index}
    for index, stage in enumerate(["fpn", "head"]):
        state = torch.load(run_dir / f"searcher-{index}-{stage}.pt", weights_only=True)
        assert state["pending"] == [] and state["num_told"] == sum(r["stage_index"] == index for r in after)


class Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs, not even except-blocks."""


def test_a_history_line_cut_by_a_kill_is_dropped_and_its_trial_runs_again(tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    real_append = History.append

    def append_then_die_mid_line(self, row):
        if len(self.rows) == 3:
            line = json.dumps({"trial": 3, **row}).encode()
            with open(self.path, "ab") as f:
                f.write(line[: len(line) // 2])
            raise Killed
        return real_append(self, row)

    monkeypatch.setattr(History, "append", append_then_die_mid_line)
    with pytest.raises(Killed):
        run_search(toy_cfg(run_dir, "search.budget=3"))
    monkeypatch.setattr(History, "append", real_append)
    assert not (run_dir / "history.jsonl").read_bytes().endswith(b"\n")
    assert len(read_history(run_dir / "history.jsonl").rows) == 3

    with caplog.at_level(logging.WARNING, logger="search.history"):
        run_search(compose("search", [f"resume={run_dir}"]))
    assert "truncated last line" in caplog.text
    check_completed_run(run_dir, ["fpn", "head"], 3)
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["trial"] for line in lines] == list(range(len(lines)))  # the file is whole again


def test_resuming_a_finished_run_does_nothing_and_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_search(toy_cfg(run_dir, "search.budget=2"))
    history = (run_dir / "history.jsonl").read_bytes()
    capsys.readouterr()
    # the head stage has trials: a larger budget would reopen the fpn stage it fixed, so it is ignored
    run_search(compose("search", [f"resume={run_dir}", "search.budget=9"]))
    assert "already complete" in capsys.readouterr().out
    assert (run_dir / "history.jsonl").read_bytes() == history


def test_raising_the_budget_on_resume_continues_a_finished_search_as_if_it_had_been_given_first(tmp_path):
    once, twice = tmp_path / "once", tmp_path / "twice"
    run_search(toy_cfg(once, "search.stages=[fpn]", "search.budget=5", "controller=ppo"))
    run_search(toy_cfg(twice, "search.stages=[fpn]", "search.budget=2", "controller=ppo"))
    first = rows_of(twice)

    run_search(compose("search", [f"resume={twice}", "search.budget=5"]))

    rows = check_completed_run(twice, ["fpn"], 5)
    assert rows[:2] == first  # the trials already paid for are kept, not re-run
    assert [r["code"] for r in rows] == [r["code"] for r in rows_of(once)]  # the controller went on where it was
    assert "budget: 5" in (twice / "config.yaml").read_text()


def test_a_resume_cannot_lower_the_budget(tmp_path):
    run_dir = tmp_path / "run"
    run_search(toy_cfg(run_dir, "search.stages=[fpn]", "search.budget=3"))
    with pytest.raises(UserError, match="can raise the run's budget \\(3 trained trials per stage\\), not lower it"):
        run_search(compose("search", [f"resume={run_dir}", "search.budget=2"]))


def test_a_best_txt_left_behind_by_a_kill_after_the_history_append_is_brought_up_to_date(tmp_path):
    """A driver killed between appending the new best row and writing best.txt (found on a Ray
    cluster, tests/search/test_ray_cluster.py) left best.txt naming an older code; opening the run fixes it."""
    run_dir = tmp_path / "run"
    run_search(toy_cfg(run_dir, "search.budget=2"))
    rows = rows_of(run_dir)
    best = max((r for r in rows if r["status"] == "ok"), key=lambda r: r["reward"])["code"]
    stale = next(r["code"] for r in rows if r["code"] != best)
    (run_dir / "best.txt").write_text(stale + "\n")
    run_search(compose("search", [f"resume={run_dir}"]))
    assert (run_dir / "best.txt").read_text().strip() == best


def test_bad_resume_dirs_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for value, message in ((tmp_path / "missing", "not a directory"), (tmp_path / "empty", "no config.yaml"),
                           (tmp_path / "file", "not a directory")):
        with pytest.raises(UserError, match=message):
            run_search(compose("search", [f"resume={value}"]))


@pytest.mark.parametrize("args, message", [
    (("run", "resume=/nonexistent/run"), "resume: '/nonexistent/run' is not a directory"),
    (("run", "search.budget=-1", "proxy_eval=toy"), "search.budget"),
    (("report", "run=/nonexistent/run"), "run: '/nonexistent/run' is not a directory"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message):
    proc = search_cli(*args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.strip().count("\n") == 0 and message in err and "Traceback" not in err


def test_resume_takes_runtime_keys_from_the_command_line_and_keeps_the_saved_search(caplog):
    from search.run import resume_config

    saved = compose("search", ["proxy_eval=toy", "search.budget=2", "executor=ray", "seed=3"])
    given = compose("search", ["resume=/somewhere", "executor=local", "search.workers=3", "search.budget=9",
                               "logger=wandb"])
    with caplog.at_level(logging.WARNING, logger="search.run"):
        merged = resume_config(given, saved)
    assert (merged.executor.name, merged.search.workers, merged.logger.name) == ("local", 3, "wandb")
    assert (merged.search.budget, merged.proxy_eval.name, merged.seed) == (2, "toy", 3)  # the run's own
    assert "ignoring search.budget" in caplog.text
