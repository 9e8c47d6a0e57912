"""experiments/search_quality.py: the statistics and the selection logic of the search-quality study."""
import json
from argparse import Namespace

import pytest

from experiment_scripts import load_experiment


@pytest.fixture(scope="module")
def study():
    return load_experiment("search_quality")


def test_rank_correlations_are_one_for_the_same_order_and_minus_one_for_the_reverse(study):
    proxy = [0.1, 0.4, 0.2, 0.9, 0.5, 0.3, 0.7, 0.8]
    same = study.rank_correlations(proxy, [10 * p + 1 for p in proxy])
    reverse = study.rank_correlations(proxy, [-p for p in proxy])
    assert same["tau"][0] == pytest.approx(1.0) and same["rho"][0] == pytest.approx(1.0)
    assert reverse["tau"][0] == pytest.approx(-1.0) and reverse["rho"][0] == pytest.approx(-1.0)


def test_the_bootstrap_interval_contains_the_estimate_and_widens_with_noise(study):
    proxy = list(range(10))
    noisy = [0, 2, 1, 4, 3, 6, 5, 9, 7, 8]
    point, low, high = study.rank_correlations(proxy, noisy)["tau"]
    assert low <= point <= high and high - low > 0.05
    assert 0.5 < point < 1.0


def test_only_trained_trials_enter_the_curves_and_failures_count_at_their_floor(study):
    rows = [{"reward": 0.2, "reused": False, "status": "ok"}, {"reward": 0.2, "reused": True, "status": "ok"},
            {"reward": 0.0, "reused": False, "status": "error"}, {"reward": 0.5, "reused": False, "status": "ok"}]
    assert study.trained_rewards(rows) == [0.2, 0.0, 0.5]


def test_fidelity_picks_the_zoo_then_searched_codes_from_best_to_worst(study, tmp_path):
    from search.space import SearchSpace
    import random

    space, rng = SearchSpace("fpn"), random.Random(3)
    run = tmp_path / "searchers" / "random-seed0"
    run.mkdir(parents=True)
    rows = [{"trial": i, "stage": "fpn", "stage_index": 0, "code": str(space.sample(rng)), "status": "ok",
             "reward": r, "reused": False}
            for i, r in enumerate([0.3, 0.9, 0.1, 0.5, 0.7, 0.2])]
    (run / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = Namespace(work=str(tmp_path), archs=6, archs_file=None)
    picked = study.pick_architectures(args)
    labels = [label for label, _ in picked]
    assert labels[:3] == ["nasfcos", "nasfcos-fpn", "fcos"]
    codes = [code for _, code in picked[3:]]
    by_code = {row["code"]: row["reward"] for row in rows}
    rewards = [by_code[c] for c in codes]
    assert rewards[0] == 0.9 and rewards[-1] == 0.1 and rewards == sorted(rewards, reverse=True)
    listing = tmp_path / "archs.json"  # --archs-file: exactly that list, in its order
    listing.write_text(json.dumps([{"label": label, "code": code} for label, code in picked[::-1]]))
    assert study.pick_architectures(Namespace(work=str(tmp_path), archs=6, archs_file=str(listing))) == picked[::-1]


def test_a_searcher_run_is_complete_only_when_the_budget_of_trained_trials_is(study, tmp_path, monkeypatch):
    run = tmp_path / "searchers" / "ppo-seed0"
    run.mkdir(parents=True)
    rows = [{"trial": i, "stage": "fpn", "stage_index": 0, "code": f"c{i % 4}", "status": "ok", "reward": 0.1,
             "reused": i >= 4} for i in range(6)]
    (run / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run / "config.yaml").write_text("seed: 0\n")
    started = []
    monkeypatch.setattr(study, "python_module", lambda command, log: started.append(command) or 0)
    args = Namespace(work=str(tmp_path), tag="", budget=4, cache_dir=str(tmp_path / "cache"))
    study.searcher_run("ppo", 0, args)
    assert started == []  # 4 trained trials: done
    study.searcher_run("ppo", 0, Namespace(**{**vars(args), "budget": 6}))
    assert started and f"resume={run}" in started[0]  # 6 rows, but 2 of them reused: resume


def test_gpu_ground_truth_is_the_mean_ap_over_the_seeds_found(study, tmp_path):
    import json
    import math

    for seed, ap in (("0", 0.10), ("1", 0.20)):
        (tmp_path / f"fcos-s{seed}").mkdir()
        (tmp_path / f"fcos-s{seed}" / "metrics.json").write_text(json.dumps({"AP": ap, "AP50": 2 * ap}))
    (tmp_path / "fcos-fpn-s0").mkdir()  # another label sharing the prefix must not be counted
    (tmp_path / "fcos-fpn-s0" / "metrics.json").write_text(json.dumps({"AP": 0.9, "AP50": 0.9}))
    truth = study.ground_truth_ap("fcos", tmp_path)
    assert truth["AP"] == pytest.approx(0.15) and truth["AP50"] == pytest.approx(0.30)
    assert truth["per_seed"] == {"0": 0.10, "1": 0.20}
    assert math.isnan(study.ground_truth_ap("nasfcos", tmp_path)["AP"])


def test_trial_extra_overrides_the_trials_on_the_cache_that_search_prepares(study, monkeypatch):
    import proxy_eval.build
    import proxy_eval.prepare
    from proxy_eval.result import TrialResult

    prepared, built = [], []

    class Evaluator:
        def evaluate(self, code, seed=0):
            return TrialResult(status="ok", reward=0.5, ap=0.5, ap50=0.6, loss=1.0, seconds=0.1)

    monkeypatch.setattr(proxy_eval.prepare, "prepare", lambda cfg: prepared.append(cfg) or "the-cache")
    monkeypatch.setattr(proxy_eval.build, "build_evaluator",
                        lambda cfg, cache=None: built.append((cfg, cache)) or Evaluator())
    args = Namespace(cache_dir="/tmp/unused", device="cpu", search=["proxy_eval.train_last_stage=true"],
                     trial_extra=["proxy_eval.train_last_stage=false"])
    scores = study.proxy_scores("fcos", 7, [0, 1], args)
    assert scores["ap"] == 0.5 and scores["status"] == "ok"
    assert [cfg.proxy_eval.train_last_stage for cfg in prepared] == [True]  # the cache of --search
    (cfg, cache), = built
    assert cache == "the-cache" and cfg.proxy_eval.train_last_stage is False and cfg.proxy_eval.iters == 7
    prepared.clear(), built.clear()
    study.proxy_scores("fcos", 7, [0], Namespace(**{**vars(args), "trial_extra": []}))
    assert prepared == [] and built[0][1] is None and built[0][0].proxy_eval.train_last_stage is True


def test_the_paired_tau_difference_is_zero_for_the_same_proxy_and_positive_for_a_better_one(study):
    truth = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    good = [1, 2, 3, 4, 5, 6, 8, 7]
    bad = [8, 7, 6, 5, 4, 3, 1, 2]
    assert study.paired_tau_difference(good, good, truth) == (0.0, 0.0, 0.0)
    point, low, high = study.paired_tau_difference(good, bad, truth)
    assert point == pytest.approx(2 * 26 / 28) and 0 < low <= point <= high
