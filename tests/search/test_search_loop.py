"""The search loop without Ray (executor=local): stages, budget, reuse, failures, the run dir,
and a tiny real search on cached features."""
from __future__ import annotations


import pytest
from omegaconf import OmegaConf

from detector.cli import compose
from detector.errors import UserError
from proxy_eval.result import FLOOR_REWARD
from search.run import run_search
from search.run_dir import open_run_dir
from search_runs import check_completed_run, rows_of, toy_cfg


def test_progressive_toy_search_trains_the_budget_per_stage_and_fixes_the_best_fpn(tmp_path):
    run_dir = tmp_path / "run"
    assert run_search(toy_cfg(run_dir)) == run_dir
    rows = check_completed_run(run_dir, ["fpn", "head"], 5)
    fpn_rows = [r for r in rows if r["stage"] == "fpn"]
    head_rows = [r for r in rows if r["stage"] == "head"]
    assert all(r["code"].endswith("+head:fcos") for r in fpn_rows)  # fpn stage: head fixed to head:fcos
    best_fpn = max((r for r in fpn_rows if r["status"] == "ok"), key=lambda r: r["reward"])["code"].split("+")[0]
    assert all(r["code"].split("+")[0] == best_fpn for r in head_rows)  # head stage: the fpn stage's best FPN
    assert all(r["status"] == "ok" and 0 <= r["reward"] <= 1 for r in rows)
    config = OmegaConf.load(run_dir / "config.yaml")  # the resolved config of the run
    assert config.proxy_eval.name == "toy" and config.search.run_dir == str(run_dir)


def test_threaded_local_executor_keeps_every_invariant(tmp_path):
    run_dir = tmp_path / "run"
    run_search(toy_cfg(run_dir, "search.workers=3", "search.stages=[joint]", "search.budget=7",
                       "controller=evolution"))
    rows = check_completed_run(run_dir, ["joint"], 7)
    assert all("+head:s" in r["code"] and r["code"].startswith("fpn:c") for r in rows)  # joint: both searched


def test_known_codes_are_reused_not_retrained_and_an_exhausted_space_stops(tmp_path):
    # One level, skip ops and sum only, 3 blocks: the only valid FPN reads c5 everywhere.
    run_dir = tmp_path / "run"
    run_search(toy_cfg(run_dir, "search.stages=[fpn]", "search.budget=3", "controller=random",
                       "space.levels=[c5]", "space.num_blocks=3", "space.fpn_ops=[skip]",
                       "space.aggregations=[sum]"))
    rows = rows_of(run_dir)
    trained = [r for r in rows if not r["reused"]]
    reused = [r for r in rows if r["reused"]]
    assert len(trained) == 1  # the space holds one code; it is trained once
    assert len(reused) == 10 * 3  # then the stage stops at the reuse limit instead of looping
    assert all(r["reused_from"] == trained[0]["trial"] and r["reward"] == trained[0]["reward"]
               and r["seconds"] == 0.0 for r in reused)
    from controller.random_search import RandomSearcher
    from detector.arch.space import SearchSpace

    searcher = RandomSearcher(SearchSpace("fpn", levels=("c5",), num_blocks=3, fpn_ops=("skip",),
                                          aggregations=("sum",)))
    searcher.load(run_dir / "searcher-0-fpn.pt")
    assert searcher.num_told == len(rows) and not searcher.pending  # every sample was told


def test_injected_failures_are_retried_then_recorded_with_the_floor_reward(tmp_path):
    run_dir = tmp_path / "run"
    run_search(toy_cfg(run_dir, "proxy_eval.fail_prob=0.5", "search.retries=2", "search.budget=6"))
    rows = check_completed_run(run_dir, ["fpn", "head"], 6)
    failed = [r for r in rows if r["status"] == "error" and not r["reused"]]
    assert failed, "fail_prob=0.5 over 12 trials should fail some"
    assert all(r["reward"] == FLOOR_REWARD and "injected" in r["error"] and r["attempts"] == 3 for r in failed)
    assert any(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize("override, message", [
    ("search.budget=0", "search.budget"),
    ("search.stages=[fpn,neck]", "unknown stage 'neck'"),
    ("search.stages=[head]", "fixed_fpn"),
    ("search.fixed_head=head:nope", "search.fixed_head"),
    ("executor=local2", "executor"),
    ("reward=bogus", "reward=bogus: choose one of auto, ap, neg_loss"),
])
def test_bad_settings_are_user_errors_before_anything_runs(tmp_path, override, message):
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        run_search(toy_cfg(run_dir, override))
    assert not (run_dir / "history.jsonl").exists()


def test_a_fresh_search_refuses_a_run_dir_that_holds_a_run(tmp_path):
    run_dir = tmp_path / "run"
    run_search(toy_cfg(run_dir, "search.stages=[fpn]", "search.budget=1"))
    with pytest.raises(UserError, match="resume="):
        run_search(toy_cfg(run_dir, "search.stages=[fpn]", "search.budget=1"))


def test_the_lock_refuses_a_second_search_on_a_run_dir_in_use(tmp_path):
    run_dir = tmp_path / "run"
    run_search(toy_cfg(run_dir, "search.stages=[fpn]", "search.budget=1"))
    owner = open_run_dir(run_dir)  # as a running search holds it (a subprocess test in test_search_resume)
    try:
        with pytest.raises(UserError, match="in use by another search"):
            run_search(compose("search", [f"resume={run_dir}"]))
    finally:
        owner.unlock()
    run_search(compose("search", [f"resume={run_dir}"]))  # released: resuming works again


def test_tiny_real_search_on_cached_features(tmp_path, monkeypatch):
    """proxy_eval=cached end to end: synthetic data, prepare, real decoder trials, report; in-process
    trials use the feature cache handle that prepare returned, so the tensor file is hashed once."""
    from proxy_eval import feature_cache
    from search.run import run_command

    hashed = []
    real_sha256 = feature_cache.file_sha256
    monkeypatch.setattr(feature_cache, "file_sha256", lambda path: hashed.append(path) or real_sha256(path))

    run_dir = tmp_path / "run"
    cfg = compose("search", [
        "executor=local", "search.workers=1", "search.budget=2", f"search.run_dir={run_dir}",
        f"cache_dir={tmp_path / 'cache'}", "backbone.weights=none", "device=cpu",
        "data.num_train=12", "data.num_val=2", "data.image_min_side=64", "data.image_max_side=96",
        "data.large_every=0", "data.max_objects=3",
        "proxy_eval.train_images=8", "proxy_eval.val_images=4", "proxy_eval.resolution=128",
        "proxy_eval.width=64", "proxy_eval.adapt_iters=0", "proxy_eval.iters=2", "proxy_eval.batch_size=4",
        "proxy_eval.warmup_iters=0",
        "space.fpn_ops=[sep3,skip]", "space.head_ops=[conv1,sep3,skip]",
    ])
    run_command(cfg)
    rows = check_completed_run(run_dir, ["fpn", "head"], 2)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["params"] > 0 and r["gflops"] > 0 and r["seconds"] > 0 for r in ok)
    assert (run_dir / "report.md").is_file()
    assert len(hashed) == 1  # written and hashed by prepare; the trials did not hash it again
