"""The value one candidate evaluation returns. Failures are values too, never exceptions.

``status`` is one of:

- ``ok``: trained and evaluated; ``reward`` is finite.
- ``diverged``: a loss became NaN or infinite.
- ``oom``: the device ran out of memory.
- ``timeout``: the trial ran past its time limit.
- ``error``: anything else (the message is in ``error``).

Non-``ok`` results carry ``reward = FLOOR_REWARD`` so that a searcher can still learn from them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("ok", "diverged", "oom", "timeout", "error")
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
        if self.status != "ok":
            self.reward = FLOOR_REWARD
        elif not math.isfinite(self.reward):
            raise ValueError("an 'ok' result needs a finite reward")

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
