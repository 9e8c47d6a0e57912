"""The searcher interface every controller implements, and the proposal it hands out.

A search loop (or the Ray Tune adapter) drives a searcher with two calls::

    proposal = searcher.ask()            # may be called several times before any tell
    searcher.tell(proposal, reward)      # once per finished candidate, in any order

A searcher is fully described by ``state_dict()``: learned weights, optimizer, baseline, buffers,
its private RNG states, counters and the proposals handed out but not yet told. A searcher built
with the same space and settings and given that state continues exactly as the original would
(same next proposals, same updates). ``save``/``load`` write and read that state with
``torch.save`` (atomically: temporary file + ``os.replace``); the file loads with
``weights_only=True``, i.e. it holds only tensors and plain Python values.

Every searcher owns a ``random.Random`` and, where it uses torch, a ``torch.Generator``; neither the
global ``random`` module nor the global torch RNG is used, so other code cannot disturb it.
"""
from __future__ import annotations

import math
import os
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detector.arch.grammar import Arch
from detector.errors import UserError, WriteError
from detector.arch.space import SearchSpace

STATE_FORMAT = 1


class ControllerError(UserError):
    """A bad controller setting or a saved state that does not match the searcher loading it."""


@dataclass(frozen=True)
class Proposal:
    """One candidate handed out by :meth:`Searcher.ask`.

    ``tokens`` are the decisions in ``space.decisions`` order and ``arch`` their decoded code.
    ``log_prob`` is the log-probability of drawing ``tokens`` under the searcher's sampling
    distribution at the time of asking (see each searcher for its meaning). ``id`` numbers the
    proposals of one searcher from 0 and is what :meth:`Searcher.tell` matches on.
    """

    tokens: tuple[int, ...]
    arch: Arch
    log_prob: float
    id: int


class Searcher(ABC):
    """Ask/tell interface shared by the RL controllers and the baselines.

    Subclasses implement :meth:`_propose` (draw valid tokens, counting rejected invalid draws in
    ``invalid_samples``), :meth:`_learn` (use one told reward) and :meth:`_extra_state` /
    :meth:`_load_extra_state` for their own state.
    """

    name = "searcher"

    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        self.space = space
        self.seed = int(seed)
        self.rng = random.Random(self.seed)
        self.invalid_samples = 0  # invalid draws rejected (and resampled) so far
        self.num_asked = 0
        self.num_told = 0
        self._pending: dict[int, Proposal] = {}

    # ------------------------------------------------------------------ ask / tell
    def ask(self) -> Proposal:
        """Propose the next candidate; always a valid architecture of ``space``."""
        tokens, log_prob = self._propose()
        proposal = Proposal(tokens=tuple(tokens), arch=self.space.decode(tokens),
                            log_prob=float(log_prob), id=self.num_asked)
        self.num_asked += 1
        self._pending[proposal.id] = proposal
        return proposal

    def tell(self, proposal: Proposal, reward: float) -> None:
        """Report the reward of a proposal from :meth:`ask`; the searcher updates at once."""
        known = self._pending.get(proposal.id)
        if known is None or known.tokens != tuple(proposal.tokens):
            raise ControllerError(
                f"tell: proposal {proposal.id} is not pending in this {self.name} searcher "
                "(already told, or asked from another searcher); tell each asked proposal once"
            )
        reward = float(reward)
        if not math.isfinite(reward):
            raise ControllerError(f"tell: reward {reward} of proposal {proposal.id} is not finite; "
                                  "report failed trials with their floor reward")
        del self._pending[proposal.id]
        self._learn(known, reward)
        self.num_told += 1

    @property
    def pending(self) -> tuple[Proposal, ...]:
        """Proposals asked but not yet told, oldest first."""
        return tuple(self._pending[k] for k in sorted(self._pending))

    @abstractmethod
    def _propose(self) -> tuple[tuple[int, ...], float]:
        """A valid token sequence and its log-probability."""

    @abstractmethod
    def _learn(self, proposal: Proposal, reward: float) -> None:
        """Use the reward of one told proposal."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ state
    def space_signature(self) -> list[str]:
        """What the saved tokens mean: every decision with its choices, and the fixed parts."""
        decisions = [f"{d.name}:{d.kind}:{','.join(d.choices)}" for d in self.space.decisions]
        return [f"stage:{self.space.stage}", f"fixed_fpn:{self.space.fixed_fpn}",
                f"fixed_head:{self.space.fixed_head}", *decisions]

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (no references to live tensors) of everything needed to continue exactly."""
        return {
            "format": STATE_FORMAT,
            "searcher": self.name,
            "space": self.space_signature(),
            "seed": self.seed,
            "rng": self.rng.getstate(),
            "invalid_samples": self.invalid_samples,
            "num_asked": self.num_asked,
            "num_told": self.num_told,
            "pending": [{"id": p.id, "tokens": list(p.tokens), "log_prob": p.log_prob}
                        for p in self.pending],
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; raises :class:`ControllerError` if it belongs to another setup."""
        if state.get("format") != STATE_FORMAT:
            raise ControllerError(f"controller state: format {state.get('format')!r} is not "
                                  f"{STATE_FORMAT}; it was written by another version")
        if state.get("searcher") != self.name:
            raise ControllerError(f"controller state: saved by a '{state.get('searcher')}' searcher, "
                                  f"cannot load into '{self.name}'; resume with controller={state.get('searcher')}")
        if list(state.get("space", [])) != self.space_signature():
            raise ControllerError("controller state: saved for a different search space "
                                  "(stage, fixed parts or decisions differ); resume with the same space config")
        self.seed = int(state["seed"])
        self.rng.setstate(_as_tuple(state["rng"]))
        self.invalid_samples = int(state["invalid_samples"])
        self.num_asked = int(state["num_asked"])
        self.num_told = int(state["num_told"])
        self._pending = {}
        for item in state["pending"]:
            tokens = tuple(int(t) for t in item["tokens"])
            self._pending[int(item["id"])] = Proposal(tokens=tokens, arch=self.space.decode(tokens),
                                                      log_prob=float(item["log_prob"]), id=int(item["id"]))
        self._load_extra_state(state["extra"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``state_dict()`` to ``path`` atomically (a crash leaves the old file intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(self.state_dict(), tmp)
        except (OSError, RuntimeError) as err:  # a full disk: torch reports "unexpected pos"
            tmp.unlink(missing_ok=True)
            raise WriteError.from_failure(path, err) from err
        os.replace(tmp, path)
        return path

    def load(self, path: str | os.PathLike) -> "Searcher":
        """Load a state written by :meth:`save` into this searcher; returns ``self``."""
        path = Path(path)
        if not path.is_file():
            raise ControllerError(f"controller state: no file at '{path}'; give the path written by save()")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unreadable, truncated or foreign file
            raise ControllerError(f"controller state: cannot read '{path}' ({type(err).__name__}); "
                                  "it is not a file written by Searcher.save") from None
        self.load_state_dict(state)
        return self


def _as_tuple(value: Any) -> Any:
    """Lists back to tuples, recursively (``random.Random.setstate`` needs tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
