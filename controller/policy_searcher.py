"""What the RL searchers (PPO, REINFORCE) share: the LSTM policy, Adam, the EMA baseline, sampling.

Reward bookkeeping, per told candidate with reward ``r``:

- ``advantage = r - baseline`` with the baseline *before* this reward (the first reward sets the
  baseline, so the first advantage is 0);
- then ``baseline = decay * baseline + (1 - decay) * r``;
- then the subclass updates the policy (:meth:`PolicySearcher._update`).

Invalid samples (``space.decode`` raises ``ArchError``: fewer than 3 unused FPN outputs) are
resampled and counted in ``invalid_samples``. With ``invalid_reward`` set (default ``None``: off),
each invalid sample also gets a policy update as if it had been told with that reward (advantage
``invalid_reward - baseline``; the baseline does not move), which teaches the policy to avoid
invalid codes. With toy or AP rewards in [0, 1], ``invalid_reward: 0.0`` is a natural choice.

The policy lives on the CPU: it is tiny, and its sampling is dominated by per-step overhead.
"""
from __future__ import annotations

import copy
from abc import abstractmethod
from typing import Any

import torch

from controller.base import ControllerError, Proposal, Searcher
from controller.policy import ControllerPolicy
from detector.arch.space import SearchSpace


class PolicySearcher(Searcher):
    """A searcher that samples from a :class:`ControllerPolicy` and learns from rewards."""

    def __init__(
        self,
        space: SearchSpace,
        seed: int = 0,
        *,
        lr: float,
        hidden: int = 100,
        layers: int = 2,
        entropy_weight: float = 0.0,
        baseline_decay: float = 0.95,
        temperature: float | None = None,
        tanh_constant: float | None = None,
        grad_clip: float = 2.0,
        invalid_reward: float | None = None,
    ) -> None:
        super().__init__(space, seed)
        _check(lr > 0, f"controller.lr: {lr} must be positive")
        _check(hidden >= 1 and layers >= 1, f"controller.hidden ({hidden}) and layers ({layers}) must be at least 1")
        _check(entropy_weight >= 0, f"controller.entropy_weight: {entropy_weight} must be >= 0")
        _check(0 <= baseline_decay < 1, f"controller.baseline_decay: {baseline_decay} must be in [0, 1)")
        _check(temperature is None or temperature > 0, f"controller.temperature: {temperature} must be positive or null")
        _check(tanh_constant is None or tanh_constant > 0,
               f"controller.tanh_constant: {tanh_constant} must be positive or null")
        _check(grad_clip >= 0, f"controller.grad_clip: {grad_clip} must be >= 0 (0 turns clipping off)")
        self.settings: dict[str, Any] = dict(
            lr=lr, hidden=hidden, layers=layers, entropy_weight=entropy_weight, baseline_decay=baseline_decay,
            temperature=temperature, tanh_constant=tanh_constant, grad_clip=grad_clip,
            invalid_reward=invalid_reward,
        )
        self.entropy_weight = entropy_weight
        self.baseline_decay = baseline_decay
        self.grad_clip = grad_clip
        self.invalid_reward = invalid_reward
        # One private generator: first initialises the weights, then drives all sampling.
        self.generator = torch.Generator().manual_seed(self.seed)
        self.policy = ControllerPolicy(space, hidden=hidden, layers=layers, temperature=temperature,
                                       tanh_constant=tanh_constant, generator=self.generator)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.baseline: float | None = None
        self.num_updates = 0

    # ------------------------------------------------------------------ sampling
    def _propose(self) -> tuple[tuple[int, ...], float]:
        while True:
            tokens, log_prob, _ = self.policy.sample(self.generator)
            if self.space.is_valid(tokens):
                return tokens, log_prob
            self.invalid_samples += 1
            if self.invalid_reward is not None:
                baseline = self.invalid_reward if self.baseline is None else self.baseline
                self._update(tokens, log_prob, self.invalid_reward - baseline)

    # ------------------------------------------------------------------ learning
    def _learn(self, proposal: Proposal, reward: float) -> None:
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * reward
        self._update(proposal.tokens, proposal.log_prob, advantage)

    @abstractmethod
    def _update(self, tokens: tuple[int, ...], log_prob: float, advantage: float) -> None:
        """Change the policy using one scored sample (``log_prob`` is its value at sampling time)."""

    def _step(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss`` with gradient-norm clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
        self.optimizer.step()
        self.num_updates += 1

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "policy": copy.deepcopy(self.policy.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "baseline": self.baseline,
            "num_updates": self.num_updates,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state["settings"] != self.settings:
            diff = ", ".join(f"{k}={state['settings'].get(k)!r} (now {v!r})"
                             for k, v in self.settings.items() if state["settings"].get(k) != v)
            raise ControllerError(f"controller state: saved with other settings: {diff}; "
                                  "resume with the saved controller settings")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.baseline = state["baseline"]
        self.num_updates = int(state["num_updates"])


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ControllerError(message)
