"""Damaged and unwritable files of a search: history.jsonl, the searcher state, config.yaml,
state.json, the feature cache; and a full disk while each of them is written.

Damage is real bytes on disk (cut, garbage, emptied, deleted). A full disk is a real kernel
fault: a file-size limit (RLIMIT_FSIZE) during one chosen write cuts the write short and fails
it with EFBIG, exactly the short write a full disk gives (ENOSPC). Expected outcomes:

- a damaged last history line: dropped with a warning, the run resumes to the exact budget;
- damage anywhere else: one line naming the file and the fix (exit 2), the file left as it was;
- a damaged feature cache: detected by its checksum, rebuilt with a warning;
- a full disk: one line (exit 2) naming the file; every file written before is intact (atomic
  writes; a cut history line is removed again) and the run resumes.
Training checkpoints: tests/faults/test_faults_training.py.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from controller.base import Searcher
from detector.cli import compose
from detector.errors import WriteError
from faults import (assert_one_line_bad_input, disk_full_on_call, files_changed, parse_history_lines, record_fault,
                    rows_lost, run_cli_in_process, snapshot)
from proxy_eval.feature_cache import FeatureCache
from search import run_dir as run_dir_module
from search.history import History
from search.run import run_search
from test_faults_search import TINY_CACHED
from search_runs import check_completed_run, rows_of, toy_cfg

STAGES = ["fpn", "head"]
BUDGET = 3


class Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs."""


def partial_run(tmp_path: Path, monkeypatch, rows: int = 4) -> Path:
    """A toy run stopped (as if killed) when it was about to write history row ``rows``."""
    run_dir = tmp_path / "run"
    real_append = History.append

    def append(self, row):
        if len(self.rows) >= rows:
            raise Killed
        return real_append(self, row)

    monkeypatch.setattr(History, "append", append)
    with pytest.raises(Killed):
        run_search(toy_cfg(run_dir, f"search.budget={BUDGET}"))
    monkeypatch.undo()
    assert len(rows_of(run_dir)) == rows
    return run_dir


def resume(run_dir: Path) -> None:
    run_search(compose("search", [f"resume={run_dir}"]))


def no_temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------- history.jsonl
@pytest.mark.parametrize("damage", ["cut mid-line", "binary garbage"])
def test_a_damaged_last_history_line_is_dropped_with_a_warning_and_the_run_resumes(tmp_path, monkeypatch, caplog,
                                                                                   damage, record_property):
    run_dir = partial_run(tmp_path, monkeypatch)
    path = run_dir / "history.jsonl"
    good = path.read_bytes().splitlines(keepends=True)
    if damage == "cut mid-line":  # the last line loses its second half (a copy or write cut short)
        path.write_bytes(b"".join(good[:-1]) + good[-1][: len(good[-1]) // 2])
    else:
        path.write_bytes(b"".join(good) + b"\x00\xff\xfe{\"trial\": 4, \"sta")
    kept = [json.loads(line) for line in (good[:-1] if damage == "cut mid-line" else good)]

    with caplog.at_level(logging.WARNING, logger="search.history"):
        resume(run_dir)
    assert "dropped a truncated last line" in caplog.text
    rows = check_completed_run(run_dir, STAGES, BUDGET)
    record_fault(record_property, 1, rows_lost(kept, rows))
    assert parse_history_lines(path) == rows and rows_lost(kept, rows) == 0


def test_a_damaged_history_line_before_the_last_is_refused_in_one_line_and_left_alone(tmp_path, monkeypatch,
                                                                                      record_property):
    run_dir = partial_run(tmp_path, monkeypatch)
    path = run_dir / "history.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:30] + "###\n"
    path.write_text("".join(lines))
    damaged = path.read_bytes()
    line = assert_one_line_bad_input(run_cli_in_process("search", ["run", f"resume={run_dir}"]), "resume",
                                     strict=False)
    assert "history.jsonl: line 2 is not a valid history row" in line and "restore it" in line
    record_fault(record_property, 1, int(path.read_bytes() != damaged))
    assert path.read_bytes() == damaged  # nothing was cut or rewritten


# ---------------------------------------------------------------------- other run files
def test_a_damaged_searcher_state_is_refused_in_one_line_and_the_run_resumes_without_it(tmp_path, monkeypatch,
                                                                                        record_property):
    run_dir = partial_run(tmp_path, monkeypatch)
    state = run_dir / "searcher-1-head.pt"  # row 4 belongs to the head stage
    state.write_bytes(state.read_bytes()[:100])
    line = assert_one_line_bad_input(run_cli_in_process("search", ["run", f"resume={run_dir}"]), "resume",
                                     strict=False)
    assert "controller state: cannot read" in line and "searcher-1-head.pt" in line
    before = rows_of(run_dir)
    state.unlink()  # the recovery: the stage continues with a fresh searcher; history keeps the budget
    resume(run_dir)
    rows = check_completed_run(run_dir, STAGES, BUDGET)
    record_fault(record_property, 1, rows_lost(before, rows))
    assert rows_lost(before, rows) == 0


def test_a_damaged_config_is_refused_in_one_line(tmp_path, monkeypatch, record_property):
    run_dir = partial_run(tmp_path, monkeypatch)
    (run_dir / "config.yaml").write_text("search: [unclosed\n  budget: {")
    before = snapshot(run_dir)
    line = assert_one_line_bad_input(run_cli_in_process("search", ["run", f"resume={run_dir}"]), "resume",
                                     strict=False)
    assert "config.yaml: unreadable" in line
    record_fault(record_property, 1, files_changed(before, run_dir))
    assert files_changed(before, run_dir) == 0


def test_a_damaged_state_json_is_ignored_because_history_is_the_source_of_truth(tmp_path, monkeypatch,
                                                                                record_property):
    run_dir = partial_run(tmp_path, monkeypatch)
    before = rows_of(run_dir)
    (run_dir / "state.json").write_bytes(b"\x00garbage{")
    resume(run_dir)
    rows = check_completed_run(run_dir, STAGES, BUDGET)  # it also reads the rewritten state.json
    record_fault(record_property, 1, rows_lost(before, rows))
    assert rows_lost(before, rows) == 0


# ---------------------------------------------------------------------- feature cache
def cached_cfg(tmp_path: Path, run: str, cache_dir: Path):
    return compose("search", [*TINY_CACHED, "search.stages=[fpn]", "search.budget=1",
                              f"search.run_dir={tmp_path / run}", f"cache_dir={cache_dir}"])


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A feature cache dir with one cache (built by prepare, as the search does), and its features."""
    from proxy_eval.prepare import prepare

    base = tmp_path_factory.mktemp("cache-faults")
    cache = prepare(cached_cfg(base, "unused", base / "cache"))
    return base / "cache", cache.load().train.features


def damage_cache(cache: FeatureCache, damage: str) -> None:
    tensor_file, checksum = cache.tensor_file, cache.path / "features.pt.sha256"
    if damage == "truncated":
        tensor_file.write_bytes(tensor_file.read_bytes()[: tensor_file.stat().st_size // 2])
    elif damage == "flipped bytes":
        data = bytearray(tensor_file.read_bytes())
        data[len(data) // 2: len(data) // 2 + 16] = bytes(16)
        tensor_file.write_bytes(bytes(data))
    elif damage == "empty checksum":
        checksum.write_text("")
    elif damage == "tensor file deleted":
        tensor_file.unlink()


def only_cache(cache_dir: Path) -> FeatureCache:
    (key,) = [p.name for p in (cache_dir / "features").iterdir()]
    return FeatureCache(cache_dir / "features", key)


@pytest.mark.parametrize("damage", ["truncated", "flipped bytes", "empty checksum", "tensor file deleted"])
def test_a_damaged_feature_cache_is_detected_and_rebuilt_to_the_same_features(built_cache, tmp_path, caplog,
                                                                               damage, record_property):
    from proxy_eval.prepare import prepare

    cache_dir, features = built_cache
    damage_cache(only_cache(cache_dir), damage)
    with caplog.at_level(logging.WARNING, logger="proxy_eval.prepare"):
        rebuilt = prepare(cached_cfg(tmp_path, "unused", cache_dir))
    assert "rebuilding the cache" in caplog.text
    rebuilt.verify()
    assert only_cache(cache_dir).path == rebuilt.path and no_temp_files(cache_dir / "features") == []
    after = rebuilt.load().train.features
    differing = sum(not torch.equal(after[level], tensor) for level, tensor in features.items())
    record_fault(record_property, 1, differing)
    assert differing == 0  # seeded: the same features again


def test_a_search_over_a_truncated_feature_cache_rebuilds_it_and_completes(built_cache, tmp_path, caplog,
                                                                           record_property):
    cache_dir, _ = built_cache
    damage_cache(only_cache(cache_dir), "truncated")
    with caplog.at_level(logging.WARNING, logger="proxy_eval.prepare"):
        run_search(cached_cfg(tmp_path, "run", cache_dir))
    assert "rebuilding the cache" in caplog.text
    rows = check_completed_run(tmp_path / "run", ["fpn"], 1)
    assert rows[0]["status"] == "ok"
    record_fault(record_property, 1, 1 - len(rows))


# ---------------------------------------------------------------------- a full disk
def history_row_limit(history, row) -> int:
    return history.path.stat().st_size + 40  # room for 40 bytes of the new line


FULL_DISK_WRITES = {
    # name: (owner, attribute, call, file-size limit, the file it writes, how to read it back, reason)
    "history.jsonl": (History, "append", 4, history_row_limit, "history.jsonl", parse_history_lines,
                      "File too large"),
    "searcher state": (Searcher, "save", 5, lambda *a, **k: 256, "searcher-0-fpn.pt",
                       lambda p: torch.load(p, weights_only=True), "the write was cut short"),  # torch.save
    "state.json": (run_dir_module, "atomic_write_text", 6, lambda *a, **k: 64, "state.json",
                   lambda p: json.loads(p.read_text()), "File too large"),
}


@pytest.mark.parametrize("write", list(FULL_DISK_WRITES))
def test_a_full_disk_is_one_line_keeps_every_file_whole_and_the_run_resumes(tmp_path, monkeypatch, write,
                                                                            record_property):
    owner, attr, call, limit, name, read_back, reason = FULL_DISK_WRITES[write]
    run_dir = tmp_path / "run"
    before: dict[str, bytes] = {}

    def snapshot_then_fail(*args, **kwargs):
        before.update(snapshot(run_dir))
        return limit(*args, **kwargs)

    calls = disk_full_on_call(monkeypatch, owner, attr, call, snapshot_then_fail)
    args = ["run", "proxy_eval=toy", "executor=local", "search.workers=1", f"search.budget={BUDGET}",
            f"search.run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"]
    line = assert_one_line_bad_input(run_cli_in_process("search", args), f"full disk at {write}", strict=False)
    monkeypatch.undo()
    assert len(calls) == call
    assert f"cannot write {run_dir / name} ({reason}" in line and "free disk space" in line
    record_fault(record_property, 1, files_changed(before, run_dir))
    assert snapshot(run_dir) == before, "a file written before the full disk changed"  # the cut write left no trace
    read_back(run_dir / name)  # still whole
    assert no_temp_files(run_dir) == []

    history = rows_of(run_dir)
    resume(run_dir)
    rows = check_completed_run(run_dir, STAGES, BUDGET)
    assert rows_lost(history, rows) == 0


def test_a_full_disk_while_the_feature_cache_is_written_leaves_no_cache_and_the_next_prepare_builds_it(
        tmp_path, monkeypatch, record_property):
    from proxy_eval.prepare import prepare

    cache_dir = tmp_path / "cache"
    cfg = cached_cfg(tmp_path, "unused", cache_dir)
    disk_full_on_call(monkeypatch, FeatureCache, "write", 1, lambda *a, **k: 4096)
    with pytest.raises(WriteError, match=r"cannot write .*features\.pt \(the write was cut short"):
        prepare(cfg)
    monkeypatch.undo()
    assert list((cache_dir / "features").iterdir()) == []  # no cache, no temporary folder
    prepare(cfg).verify()
    record_fault(record_property, 1, None)  # nothing existed before
