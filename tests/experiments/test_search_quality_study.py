"""The search-quality studies (experiments/study_*.py): their statistics and selection logic."""
import json
from argparse import Namespace

import pytest

from experiment_scripts import load_experiment


@pytest.fixture(scope="module")
def stats():
    return load_experiment("study_stats")


@pytest.fixture(scope="module")
def searchers():
    return load_experiment("study_searchers")


@pytest.fixture(scope="module")
def fidelity():
    return load_experiment("study_fidelity")


@pytest.fixture(scope="module")
def short():
    return load_experiment("study_short_training")


def test_rank_correlations_are_one_for_the_same_order_and_minus_one_for_the_reverse(stats):
    proxy = [0.1, 0.4, 0.2, 0.9, 0.5, 0.3, 0.7, 0.8]
    same = stats.rank_correlations(proxy, [10 * p + 1 for p in proxy])
    reverse = stats.rank_correlations(proxy, [-p for p in proxy])
    assert same["tau"][0] == pytest.approx(1.0) and same["rho"][0] == pytest.approx(1.0)
    assert reverse["tau"][0] == pytest.approx(-1.0) and reverse["rho"][0] == pytest.approx(-1.0)


def test_the_bootstrap_interval_contains_the_estimate_and_widens_with_noise(stats):
    proxy = list(range(10))
    noisy = [0, 2, 1, 4, 3, 6, 5, 9, 7, 8]
    point, low, high = stats.rank_correlations(proxy, noisy)["tau"]
    assert low <= point <= high and high - low > 0.05
    assert 0.5 < point < 1.0


def test_only_trained_trials_enter_the_curves_and_failures_count_at_their_floor(searchers):
    rows = [{"reward": 0.2, "reused": False, "status": "ok"}, {"reward": 0.2, "reused": True, "status": "ok"},
            {"reward": 0.0, "reused": False, "status": "error"}, {"reward": 0.5, "reused": False, "status": "ok"}]
    assert searchers.trained_rewards(rows) == [0.2, 0.0, 0.5]


def test_fidelity_picks_the_zoo_then_searched_codes_from_best_to_worst(fidelity, tmp_path):
    from detector.arch.space import SearchSpace
    import random

    space, rng = SearchSpace("fpn"), random.Random(3)
    run = tmp_path / "searchers" / "random-seed0"
    run.mkdir(parents=True)
    rows = [{"trial": i, "stage": "fpn", "stage_index": 0, "code": str(space.sample(rng)), "status": "ok",
             "reward": r, "reused": False}
            for i, r in enumerate([0.3, 0.9, 0.1, 0.5, 0.7, 0.2])]
    (run / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = Namespace(work=str(tmp_path), archs=6, archs_file=None)
    picked = fidelity.pick_architectures(args)
    labels = [label for label, _ in picked]
    assert labels[:3] == ["nasfcos", "nasfcos-fpn", "fcos"]
    codes = [code for _, code in picked[3:]]
    by_code = {row["code"]: row["reward"] for row in rows}
    rewards = [by_code[c] for c in codes]
    assert rewards[0] == 0.9 and rewards[-1] == 0.1 and rewards == sorted(rewards, reverse=True)
    listing = tmp_path / "archs.json"  # --archs-file: exactly that list, in its order
    listing.write_text(json.dumps([{"label": label, "code": code} for label, code in picked[::-1]]))
    assert fidelity.pick_architectures(Namespace(work=str(tmp_path), archs=6, archs_file=str(listing))) == picked[::-1]


def test_a_searcher_run_is_complete_only_when_the_budget_of_trained_trials_is(searchers, tmp_path, monkeypatch):
    run = tmp_path / "searchers" / "ppo-seed0"
    run.mkdir(parents=True)
    rows = [{"trial": i, "stage": "fpn", "stage_index": 0, "code": f"c{i % 4}", "status": "ok", "reward": 0.1,
             "reused": i >= 4} for i in range(6)]
    (run / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run / "config.yaml").write_text("seed: 0\n")
    started = []
    monkeypatch.setattr(searchers, "python_module", lambda command, log: started.append(command) or 0)
    args = Namespace(work=str(tmp_path), tag="", budget=4, cache_dir=str(tmp_path / "cache"))
    searchers.searcher_run("ppo", 0, args)
    assert started == []  # 4 trained trials: done
    searchers.searcher_run("ppo", 0, Namespace(**{**vars(args), "budget": 6}))
    assert started and f"resume={run}" in started[0]  # 6 rows, but 2 of them reused: resume
    assert "search.budget=6" in started[0]  # a larger budget than the run's own continues it


def test_gpu_ground_truth_is_the_mean_ap_over_the_seeds_found(fidelity, tmp_path):
    import json
    import math

    for seed, ap in (("0", 0.10), ("1", 0.20)):
        (tmp_path / f"fcos-s{seed}").mkdir()
        (tmp_path / f"fcos-s{seed}" / "metrics.json").write_text(json.dumps({"AP": ap, "AP50": 2 * ap}))
    (tmp_path / "fcos-fpn-s0").mkdir()  # another label sharing the prefix must not be counted
    (tmp_path / "fcos-fpn-s0" / "metrics.json").write_text(json.dumps({"AP": 0.9, "AP50": 0.9}))
    truth = fidelity.ground_truth_ap("fcos", tmp_path)
    assert truth["AP"] == pytest.approx(0.15) and truth["AP50"] == pytest.approx(0.30)
    assert truth["per_seed"] == {"0": 0.10, "1": 0.20}
    assert math.isnan(fidelity.ground_truth_ap("nasfcos", tmp_path)["AP"])


def test_trial_extra_overrides_the_trials_on_the_cache_that_search_prepares(fidelity, monkeypatch):
    import proxy_eval.build
    import proxy_eval.prepare
    from proxy_eval.result import TrialResult

    prepared, built = [], []

    class Evaluator:
        def evaluate(self, code, seed=0, report=None):
            report({"iteration": 7, "loss": 1.0 + seed, "loss_window": 1.5 + seed})
            return TrialResult(status="ok", reward=0.5, ap=0.5, ap50=0.6, loss=1.0, seconds=0.1)

    monkeypatch.setattr(proxy_eval.prepare, "prepare", lambda cfg: prepared.append(cfg) or "the-cache")
    monkeypatch.setattr(proxy_eval.build, "build_evaluator",
                        lambda cfg, cache=None: built.append((cfg, cache)) or Evaluator())
    args = Namespace(cache_dir="/tmp/unused", device="cpu", search=["proxy_eval.train_last_stage=true"],
                     trial_extra=["proxy_eval.train_last_stage=false"])
    scores = fidelity.proxy_scores("fcos", 7, [0, 1], args)
    assert scores["ap"] == 0.5 and scores["status"] == "ok"
    assert scores["curves"] == [[[7, 1.0]], [[7, 2.0]]]  # each seed's learning curve, for the stopping replays
    assert scores["window_curves"] == [[[7, 1.5]], [[7, 2.5]]]  # and its mean loss since the previous report
    assert [cfg.proxy_eval.train_last_stage for cfg in prepared] == [True]  # the cache of --search
    (cfg, cache), = built
    assert cache == "the-cache" and cfg.proxy_eval.train_last_stage is False and cfg.proxy_eval.iters == 7
    prepared.clear(), built.clear()
    fidelity.proxy_scores("fcos", 7, [0], Namespace(**{**vars(args), "trial_extra": []}))
    assert prepared == [] and built[0][1] is None and built[0][0].proxy_eval.train_last_stage is True


def test_the_paired_tau_difference_is_zero_for_the_same_proxy_and_positive_for_a_better_one(stats):
    truth = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    good = [1, 2, 3, 4, 5, 6, 8, 7]
    bad = [8, 7, 6, 5, 4, 3, 1, 2]
    assert stats.paired_tau_difference(good, good, truth) == (0.0, 0.0, 0.0)
    point, low, high = stats.paired_tau_difference(good, bad, truth)
    assert point == pytest.approx(2 * 26 / 28) and 0 < low <= point <= high


def test_average_dirs_combine_the_proxy_instances_by_mean_score_or_mean_rank(fidelity, stats, tmp_path):
    labels = ["a", "b", "c"]
    instances = {"split0": {"a": (0.1, 2.0), "b": (0.3, 1.0), "c": (0.2, 3.0)},
                 "split1": {"a": (0.9, 1.5), "b": (0.0, 2.5), "c": (0.1, 0.5)}}
    for folder, scores in instances.items():
        (tmp_path / folder).mkdir()
        for label, (ap, loss) in scores.items():
            row = {"label": label, "code": "c", "proxy": {"120": {"ap": ap, "loss": loss, "status": "ok"}}}
            (tmp_path / folder / f"{label}.json").write_text(json.dumps(row))
    folders = [str(tmp_path / "split0"), str(tmp_path / "split1")]
    assert fidelity.per_folder_scores(labels, tmp_path / "split0", 120) == ([0.1, 0.3, 0.2], [-2.0, -1.0, -3.0])
    by_score = fidelity.averaged_proxy(labels, folders, [120], "score")
    assert [by_score[label]["120"]["ap"] for label in labels] == pytest.approx([0.5, 0.15, 0.15])
    assert [by_score[label]["120"]["loss"] for label in labels] == pytest.approx([1.75, 1.75, 1.75])
    by_rank = fidelity.averaged_proxy(labels, folders, [120], "rank")
    # AP ranks (1 = worst): split0 a1 b3 c2, split1 a3 b1 c2; -loss ranks: split0 a2 b3 c1, split1 a2 b1 c3
    assert [by_rank[label]["120"]["ap"] for label in labels] == pytest.approx([2.0, 2.0, 2.0])
    assert [-by_rank[label]["120"]["loss"] for label in labels] == pytest.approx([2.0, 2.0, 2.0])
    assert stats.combine([[1.0, 2.0, 3.0], [1.0, 2.0, 30.0]], "rank") == [1.0, 2.0, 3.0]
    assert stats.combine([[1.0, 2.0, 3.0], [1.0, 2.0, 30.0]], "score") == [1.0, 2.0, 16.5]


def test_average_dirs_reports_each_instance_and_every_subset_of_k(fidelity, tmp_path):
    truth = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}
    orders = {"good": [1, 2, 3, 4], "bad": [4, 3, 2, 1]}  # proxy AP of a..d
    for folder, aps in orders.items():
        (tmp_path / folder).mkdir()
        for (label, _), ap in zip(truth.items(), aps):
            row = {"label": label, "code": "c", "proxy": {"120": {"ap": ap, "loss": 1.0 / ap, "status": "ok"}}}
            (tmp_path / folder / f"{label}.json").write_text(json.dumps(row))
    rows = [{"label": label, "trained": {"AP": ap}} for label, ap in truth.items()]
    args = Namespace(average_dirs=[str(tmp_path / "good"), str(tmp_path / "bad")], proxy_iters=[120])
    text = "\n".join(fidelity.adaptation_lines(rows, args))
    assert f"| `{tmp_path / 'good'}` | 1.00 [" in text and f"| `{tmp_path / 'bad'}` | -1.00 [" in text
    assert "| 1 | 2 | 0.00 [-1.00, 1.00] | 0.00 [-1.00, 1.00] | 0.00 [-1.00, 1.00] | 0.00 [-1.00, 1.00] |" in text
    assert "| 2 | 1 |" in text and "(mean Kendall tau over the pairs of folders): ap -1.00, neg_loss -1.00." in text


def test_short_training_taus_rank_the_evals_along_the_way_against_independent_final_runs(short, tmp_path):
    final, along = tmp_path / "final", tmp_path / "along"
    labels = ["a", "b", "c", "d", "e"]
    for i, label in enumerate(labels):
        (final / f"{label}-s0").mkdir(parents=True)
        (final / f"{label}-s0" / "metrics.json").write_text(json.dumps({"AP": 0.1 * i, "AP50": 0.0}))
        evals = [{"iteration": 100, "AP": -0.1 * i},  # early: the reverse order
                 {"iteration": 200, "AP": 0.1 * i + 0.01}]  # later: the same order
        (along / f"{label}-s1").mkdir(parents=True)
        (along / f"{label}-s1" / "metrics.json").write_text(json.dumps({"evals": evals}))
    taus = short.short_training_taus(labels, final, along)
    assert sorted(taus) == [100, 200]
    assert taus[100]["tau"][0] == pytest.approx(-1.0) and taus[200]["tau"][0] == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match="no f-s"):
        (final / "f-s0").mkdir()
        (final / "f-s0" / "metrics.json").write_text(json.dumps({"AP": 0.9, "AP50": 0.0}))
        short.short_training_taus([*labels, "f"], final, along)
    # a same-seed final run is left out with final_seeds: "a" would otherwise become the best
    (final / "a-s1").mkdir()
    (final / "a-s1" / "metrics.json").write_text(json.dumps({"AP": 10.0, "AP50": 0.0}))
    assert short.short_training_taus(labels, final, along, final_seeds=["0"])[200]["tau"][0] == pytest.approx(1.0)
    assert short.short_training_taus(labels, final, along)[200]["tau"][0] < 1.0


def test_each_study_is_its_own_script_and_the_old_command_still_reaches_it():
    import subprocess
    import sys

    from experiment_scripts import EXPERIMENTS

    for script in ("study_searchers.py", "study_fidelity.py", "study_short_training.py"):
        done = subprocess.run([sys.executable, str(EXPERIMENTS / script), "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "--proxy-iters" in done.stdout, script
    old = subprocess.run([sys.executable, str(EXPERIMENTS / "search_quality.py"), "fidelity", "--help"],
                         capture_output=True, text=True)
    assert old.returncode == 0 and "--ground-truth" in old.stdout
    unknown = subprocess.run([sys.executable, str(EXPERIMENTS / "search_quality.py"), "nope"], capture_output=True,
                             text=True)
    assert unknown.returncode == 2 and "searchers|fidelity|short-training" in unknown.stderr


def test_the_margin_over_random_carries_the_standard_error_of_the_difference(searchers):
    margin, error = searchers.margin_over([0.3, 0.5], [0.1, 0.1, 0.1])
    assert margin == pytest.approx(0.3)
    # SE of [0.3, 0.5] is 0.1; the baseline has none
    assert error == pytest.approx(0.1)
    assert searchers.standard_error([0.2]) == 0.0


def test_the_searchers_table_finds_random_search_under_a_tag(searchers, tmp_path):
    def rows(rewards):
        return [{"trial": i, "status": "ok", "reward": r, "seconds": 1.0, "reused": False} for i, r in enumerate(rewards)]

    curves = {"ppo-x": [[0.1, 0.4], [0.2, 0.5]], "random-x": [[0.1, 0.2], [0.3, 0.2]]}
    runs = {name: [{"rows": rows(c)} for c in group] for name, group in curves.items()}
    args = Namespace(tag="-x", seeds=[0, 1], work=str(tmp_path), controller_set=[], reward="ap", search=[], jobs=1)
    path = tmp_path / "searchers-x.md"
    searchers.write_searchers_markdown(curves, runs, 2, path, args, 1.0)
    text = path.read_text()
    assert "Random search's mean final best-so-far: 0.2500" in text
    assert "| ppo-x | 0.4500 ± 0.0500 | +0.2000 ± 0.0707 | yes |" in text


@pytest.fixture(scope="module")
def headline():
    return load_experiment("study_headline")


def write_metrics(folder, label, seed, ap):
    run = folder / f"{label}-s{seed}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"AP": ap, "AP50": ap + 0.3, "iterations": 100, "batch_size": 16,
                                                  "train_seconds": 20.0}))


def test_headline_pools_the_seeds_of_every_folder_and_ignores_other_labels_that_share_a_prefix(headline, tmp_path):
    write_metrics(tmp_path / "gt", "fcos", 0, 0.30)
    write_metrics(tmp_path / "gt", "fcos", 1, 0.34)
    write_metrics(tmp_path / "more", "fcos", 2, 0.32)
    write_metrics(tmp_path / "more", "fcos-wide", 0, 0.9)  # another label: not a seed of fcos
    row = headline.summarize({"label": "fcos", "code": "fcos"}, [tmp_path / "gt", tmp_path / "more"], (800, 1333))
    assert row["seeds"] == [0, 1, 2]
    assert row["ap"] == pytest.approx(0.32) and row["ap_std"] == pytest.approx(0.02)
    assert row["img_per_s"] == pytest.approx(80.0) and row["gflops"] > 0 and not row["searched"]


def test_the_headline_goal_needs_a_margin_above_two_deviations_and_a_bounded_cost(headline):
    reference = {"label": "fcos", "ap": 0.30, "ap_std": 0.01, "gflops": 10.0}
    clear = {"label": "s", "ap": 0.33, "ap_std": 0.01, "gflops": 14.0}
    noisy = {**clear, "ap_std": 0.02}          # 0.03 is not above 2 x 0.02
    costly = {**clear, "gflops": 16.0}         # 1.6x the reference's decoder GFLOPs
    assert "**met**" in headline.verdict(clear, reference, 1.5)
    assert "**missed**" in headline.verdict(noisy, reference, 1.5)
    assert "**missed**" in headline.verdict(costly, reference, 1.5)


def test_headline_lists_join_in_order_and_name_each_label_once(headline, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([{"label": "ppo-best", "code": "fcos", "from": "run a"}, {"label": "fcos", "code": "fcos"}]))
    second.write_text(json.dumps([{"label": "fcos", "code": "nasfcos"}, {"label": "random-best", "code": "fcos"}]))
    entries = headline.joined_entries([first, second])
    assert [entry["label"] for entry in entries] == ["ppo-best", "fcos", "random-best"]
    assert entries[1]["code"] == "fcos"  # the first file's entry of a label wins
