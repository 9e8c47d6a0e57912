"""The stage loop of a search, independent of how trials are executed.

A search runs its stages (``search.stages``, e.g. ``[fpn, head]``) in order. Each stage has its
own search space (:func:`stage_space`: ``fpn`` fixes the head, ``head`` fixes the FPN to the best
found so far, ``joint`` fixes nothing), its own searcher (saved to ``searcher-<i>-<stage>.pt``
after every ask and every tell) and a budget of ``search.budget`` *trained* trials.

An executor takes the stages from a :class:`StageSequence` (``next_stage()`` until None) and
drives one :class:`StageRun` at a time with two calls::

    request = stage.next_request()     # a TrialRequest to run now, or None: nothing to start now
    stage.complete(request, result)    # when its TrialResult is known (any order, any thread*)

(*) calls must not overlap: the local executor calls both from its main thread, Ray Tune from
its driver loop. A stage is over when ``stage.finished``.

Reuse. A code already evaluated in this run (any stage) is never trained again: its earlier
result is told to the searcher and recorded with ``reused: true``. A proposal whose code is
being evaluated right now waits for that trial and is then recorded the same way. Reused
samples do *not* count toward the budget (the budget is what is paid for: trained trials), so
the number of trained trials of a finished stage is exactly ``search.budget``, unless the
searcher keeps proposing known codes: after ``REUSE_LIMIT_FACTOR * budget`` reused samples in a
stage (a tiny space is exhausted, or the controller has converged) the stage stops early, with
a warning, instead of looping forever.

Durability and resume. Every event is written before the next one starts, in this order:

- ask: ``searcher.ask()`` then the searcher is saved (so its RNG and pending list move on);
- finish: the history line(s) are appended, then ``searcher.tell`` and the searcher is saved.

History is the source of truth. On resume a stage reloads its searcher; a pending proposal that
already has a history line (the driver died between the append and the save) is told from it;
every other pending proposal was in flight when the driver died and is run again, before any new
proposal. A proposal asked but not yet saved is asked again (the saved state predates it). So a
driver killed at any moment loses no recorded trial and trains none twice; only trials that were
running (not yet recorded) run again.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from detector.arch.grammar import Arch, ArchError, FCOSHead, FPNPart, HeadPart, parse
from detector.errors import UserError
from detector.arch.zoo import resolve_arch
from proxy_eval.result import TrialResult
from search.early_stopping import row_curve, stopped_reward
from search.history import History, best_row
from search.run_dir import RunDir
from detector.arch.space import STAGES, SearchSpace, space_from_cfg

log = logging.getLogger(__name__)

REUSE_LIMIT_FACTOR = 10


@dataclass(frozen=True)
class TrialRequest:
    """One candidate to evaluate. ``key`` (``"<stage_index>:<proposal id>"``) is unique in a run.
    ``arch`` is the code as a value for in-process executors; ``code`` its text (Ray, disk)."""

    key: str
    code: str
    stage: str
    stage_index: int
    proposal_id: int
    arch: Arch | None = None


class Executor(Protocol):
    """Runs every stage of ``stages.next_stage()``: until the stage is finished, start what its
    ``next_request`` gives and hand each result to its ``complete``."""

    def run(self, stages: "StageSequence") -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------- configuration
def stage_names(cfg: Any) -> list[str]:
    """``search.stages`` as a list, validated."""
    stages = cfg.search.stages
    names = [stages] if isinstance(stages, str) else list(stages or [])
    if not names:
        raise UserError("search.stages: empty; give e.g. search.stages=[fpn,head] or [joint]")
    for name in names:
        if name not in STAGES:
            raise UserError(f"search.stages: unknown stage '{name}'; choose from {', '.join(STAGES)}")
    if names[0] == "head" and not cfg.search.get("fixed_fpn"):
        raise UserError("search.stages: a head stage needs an FPN: run an fpn or joint stage before it, "
                        "or set search.fixed_fpn=<code>")
    return [str(n) for n in names]


def check_search_settings(cfg: Any) -> None:
    """Budget, workers and retries are sane integers, the stages are known and the space of every
    stage that can be built before any trial (all but a head stage fixing the best FPN found) builds,
    fixed parts included; :class:`UserError` otherwise."""
    for key, low in (("budget", 1), ("workers", 1), ("retries", 0), ("top_k", 1)):
        value = cfg.search.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"search.{key}: {value!r} must be an integer >= {low}")
    for stage in stage_names(cfg):
        if stage != "head" or cfg.search.get("fixed_fpn"):
            stage_space(cfg, stage, [])
    if cfg.search.get("fixed_head") and "fpn" not in stage_names(cfg):
        parse_fixed_part(cfg.search.fixed_head, "head")


def parse_fixed_part(value: str, kind: str) -> FPNPart | HeadPart:
    """``search.fixed_fpn`` / ``fixed_head``: a part code (``fpn:...``, ``head:...``), or anything
    ``arch=`` accepts (zoo name, full code, file, run dir), of which the part is taken."""
    text = str(value).strip()
    try:
        if kind == "fpn" and text.startswith("fpn:") and "+" not in text:
            return parse(f"{text}+head:fcos", None, None).fpn
        if kind == "head" and text.startswith("head:"):
            return parse(f"fpn:standard+{text}", None, None).head
        arch = resolve_arch(text)
    except ArchError as err:
        raise UserError(f"search.fixed_{kind}: {err}") from None
    return arch.fpn if kind == "fpn" else arch.head


def stage_space(cfg: Any, stage: str, rows_before: list[dict[str, Any]]) -> SearchSpace:
    """The space of one stage; ``rows_before`` are the history rows of the earlier stages."""
    fixed_fpn = fixed_head = None
    if stage == "fpn":
        fixed_head = parse_fixed_part(cfg.search.fixed_head, "head") if cfg.search.get("fixed_head") else FCOSHead()
    elif stage == "head":
        if cfg.search.get("fixed_fpn"):
            fixed_fpn = parse_fixed_part(cfg.search.fixed_fpn, "fpn")
        else:
            best = best_row(rows_before)
            if best is None:
                run_dir = cfg.search.get("run_dir") or "<run dir>"
                raise UserError("head stage: no earlier trial finished 'ok', so there is no best FPN to fix "
                                f"(see {run_dir}/history.jsonl and report.md); to search heads anyway, run "
                                f"python -m search run resume={run_dir} search.fixed_fpn=<code, e.g. nasfcos>")
            fixed_fpn = parse(best["code"], None, None).fpn
    try:
        return space_from_cfg(cfg.space, stage, fixed_fpn=fixed_fpn, fixed_head=fixed_head)
    except ArchError as err:
        raise UserError(str(err)) from None


# ---------------------------------------------------------------------- run-wide record
class SearchRecord:
    """What every stage shares: the run dir, the history, results by code, trials in flight,
    the best row, and the observers (progress bar, logger) told about every new row."""

    def __init__(self, run_dir: RunDir, history: History, stages: list[str], budget: int) -> None:
        self.run_dir = run_dir
        self.history = history
        self.stages = stages
        self.budget = budget
        self.by_code: dict[str, dict[str, Any]] = {}
        for row in history.rows:
            if not row["reused"]:
                self.by_code.setdefault(row["code"], row)
        self.in_flight: dict[str, TrialRequest] = {}  # code -> request
        self.best = best_row(history.rows)
        if self.best is not None:  # a driver killed between a history append and best.txt: bring it up to date
            path = run_dir.best_path
            if not path.exists() or path.read_text().strip() != self.best["code"]:
                run_dir.write_best(self.best["code"])
        self.observers: list[Callable[[dict[str, Any], "SearchRecord"], None]] = []  # per new row
        self.stage_observers: list[Callable[["StageRun"], None]] = []  # per stage start
        self.current: "StageRun | None" = None
        # torch threads for searcher updates: a tiny LSTM gains nothing from more, and extra
        # threads slow it down many times over when trials share the cores (15x measured on a
        # loaded 2-core machine). None leaves the process setting alone: the threaded local
        # executor sets it, because changing the setting while trials run in other threads is unsafe.
        self.controller_threads: int | None = 1

    def add_row(self, row: dict[str, Any]) -> dict[str, Any]:
        row = self.history.append(row)
        if not row["reused"]:
            self.by_code.setdefault(row["code"], row)
        if row["status"] == "ok" and (self.best is None or row["reward"] > self.best["reward"]):
            self.best = row
            self.run_dir.write_best(row["code"])
        for observe in self.observers:
            observe(row, self)
        return row

    def trained_count(self) -> int:
        return sum(not row["reused"] for row in self.history.rows)

    def write_state(self, status: str = "running") -> None:
        stage = self.current
        per_stage = []
        for i, name in enumerate(self.stages):
            rows = self.history.stage_rows(i)
            per_stage.append({"stage": name, "trained": sum(not r["reused"] for r in rows),
                              "reused": sum(bool(r["reused"]) for r in rows)})
        self.run_dir.write_state({
            "status": status,
            "stage_index": stage.index if stage else None,
            "stage": stage.name if stage else None,
            "fixed_fpn": str(stage.space.fixed_fpn) if stage and stage.space.fixed_fpn else None,
            "fixed_head": str(stage.space.fixed_head) if stage and not stage.space.searches_head else None,
            "budget_per_stage": self.budget,
            "stages": per_stage,
            "pending": [{"key": r.key, "code": r.code} for r in self.in_flight.values()],
            "invalid_samples": stage.searcher.invalid_samples if stage else None,
            "best": None if self.best is None else {k: self.best[k] for k in ("trial", "code", "reward")},
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })


# ---------------------------------------------------------------------- one stage
class StageRun:
    """One stage's searcher and bookkeeping: hands out requests, records results."""

    def __init__(self, record: SearchRecord, index: int, name: str, space: SearchSpace, searcher: Any,
                 searcher_path: Path, budget: int) -> None:
        self.record = record
        self.index = index
        self.name = name
        self.space = space
        self.searcher = searcher
        self.searcher_path = Path(searcher_path)
        self.budget = budget
        self.reuse_limit = REUSE_LIMIT_FACTOR * budget
        self.in_flight: dict[str, Any] = {}  # request key -> proposal
        self.waiting: dict[str, list[Any]] = {}  # code in flight -> proposals waiting for it
        self.rerun: list[Any] = []
        self._warned_reuse = False
        rows = record.history.stage_rows(index)
        self.trained = sum(not r["reused"] for r in rows)
        self.reused = sum(bool(r["reused"]) for r in rows)
        self._resolve_pending()

    # -------------------------------------------------------------- resume
    def _resolve_pending(self) -> None:
        """Tell pending proposals that history already finished; queue the others to run again."""
        finished = {row["proposal_id"]: row for row in self.record.history.stage_rows(self.index)}
        told = False
        for proposal in self.searcher.pending:
            row = finished.get(proposal.id)
            if row is not None:
                with self._controller_threads():
                    self.searcher.tell(proposal, float(row["reward"]))
                told = True
            else:
                self.rerun.append(proposal)
        if told:
            self._save()
        if self.rerun:
            log.info("stage %s: %d trial(s) in flight when the search stopped will run again",
                     self.name, len(self.rerun))

    # -------------------------------------------------------------- state
    @property
    def waiting_count(self) -> int:
        return sum(len(v) for v in self.waiting.values())

    @property
    def can_ask(self) -> bool:
        """True while new proposals may be asked: budget left and reuse limit not reached."""
        if self.reused + self.waiting_count >= self.reuse_limit:
            if not self._warned_reuse:
                self._warned_reuse = True
                log.warning("stage %s: stopped after %d reused proposals with %d of %d trials trained: "
                            "the searcher keeps proposing codes already evaluated (space exhausted or "
                            "converged)", self.name, self.reused, self.trained, self.budget)
            return False
        return self.trained + len(self.in_flight) < self.budget

    @property
    def exhausted(self) -> bool:
        """Nothing more will be handed out (trials in flight may still be finishing)."""
        return not self.rerun and not self.can_ask

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.in_flight

    # -------------------------------------------------------------- the two calls
    def next_request(self) -> TrialRequest | None:
        """The next trial to start, or None when nothing is to be started now.

        Proposals whose code is known are resolved here (reused); proposals whose code is in
        flight wait for it. Re-runs from a resume come first, then new asks.
        """
        while True:
            if self.rerun:
                proposal = self.rerun.pop(0)
            elif self.can_ask:
                with self._controller_threads():
                    proposal = self.searcher.ask()
                self._save()
            else:
                return None
            code = str(proposal.arch)
            known = self.record.by_code.get(code)
            if known is not None:
                self._record_reused(proposal, known)
                with self._controller_threads():
                    self.searcher.tell(proposal, float(known["reward"]))
                self._save()
                continue
            if code in self.record.in_flight:
                self.waiting.setdefault(code, []).append(proposal)
                continue
            request = TrialRequest(key=f"{self.index}:{proposal.id}", code=code, stage=self.name,
                                   stage_index=self.index, proposal_id=proposal.id, arch=proposal.arch)
            self.in_flight[request.key] = proposal
            self.record.in_flight[code] = request
            self.record.write_state()
            return request

    def complete(self, request: TrialRequest, result: TrialResult, attempts: int = 1) -> None:
        """Record a finished trial: history first, then tell the searcher (and waiters), then save."""
        proposal = self.in_flight.pop(request.key)
        self.record.in_flight.pop(request.code, None)
        if result.status == "stopped":  # early stopping: the reward it is told (search.early_stopping)
            result = replace(result, reward=stopped_reward(row_curve(result.to_dict()),
                                                           self.record.history.stage_rows(self.index)))
        row = self.record.add_row(self._row(proposal, result.to_dict(), reused_from=None, attempts=attempts))
        self.trained += 1
        waiters = self.waiting.pop(request.code, [])
        for waiter in waiters:
            self._record_reused(waiter, row)
        with self._controller_threads():
            self.searcher.tell(proposal, float(result.reward))
            for waiter in waiters:
                self.searcher.tell(waiter, float(result.reward))
        self._save()
        self.record.write_state()

    # -------------------------------------------------------------- searcher calls
    def _save(self) -> None:
        self.searcher.save(self.searcher_path)

    @contextmanager
    def _controller_threads(self) -> Iterator[None]:
        """Run searcher updates with ``record.controller_threads`` torch threads (see SearchRecord)."""
        wanted = self.record.controller_threads
        if wanted is None:
            yield
            return
        import torch

        before = torch.get_num_threads()
        if before == wanted:
            yield
            return
        torch.set_num_threads(wanted)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # -------------------------------------------------------------- rows
    def _record_reused(self, proposal: Any, source: dict[str, Any]) -> None:
        metrics = {k: source.get(k) for k in ("status", "reward", "ap", "ap50", "loss", "params", "gflops", "error")}
        metrics["seconds"] = 0.0
        self.record.add_row(self._row(proposal, metrics, reused_from=source["trial"], attempts=0))
        self.reused += 1

    def _row(self, proposal: Any, metrics: dict[str, Any], reused_from: int | None, attempts: int) -> dict[str, Any]:
        return {
            "stage": self.name,
            "stage_index": self.index,
            "code": str(proposal.arch),
            **metrics,
            "reused": reused_from is not None,
            "reused_from": reused_from,
            "attempts": attempts,
            "proposal_id": proposal.id,
            "tokens": list(proposal.tokens),
            "log_prob": proposal.log_prob,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


# ---------------------------------------------------------------------- all stages
class StageSequence:
    """The stages of a run in order, each built only when the previous one is finished (the
    head stage fixes the best FPN found before it). Finished stages are skipped.

    ``make_searcher(space, seed)`` builds a fresh searcher; a stage whose searcher file exists
    continues from it. Stage ``i`` uses the seed ``cfg.seed + i``.
    """

    def __init__(self, cfg: Any, record: SearchRecord, make_searcher: Callable[[SearchSpace, int], Any]) -> None:
        self.cfg = cfg
        self.record = record
        self.make_searcher = make_searcher
        self.position = 0
        self.worked = 0  # stages that had something to do
        self.done = False

    def next_stage(self) -> StageRun | None:
        """The next unfinished stage, or None when every stage is finished."""
        current = self.record.current
        if current is not None and not current.finished:
            raise RuntimeError(f"stage '{current.name}' is not finished: {len(current.in_flight)} trial(s) in flight, "
                               f"{current.trained}/{current.budget} trained")
        while self.position < len(self.record.stages):
            stage = self._build(self.position)
            self.position += 1
            self.record.current = stage
            if stage.finished:
                continue
            self.worked += 1
            log.info("stage %d/%d '%s': %d of %d trials done%s", stage.index + 1, len(self.record.stages),
                     stage.name, stage.trained, stage.budget,
                     f"; FPN fixed to {stage.space.fixed_fpn}" if stage.name == "head" else "")
            self.record.write_state()
            for observe in self.record.stage_observers:
                observe(stage)
            return stage
        self.record.current = None
        self.done = True
        return None

    def _build(self, index: int) -> StageRun:
        name = self.record.stages[index]
        rows_before = [row for row in self.record.history.rows if row["stage_index"] < index]
        space = stage_space(self.cfg, name, rows_before)
        path = self.record.run_dir.searcher_path(index, name)
        searcher = self.make_searcher(space, int(self.cfg.seed) + index)
        if path.exists():
            searcher.load(path)
        return StageRun(self.record, index, name, space, searcher, path, self.record.budget)


def run_stages(cfg: Any, record: SearchRecord, executor: Executor,
               make_searcher: Callable[[SearchSpace, int], Any]) -> int:
    """Run every unfinished stage in order with ``executor``; returns how many stages had work."""
    stages = StageSequence(cfg, record, make_searcher)
    executor.run(stages)
    if not stages.done:
        current = record.current
        raise RuntimeError(f"the search stopped in stage '{current.name if current else '?'}' before the "
                           "budget was spent; resume the run to continue")
    record.write_state("finished")
    return stages.worked


def parse_code(code: str) -> Arch:
    """The architecture of a code handed out by a stage (any block and layer counts)."""
    return parse(code, None, None)
