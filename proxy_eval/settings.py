"""The proxy's settings: the one module that reads ``cfg.proxy_eval`` (and the few other keys a
proxy needs), turning it into plain frozen values that travel to trial workers.

- :class:`TrialSettings` -- how one candidate trains and is scored (every proxy);
- :class:`PrepareSettings`, :class:`BackboneSpec` -- what determines the cached proxy's features;
- :func:`trial_settings`, :func:`prepare_arguments`, :func:`split_arguments`,
  :func:`end_to_end_options`, :func:`toy_arguments` -- those values from a composed config;
- :func:`proxy_name`, :func:`resolve_device`, :func:`resolve_reward`.

Keys read besides ``cfg.proxy_eval``: ``cfg.reward`` (``auto``: :func:`resolve_reward`), ``cfg.device`` (auto | cpu | cuda, resolved in
the process that runs the trial), ``cfg.model.width`` (when ``proxy_eval.width`` is null),
``cfg.cache_dir``, ``cfg.data``, ``cfg.backbone``, ``cfg.recipe``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detector.errors import UserError
from detector.model.backbone import resolve_freezing
from detector.model.deform import DEFORM_IMPLS
from detector.model.recipe import Recipe

REWARDS = ("ap", "neg_loss")
# reward=auto: what ranked best against full training in the pretrained regime
# (experiments/search_quality/pretrained/README.md): for the end-to-end proxy the loss (Kendall tau
# 0.65 / 0.53 at 300 iterations on two proxy instances, against 0.53 / 0.53 for AP), for the cached
# proxy its AP (the loss was no better on either instance).
AUTO_REWARD = {"cached": "ap", "end_to_end": "neg_loss", "toy": "ap"}
AMP_MODES = ("auto", "bf16", "off")


@dataclass(frozen=True)
class TrialSettings:
    """Training and evaluation settings of one trial (read from ``cfg.proxy_eval`` by :func:`trial_settings`)."""

    iters: int = 60
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 10
    clip_grad: float = 10.0
    width: int = 64
    amp: str = "auto"
    eval_batch_size: int = 16
    score_thresh: float | None = None  # None: the recipe's
    reward: str = "ap"
    timeout_s: float = 600.0
    report_every: int = 10
    fail_prob: float = 0.0
    inject_nan: int | None = None
    device: str = "cpu"
    threads: int | None = None
    deform_impl: str = "fast"
    train_last_stage: bool = False
    cuda_graph: bool = False  # end-to-end proxy: backbone + FPN + head fwd+bwd replayed from a CUDA graph
    cuda_graph_pad: tuple[int, int] | None = None  # its batches padded to at least this (H, W); None: the data's

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise UserError(f"reward={self.reward}: choose one of {', '.join(REWARDS)}")
        if self.amp not in AMP_MODES:
            raise UserError(f"proxy_eval.amp={self.amp}: choose one of {', '.join(AMP_MODES)}")
        if self.iters < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise UserError("proxy_eval: iters, batch_size and eval_batch_size must be >= 1")
        if not 0.0 <= self.fail_prob <= 1.0:
            raise UserError(f"proxy_eval.fail_prob={self.fail_prob}: a probability in [0, 1]")
        if self.timeout_s <= 0:
            raise UserError(f"proxy_eval.timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.deform_impl not in DEFORM_IMPLS:
            raise UserError(f"proxy_eval.deform_impl={self.deform_impl}: choose one of {', '.join(DEFORM_IMPLS)}")
        if self.cuda_graph and self.device == "cpu":
            raise UserError("proxy_eval.cuda_graph=true needs CUDA trials, but device=cpu; drop it "
                            "(or set proxy_eval.cuda_graph=false) for CPU trials")


class PrepareError(UserError):
    """A proxy setting or an adaptation checkpoint is unusable."""


@dataclass(frozen=True)
class PrepareSettings:
    """What determines the proxy features (read from ``cfg.proxy_eval`` by :func:`prepare_arguments`)."""

    train_images: int | None
    val_images: int
    split_seed: int = 0
    resolution: int = 384
    width: int = 256
    adapt_from: str | None = None
    adapt_iters: int = 0
    adapt_batch_size: int = 8
    adapt_lr: float = 0.01
    min_box_size: float = 1.0
    extract_batch_size: int = 16
    workers: int = 0
    train_last_stage: bool = False  # also store the adapted last stage (proxy_eval.last_stage)

    def __post_init__(self) -> None:
        if self.resolution < 64 or self.resolution % 32:
            raise PrepareError(f"proxy_eval.resolution={self.resolution}: use a multiple of 32, at least 64")
        if self.adapt_iters < 0 or self.adapt_batch_size < 1 or self.extract_batch_size < 1:
            raise PrepareError("proxy_eval: adapt_iters must be >= 0 and batch sizes >= 1")
        if self.width < 32 or self.width % 32:
            raise PrepareError(f"proxy_eval.width={self.width}: use a multiple of 32 (GroupNorm(32) in the head)")


@dataclass(frozen=True)
class BackboneSpec:
    """``cfg.backbone`` as plain values."""

    name: str
    weights: str = "none"
    frozen_stages: int = 1
    norm: str = "frozen_bn"
    levels: tuple[str, ...] = ("c3", "c4", "c5")
PROXY_NAMES = ("cached", "end_to_end", "toy")
PROXY_CONF = Path(__file__).resolve().parents[1] / "conf" / "proxy_eval"


def proxy_keys(name: str) -> tuple[str, ...]:
    """The settings a ``proxy_eval`` section of kind ``name`` has: the keys of
    ``conf/proxy_eval/<name>.yaml``, the one source of their defaults (read with PyYAML)."""
    import yaml

    return tuple(yaml.safe_load((PROXY_CONF / f"{name}.yaml").read_text(encoding="utf-8")))


class ProxySection:
    """``cfg.proxy_eval`` checked against :func:`proxy_keys`: ``section[key]`` for a key the YAML of
    its kind defines; an unknown or missing key is a UserError naming the valid ones."""

    def __init__(self, node: Any) -> None:
        items = dict(node.items())
        self.name = str(items.get("name", None))
        if self.name not in PROXY_NAMES:
            raise UserError(f"proxy_eval.name={self.name}: choose one of {', '.join(PROXY_NAMES)}")
        allowed = proxy_keys(self.name)
        unknown = sorted(str(k) for k in items if k not in allowed)
        if unknown:
            raise UserError(f"proxy_eval.{unknown[0]}: not a setting of the '{self.name}' proxy; its settings are "
                            f"{', '.join(allowed)}")
        missing = [k for k in allowed if k not in items]
        if missing:
            raise UserError(f"proxy_eval.{missing[0]} is missing; a '{self.name}' proxy needs every key of "
                            f"conf/proxy_eval/{self.name}.yaml ({', '.join(allowed)})")
        self._items = items

    def __getitem__(self, key: str) -> Any:
        return self._items[key]


def _proxy(cfg: Any) -> ProxySection:
    node = cfg.get("proxy_eval", None)
    if node is None:
        raise UserError("proxy_eval: missing; choose proxy_eval=cached, end_to_end or toy")
    return ProxySection(node)


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


def _optional(value: Any, kind: type) -> Any:
    return None if value is None else kind(value)


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


def _width(cfg: Any, proxy: ProxySection) -> int:
    width = proxy["width"]
    return int(cfg.model.width if width is None else width)


def prepare_arguments(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`proxy_eval.prepare.prepare_features` from the config."""
    proxy = _proxy(cfg)
    if proxy.name != "cached":
        raise UserError(f"proxy_eval={proxy.name} has no feature cache to prepare; use proxy_eval=cached")
    settings = PrepareSettings(
        train_images=_optional(proxy["train_images"], int),
        val_images=int(proxy["val_images"]),
        split_seed=int(proxy["split_seed"]),
        resolution=int(proxy["resolution"]),
        width=_width(cfg, proxy),
        adapt_from=str(proxy["adapt_from"]) if proxy["adapt_from"] else None,
        adapt_iters=int(proxy["adapt_iters"]),
        adapt_batch_size=int(proxy["adapt_batch_size"]),
        adapt_lr=float(proxy["adapt_lr"]),
        min_box_size=float(proxy["min_box_size"]),
        extract_batch_size=int(proxy["extract_batch_size"]),
        workers=int(proxy["workers"]),
        train_last_stage=_flag(proxy["train_last_stage"], "train_last_stage"),
    )
    b = cfg.backbone
    levels = b.get("levels", None) or ("c3", "c4", "c5")
    weights = str(b.weights) if b.get("weights", None) else "none"
    frozen_stages, norm = resolve_freezing(weights, b.frozen_stages, b.norm)
    backbone = BackboneSpec(name=str(b.name), weights=weights, frozen_stages=int(frozen_stages), norm=norm,
                            levels=tuple(levels))
    return {
        "settings": settings,
        "data_cfg": cfg.data,
        "backbone": backbone,
        "recipe": Recipe.from_cfg(cfg.recipe),
        "num_classes": int(cfg.data.num_classes),
        "cache_dir": cfg.get("cache_dir", None),
        "device": resolve_device(cfg.get("device", "auto")),
    }


def trial_settings(cfg: Any) -> TrialSettings:
    """:class:`TrialSettings` from the config (device stays ``auto`` until a trial runs)."""
    proxy = _proxy(cfg)
    if proxy.name == "toy":
        raise UserError("proxy_eval=toy trains nothing; it has no trial settings")
    return TrialSettings(
        iters=int(proxy["iters"]),
        batch_size=int(proxy["batch_size"]),
        lr=float(proxy["lr"]),
        momentum=float(proxy["momentum"]),
        weight_decay=float(proxy["weight_decay"]),
        warmup_iters=int(proxy["warmup_iters"]),
        clip_grad=float(proxy["clip_grad"]),
        width=_width(cfg, proxy),
        amp=str(proxy["amp"]),
        eval_batch_size=int(proxy["eval_batch_size"]),
        score_thresh=_optional(proxy["score_thresh"], float),
        reward=resolve_reward(cfg),
        timeout_s=float(proxy["timeout_s"]),
        report_every=max(1, int(proxy["report_every"])),
        fail_prob=float(proxy["fail_prob"]),
        inject_nan=_inject_nan(proxy["inject_nan"]),
        device=str(cfg.get("device", "auto") or "auto"),
        threads=_optional(proxy["threads"], int),
        deform_impl=str(proxy["deform_impl"]),
        # the cached proxy's option (the end-to-end proxy trains the whole backbone anyway)
        train_last_stage=_flag(proxy["train_last_stage"], "train_last_stage") if proxy.name == "cached" else False,
        # the end-to-end proxy's options (the cached proxy trains no backbone, its steps are small)
        cuda_graph=_flag(proxy["cuda_graph"], "cuda_graph") if proxy.name == "end_to_end" else False,
        cuda_graph_pad=_graph_pad(proxy["cuda_graph_pad"]) if proxy.name == "end_to_end" else None,
    )


def _graph_pad(value: Any) -> tuple[int, int] | None:
    """``proxy_eval.cuda_graph_pad``: null, or [height, width] in pixels (UserError otherwise)."""
    if value is None:
        return None
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"proxy_eval.cuda_graph_pad={value!r}: give [height, width] in pixels, or null") from None
    if min(height, width) < 1:
        raise UserError(f"proxy_eval.cuda_graph_pad={list(value)}: both sides must be >= 1 pixel")
    return height, width


def resolve_reward(cfg: Any) -> str:
    """``cfg.reward``, with ``auto`` (or unset) resolved for the proxy: :data:`AUTO_REWARD`, except
    ``ap`` under ``search.objective=ap_at_latency`` (which multiplies the AP). UserError for any
    other value (the driver calls it before a run starts, the trials through :func:`trial_settings`)."""
    reward = str(cfg.get("reward", None) or "auto")
    if reward != "auto":
        if reward not in REWARDS:
            raise UserError(f"reward={reward}: choose one of auto, {', '.join(REWARDS)}")
        return reward
    search = cfg.get("search", None)
    if search is not None and search.get("objective", "ap") == "ap_at_latency":
        return "ap"
    return AUTO_REWARD.get(proxy_name(cfg), "ap")


def proxy_name(cfg: Any) -> str:
    """``proxy_eval.name``, checked: cached | end_to_end | toy."""
    return _proxy(cfg).name


def split_arguments(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`proxy_eval.end_to_end.prepare_data`: the data and its proxy split."""
    proxy = _proxy(cfg)
    return {"data_cfg": cfg.data, "cache_dir": cfg.get("cache_dir", None),
            "train_images": _optional(proxy["train_images"], int),
            "val_images": int(proxy["val_images"]), "split_seed": int(proxy["split_seed"])}


def end_to_end_options(cfg: Any) -> dict[str, Any]:
    """How the end-to-end proxy builds candidates: ``model`` (the keys ``build_detector_from_cfg``
    reads, as plain values), ``workers`` and ``cost_resolution``."""
    from omegaconf import OmegaConf

    def plain(node: Any) -> dict[str, Any]:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)

    proxy = _proxy(cfg)
    model = {"backbone": plain(cfg.backbone), "recipe": plain(cfg.recipe), "num_classes": int(cfg.data.num_classes),
             "width": _width(cfg, proxy)}
    return {"model": model, "workers": int(proxy["workers"]), "cost_resolution": int(proxy["cost_resolution"])}


def toy_arguments(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :class:`proxy_eval.toy.ToyProxy` (the space config as a plain dict)."""
    from omegaconf import OmegaConf

    proxy = _proxy(cfg)
    space_cfg = OmegaConf.to_container(cfg.space, resolve=True) if OmegaConf.is_config(cfg.space) else cfg.space
    return {"space_cfg": space_cfg, "target_seed": int(proxy["target_seed"]), "noise": float(proxy["noise"]),
            "seed": int(proxy["seed"]), "weight_spread": float(proxy["weight_spread"]),
            "fail_prob": float(proxy["fail_prob"]), "inject_nan": _inject_nan(proxy["inject_nan"]),
            "sleep_s": float(proxy["sleep_s"]), "curve_steps": int(proxy["curve_steps"]),
            "curve_noise": float(proxy["curve_noise"])}
