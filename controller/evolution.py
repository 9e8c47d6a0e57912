"""Regularized (aging) evolution, Real et al. 2019: tournament selection, one mutation, oldest dies.

- While fewer than ``population`` rewards have come back, every proposal is a uniform random
  valid code (the initial population; with concurrent trials a few extra may be drawn).
- Afterwards: draw ``sample_size`` distinct members of the population uniformly, take the one with
  the highest reward as parent, and propose ``space.mutate(parent)`` (exactly one decision changed,
  still valid).
- Every told candidate joins the population as its youngest member; when the population exceeds
  ``population`` members the oldest is removed, whatever its reward.
"""
from __future__ import annotations

import math
from typing import Any

from controller.base import ControllerError, Proposal, Searcher
from controller.random_search import sample_uniform
from detector.arch.space import SearchSpace


class EvolutionSearcher(Searcher):
    """Regularized evolution over token sequences.

    ``Proposal.log_prob``: ``-log(number of valid codes)`` for random members; for a child, the
    log-probability of the one-decision mutation that produced it from its parent (uniform position
    among the decisions with more than one choice, uniform new value), ignoring invalid retries.
    """

    name = "evolution"

    def __init__(self, space: SearchSpace, seed: int = 0, population: int = 30, sample_size: int = 10) -> None:
        super().__init__(space, seed)
        if population < 2:
            raise ControllerError(f"controller.population: {population} is too small; use at least 2")
        if not 1 <= sample_size <= population:
            raise ControllerError(
                f"controller.sample_size: {sample_size} must be between 1 and population ({population})"
            )
        self.population_size = population
        self.sample_size = sample_size
        self.population: list[tuple[tuple[int, ...], float]] = []  # (tokens, reward), oldest first
        self._uniform_log_prob = -math.log(space.size())
        self._num_mutable = sum(d.num_choices > 1 for d in space.decisions)

    def _propose(self) -> tuple[tuple[int, ...], float]:
        if len(self.population) < self.population_size:
            tokens, rejected = sample_uniform(self.space, self.rng)
            self.invalid_samples += rejected
            return tokens, self._uniform_log_prob
        contestants = self.rng.sample(range(len(self.population)), self.sample_size)
        parent = max(contestants, key=lambda i: (self.population[i][1], -i))  # ties: the older
        parent_tokens = self.population[parent][0]
        child = self.space.mutate(parent_tokens, self.rng)
        changed = next((i for i, (a, b) in enumerate(zip(parent_tokens, child)) if a != b), None)
        if changed is None:  # a space with no decision to change: the child is its parent
            return child, 0.0
        log_prob = -math.log(self._num_mutable) - math.log(self.space.decisions[changed].num_choices - 1)
        return child, log_prob

    def _learn(self, proposal: Proposal, reward: float) -> None:
        self.population.append((proposal.tokens, reward))
        if len(self.population) > self.population_size:
            self.population.pop(0)  # aging: the oldest dies, not the worst

    def _extra_state(self) -> dict[str, Any]:
        return {
            "population_size": self.population_size,
            "sample_size": self.sample_size,
            "population": [(list(tokens), reward) for tokens, reward in self.population],
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if (state["population_size"], state["sample_size"]) != (self.population_size, self.sample_size):
            raise ControllerError(
                f"controller state: saved with population={state['population_size']} "
                f"sample_size={state['sample_size']}, this searcher has population={self.population_size} "
                f"sample_size={self.sample_size}; resume with the saved settings"
            )
        self.population = [(tuple(int(t) for t in tokens), float(reward)) for tokens, reward in state["population"]]
