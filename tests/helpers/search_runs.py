"""Search runs in tests: a toy search config and the invariants every finished run keeps."""
from __future__ import annotations

import json
from pathlib import Path

from detector.arch.zoo import resolve_arch
from detector.cli import compose
from search.history import read_history


def toy_cfg(run_dir: Path, *overrides: str):
    return compose("search", ["proxy_eval=toy", "executor=local", "search.workers=1", "search.budget=5",
                              f"search.run_dir={run_dir}", f"cache_dir={run_dir.parent / 'cache'}", *overrides])


def rows_of(run_dir: Path) -> list[dict]:
    return read_history(run_dir / "history.jsonl").rows


def check_completed_run(run_dir: Path, stages: list[str], budget: int) -> list[dict]:
    """Invariants of every finished run; returns the history rows."""
    rows = rows_of(run_dir)
    assert [r["trial"] for r in rows] == list(range(len(rows)))
    for index, name in enumerate(stages):
        own = [r for r in rows if r["stage_index"] == index]
        assert all(r["stage"] == name for r in own)
        assert sum(not r["reused"] for r in own) == budget  # the budget counts trained trials
    trained_codes = [r["code"] for r in rows if not r["reused"]]
    assert len(trained_codes) == len(set(trained_codes)), "a code was trained twice"
    ok = [r for r in rows if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["reward"])
    assert (run_dir / "best.txt").read_text().strip() == best["code"]
    assert str(resolve_arch(str(run_dir))) == best["code"]  # what `detector train arch=<run_dir>` reads
    assert json.loads((run_dir / "state.json").read_text())["status"] == "finished"
    for index, name in enumerate(stages):
        assert (run_dir / f"searcher-{index}-{name}.pt").is_file()
    return rows


def toy_stage_searcher(tmp_path: Path):
    """(adapter, run_dir): the searcher Ray Tune drives (``search.ray_executor.StageSearcher``, one retry)
    over a fresh toy run of one fpn stage with a budget of 2, for tests that call it as Tune would."""
    from controller.build import build_searcher
    from search.history import History
    from search.loop import SearchRecord, StageSequence
    from search.ray_executor import StageSearcher
    from search.run_dir import create_run_dir

    cfg = toy_cfg(tmp_path / "run", "search.stages=[fpn]", "search.budget=2")
    run_dir = create_run_dir(cfg.search.run_dir)
    record = SearchRecord(run_dir, History(run_dir.history_path), ["fpn"], 2)
    stages = StageSequence(cfg, record, lambda space, seed: build_searcher(cfg.controller, space, seed))
    return StageSearcher(stages, stages.next_stage(), retries=1), run_dir
