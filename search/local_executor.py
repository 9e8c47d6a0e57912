"""``executor=local``: run a stage's trials in this process, without Ray.

Used by tests, for debugging, and on machines without Ray (the GPU machine). With
``search.workers: 1`` trials run one after the other in the main thread. With more workers, up to
that many trials run at once in a thread pool of the driver process; each thread builds its own
evaluator once, and every searcher call stays on the main thread. The torch CPU thread pool is
shared by the trials, so it is set for the run to :func:`search.trial_threads.trial_threads`
(``proxy_eval.threads``, else ``cores // workers``), with one worker too. Threads suit GPU
trials (kernels release the GIL); note that trials running at once share torch's global RNG, so
their weight initialisation is not reproducible bit for bit (``search.workers=1`` is).

Early stopping (``search.scheduler``): each trial's ``report`` callback feeds the search's stopping
rule (:mod:`search.early_stopping`, one rule for the whole search, fed the curves already in
history on resume); a trial the rule stops ends with status ``stopped``.

:func:`run_trial` (one candidate, with retries) is also what a Ray worker runs; it records the
trial's learning curve (every report) in ``extra["curve"]``.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from detector.arch.grammar import Arch
from proxy_eval.result import TrialResult
from search.early_stopping import StopReporter, StoppingSettings, make_rule, recording, replay_history
from search.loop import StageRun, StageSequence, TrialRequest, parse_code
from search.trial_threads import trial_threads

log = logging.getLogger(__name__)


def run_trial(evaluator: Any, code: str | Arch, seed: int, retries: int,
              report: Callable[[dict], None] | None = None) -> tuple[TrialResult, int]:
    """Evaluate ``code`` (its text, or the Arch value in-process); a result with status ``error`` is
    retried up to ``retries`` times. ``report`` receives the trial's intermediate reports.

    Returns the last result, with the last attempt's learning curve ``[[iteration, loss], ...]`` in
    ``extra["curve"]`` (``extra["report_seconds"]``: when each report came, in seconds from the start of
    the attempt; ``extra["started_at"]``: its start, Unix time), and the number of attempts. ``diverged``, ``oom``, ``timeout`` and
    ``stopped`` are properties of the candidate and are not retried. An exception escaping the
    evaluator (its contract says it never raises) becomes an ``error`` result.
    """
    arch = code if isinstance(code, Arch) else parse_code(code)
    code = str(arch)
    attempts = 0
    while True:
        attempts += 1
        start, started_at = time.perf_counter(), time.time()
        curve: list[list[float]] = []
        report_seconds: list[float] = []
        try:
            result = evaluator.evaluate(arch, seed=seed, report=recording(report, curve, report_seconds, start))
        except Exception as err:  # noqa: BLE001 - a trial's failure is a value, never a crash of the search
            result = TrialResult.failure("error", f"{type(err).__name__}: {err}",
                                         seconds=time.perf_counter() - start)
        result.extra = {**result.extra, "curve": curve, "report_seconds": report_seconds, "started_at": started_at}
        if result.status != "error" or attempts > retries:
            return result, attempts
        log.info("trial %s failed (%s); retry %d of %d", code[:60], result.error[:120], attempts, retries)


class LocalExecutor:
    """Runs trials in the driver process: sequentially, or in ``workers`` threads."""

    def __init__(self, make_evaluator: Callable[[], Any], seed: int, retries: int, workers: int = 1,
                 stopping: StoppingSettings | None = None, threads: int | None = None) -> None:
        self.make_evaluator = make_evaluator
        self.seed = int(seed)
        self.retries = int(retries)
        self.workers = int(workers)
        self.threads = trial_threads(threads, self.workers)
        self.stopping = stopping or StoppingSettings()
        self.rule = make_rule(self.stopping)
        self._rule_lock = threading.Lock()
        self._local = threading.local()

    def _evaluator(self) -> Any:
        evaluator = getattr(self._local, "evaluator", None)
        if evaluator is None:
            evaluator = self._local.evaluator = self.make_evaluator()
        return evaluator

    def _run(self, request: TrialRequest) -> tuple[TrialResult, int]:
        if self.rule is None:
            return run_trial(self._evaluator(), request.arch or request.code, self.seed, self.retries)
        reporter = StopReporter(self.rule, request.key, self.stopping.max_t, self._rule_lock)
        result, attempts = run_trial(self._evaluator(), request.arch or request.code, self.seed, self.retries,
                                     report=reporter)
        if result.status not in ("ok", "stopped"):
            reporter.last = (0, float("nan"))  # a failed trial leaves the rule's "reported this far" set
        reporter.finish()
        return result, attempts

    def run(self, stages: StageSequence) -> None:
        if self.rule is not None:
            fed = replay_history(self.rule, stages.record.history.rows)
            if fed:
                log.info("early stopping (%s): replayed the curves of %d trials from history", self.stopping.scheduler, fed)
        # The trials share the process's torch thread pool: split the cores between them once, and
        # leave the setting alone afterwards (changing it while trials run in threads is unsafe).
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        if self.workers > 1:
            stages.record.controller_threads = None
        try:
            while (stage := stages.next_stage()) is not None:
                self.run_stage(stage)
        finally:
            torch.set_num_threads(before)

    def run_stage(self, stage: StageRun) -> None:
        if self.workers == 1:
            while (request := stage.next_request()) is not None:
                stage.complete(request, *self._run(request))
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="trial") as pool:
            running: dict[Future, TrialRequest] = {}
            while True:
                while len(running) < self.workers and (request := stage.next_request()) is not None:
                    running[pool.submit(self._run, request)] = request
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    stage.complete(running.pop(future), *future.result())

    def close(self) -> None:
        pass
