"""The models a bench row measures: ours as retrained (random weights, frozen BN, stem + stage 1
frozen), torchvision's FCOS in either layout, and recipes read without Hydra."""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from detector.arch.grammar import Arch
from detector.model.build import build_detector
from detector.fast.switch import compile_parts, set_fast_paths
from detector.model.fcos import FCOS
from detector.model.recipe import Recipe
from detector.bench.settings import TORCHVISION_BACKBONES, BenchError, BenchSettings, Variant


def load_recipe(name: str) -> Recipe:
    """``conf/recipe/<name>.yaml`` as a Recipe, read with PyYAML (for scripts without Hydra)."""
    import yaml

    path = Path(__file__).resolve().parents[2] / "conf" / "recipe" / f"{name}.yaml"
    if not path.is_file():
        raise BenchError(f"recipe '{name}': no file {path}; choose one of "
                         f"{', '.join(sorted(p.stem for p in path.parent.glob('*.yaml')))}")
    return Recipe.from_cfg(yaml.safe_load(path.read_text(encoding="utf-8")))


def build_ours(arch: Arch, recipe: Recipe, settings: BenchSettings, variant: Variant, device: torch.device) -> FCOS:
    """Our detector as retrained: random weights, frozen BN, stem + stage 1 frozen."""
    torch.manual_seed(settings.seed)
    model = build_detector(arch, settings.num_classes, recipe, settings.backbone, "none", settings.width,
                           frozen_stages=1, norm="frozen_bn").to(device)
    set_fast_paths(model, variant.fast_paths, deform=variant.deform_impl)
    compile_parts(model, variant.compile)
    return model


def build_torchvision_fcos(recipe: Recipe, settings: BenchSettings, layout: str, device: torch.device) -> nn.Module:
    """torchvision's FCOS with the recipe's inference thresholds (see the module doc for ``layout``)."""
    from torchvision.models.detection import FCOS as TorchvisionFCOS
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if settings.backbone not in TORCHVISION_BACKBONES:
        raise BenchError(f"bench: the torchvision reference needs a ResNet backbone ({', '.join(TORCHVISION_BACKBONES)}), "
                         f"got {settings.backbone}; pass bench.torchvision=none")
    torch.manual_seed(settings.seed)
    options = dict(min_size=settings.short_side, max_size=settings.max_size, score_thresh=recipe.score_thresh,
                   nms_thresh=recipe.nms_thresh, detections_per_img=recipe.detections_per_image,
                   topk_candidates=recipe.topk_per_level)
    # fcos_resnet50_fpn's own construction: with backbone weights FrozenBatchNorm2d and 3 trainable
    # stages, without (weights=None, weights_backbone=None) BatchNorm2d and all 5 stages trainable
    norm, trainable = (FrozenBatchNorm2d, 3) if layout == "frozen_bn" else (nn.BatchNorm2d, 5)
    resnet = getattr(torchvision.models, settings.backbone)(weights=None, norm_layer=norm)
    body = _resnet_fpn_extractor(resnet, trainable, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return TorchvisionFCOS(body, settings.num_classes, **options).to(device)


def prepare_model(model: nn.Module, settings: BenchSettings) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if settings.channels_last else model
