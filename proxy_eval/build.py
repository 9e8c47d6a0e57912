"""Build the proxy evaluator from the composed search config: the one place that reads ``cfg.proxy_eval``.

``build_evaluator(cfg, cache=None)`` returns an object with the evaluator contract::

    evaluate(arch, seed=0, report=None) -> TrialResult      # never raises

- ``proxy_eval=cached``: :class:`proxy_eval.trial.CachedEvaluator` over the feature cache
  (``cache``: the :class:`~proxy_eval.feature_cache.FeatureCache` that :func:`proxy_eval.prepare.prepare`
  returned, or its path; None runs ``prepare`` now, which reuses a valid cache).
- ``proxy_eval=end_to_end``: :class:`proxy_eval.end_to_end.EndToEndEvaluator`, which trains each
  candidate as a whole detector on the proxy split (``cache``: the
  :class:`~proxy_eval.end_to_end.EndToEndData` that :func:`prepare_proxy` returned; None or a path
  prepares it now, which only reads the data once it exists).
- ``proxy_eval=toy``: :class:`ToyProxy`, the instant synthetic reward of :mod:`proxy_eval.toy`
  behind the same contract, with the same fault injection.

Both are picklable and cheap to send to a worker. Keys read besides ``cfg.proxy_eval``:
``cfg.reward``, ``cfg.device`` (auto | cpu | cuda, resolved in the process that runs the trial),
``cfg.model.width`` (when ``proxy_eval.width`` is null), ``cfg.cache_dir``,
``cfg.data``, ``cfg.backbone``, ``cfg.recipe``, ``cfg.space`` (toy).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Protocol

from detector.arch import Arch, FCOSHead, SearchedFPN, SearchedHead
from detector.errors import UserError
from detector.recipe import Recipe
from detector.zoo import resolve_arch
from proxy_eval.feature_cache import FeatureCache
from proxy_eval.result import TrialResult

PROXY_NAMES = ("cached", "end_to_end", "toy")


class Evaluator(Protocol):
    """What the search loop calls, in-process or inside a Ray worker."""

    def evaluate(self, arch: Arch, seed: int = 0,
                 report: Callable[[dict], None] | None = None) -> TrialResult: ...


def _proxy(cfg: Any) -> Any:
    node = cfg.get("proxy_eval", None)
    if node is None:
        raise UserError("proxy_eval: missing; choose proxy_eval=cached, end_to_end or toy")
    return node


def _inject_nan(value: Any) -> int | None:
    if value is None or value is False:
        return None
    if value is True:
        return 0
    if int(value) < 0:
        raise UserError(f"proxy_eval.inject_nan={value}: an iteration >= 0, true, or null")
    return int(value)


def _flag(value: Any, key: str) -> bool:
    """A boolean setting; anything but true / false (or null = false) is a UserError."""
    if value is None or isinstance(value, bool):
        return bool(value)
    raise UserError(f"proxy_eval.{key}={value!r}: use true or false")


def resolve_device(value: Any) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``/``cuda[:k]`` pass through."""
    import torch

    value = str(value or "auto")
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value != "cpu" and not value.startswith("cuda"):
        raise UserError(f"device={value}: choose auto, cpu or cuda")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={value} but no CUDA device is visible; use device=cpu or auto")
    return value


def _width(cfg: Any, proxy: Any) -> int:
    width = proxy.get("width", None)
    if width is None:
        width = cfg.model.width
    return int(width)


def prepare_arguments(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`proxy_eval.prepare.prepare_features` from the config."""
    from proxy_eval.prepare import BackboneSpec, PrepareSettings

    proxy = _proxy(cfg)
    train_images = proxy.get("train_images", None)
    settings = PrepareSettings(
        train_images=None if train_images is None else int(train_images),
        val_images=int(proxy.val_images),
        split_seed=int(proxy.get("split_seed", 0)),
        resolution=int(proxy.resolution),
        width=_width(cfg, proxy),
        adapt_from=str(proxy.adapt_from) if proxy.get("adapt_from", None) else None,
        adapt_iters=int(proxy.get("adapt_iters", 0)),
        adapt_batch_size=int(proxy.get("adapt_batch_size", 8)),
        adapt_lr=float(proxy.get("adapt_lr", 0.01)),
        min_box_size=float(proxy.get("min_box_size", 1.0)),
        extract_batch_size=int(proxy.get("extract_batch_size", 16)),
        workers=int(proxy.get("workers", 0)),
        train_last_stage=_flag(proxy.get("train_last_stage", False), "train_last_stage"),
    )
    b = cfg.backbone
    levels = b.get("levels", None) or ("c3", "c4", "c5")
    backbone = BackboneSpec(name=str(b.name), weights=str(b.weights) if b.get("weights", None) else "none",
                            frozen_stages=int(b.frozen_stages), norm=str(b.norm), levels=tuple(levels))
    return {
        "settings": settings,
        "data_cfg": cfg.data,
        "backbone": backbone,
        "recipe": Recipe.from_cfg(cfg.recipe),
        "num_classes": int(cfg.data.num_classes),
        "cache_dir": cfg.get("cache_dir", None),
        "device": resolve_device(cfg.get("device", "auto")),
    }


def trial_settings(cfg: Any) -> Any:
    """:class:`proxy_eval.trial.TrialSettings` from the config (device stays ``auto`` until a trial runs)."""
    from proxy_eval.trial import TrialSettings

    proxy = _proxy(cfg)
    score_thresh = proxy.get("score_thresh", None)
    threads = proxy.get("threads", None)
    return TrialSettings(
        iters=int(proxy.iters),
        batch_size=int(proxy.batch_size),
        lr=float(proxy.lr),
        momentum=float(proxy.get("momentum", 0.9)),
        weight_decay=float(proxy.get("weight_decay", 1e-4)),
        warmup_iters=int(proxy.get("warmup_iters", 0)),
        clip_grad=float(proxy.get("clip_grad", 0.0)),
        width=_width(cfg, proxy),
        amp=str(proxy.get("amp", "auto")),
        eval_batch_size=int(proxy.get("eval_batch_size", 16)),
        score_thresh=None if score_thresh is None else float(score_thresh),
        reward=str(cfg.get("reward", "ap")),
        timeout_s=float(proxy.get("timeout_s", 600)),
        report_every=max(1, int(proxy.get("report_every", 10))),
        fail_prob=float(proxy.get("fail_prob", 0.0)),
        inject_nan=_inject_nan(proxy.get("inject_nan", None)),
        device=str(cfg.get("device", "auto") or "auto"),
        threads=None if threads is None else int(threads),
        deform_impl=str(proxy.get("deform_impl", "fast")),
        train_last_stage=_flag(proxy.get("train_last_stage", False), "train_last_stage"),
    )


def _proxy_name(cfg: Any) -> str:
    name = str(_proxy(cfg).get("name", "cached"))
    if name not in PROXY_NAMES:
        raise UserError(f"proxy_eval.name={name}: choose one of {', '.join(PROXY_NAMES)}")
    return name


def prepare_proxy(cfg: Any) -> Any:
    """What the driver builds once before any trial: the feature cache (``cached``), the data and
    proxy splits (``end_to_end``), or None (``toy``). Bad settings raise a UserError here."""
    from proxy_eval.latency_objective import checked_objective

    checked_objective(cfg)  # search.objective / search.latency: refused before any trial
    name = _proxy_name(cfg)
    if name == "cached":
        from proxy_eval.prepare import prepare

        return prepare(cfg)
    if name == "end_to_end":
        return end_to_end_data(cfg)
    return None


def end_to_end_data(cfg: Any) -> Any:
    """:class:`proxy_eval.end_to_end.EndToEndData` of the config (the data is generated if needed)."""
    from proxy_eval.end_to_end import prepare_data

    proxy = _proxy(cfg)
    train_images = proxy.get("train_images", None)
    return prepare_data(cfg.data, cfg.get("cache_dir", None), None if train_images is None else int(train_images),
                        int(proxy.val_images), int(proxy.get("split_seed", 0)))


def end_to_end_evaluator(cfg: Any, data: Any = None) -> Evaluator:
    """The end-to-end evaluator of the config, on ``data`` (an EndToEndData; None: prepared now)."""
    from omegaconf import OmegaConf

    from proxy_eval.end_to_end import EndToEndData, EndToEndEvaluator, ModelSpec

    def plain(node: Any) -> dict[str, Any]:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)

    proxy = _proxy(cfg)
    if not isinstance(data, EndToEndData):
        data = end_to_end_data(cfg)
    model = ModelSpec(backbone=plain(cfg.backbone), recipe=plain(cfg.recipe), num_classes=int(cfg.data.num_classes),
                      width=_width(cfg, proxy))
    return EndToEndEvaluator(data, model, trial_settings(cfg), workers=int(proxy.get("workers", 0)),
                             cost_resolution=int(proxy.get("cost_resolution", 128)))


def build_evaluator(cfg: Any, cache: FeatureCache | str | os.PathLike | None = None) -> Evaluator:
    """The evaluator that ``cfg.proxy_eval.name`` selects (see the module docstring), wrapped by
    ``search.objective`` when latency is measured (:mod:`proxy_eval.latency_objective`)."""
    from proxy_eval.latency_objective import with_objective

    return with_objective(cfg, _proxy_evaluator(cfg, cache))


def _proxy_evaluator(cfg: Any, cache: FeatureCache | str | os.PathLike | None = None) -> Evaluator:
    name = _proxy_name(cfg)
    if name == "toy":
        return ToyProxy.from_cfg(cfg)
    if name == "end_to_end":
        return end_to_end_evaluator(cfg, cache)
    from proxy_eval.trial import CachedEvaluator

    if cache is None:
        cache = prepare_proxy(cfg)
    path = cache.path if isinstance(cache, FeatureCache) else cache
    return CachedEvaluator(path, trial_settings(cfg), Recipe.from_cfg(cfg.recipe))


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
                 sleep_s: float = 0.0) -> None:
        self.space_cfg = dict(space_cfg)
        self.target_seed, self.noise, self.seed = int(target_seed), float(noise), int(seed)
        self.weight_spread, self.fail_prob, self.inject_nan = float(weight_spread), float(fail_prob), inject_nan
        self.sleep_s = float(sleep_s)
        self._toys: dict[tuple[str, int], Any] = {}

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ToyProxy":
        from omegaconf import OmegaConf

        proxy = _proxy(cfg)
        space_cfg = OmegaConf.to_container(cfg.space, resolve=True) if OmegaConf.is_config(cfg.space) else cfg.space
        return cls(space_cfg, target_seed=int(proxy.get("target_seed", 0)), noise=float(proxy.get("noise", 0.0)),
                   seed=int(proxy.get("seed", 0)), weight_spread=float(proxy.get("weight_spread", 0.0)),
                   fail_prob=float(proxy.get("fail_prob", 0.0)), inject_nan=_inject_nan(proxy.get("inject_nan", None)),
                   sleep_s=float(proxy.get("sleep_s", 0.0)))

    def _toy(self, arch: Arch, seed: int) -> Any:
        from proxy_eval.toy import ToyEvaluator
        from search.space import space_from_cfg

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
        from proxy_eval.trial import injected_failure

        start = time.perf_counter()
        if self.sleep_s > 0:
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
            if report is not None and result.ok:
                report({"iteration": 1, "loss": result.loss})
            return result
        except Exception as err:  # the contract: never raise
            return TrialResult.failure("error", f"{type(err).__name__}: {err}", time.perf_counter() - start)

    __call__ = evaluate


class _AttrDict(dict):
    """A dict readable as attributes (what ``space_from_cfg`` expects from a config node)."""

    __getattr__ = dict.__getitem__
