"""PPO (Schulman et al. 2017) for the controller: clipped surrogate over a buffer of recent samples.

After every told candidate the scored sample ``(tokens, log_prob at sampling, advantage)`` joins a
buffer of the last ``buffer`` samples, and the policy takes ``epochs`` passes over the buffer, in
shuffled minibatches of ``minibatch`` samples (``null``: the whole buffer, one step per epoch),
with one Adam step per minibatch on::

    ratio = exp(log_prob_now(tokens) - log_prob_at_sampling)
    loss  = -mean(min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A)) - entropy_weight * mean(entropy)

Advantages are fixed when a sample is told (reward minus the baseline of that moment). The ratio
is taken against the policy that actually drew the sample, so old samples stop pushing once the
policy has moved more than ``clip`` away from them in their own direction.
"""
from __future__ import annotations

from typing import Any

import torch

from controller.base import ControllerError
from controller.policy_searcher import PolicySearcher
from detector.arch.space import SearchSpace


class PPOSearcher(PolicySearcher):
    """LSTM policy trained by PPO after every told candidate."""

    name = "ppo"

    def __init__(self, space: SearchSpace, seed: int = 0, *, lr: float = 1e-3, buffer: int = 100,
                 epochs: int = 2, minibatch: int | None = 20, clip: float = 0.1, **settings) -> None:
        if buffer < 1 or epochs < 1:
            raise ControllerError(f"controller.buffer ({buffer}) and controller.epochs ({epochs}) must be at least 1")
        if minibatch is not None and minibatch < 1:
            raise ControllerError(f"controller.minibatch: {minibatch} must be at least 1, or null for the whole buffer")
        if not 0 < clip < 1:
            raise ControllerError(f"controller.clip: {clip} must be in (0, 1)")
        super().__init__(space, seed, lr=lr, **settings)
        self.settings.update(buffer=buffer, epochs=epochs, minibatch=minibatch, clip=clip)
        self.buffer_size = buffer
        self.epochs = epochs
        self.minibatch = minibatch
        self.clip = clip
        self.buffer: list[tuple[tuple[int, ...], float, float]] = []  # (tokens, old log-prob, advantage)

    def _update(self, tokens: tuple[int, ...], log_prob: float, advantage: float) -> None:
        self.buffer.append((tuple(tokens), float(log_prob), float(advantage)))
        del self.buffer[: -self.buffer_size]
        batch = self.policy.as_tensor([item[0] for item in self.buffer])  # (B, T)
        old_log_prob = torch.tensor([item[1] for item in self.buffer])  # (B,)
        advantages = torch.tensor([item[2] for item in self.buffer])  # (B,)
        size = len(self.buffer) if self.minibatch is None else self.minibatch
        for _ in range(self.epochs):
            order = torch.randperm(len(self.buffer), generator=self.generator) if size < len(self.buffer) \
                else torch.arange(len(self.buffer))
            for idx in order.split(size):
                new_log_prob, entropy = self.policy.log_prob(batch[idx])  # (b,), (b,)
                ratio = torch.exp(new_log_prob - old_log_prob[idx])
                surrogate = torch.minimum(ratio * advantages[idx],
                                          ratio.clamp(1 - self.clip, 1 + self.clip) * advantages[idx])
                self._step(-surrogate.mean() - self.entropy_weight * entropy.mean())

    def _extra_state(self) -> dict[str, Any]:
        state = super()._extra_state()
        state["buffer"] = [(list(tokens), lp, adv) for tokens, lp, adv in self.buffer]
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self.buffer = [(tuple(int(t) for t in tokens), float(lp), float(adv)) for tokens, lp, adv in state["buffer"]]
