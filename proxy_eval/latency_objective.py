"""Latency-aware search: each trial also measures its candidate's latency, and the objective sets the reward.

``search.objective`` (the trial's AP always stays in ``ap``):

- ``ap``: reward = the proxy's reward (today's behaviour). Latency is measured only with
  ``search.latency.measure=true``.
- ``ap_at_latency``: MnasNet's soft constraint, reward = AP * (latency / target)^w with
  ``w = search.latency.w_under`` when latency <= target and ``search.latency.w`` above it (``w_under``
  null: the same w, the soft form; ``w_under=0, w=-1``: MnasNet's hard form). ``w=-0.07`` costs a
  candidate twice as slow as the target about 5 % of its AP.
- ``pareto``: reward = AP; the report shows the AP-latency front of all trials (:mod:`search.pareto`).

The latency is that of the *deployed* detector, not of the proxy: the full FCOS (the search's backbone,
``model.width``, ``data.num_classes``, the recipe, random weights) at ``search.latency.size`` and
``batch``, end to end with pre- and post-processing, measured by :func:`detector.deploy.latency.measure_latency`
in the trial's process on the trial's device (``device``; ``runtime=onnxruntime`` measures the CPU ONNX
Runtime deployment). So it is measured where the trials run, which is where the search is meant to
deploy: run the search on the target device. It works the same for every proxy: with ``proxy_eval=toy``
the reward's AP is the toy's score, but the latency is the real decoder's, measured.

Measurements are cached per code in ``<cache_dir>/latency/latency.json``, keyed by the code, the model
settings, the latency settings and the device description: a code measured once on a device is not
measured again (by this run, a resumed one, or another search with the same settings). Written
atomically; concurrent workers may each measure a code once.

Recorded in each trial's ``extra``: ``latency_ms`` (median), ``latency_p90_ms``, ``latency_device``,
``latency_cached``, ``objective``, and the deployed detector's parameter count ``deploy_params`` (the
history's ``params`` / ``gflops`` stay the proxy's, as without a latency objective).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from detector.errors import UserError
from detector.deploy.latency import LatencySettings
from proxy_eval.result import TrialResult
from proxy_eval.settings import resolve_reward

OBJECTIVES = ("ap", "ap_at_latency", "pareto")
CACHE_FILE = "latency.json"


@dataclass(frozen=True)
class ObjectiveSettings:
    """``search.objective`` and ``search.latency.*`` (the measurement itself: ``latency``)."""

    objective: str = "ap"
    measure: bool = False
    target_ms: float = 100.0
    w: float = -0.07
    w_under: float | None = None
    latency: LatencySettings = field(default_factory=lambda: LatencySettings(size=(320, 320), warmup=2, iters=10))

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"search.objective={self.objective}: choose one of {', '.join(OBJECTIVES)}")
        if not self.target_ms > 0:
            raise UserError(f"search.latency.target_ms={self.target_ms}: must be > 0 milliseconds")
        for name in ("w", "w_under"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value > 0):
                raise UserError(f"search.latency.{name}={value}: an exponent <= 0 (e.g. -0.07 soft, -1 hard)")

    def reward(self, ap: float, latency_ms: float) -> float:
        """The objective's reward for a trial of AP ``ap`` and median latency ``latency_ms``."""
        if self.objective != "ap_at_latency":
            return ap
        w = self.w if latency_ms > self.target_ms or self.w_under is None else self.w_under
        return ap * (latency_ms / self.target_ms) ** w

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ObjectiveSettings":
        objective = str(cfg.search.get("objective", "ap"))
        node = cfg.search.get("latency", None)
        if node is None:  # a run configured before latency-aware search existed
            return cls(objective=objective)
        measure = node.get("measure", "auto")
        if measure not in ("auto", True, False):
            raise UserError(f"search.latency.measure={measure!r}: auto, true or false")
        w_under = node.get("w_under", None)
        return cls(objective=objective, measure=objective != "ap" if measure == "auto" else bool(measure),
                   target_ms=float(node.target_ms), w=float(node.w), w_under=None if w_under is None else float(w_under),
                   latency=LatencySettings.from_cfg(node))


class LatencyAwareEvaluator:
    """Wraps a proxy evaluator: its result, plus the deployed detector's latency and the objective's reward.

    ``model``: a :class:`proxy_eval.end_to_end.ModelSpec` of the deployed detector (plain values, so
    the evaluator travels to Ray workers)."""

    def __init__(self, inner: Any, settings: ObjectiveSettings, model: Any, device: str,
                 cache_dir: str | os.PathLike | None) -> None:
        self.inner = inner
        self.settings = settings
        self.model = model
        self.device = device
        self.cache_dir = None if cache_dir is None else str(cache_dir)

    def evaluate(self, arch: Any, seed: int = 0, report: Callable[[dict], None] | None = None) -> TrialResult:
        result = self.inner.evaluate(arch, seed=seed, report=report)
        if not result.ok:
            return result
        start = time.perf_counter()
        try:
            latency = self.latency(str(arch))
        except Exception as err:  # the contract: never raise; a candidate that cannot run is a failure
            from proxy_eval.result import failed_trial

            failed = failed_trial(err, result.seconds + time.perf_counter() - start,
                                  {"params": result.params, "gflops": result.gflops})
            failed.error = f"latency measurement: {failed.error}"[:500]
            return failed
        extra = {**result.extra, "objective": self.settings.objective, "latency_ms": latency["median_ms"],
                 "latency_p90_ms": latency["p90_ms"], "latency_device": latency["device"],
                 "latency_cached": latency["cached"], "deploy_params": latency["params"]}
        return replace(result, reward=self.settings.reward(result.ap, latency["median_ms"]),
                       seconds=result.seconds + time.perf_counter() - start, extra=extra)

    __call__ = evaluate

    def latency(self, code: str) -> dict[str, Any]:
        """The cached or freshly measured latency record of ``code`` on this process's device."""
        import torch

        from proxy_eval.settings import resolve_device

        from detector.deploy.latency import device_description

        device = torch.device(resolve_device(self.device) if self.settings.latency.runtime == "torch" else "cpu")
        settings = self.settings.latency
        key_text = json.dumps({"code": code, "model": asdict(self.model), "latency": asdict(settings),
                               "device": device_description(device, settings)}, sort_keys=True, default=list)
        key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
        cache = self._read_cache()
        if key in cache:
            return {**cache[key], "cached": True}
        record = self._measure(code, settings, device)
        self._write_entry(key, record)
        return {**record, "cached": False}

    def _measure(self, code: str, settings: Any, device: Any) -> dict[str, Any]:
        import torch

        from detector.model.build import build_detector_from_cfg
        from detector.model.cost import count_parameters
        from detector.deploy.latency import measure_latency
        from detector.arch.zoo import resolve_arch

        cfg = self.model.config()
        cfg.backbone.weights = "none"  # latency does not depend on the weights: never download
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_detector_from_cfg(cfg, resolve_arch(code, None, None)).eval()
        measured = measure_latency(model, settings, device, arch=code)
        return {"median_ms": measured["median_ms"], "p90_ms": measured["p90_ms"], "device": measured["device"],
                "params": count_parameters(model)}

    # ------------------------------------------------------------------ the per-code cache
    def _cache_path(self) -> Path:
        from detector.cache_dir import resolve_cache_dir

        return resolve_cache_dir(self.cache_dir) / "latency" / CACHE_FILE

    def _read_cache(self) -> dict[str, Any]:
        path = self._cache_path()
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # missing or damaged: measure again

    def _write_entry(self, key: str, record: dict[str, Any]) -> None:
        path = self._cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            cache = {**self._read_cache(), key: record}
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written only costs a measurement next time


def checked_objective(cfg: Any) -> ObjectiveSettings:
    """The objective settings of ``cfg``; UserError for bad ones (called by the driver before any trial)."""
    settings = ObjectiveSettings.from_cfg(cfg)
    if resolve_reward(cfg) != "ap" and settings.objective == "ap_at_latency":
        raise UserError(f"search.objective=ap_at_latency multiplies the AP; it needs reward=ap (got {cfg.reward})")
    return settings


def with_objective(cfg: Any, evaluator: Any) -> Any:
    """``evaluator`` itself for ``objective=ap`` without latency, else wrapped in :class:`LatencyAwareEvaluator`."""
    from omegaconf import OmegaConf

    settings = checked_objective(cfg)
    if not settings.measure:
        return evaluator

    def plain(node: Any) -> dict[str, Any]:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)

    from proxy_eval.end_to_end import ModelSpec

    model = ModelSpec(backbone=plain(cfg.backbone), recipe=plain(cfg.recipe), num_classes=int(cfg.data.num_classes),
                      width=int(cfg.model.width))
    return LatencyAwareEvaluator(evaluator, settings, model, str(cfg.get("device", "auto") or "auto"),
                                 cfg.get("cache_dir", None))
