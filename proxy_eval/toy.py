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

Learning curves (``curve_steps = N > 0``, for the search's early stopping): a trial reports
``{"iteration": t, "loss": L_t}`` for t = 1..N with ``L_t = (1 - reward) + (1 + curve_noise * z) * (1 - t/N)``,
z a standard normal seeded by ``(seed, code)``: every curve ends at ``1 - reward``, and early
iterations rank codes with a per-code error that shrinks linearly to 0 (``curve_noise`` sets how
unreliable an early rung is); ``sleep_s`` is then spread over the N steps, so a trial stopped at
step t takes t/N of the time. ``curve_steps = 0`` reports once, at iteration 1.

The evaluator is plain Python (picklable, torch-free) and works with any stage's space; an
architecture outside the space gives an ``error`` result, never an exception. The
``proxy_eval=toy`` config is read by :mod:`proxy_eval.settings`; :class:`ToyProxy` wraps this class
behind the evaluator contract.
"""
from __future__ import annotations

import hashlib
import random
import time
from typing import Any, Callable

from detector.arch.grammar import Arch, ArchError, FCOSHead, SearchedFPN, SearchedHead, parse
from detector.arch.zoo import resolve_arch
from detector.errors import UserError
from proxy_eval.result import TrialResult, TrialStopped, injected_failure
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


class ToyProxy:
    """:class:`proxy_eval.toy.ToyEvaluator` behind the evaluator contract.

    The toy space follows the candidate: a searched FPN with a fixed head is scored in the ``fpn``
    stage's space, a searched head on a fixed FPN in the ``head`` stage's, both searched in
    ``joint``. The trial ``seed`` offsets the toy's noise seed. ``sleep_s`` makes each trial take
    that long (tests that kill a search mid-trial). ``fail_prob`` gives ``error`` and
    ``inject_nan`` (not null) gives ``diverged``, as with the cached evaluator.
    """

    def __init__(self, space_cfg: Any, target_seed: int = 0, noise: float = 0.0, seed: int = 0,
                 weight_spread: float = 0.0, fail_prob: float = 0.0, inject_nan: int | None = None,
                 sleep_s: float = 0.0, curve_steps: int = 0, curve_noise: float = 0.0) -> None:
        self.space_cfg = dict(space_cfg)
        self.target_seed, self.noise, self.seed = int(target_seed), float(noise), int(seed)
        self.weight_spread, self.fail_prob, self.inject_nan = float(weight_spread), float(fail_prob), inject_nan
        self.sleep_s = float(sleep_s)
        if int(curve_steps) < 0 or float(curve_noise) < 0:
            raise UserError(f"proxy_eval.curve_steps={curve_steps} and curve_noise={curve_noise} must be >= 0")
        self.curve_steps, self.curve_noise = int(curve_steps), float(curve_noise)
        self._toys: dict[tuple[str, int], Any] = {}

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ToyProxy":
        from proxy_eval.settings import toy_arguments

        return cls(**toy_arguments(cfg))

    def _toy(self, arch: Arch, seed: int) -> Any:
        from detector.arch.space import space_from_cfg

        searched_fpn, searched_head = isinstance(arch.fpn, SearchedFPN), isinstance(arch.head, SearchedHead)
        if searched_fpn and not searched_head:
            stage, fixed = "fpn", str(arch.head)
        elif searched_head and not searched_fpn:
            stage, fixed = "head", str(arch.fpn)
        else:
            stage, fixed = "joint", ""
        key = (stage, fixed, seed)
        if key not in self._toys:
            space = space_from_cfg(_AttrDict(self.space_cfg), stage,
                                   fixed_fpn=arch.fpn if stage == "head" else None,
                                   fixed_head=arch.head if stage == "fpn" else FCOSHead())
            self._toys[key] = ToyEvaluator(space, self.target_seed, self.noise, self.seed + seed, self.weight_spread)
        return self._toys[key]

    def evaluate(self, arch: Arch | str, seed: int = 0, report: Callable[[dict], None] | None = None) -> TrialResult:
        start = time.perf_counter()
        if self.sleep_s > 0 and not self.curve_steps:
            time.sleep(self.sleep_s)
        try:
            if isinstance(arch, str):
                arch = resolve_arch(arch, num_blocks=None, num_head_layers=None)
            if injected_failure(seed, arch, self.fail_prob):
                return TrialResult.failure("error", f"InjectedFailure: injected failure (proxy_eval.fail_prob="
                                           f"{self.fail_prob})", time.perf_counter() - start)
            if self.inject_nan is not None:
                return TrialResult.failure("diverged", f"training loss became nan at iteration {self.inject_nan}",
                                           time.perf_counter() - start)
            result = self._toy(arch, seed).evaluate(arch)
            if self.curve_steps:
                self._curve(arch, seed, result.loss, report)
            elif report is not None and result.ok:
                report({"iteration": 1, "loss": result.loss})
            result.seconds = time.perf_counter() - start
            return result
        except TrialStopped as stop:
            return stop.result(time.perf_counter() - start, {})
        except Exception as err:  # the contract: never raise
            return TrialResult.failure("error", f"{type(err).__name__}: {err}", time.perf_counter() - start)

    __call__ = evaluate

    def _curve(self, arch: Arch, seed: int, final_loss: float, report: Callable[[dict], None] | None) -> None:
        """Report the learning curve of the module docstring, sleeping ``sleep_s / curve_steps`` per step."""
        key = hashlib.sha256(f"toy-curve:{self.seed + seed}:{arch}".encode()).digest()
        z = random.Random(int.from_bytes(key[:8], "big")).gauss(0.0, 1.0)
        for step in range(1, self.curve_steps + 1):
            if self.sleep_s > 0:
                time.sleep(self.sleep_s / self.curve_steps)
            remaining = 1.0 - step / self.curve_steps
            if report is not None:
                report({"iteration": step, "loss": final_loss + (1.0 + self.curve_noise * z) * remaining})


class _AttrDict(dict):
    """A dict readable as attributes (what ``space_from_cfg`` expects from a config node)."""

    __getattr__ = dict.__getitem__
