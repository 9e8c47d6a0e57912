"""Threads per trial: proxy_eval.threads, else cores // concurrent trials, for both executors."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from proxy_eval.result import TrialResult
from search.local_executor import LocalExecutor
from search.run import run_search
from search.trial_threads import node_concurrency, trial_threads
from search_runs import toy_cfg


def test_threads_split_the_cores_between_concurrent_trials(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert trial_threads(None, 1, cores=16) == 16
    assert trial_threads(None, 4, cores=16) == 4
    assert trial_threads(None, 3, cores=2) == 1  # never below one
    assert trial_threads(2, 8, cores=16) == 2  # proxy_eval.threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert trial_threads(None, 1, cores=16) == 1  # the environment's cap holds
    assert node_concurrency(workers=4, cpus_per_trial=3, cores=16) == 4
    assert node_concurrency(workers=8, cpus_per_trial=3, cores=16) == 5  # only 5 trials fit on the node
    assert node_concurrency(workers=2, cpus_per_trial=0.5, cores=1) == 2


class ThreadsSeen:
    """An evaluator that records the torch threads its trial runs with."""

    seen: list[int] = []

    def evaluate(self, arch, seed=0, report=None):
        ThreadsSeen.seen.append(torch.get_num_threads())
        return TrialResult(status="ok", reward=0.5)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_local_executor_runs_trials_with_cores_per_concurrent_trial(tmp_path, monkeypatch, workers):
    before = torch.get_num_threads()
    monkeypatch.setattr("search.trial_threads.available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    real = LocalExecutor.__init__

    def with_threads_seen(self, make_evaluator, **kwargs):
        real(self, ThreadsSeen, **kwargs)

    monkeypatch.setattr(LocalExecutor, "__init__", with_threads_seen)
    ThreadsSeen.seen = []
    run_search(toy_cfg(tmp_path / "run", f"search.workers={workers}", "search.budget=2", "search.stages=[fpn]"))
    assert ThreadsSeen.seen and set(ThreadsSeen.seen) == {4 // workers}
    assert torch.get_num_threads() == before  # the process setting is restored after the run


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")
def test_a_ray_trial_sets_cores_per_concurrent_trial_on_its_node(monkeypatch):
    from search.ray_executor import _set_trial_threads

    before = torch.get_num_threads()
    monkeypatch.setattr("search.trial_threads.available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        setup = {"cfg": {"proxy_eval": {"name": "cached"}}, "threads": None, "workers": 2, "cpus_per_trial": 1.0}
        _set_trial_threads(setup)
        assert torch.get_num_threads() == 2
        _set_trial_threads({**setup, "threads": 3})
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
