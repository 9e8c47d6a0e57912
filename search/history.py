"""``history.jsonl``: the append-only record of every finished trial of a search run.

One JSON object per line, one line per finished trial, in the order the trials finished::

    {"trial": 7, "stage": "fpn", "stage_index": 0, "code": "fpn:...+head:fcos",
     "status": "ok", "reward": 0.31, "ap": 0.31, "ap50": 0.52, "loss": 1.2, "params": 123456,
     "gflops": 3.4, "seconds": 41.0, "error": "", "extra": {...},
     "reused": false, "reused_from": null, "attempts": 1,
     "proposal_id": 7, "tokens": [...], "log_prob": -41.2, "finished_at": "2025-01-01T12:00:00"}

- ``trial`` numbers the lines from 0 (it is the line's position); ``stage_index`` is the
  position of the stage in ``search.stages``; ``proposal_id`` is the id the stage's searcher gave
  the proposal, which is how a resumed search matches history lines to the searcher's pending
  proposals.
- ``reused: true`` means the code had already been evaluated earlier in the run: the earlier
  result (line ``reused_from``) was told to the searcher again and nothing was trained.
- The metric keys are those of :class:`proxy_eval.result.TrialResult` (``loss`` is ``null``
  when it is not a number).

The history is the source of truth of a run: resume, ``best.txt`` and the report are derived
from it. A line is written in one ``write`` and fsync'ed; a driver killed in the middle of a
write can leave a truncated last line, which :func:`read_history` detects, reports and drops
(and :class:`History` cuts off the file, so that the next line starts cleanly). A corrupt line
anywhere else means the file was edited by hand, and is refused with a :class:`UserError`.
"""
from __future__ import annotations

import contextlib
import json
import math
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from detector.errors import UserError, WriteError

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
REQUIRED_KEYS = ("trial", "stage", "stage_index", "code", "status", "reward", "reused")


@dataclass
class HistoryRead:
    """What :func:`read_history` found: the good rows, where they end, and the dropped tail."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    good_bytes: int = 0  # length of the file prefix holding the good rows
    dropped_tail: str | None = None  # the unreadable last line, if there was one
    needs_newline: bool = False  # the last good row lacks its final newline


def _parse_row(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(row, dict) or any(key not in row for key in REQUIRED_KEYS):
        return None
    return row


def read_history(path: str | os.PathLike) -> HistoryRead:
    """Read ``history.jsonl``; a missing file is an empty history.

    A truncated or corrupt *last* line is dropped and reported (logged as a warning, and kept in
    ``dropped_tail``); a corrupt line before the last raises :class:`UserError`.
    """
    path = Path(path)
    out = HistoryRead()
    if not path.exists():
        return out
    data = path.read_bytes()
    lines = data.split(b"\n")
    offset = 0
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines) or all(not rest.strip() for rest in lines[number:])
        end = offset + len(line) + (1 if number < len(lines) else 0)
        if not line.strip():
            offset = end
            continue
        row = _parse_row(line)
        if row is None:
            if not is_last:
                raise UserError(
                    f"{path}: line {number} is not a valid history row; the file was changed by hand? "
                    "restore it or delete the broken line"
                )
            out.dropped_tail = line.decode("utf-8", errors="replace")
            log.warning("%s: dropped a truncated last line (%d bytes), the driver was likely killed "
                        "while writing it; that trial will run again", path, len(line))
            break
        out.rows.append(row)
        out.good_bytes = end
        out.needs_newline = number == len(lines)  # no newline after the last good row
        offset = end
    return out


class History:
    """Open ``history.jsonl`` for appending: reads it, repairs a truncated tail, then appends rows."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        found = read_history(self.path)
        self.rows: list[dict[str, Any]] = found.rows
        self.dropped_tail = found.dropped_tail
        if found.dropped_tail is not None:
            with open(self.path, "r+b") as f:
                f.truncate(found.good_bytes)
        if found.needs_newline:
            with open(self.path, "ab") as f:
                f.write(b"\n")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def next_trial(self) -> int:
        return len(self.rows)

    def append(self, row: dict[str, Any]) -> dict[str, Any]:
        """Number the row (``trial``), write it as one line, flush and fsync; returns the row."""
        row = {"trial": self.next_trial, **{k: v for k, v in row.items() if k != "trial"}}
        missing = [key for key in REQUIRED_KEYS if key not in row]
        if missing:
            raise ValueError(f"history row lacks {missing}")
        row = _finite(row)
        line = (json.dumps(row, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
        with open(self.path, "ab", buffering=0) as f:
            start = f.tell()
            try:
                written = 0
                while written < len(line):  # a raw write may be short (a full disk) before it fails
                    written += f.write(line[written:])
                os.fsync(f.fileno())
            except OSError as err:  # a full disk: cut the partial line off again, say so in one line
                with contextlib.suppress(OSError):
                    os.ftruncate(f.fileno(), start)
                raise WriteError.from_failure(self.path, err) from err
        self.rows.append(row)
        return row

    def stage_rows(self, stage_index: int) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["stage_index"] == stage_index]


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def trained_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of trials that were actually evaluated (not reused results)."""
    return [row for row in rows if not row["reused"]]


def best_row(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``ok`` row with the highest reward (earliest on ties), or None if none is ``ok``."""
    best = None
    for row in rows:
        if row["status"] == "ok" and (best is None or row["reward"] > best["reward"]):
            best = row
    return best
