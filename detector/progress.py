"""Progress of a long loop: a tqdm bar on a terminal, periodic log lines elsewhere.

``tqdm(disable=None)`` shows nothing when stderr is not a terminal (a log file, a CI job, a
``nohup`` run), so minutes of backbone adaptation or feature extraction passed without a word.
:func:`progress` keeps the bar on a terminal and otherwise logs ``<desc>: <done>/<total> (<pct>%),
<elapsed> s`` at the first step, then at most every ``every_s`` seconds, and at the end.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
LOG_EVERY_S = 30.0


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", every_s: float = LOG_EVERY_S,
             terminal: bool | None = None) -> Iterator[T]:
    """Iterate ``iterable``, reporting progress (see the module doc); ``terminal`` None: stderr's."""
    if terminal is None:
        terminal = sys.stderr.isatty()
    if terminal:
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=desc, leave=False)
        return
    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else None
    start = last = time.monotonic()
    done = 0

    def report() -> None:
        share = f"/{total} ({100 * done / total:.0f}%)" if total else ""
        log.info("%s: %d%s, %.0f s", desc, done, share, time.monotonic() - start)

    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if done == 1 or now - last >= every_s:
            last = now
            report()
    report()
