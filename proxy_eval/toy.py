"""A toy evaluator: an instant synthetic reward for testing and comparing searchers.

The reward of an architecture is how closely its token sequence (in the given stage's space)
agrees with a hidden *target* sequence, drawn once as a valid code of the space from
``random.Random(f"toy-target:{target_seed}")``::

    score(arch) = sum_i w_i * [tokens_i == target_i]          (weights w_i >= 0, sum 1)

so the target scores exactly 1 and a uniformly random code scores about the mean of
``1 / num_choices``. Weights are uniform by default; ``weight_spread = s`` in [0, 1) draws
``w_i ~ 1 + s * U(-1, 1)`` (then normalised) from the same target RNG, making some decisions matter
more than others. With ``noise > 0`` the score gets Gaussian noise of that standard deviation,
seeded by ``(seed, code)``: repeated evaluations of one code agree, different ``seed`` values give
different noise. ``reward = ap = ap50 = clip(score + noise, 0, 1)``, ``loss = 1 - ap``; ``params``
and ``gflops`` are 0 (no network exists) and ``seconds`` is the measured evaluation time.

The evaluator is plain Python (picklable, torch-free) and works with any stage's space; an
architecture outside the space gives an ``error`` result, never an exception. The
``proxy_eval=toy`` config is read in :mod:`proxy_eval.build`, which wraps this class.
"""
from __future__ import annotations

import hashlib
import random
import time

from detector.arch.grammar import Arch, ArchError, parse
from detector.errors import UserError
from proxy_eval.result import TrialResult
from detector.arch.space import SearchSpace


class ToyEvaluator:
    """``evaluate(arch) -> TrialResult`` in microseconds, deterministic per ``(arch, seed)``."""

    def __init__(self, space: SearchSpace, target_seed: int = 0, noise: float = 0.0, seed: int = 0,
                 weight_spread: float = 0.0) -> None:
        if noise < 0:
            raise UserError(f"proxy_eval.noise: {noise} must be >= 0 (a standard deviation)")
        if not 0 <= weight_spread < 1:
            raise UserError(f"proxy_eval.weight_spread: {weight_spread} must be in [0, 1)")
        self.space = space
        self.target_seed = int(target_seed)
        self.noise = float(noise)
        self.seed = int(seed)
        self.weight_spread = float(weight_spread)
        target_rng = random.Random(f"toy-target:{self.target_seed}")  # salted: no clash with searcher seeds
        self.target_tokens = space.sample_tokens(target_rng)
        raw = [1.0 + self.weight_spread * target_rng.uniform(-1.0, 1.0) for _ in space.decisions]
        self.weights = tuple(w / sum(raw) for w in raw)

    @property
    def target(self) -> Arch:
        """The hidden best architecture (score 1)."""
        return self.space.decode(self.target_tokens)

    def score(self, tokens: tuple[int, ...]) -> float:
        """Noise-free weighted agreement of ``tokens`` with the target, in [0, 1]."""
        return sum(w for w, a, b in zip(self.weights, tokens, self.target_tokens) if a == b)

    def evaluate(self, arch: Arch | str) -> TrialResult:
        """The toy result of one architecture (a code value or its text form)."""
        start = time.perf_counter()
        try:
            if isinstance(arch, str):
                arch = parse(arch, num_blocks=None, num_head_layers=None)
            tokens = self.space.encode(arch)
        except ArchError as err:
            return TrialResult.failure("error", error=str(err), seconds=time.perf_counter() - start)
        value = self.score(tokens)
        if self.noise > 0:
            key = hashlib.sha256(f"{self.seed}:{arch}".encode()).digest()
            value += random.Random(int.from_bytes(key[:8], "big")).gauss(0.0, self.noise)
        value = min(max(value, 0.0), 1.0)
        return TrialResult(status="ok", reward=value, ap=value, ap50=value, loss=1.0 - value,
                           params=0, gflops=0.0, seconds=time.perf_counter() - start,
                           extra={"toy_target_seed": self.target_seed})

    __call__ = evaluate

