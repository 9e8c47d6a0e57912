"""REINFORCE (Williams 1992) with an EMA baseline: one gradient step per finished candidate.

Loss of one scored sample: ``-advantage * log_prob(tokens) - entropy_weight * entropy(tokens)``,
with ``log_prob`` and ``entropy`` recomputed under the current policy (with concurrent trials the
policy may have moved since the sample was drawn; the update ignores that, as asynchronous
REINFORCE does).
"""
from __future__ import annotations

from controller.policy_searcher import PolicySearcher
from detector.arch.space import SearchSpace


class ReinforceSearcher(PolicySearcher):
    """LSTM policy trained by REINFORCE after every told candidate."""

    name = "reinforce"

    def __init__(self, space: SearchSpace, seed: int = 0, *, lr: float = 1e-3, **settings) -> None:
        super().__init__(space, seed, lr=lr, **settings)

    def _update(self, tokens: tuple[int, ...], log_prob: float, advantage: float) -> None:
        new_log_prob, entropy = self.policy.log_prob([tokens])  # (1,), (1,)
        loss = -(advantage * new_log_prob + self.entropy_weight * entropy).sum()
        self._step(loss)
