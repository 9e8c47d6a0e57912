"""``executor=local``: run a stage's trials in this process, without Ray.

Used by tests, for debugging, and on machines without Ray (the GPU machine). With
``search.workers: 1`` trials run one after the other in the main thread. With more workers, up to
that many trials run at once in a thread pool of the driver process; each thread builds its own
evaluator once, and every searcher call stays on the main thread. The torch CPU thread pool is
shared by the trials, so it is set to ``cores // workers`` threads for the run. Threads suit GPU
trials (kernels release the GIL); note that trials running at once share torch's global RNG, so
their weight initialisation is not reproducible bit for bit (``search.workers=1`` is).

:func:`run_trial` (one candidate, with retries) is also what a Ray worker runs.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from detector.arch.grammar import Arch
from proxy_eval.result import TrialResult
from search.loop import StageRun, StageSequence, TrialRequest, parse_code

log = logging.getLogger(__name__)


def run_trial(evaluator: Any, code: str | Arch, seed: int, retries: int) -> tuple[TrialResult, int]:
    """Evaluate ``code`` (its text, or the Arch value in-process); a result with status ``error`` is
    retried up to ``retries`` times.

    Returns the last result and the number of attempts. ``diverged``, ``oom`` and ``timeout``
    are properties of the candidate and are not retried. An exception escaping the evaluator
    (its contract says it never raises) becomes an ``error`` result.
    """
    arch = code if isinstance(code, Arch) else parse_code(code)
    code = str(arch)
    attempts = 0
    while True:
        attempts += 1
        start = time.perf_counter()
        try:
            result = evaluator.evaluate(arch, seed=seed)
        except Exception as err:  # noqa: BLE001 - a trial's failure is a value, never a crash of the search
            result = TrialResult.failure("error", f"{type(err).__name__}: {err}",
                                         seconds=time.perf_counter() - start)
        if result.status != "error" or attempts > retries:
            return result, attempts
        log.info("trial %s failed (%s); retry %d of %d", code[:60], result.error[:120], attempts, retries)


class LocalExecutor:
    """Runs trials in the driver process: sequentially, or in ``workers`` threads."""

    def __init__(self, make_evaluator: Callable[[], Any], seed: int, retries: int, workers: int = 1) -> None:
        self.make_evaluator = make_evaluator
        self.seed = int(seed)
        self.retries = int(retries)
        self.workers = int(workers)
        self._local = threading.local()

    def _evaluator(self) -> Any:
        evaluator = getattr(self._local, "evaluator", None)
        if evaluator is None:
            evaluator = self._local.evaluator = self.make_evaluator()
        return evaluator

    def _run(self, request: TrialRequest) -> tuple[TrialResult, int]:
        return run_trial(self._evaluator(), request.arch or request.code, self.seed, self.retries)

    def run(self, stages: StageSequence) -> None:
        if self.workers == 1:
            while (stage := stages.next_stage()) is not None:
                self.run_stage(stage)
            return
        # Threads share the process's torch thread pool: split the cores between the trials once,
        # and leave the setting alone afterwards (changing it while trials run is unsafe).
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.workers))
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
