"""executor=ray: a toy search through Ray Tune (one local Ray for the whole module), and the
Tune searcher adapter recording a crashed worker as a failed trial."""
from __future__ import annotations

import importlib.util
import logging

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")

from detector.cli import compose  # noqa: E402
from proxy_eval.result import FLOOR_REWARD  # noqa: E402
from search.run import run_search  # noqa: E402
from search_runs import check_completed_run, rows_of, toy_cfg, toy_stage_searcher  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance for the module (starting Ray costs seconds); run_search joins it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def test_ray_toy_search_completes_every_stage_with_failures_recorded(tmp_path, local_ray):
    run_dir = tmp_path / "run"
    run_search(toy_cfg(run_dir, "executor=ray", "search.workers=2", "search.budget=4",
                       "proxy_eval.fail_prob=0.3", "search.retries=1"))
    rows = check_completed_run(run_dir, ["fpn", "head"], 4)
    failed = [r for r in rows if r["status"] == "error" and not r["reused"]]
    assert failed, "fail_prob=0.3 over 8 trials should fail some"
    assert all(r["reward"] == FLOOR_REWARD and r["attempts"] == 2 and "injected" in r["error"] for r in failed)
    assert (run_dir / "ray").is_dir()  # Tune's experiment folder lives in the run dir
    assert local_ray.is_initialized()  # a Ray the search did not start is left running


def test_a_trial_whose_worker_keeps_crashing_is_recorded_as_error_and_the_search_goes_on(tmp_path):
    adapter, run_dir = toy_stage_searcher(tmp_path)
    first = adapter.suggest("trial-a")
    second = adapter.suggest("trial-b")
    assert first["code"] != second["code"]
    assert adapter.suggest("trial-c") is None  # budget handed out: wait for the running trials
    adapter.on_trial_complete("trial-a", result=None, error=True)  # Tune gave up after the retries
    rows = rows_of(run_dir.path)
    assert [(r["code"], r["status"], r["reward"], r["attempts"]) for r in rows] == [
        (first["code"], "error", FLOOR_REWARD, 2)]
    assert "Ray worker" in rows[0]["error"]
    adapter.on_trial_complete("trial-b", result={"reward": 0.5, "attempts": 1, "trial_result":
                                                 '{"status": "ok", "reward": 0.5, "ap": 0.5}'})
    assert adapter.suggest("trial-d") == "FINISHED"
    assert [r["status"] for r in rows_of(run_dir.path)] == ["error", "ok"]
    run_dir.unlock()


def test_rays_trial_resources_must_fit_the_cluster(tmp_path, local_ray):
    from detector.errors import UserError

    with pytest.raises(UserError, match="gpus_per_trial"):
        run_search(compose("search", ["proxy_eval=toy", "executor=ray", f"search.run_dir={tmp_path / 'run'}",
                                      "ray.gpus_per_trial=64"]))
