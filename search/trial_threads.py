"""How many torch CPU threads one trial uses: ``proxy_eval.threads`` if set, else
``cores // concurrent trials`` (at least 1, and at most ``OMP_NUM_THREADS`` when the environment sets
it), for both executors.

Why: on a 2-core machine a training step with two OpenMP threads ran 5-10x slower whenever another
busy process shared the cores, while one thread per process kept ~22 img/s (issue #23). Trials that
run at once must split the cores, not each take all of them.

- ``executor=local``: the trials share the driver's thread pool, so the executor sets
  ``torch.set_num_threads(trial_threads(...))`` once for the run (``concurrent = search.workers``).
- ``executor=ray``: each trial runs in its own worker process; the trainable sets it in the worker
  with ``concurrent`` = the trials that run at once on that node, ``min(search.workers,
  cores // ray.cpus_per_trial)`` (see :func:`node_concurrency`).
"""
from __future__ import annotations

import os


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's share), else ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def trial_threads(configured: int | None, concurrent: int, cores: int | None = None) -> int:
    """``configured`` when given (> 0), else ``max(1, cores // concurrent)``, capped by
    ``OMP_NUM_THREADS`` when the environment sets it; ``cores`` defaults to :func:`available_cores`."""
    if configured:
        return max(1, int(configured))
    cores = int(cores or available_cores())
    threads = max(1, cores // max(1, int(concurrent)))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(omp)) if omp.isdigit() and int(omp) > 0 else threads


def node_concurrency(workers: int, cpus_per_trial: float, cores: int | None = None) -> int:
    """How many of ``workers`` concurrent Ray trials fit on one node of ``cores`` CPUs."""
    cores = int(cores or available_cores())
    fit = int(cores // cpus_per_trial) if cpus_per_trial > 0 else cores
    return max(1, min(int(workers), fit))
