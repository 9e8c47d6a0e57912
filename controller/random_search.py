"""Uniform random search: the honest baseline every learned controller must beat."""
from __future__ import annotations

import math
import random

from controller.base import Proposal, Searcher
from detector.arch.space import SearchSpace


def sample_uniform(space: SearchSpace, rng: random.Random) -> tuple[tuple[int, ...], int]:
    """A uniformly drawn *valid* token sequence and the number of invalid draws rejected first.

    Draws each decision uniformly and rejects invalid sequences: the same procedure (and, for the
    same ``rng`` state, the same result) as :meth:`SearchSpace.sample_tokens`, with the rejections
    counted.
    """
    rejected = 0
    while True:
        tokens = tuple(rng.randrange(d.num_choices) for d in space.decisions)
        if space.is_valid(tokens):
            return tokens, rejected
        rejected += 1


class RandomSearcher(Searcher):
    """Draws every candidate uniformly from the valid codes; ignores rewards.

    ``Proposal.log_prob`` is ``-log(number of valid codes)``, the exact log-probability of
    uniform sampling over the valid part of the space.
    """

    name = "random"

    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        super().__init__(space, seed)
        self.log_prob = -math.log(space.size())

    def _propose(self) -> tuple[tuple[int, ...], float]:
        tokens, rejected = sample_uniform(self.space, self.rng)
        self.invalid_samples += rejected
        return tokens, self.log_prob

    def _learn(self, proposal: Proposal, reward: float) -> None:
        pass  # rewards do not change a uniform distribution
