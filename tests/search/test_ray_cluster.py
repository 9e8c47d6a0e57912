"""The search on a real multi-node Ray cluster (executor=ray, ray.address=<head>).

The cluster is real: a head and worker nodes started as separate ``ray start`` processes on this
machine (:class:`ray_cluster.LocalCluster`: own temp dirs and ports, token authentication, one
custom resource naming each node). The driver is the real CLI, ``python -m search run``, in a
subprocess joining with ``ray.address=<head>``. Every trial records the node it ran on, so the
tests see trials land on both nodes. Afterwards exactly the processes the test started are
stopped (by process id) and none is left.

Faults: a worker node SIGKILLed mid-trial (the trial runs again elsewhere, recorded once), the
driver SIGKILLed (``resume=`` against the running cluster completes the budget exactly), a
cluster that is not there or refuses the driver's token (one line, exit 2), the head gone
mid-search and back (slow), a node that cannot see ``cache_dir`` (slow; a fast twin checks the
worker's message).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")

from faults import (ROOT, PausePoint, assert_one_line_bad_input, parse_history_lines, record_fault,  # noqa: E402
                    rows_lost, run_cli_in_process, sigkill, start_cli, wait_for_marker, wait_until)
from ray_cluster import LocalCluster, can_hide_paths, free_port  # noqa: E402
from search_runs import check_completed_run  # noqa: E402

STAGES = ["fpn", "head"]


@pytest.fixture(scope="module")
def cluster():
    """Head and one worker node, 1 CPU each (so two trials at once must use both nodes)."""
    with LocalCluster() as started:
        started.start_head("head", cpus=1, **project_env())
        started.add_node("node1", cpus=1, **project_env())
        started.wait_for_nodes()
        yield started
        started.stop()
        assert started.leftover() == [], "a process of the test cluster outlived it"


def project_env() -> dict[str, str]:
    """This checkout importable on every node and in the driver (the same project everywhere)."""
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "helpers")]), "TQDM_DISABLE": "1"}


def search_args(run_dir: Path, address: str, *extra: str) -> list[str]:
    return ["run", "proxy_eval=toy", "executor=ray", f"ray.address={address}", "search.budget=3",
            f"search.run_dir={run_dir}", f"cache_dir={run_dir.parent / 'cache'}", *extra]


def run_search_cli(cluster: LocalCluster, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=ROOT, text=True, capture_output=True,
                          timeout=timeout, env=cluster.env(**project_env(), **env))


def nodes_of(rows: list[dict]) -> list[str]:
    """The test node (its custom resource) each trained row ran on."""
    return [next(iter(r["extra"]["node_resources"])) for r in rows if not r["reused"]]


# ---------------------------------------------------------------------- the search on the cluster
def test_a_search_on_a_two_node_cluster_uses_both_nodes_and_resumes_after_a_driver_kill(cluster, tmp_path,
                                                                                        record_property):
    """search.workers=3 on two 1-CPU nodes: the driver is SIGKILLed after the 2nd history row, and
    ``resume=`` (which joins the cluster from the run's saved config) completes the run: exactly the
    budget per stage, no code trained twice, no row lost, trials on both nodes, one warning that
    only 2 trials fit at once, the report written."""
    run_dir = tmp_path / "run"
    # Tune hands a trial to whichever trial actor is ready first, and an actor starts in 5-20 s on
    # a loaded machine (a torch import): with trials of 3 s in one stage, both nodes start their
    # actors at the same moment in each run, so each gets trials. (In a second stage the first
    # node's actor is warm and can take every trial before the other node's actor is up.)
    args = search_args(run_dir, cluster.address, "search.workers=3", "proxy_eval.sleep_s=3", "search.stages=[fpn]",
                       "search.budget=5")
    pause = PausePoint("search.history:History.append", tmp_path / "paused", call=2, when="after")
    proc = start_cli("search", *args, pause=pause, env=cluster.env(**project_env()))
    wait_for_marker(pause, proc, timeout=240)
    sigkill(proc)
    before = parse_history_lines(run_dir / "history.jsonl")
    assert len(before) == 2
    done = run_search_cli(cluster, "run", f"resume={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = check_completed_run(run_dir, ["fpn"], 5)
    assert rows_lost(before, rows) == 0
    assert set(nodes_of(rows)) == {"head", "node1"}, (nodes_of(rows), done.stderr[-2000:],
                                                       cluster.nodes["node1"].log.read_text()[-2000:])
    assert all(r["extra"]["node_ip"] and r["extra"]["node_id"] for r in rows if not r["reused"])
    warnings = [line for line in done.stderr.splitlines() if "can place only 2 trial(s)" in line]
    assert len(warnings) == 1, done.stderr[-3000:]
    assert "search.workers=3" in warnings[0]
    assert (run_dir / "report.md").is_file()
    assert "Traceback" not in done.stderr
    record_fault(record_property, 1, rows_lost(before, rows))


def test_no_cluster_at_the_address_is_one_line_naming_the_fix(tmp_path, record_property):
    started = time.monotonic()
    outcome = run_cli_in_process("search", search_args(tmp_path / "run", f"127.0.0.1:{free_port()}"))
    line = assert_one_line_bad_input(outcome, "no head", strict=False)
    assert "no Ray head answers at" in line and "Connection refused" in line and "ray start --head" in line
    assert time.monotonic() - started < 60  # not Ray's minutes of retries
    record_fault(record_property, 1, None)


def test_a_driver_without_the_clusters_token_is_one_line_naming_the_fix(cluster, tmp_path, record_property):
    """The head requires token authentication; a driver started without RAY_AUTH_MODE=token (what
    a new user does) is refused: one line saying how to pass the token, exit 2."""
    env = {k: v for k, v in cluster.env(**project_env()).items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    done = subprocess.run([sys.executable, "-m", "search", *search_args(tmp_path / "run", cluster.address)],
                          cwd=ROOT, text=True, capture_output=True, timeout=180, env=env)
    line = assert_one_line_bad_input(done, "no token", strict=False)
    assert "refused this driver's authentication token" in line and "RAY_AUTH_MODE=token" in line
    assert "InvalidAuthToken" not in done.stderr  # Ray's retry lines are not shown
    record_fault(record_property, 1, None)


def test_more_workers_than_the_nodes_can_place_warn_once_and_a_trial_no_node_holds_is_refused(caplog):
    """Placement counts whole trials per node (a trial never spans nodes), from ``ray.nodes()``."""
    from detector.errors import UserError
    from search.ray_executor import RayExecutor, trial_slots

    assert trial_slots({"CPU": 1.0}, {"cpu": 0.1, "gpu": 0.0}) == 10
    assert trial_slots({"CPU": 16.0, "GPU": 1.0}, {"cpu": 1.0, "gpu": 0.25}) == 4
    assert trial_slots({"CPU": 16.0}, {"cpu": 1.0, "gpu": 0.5}) == 0
    nodes = [{"Alive": True, "Resources": {"CPU": 3.0}}, {"Alive": True, "Resources": {"CPU": 3.0}},
             {"Alive": False, "Resources": {"CPU": 64.0}}]
    executor = object.__new__(RayExecutor)
    executor.workers, executor.resources = 5, {"cpu": 2.0, "gpu": 0.0}
    with caplog.at_level("WARNING", logger="search.ray_executor"):
        executor._check_placement(nodes)
    assert [r.getMessage() for r in caplog.records] == [
        "search.workers=5 but the Ray cluster (2 node(s)) can place only 2 trial(s) of ray.cpus_per_trial=2 and "
        "ray.gpus_per_trial=0 at once: 2 will run at a time; add nodes or lower ray.cpus_per_trial / "
        "ray.gpus_per_trial"]
    executor.workers = 2
    caplog.clear()
    executor._check_placement(nodes)
    assert not caplog.records
    executor.resources = {"cpu": 4.0, "gpu": 0.0}  # 6 CPUs in the cluster, but 3 per node
    with pytest.raises(UserError, match="no node of the Ray cluster can hold a trial of ray.cpus_per_trial=4"):
        executor._check_placement(nodes)


# ---------------------------------------------------------------------- faults on the cluster
@pytest.mark.slow
def test_a_worker_node_killed_mid_trial_reruns_its_trial_on_another_node(cluster, tmp_path, record_property):
    """A third node joins; once a trial runs there, every process of that node is SIGKILLed. Tune
    restarts the trial (search.retries=1) on a surviving node; it is recorded once, ok. (Slow, ~75 s;
    fast twin: test_search_ray.py's adapter test, a trial whose worker is lost for good is recorded
    as ``error`` and the search goes on.)"""
    victim = cluster.add_node("victim", cpus=1, **project_env())
    cluster.wait_for_nodes()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "search",
                             *search_args(run_dir, cluster.address, "search.workers=3", "search.stages=[fpn]",
                                          "search.budget=4", "proxy_eval.sleep_s=3", "search.retries=1")],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cluster.env(**project_env()))
    try:
        wait_until(lambda: trial_running_on(cluster, victim.process.pid), proc, "a trial on the victim node", 240)
        killed = cluster.kill_node("victim")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert killed
    rows = check_completed_run(run_dir, ["fpn"], 4)
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert "victim" not in nodes_of(rows)  # the killed node's trial was recorded from its re-run
    assert any(p.name.startswith("error") for p in (run_dir / "ray").rglob("*")), "Tune recorded no failure"
    record_fault(record_property, 1, 0)


def trial_running_on(cluster: LocalCluster, session: int) -> bool:
    """A Tune trial actor of the node started as ``session`` is running a trial (its process title)."""
    from ray_cluster import _session

    for pid in cluster.leftover():
        if _session(pid) != session:
            continue
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ImplicitFunc.train" in title:  # Ray's title while the actor runs a trial (not while it starts)
            return True
    return False


def test_a_node_without_the_feature_cache_fails_the_trial_in_one_line_naming_the_path(tmp_path, record_property):
    """Fast twin of the slow blind-node test: the worker's check before it opens the cache."""
    from detector.errors import UserError
    from search.ray_executor import _worker_evaluator

    missing = tmp_path / "features" / "abc"
    with pytest.raises(UserError) as err:
        _worker_evaluator({"key": "blind", "cache": str(missing), "cfg": {}})
    assert str(missing) in str(err.value) and "cache_dir" in str(err.value) and "\n" not in str(err.value)
    record_fault(record_property, 1, None)


@pytest.mark.slow
@pytest.mark.skipif(not can_hide_paths(), reason="needs root and unshare to hide cache_dir from one node")
def test_a_node_that_cannot_see_cache_dir_fails_its_trials_in_one_line_and_the_search_goes_on(tmp_path,
                                                                                                record_property):
    """proxy_eval=cached on a head that sees cache_dir and a node that sees an empty folder there
    (its own mount namespace): the node's trials fail with one line naming the cache's path, the
    head's succeed, the budget is spent exactly."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    run_dir = tmp_path / "run"
    with LocalCluster() as blind_cluster:
        blind_cluster.start_head("head", cpus=1, **project_env())
        blind_cluster.add_node("blind", cpus=1, hide=cache_dir, **project_env())
        blind_cluster.wait_for_nodes()
        done = run_search_cli(blind_cluster, *search_args(run_dir, blind_cluster.address, *TINY_CACHED_RAY,
                                                          "search.workers=2", "search.stages=[fpn]",
                                                          "search.budget=4", f"cache_dir={cache_dir}"), timeout=600)
        blind_cluster.stop()
        assert blind_cluster.leftover() == []
    assert done.returncode == 0, done.stderr[-3000:]
    rows = check_completed_run(run_dir, ["fpn"], 4)
    blind = [r for r in rows if r["extra"]["node_resources"] == {"blind": 1.0}]
    seeing = [r for r in rows if r["extra"]["node_resources"] == {"head": 1.0}]
    assert blind and seeing, nodes_of(rows)
    assert all(r["status"] == "error" and "not visible on node" in r["error"] and str(cache_dir) in r["error"]
               and "\n" not in r["error"] for r in blind)
    assert all(r["status"] == "ok" for r in seeing), [r["error"] for r in seeing]
    record_fault(record_property, 1, 0)


# A tiny real cached proxy (test_faults_search's settings) on the Ray executor.
TINY_CACHED_RAY = [
    "proxy_eval=cached", "backbone.weights=none", "device=cpu",
    "data.num_train=12", "data.num_val=2", "data.image_min_side=64", "data.image_max_side=96",
    "data.large_every=0", "data.max_objects=3",
    "proxy_eval.train_images=8", "proxy_eval.val_images=4", "proxy_eval.resolution=128",
    "proxy_eval.width=64", "proxy_eval.adapt_iters=0", "proxy_eval.iters=2", "proxy_eval.batch_size=4",
    "proxy_eval.warmup_iters=0", "space.fpn_ops=[sep3,skip]", "space.head_ops=[conv1,sep3,skip]",
]


@pytest.mark.slow
def test_the_head_gone_mid_search_stops_the_driver_and_resume_completes_when_it_is_back(tmp_path,
                                                                                      record_property):
    """The head node (GCS, raylet) is SIGKILLed while trials run: the driver exits, every history row
    written before stays; ``resume=`` with the head still gone is one line (exit 2); a head restarted
    on the same port (and a worker node) lets ``resume=`` complete the budget exactly."""
    run_dir = tmp_path / "run"
    with LocalCluster() as gone:
        gone.start_head("head", cpus=1, **project_env())
        gone.add_node("node1", cpus=1, **project_env())
        gone.wait_for_nodes()
        proc = subprocess.Popen([sys.executable, "-m", "search",
                                 *search_args(run_dir, gone.address, "search.workers=2", "proxy_eval.sleep_s=1")],
                                cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=gone.env(**project_env()))
        history = run_dir / "history.jsonl"
        try:
            wait_until(lambda: history.exists() and len(history.read_text().splitlines()) >= 2, proc,
                       "two history rows", 240)
            gone.kill_node("head")
            started = time.monotonic()
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        print(f"driver exit {proc.returncode} after {time.monotonic() - started:.0f} s; stderr tail:\n{err[-1500:]}")
        assert proc.returncode != 0
        before = parse_history_lines(history)
        assert 2 <= len(before) < 6
        outcome = run_cli_in_process("search", ["run", f"resume={run_dir}"])
        line = assert_one_line_bad_input(outcome, "resume, head gone", strict=False)
        assert "no Ray head answers at" in line
        gone.kill_node("node1")
        gone.start_head("head", cpus=1, port=gone.port, **project_env())
        gone.add_node("node1", cpus=1, **project_env())
        gone.wait_for_nodes()
        done = run_search_cli(gone, "run", f"resume={run_dir}")
        gone.stop()
        assert gone.leftover() == []
    assert done.returncode == 0, done.stderr[-3000:]
    after = check_completed_run(run_dir, STAGES, 3)
    assert rows_lost(before, after) == 0
    record_fault(record_property, 1, rows_lost(before, after))
