"""Build a searcher from the ``controller`` config group: the one place that reads controller configs.

``controller.name`` picks the searcher; every other key is a constructor argument of that searcher
(see ``conf/controller/<name>.yaml`` for the keys and their defaults). An unknown name or key is a
:class:`~controller.base.ControllerError` naming the valid ones, so a typo never passes silently.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from controller.base import ControllerError, Searcher
from controller.evolution import EvolutionSearcher
from controller.ppo import PPOSearcher
from controller.random_search import RandomSearcher
from controller.reinforce import ReinforceSearcher
from detector.arch.space import SearchSpace

SEARCHERS: dict[str, type[Searcher]] = {
    "ppo": PPOSearcher,
    "reinforce": ReinforceSearcher,
    "random": RandomSearcher,
    "evolution": EvolutionSearcher,
}

# Settings shared by the policy searchers; PPO and REINFORCE pass them on to PolicySearcher.
POLICY_KEYS = ("lr", "hidden", "layers", "entropy_weight", "baseline_decay", "temperature",
               "tanh_constant", "grad_clip", "invalid_reward")

# How each setting is read: (type, may it be null). Values are converted, bad ones rejected here.
KEY_TYPES: dict[str, tuple[type, bool]] = {
    "lr": (float, False), "hidden": (int, False), "layers": (int, False), "entropy_weight": (float, False),
    "baseline_decay": (float, False), "temperature": (float, True), "tanh_constant": (float, True),
    "grad_clip": (float, False), "invalid_reward": (float, True), "buffer": (int, False),
    "epochs": (int, False), "minibatch": (int, True), "clip": (float, False),
    "population": (int, False), "sample_size": (int, False),
}


def searcher_keys(name: str) -> tuple[str, ...]:
    """The config keys (besides ``name``) that the searcher ``name`` accepts."""
    cls = SEARCHERS[name]
    own = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "space", "seed", "settings")]
    return tuple(dict.fromkeys(own + (list(POLICY_KEYS) if cls in (PPOSearcher, ReinforceSearcher) else [])))


def build_searcher(cfg_controller: Any, space: SearchSpace, seed: int) -> Searcher:
    """A fresh searcher for ``space`` from the ``controller`` config node (a DictConfig or a mapping)."""
    settings = _as_dict(cfg_controller)
    name = settings.pop("name", None)
    if name not in SEARCHERS:
        raise ControllerError(f"controller={name}: unknown controller; choose one of {', '.join(SEARCHERS)}")
    allowed = searcher_keys(name)
    unknown = sorted(k for k in settings if k not in allowed)
    if unknown:
        raise ControllerError(f"controller.{unknown[0]}: not a setting of the '{name}' controller; "
                              f"its settings are {', '.join(allowed) or '(none)'}")
    return SEARCHERS[name](space, int(seed), **{k: _convert(k, v) for k, v in settings.items()})


def _convert(key: str, value: Any) -> Any:
    kind, nullable = KEY_TYPES[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or value is None:
        ok = False
    elif kind is int:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    else:
        ok = isinstance(value, (int, float))
    if not ok:
        expected = f"{'an integer' if kind is int else 'a number'}{' or null' if nullable else ''}"
        raise ControllerError(f"controller.{key}={value!r}: expected {expected}")
    return kind(value)


def _as_dict(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import OmegaConf
    except ImportError:  # plain mappings still work without omegaconf
        OmegaConf = None
    if OmegaConf is not None and OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise ControllerError(f"controller: expected a config mapping with a 'name', got {type(cfg).__name__}")
    return dict(cfg)
