"""Build the proxy evaluator from the composed search config (the factory; nothing in
``proxy_eval`` imports it back). Settings are read by :mod:`proxy_eval.settings`.

``build_evaluator(cfg, cache=None)`` returns an object with the evaluator contract::

    evaluate(arch, seed=0, report=None) -> TrialResult      # never raises

- ``proxy_eval=cached``: :class:`proxy_eval.cached.CachedEvaluator` over the feature cache
  (``cache``: the :class:`~proxy_eval.feature_cache.FeatureCache` that :func:`prepare_proxy`
  returned, or its path; None runs :func:`proxy_eval.prepare.prepare` now, which reuses a valid cache).
- ``proxy_eval=end_to_end``: :class:`proxy_eval.end_to_end.EndToEndEvaluator`, which trains each
  candidate as a whole detector on the proxy split (``cache``: the
  :class:`~proxy_eval.end_to_end.EndToEndData` that :func:`prepare_proxy` returned; None or a path
  prepares it now, which only reads the data once it exists).
- ``proxy_eval=toy``: :class:`proxy_eval.toy.ToyProxy`, the instant synthetic reward behind the
  same contract, with the same fault injection.

All are picklable and cheap to send to a worker.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Protocol

from detector.arch.grammar import Arch
from detector.model.recipe import Recipe
from proxy_eval.feature_cache import FeatureCache
from proxy_eval.result import TrialResult
from proxy_eval.settings import end_to_end_options, proxy_name, split_arguments, trial_settings


class Evaluator(Protocol):
    """What the search loop calls, in-process or inside a Ray worker."""

    def evaluate(self, arch: Arch, seed: int = 0,
                 report: Callable[[dict], None] | None = None) -> TrialResult: ...


def prepare_proxy(cfg: Any) -> Any:
    """What the driver builds once before any trial: the feature cache (``cached``), the data and
    proxy splits (``end_to_end``), or None (``toy``). Bad settings raise a UserError here."""
    from proxy_eval.latency_objective import checked_objective

    checked_objective(cfg)  # search.objective / search.latency: refused before any trial
    name = proxy_name(cfg)
    if name == "cached":
        from proxy_eval.prepare import prepare

        return prepare(cfg)
    if name == "end_to_end":
        from proxy_eval.end_to_end import prepare_data

        return prepare_data(**split_arguments(cfg))
    return None


def build_evaluator(cfg: Any, cache: FeatureCache | str | os.PathLike | None = None) -> Evaluator:
    """The evaluator that ``cfg.proxy_eval.name`` selects (see the module docstring), wrapped by
    ``search.objective`` when latency is measured (:mod:`proxy_eval.latency_objective`)."""
    from proxy_eval.latency_objective import with_objective

    return with_objective(cfg, _proxy_evaluator(cfg, cache))


def _proxy_evaluator(cfg: Any, cache: FeatureCache | str | os.PathLike | None = None) -> Evaluator:
    name = proxy_name(cfg)
    if name == "toy":
        from proxy_eval.toy import ToyProxy

        return ToyProxy.from_cfg(cfg)
    if name == "end_to_end":
        from proxy_eval.end_to_end import EndToEndData, EndToEndEvaluator, ModelSpec

        data = cache if isinstance(cache, EndToEndData) else prepare_proxy(cfg)
        options = end_to_end_options(cfg)
        return EndToEndEvaluator(data, ModelSpec(**options["model"]), trial_settings(cfg), workers=options["workers"],
                                 cost_resolution=options["cost_resolution"])
    from proxy_eval.cached import CachedEvaluator

    if cache is None:
        cache = prepare_proxy(cfg)
    return CachedEvaluator(cache, trial_settings(cfg), Recipe.from_cfg(cfg.recipe))  # in-process: the same handle
