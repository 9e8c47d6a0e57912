"""The LSTM controller policy: sampling agrees with scoring, masking is exact, RNGs stay private."""
from __future__ import annotations

import math

import pytest
import torch

from controller.policy import ControllerPolicy
from detector.arch.zoo import zoo_arch
from detector.arch.space import SearchSpace


def make_policy(stage: str = "fpn", seed: int = 0, **kwargs) -> ControllerPolicy:
    space = SearchSpace(stage, fixed_fpn=zoo_arch("nasfcos").fpn if stage == "head" else None)
    return ControllerPolicy(space, hidden=kwargs.pop("hidden", 24), generator=torch.Generator().manual_seed(seed),
                            **kwargs)


def sharpen(policy: ControllerPolicy, scale: float = 20.0) -> None:
    """Make the distributions far from uniform, so that mismatches and masking bugs show."""
    with torch.no_grad():
        for param in policy.parameters():
            param.mul_(scale)


@pytest.mark.parametrize("stage", ["fpn", "head", "joint"])
@pytest.mark.parametrize("shaping", [{}, {"temperature": 1.7, "tanh_constant": 2.5}])
def test_log_prob_of_samples_equals_value_returned_at_sampling(stage, shaping):
    policy = make_policy(stage, **shaping)
    sharpen(policy, 8.0)
    gen = torch.Generator().manual_seed(1)
    samples = [policy.sample(gen) for _ in range(40)]
    log_prob, entropy = policy.log_prob([tokens for tokens, _, _ in samples])  # batched
    for i, (tokens, lp, ent) in enumerate(samples):
        assert len(tokens) == len(policy.space.decisions)
        assert log_prob[i].item() == pytest.approx(lp, abs=1e-4)
        assert entropy[i].item() == pytest.approx(ent, abs=1e-4)
        assert lp < 0 and ent > 0


def test_batched_log_prob_equals_one_sequence_at_a_time():
    policy = make_policy("joint")
    gen = torch.Generator().manual_seed(2)
    tokens = [policy.sample(gen)[0] for _ in range(6)]
    batched, _ = policy.log_prob(tokens)
    single = torch.cat([policy.log_prob([t])[0] for t in tokens])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_masked_input_choices_are_never_sampled():
    policy = make_policy("fpn")
    # Push the input classifier hard towards large indices: without masking, early blocks would pick
    # inputs that do not exist yet almost every time.
    with torch.no_grad():
        policy.classifiers["input"].bias.copy_(3.0 * torch.arange(9.0))
    gen = torch.Generator().manual_seed(3)
    top_seen = 0
    for _ in range(300):
        tokens, _, _ = policy.sample(gen)
        for tok, decision in zip(tokens, policy.space.decisions):
            assert 0 <= tok < decision.num_choices, f"{decision.name} sampled {tok}"
            if decision.kind == "input":
                top_seen += tok == decision.num_choices - 1
    assert top_seen > 0.5 * 300 * 14  # the bias works on the choices that exist


def test_masked_choices_have_exactly_zero_probability():
    policy = make_policy("joint")
    sharpen(policy)
    tokens = policy.as_tensor([policy.sample(torch.Generator().manual_seed(s))[0] for s in range(5)])
    probs = policy.step_log_probs(tokens).exp()  # (N, T, C_max)
    for t, decision in enumerate(policy.space.decisions):
        assert torch.all(probs[:, t, decision.num_choices:] == 0.0), decision.name
        torch.testing.assert_close(probs[:, t].sum(-1), torch.ones(5), rtol=0, atol=1e-5)
    assert policy.masked.any()  # the space does have masked entries (early input decisions)


def test_tanh_constant_bounds_the_logits():
    c = 1.5
    policy = make_policy("fpn", tanh_constant=c)
    sharpen(policy, 100.0)
    tokens = policy.as_tensor([policy.sample(torch.Generator().manual_seed(4))[0]])
    log_probs = policy.step_log_probs(tokens)[0]  # (T, C)
    for t, decision in enumerate(policy.space.decisions):
        row = log_probs[t, : decision.num_choices]
        assert (row.max() - row.min()).item() <= 2 * c + 1e-4
        assert row.min().item() >= -2 * c - math.log(decision.num_choices) - 1e-4


def test_sampling_is_reproducible_and_leaves_the_global_rng_alone():
    global_state = torch.random.get_rng_state()
    a, b = make_policy("joint", seed=5), make_policy("joint", seed=5)
    draws_a = [a.sample(torch.Generator().manual_seed(9)) for _ in range(3)]
    draws_b = [b.sample(torch.Generator().manual_seed(9)) for _ in range(3)]
    assert draws_a == draws_b
    assert torch.equal(torch.random.get_rng_state(), global_state)
    other = make_policy("joint", seed=6)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), other.parameters()))


def test_log_prob_is_differentiable_in_every_parameter():
    policy = make_policy("joint")
    tokens = [policy.sample(torch.Generator().manual_seed(s))[0] for s in range(4)]
    log_prob, entropy = policy.log_prob(tokens)
    (log_prob.sum() + entropy.sum()).backward()
    for name, param in policy.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert policy.classifiers["input"].weight.grad.abs().sum() > 0


def test_wrong_token_shape_is_rejected():
    policy = make_policy("fpn")
    with pytest.raises(ValueError, match="shape"):
        policy.log_prob([[0, 1, 2]])
