"""The value one candidate evaluation returns. Failures are values too, never exceptions.

``status`` is one of:

- ``ok``: trained and evaluated; ``reward`` is finite.
- ``diverged``: a loss became NaN or infinite.
- ``oom``: the device ran out of memory.
- ``timeout``: the trial ran past its time limit.
- ``error``: anything else (the message is in ``error``).
- ``stopped``: stopped early by the search's stopping rule (``search.scheduler``, raised as
  :class:`TrialStopped` from the ``report`` callback); ``loss`` is the last *training* loss reported
  and ``extra["stopped_at"]`` its iteration. Its ``reward`` is set by the search
  (:func:`search.early_stopping.stopped_reward`), the floor until then.

Other non-``ok`` results carry ``reward = FLOOR_REWARD`` so that a searcher can still learn from them.

Inside a trial, failures are raised as :class:`TrialDiverged` / :class:`TrialTimeout` /
:class:`InjectedFailure` (or any exception) and turned into results by :func:`failed_trial` at the
evaluator's boundary; :func:`trial_reward` is the one reward rule of every proxy.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any


STATUSES = ("ok", "diverged", "oom", "timeout", "error", "stopped")
FLOOR_REWARD = 0.0


@dataclass
class TrialResult:
    status: str
    reward: float
    ap: float = 0.0
    ap50: float = 0.0
    loss: float = math.nan
    params: int = 0
    gflops: float = 0.0
    seconds: float = 0.0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status '{self.status}' is not one of {STATUSES}")
        if self.status not in ("ok", "stopped"):
            self.reward = FLOOR_REWARD
        elif not math.isfinite(self.reward):
            raise ValueError(f"an '{self.status}' result needs a finite reward")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not math.isfinite(out["loss"]):
            out["loss"] = None  # JSON has no NaN
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialResult":
        data = dict(data)
        if data.get("loss") is None:
            data["loss"] = math.nan
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def failure(cls, status: str, error: str = "", seconds: float = 0.0, **metrics: Any) -> "TrialResult":
        return cls(status=status, reward=FLOOR_REWARD, error=error[:500], seconds=seconds, **metrics)


class TrialDiverged(Exception):
    """A non-finite training or validation loss (-> status ``diverged``)."""


class TrialTimeout(Exception):
    """Past ``timeout_s`` of wall clock (-> status ``timeout``)."""


class TrialStopped(Exception):
    """Raised by a ``report`` callback: the stopping rule stops the trial here (-> status ``stopped``)."""

    def __init__(self, iteration: int, loss: float) -> None:
        super().__init__(f"stopped early at iteration {iteration} (training loss {loss:.4g})")
        self.iteration, self.loss = int(iteration), float(loss)

    def result(self, seconds: float, metrics: dict[str, Any]) -> "TrialResult":
        return TrialResult(status="stopped", reward=FLOOR_REWARD, loss=self.loss, seconds=seconds,
                           error=str(self), extra={"stopped_at": self.iteration}, **metrics)


class InjectedFailure(RuntimeError):
    """Raised inside a trial by ``fail_prob`` fault injection (becomes status ``error``)."""


def failed_trial(err: Exception, seconds: float, metrics: dict[str, Any]) -> TrialResult:
    """The result of a trial that raised ``err``: stopped, diverged, timeout, oom (the CUDA cache is emptied),
    or error with the exception's type and message. ``metrics`` (params, gflops) are kept."""
    if isinstance(err, TrialStopped):
        return err.result(seconds, metrics)
    if isinstance(err, TrialDiverged):
        return TrialResult.failure("diverged", str(err), seconds, **metrics)
    if isinstance(err, TrialTimeout):
        return TrialResult.failure("timeout", str(err), seconds, **metrics)
    import torch  # here, so that the result type stays importable without torch

    if isinstance(err, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return TrialResult.failure("oom", str(err).splitlines()[0] if str(err) else "out of memory", seconds, **metrics)
    return TrialResult.failure("error", f"{type(err).__name__}: {err}", seconds, **metrics)


def trial_reward(reward: str, ap: float, val_loss: float) -> float:
    """``ap``: the proxy-val AP; ``neg_loss``: exp(-loss), which ranks exactly like minus the loss but
    stays in (0, 1], so that the floor reward 0 of a failed trial remains the worst value a searcher sees."""
    return float(ap if reward == "ap" else math.exp(-val_loss))


def injected_failure(seed: int, arch: Any, fail_prob: float) -> bool:
    """Whether fault injection fails this (seed, arch): a coin seeded by both, stable across runs."""
    if fail_prob <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{arch}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).random() < fail_prob
