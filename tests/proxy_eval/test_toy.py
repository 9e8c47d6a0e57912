"""The toy evaluator: an instant, deterministic reward with a known optimum, for any stage."""
from __future__ import annotations

import pickle
import random
import statistics

import pytest

from detector.arch.grammar import parse
from detector.errors import UserError
from detector.arch.zoo import zoo_arch
from proxy_eval.toy import ToyEvaluator
from detector.arch.space import SearchSpace


def test_the_hidden_target_scores_one_and_is_a_valid_code_of_the_space():
    space = SearchSpace("fpn")
    toy = ToyEvaluator(space, target_seed=3)
    assert space.is_valid(toy.target_tokens)
    result = toy.evaluate(toy.target)
    assert result.ok and result.reward == pytest.approx(1.0)
    assert ToyEvaluator(space, target_seed=4).target_tokens != toy.target_tokens


def test_reward_is_the_fraction_of_decisions_agreeing_with_the_target():
    space = SearchSpace("fpn")
    toy = ToyEvaluator(space, target_seed=0)
    child = space.mutate(toy.target_tokens, random.Random(0))  # exactly one decision differs
    assert toy.evaluate(space.decode(child)).reward == pytest.approx(1 - 1 / len(space.decisions))
    rng = random.Random(1)
    rewards = [toy.evaluate(space.sample(rng)).reward for _ in range(400)]
    expected = statistics.mean(1 / d.num_choices for d in space.decisions)  # uniform random codes
    assert statistics.mean(rewards) == pytest.approx(expected, abs=0.03)


def test_noise_free_results_are_deterministic_and_fill_every_field():
    space = SearchSpace("joint")
    arch = space.sample(random.Random(2))
    a, b = ToyEvaluator(space, target_seed=1).evaluate(arch), ToyEvaluator(space, target_seed=1).evaluate(arch)
    assert a.reward == b.reward
    assert a.status == "ok" and a.ap == a.ap50 == a.reward and a.loss == pytest.approx(1 - a.reward)
    assert a.params == 0 and a.gflops == 0.0 and 0 <= a.seconds < 1.0


def test_noise_is_seeded_per_code_and_seed():
    space = SearchSpace("fpn")
    rng = random.Random(3)
    archs = [space.sample(rng) for _ in range(20)]
    clean = ToyEvaluator(space, target_seed=0)
    noisy = ToyEvaluator(space, target_seed=0, noise=0.05, seed=7)
    again = ToyEvaluator(space, target_seed=0, noise=0.05, seed=7)
    other = ToyEvaluator(space, target_seed=0, noise=0.05, seed=8)
    first = [noisy.evaluate(a).reward for a in archs]
    assert first == [noisy.evaluate(a).reward for a in archs] == [again.evaluate(a).reward for a in archs]
    assert first != [other.evaluate(a).reward for a in archs]
    assert first != [clean.evaluate(a).reward for a in archs]
    assert all(0.0 <= r <= 1.0 for r in first)


def test_per_decision_weights_are_normalised_and_vary_with_spread():
    space = SearchSpace("joint")
    toy = ToyEvaluator(space, target_seed=0, weight_spread=0.5)
    assert sum(toy.weights) == pytest.approx(1.0)
    assert max(toy.weights) > min(toy.weights) * 1.2
    assert toy.evaluate(toy.target).reward == pytest.approx(1.0)
    assert len(set(ToyEvaluator(space).weights)) == 1


def test_head_stage_space_and_text_codes_work():
    fixed_fpn = zoo_arch("nasfcos").fpn
    space = SearchSpace("head", fixed_fpn=fixed_fpn)
    toy = ToyEvaluator(space, target_seed=2)
    assert toy.evaluate(str(toy.target)).reward == pytest.approx(1.0)
    assert toy.target.fpn == fixed_fpn


def test_an_architecture_outside_the_space_is_an_error_result_not_an_exception():
    toy = ToyEvaluator(SearchSpace("fpn"))
    result = toy.evaluate(parse("fpn:standard+head:fcos"))
    assert result.status == "error" and result.reward == 0.0 and "fpn" in result.error
    assert toy.evaluate("not a code").status == "error"


def test_bad_settings_raise_user_errors():
    with pytest.raises(UserError, match="noise"):
        ToyEvaluator(SearchSpace("fpn"), noise=-1.0)
    with pytest.raises(UserError, match="weight_spread"):
        ToyEvaluator(SearchSpace("fpn"), weight_spread=1.5)


def test_evaluator_pickles_for_remote_workers():
    space = SearchSpace("fpn")
    toy = ToyEvaluator(space, target_seed=5, noise=0.1)
    clone = pickle.loads(pickle.dumps(toy))
    arch = space.sample(random.Random(0))
    assert clone.evaluate(arch).reward == toy.evaluate(arch).reward
