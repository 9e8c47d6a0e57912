"""``python -m detector export ckpt=<file> format=onnx out=<file>``: a detector as an ONNX graph.

What the graph holds, and what runs outside it (:class:`detector.deploy.onnx_runtime.OnnxDetector` does
both outside steps, with the same functions as the PyTorch model):

- input ``images``: ``(N, 3, H, W)`` float32, already normalised as the backbone expects and
  zero-padded bottom/right to a multiple of 32 (``FCOS.preprocess``). Batch, height and width are
  dynamic axes: one file serves every batch and image size.
- network (in the graph): backbone -> FPN -> head.
- outputs: the head's per-level maps, ``cls_logits_p3..p7`` ``(N, C, H_l, W_l)``,
  ``bbox_reg_p3..p7`` ``(N, 4, H_l, W_l)``, ``centerness_p3..p7`` ``(N, 1, H_l, W_l)``.
- post-processing (outside, documented): points from the map sizes and ``recipe.point_offset``
  (:func:`detector.model.points.points_for`), then :func:`detector.model.postprocess.postprocess` (threshold,
  top-k per level, box decoding, clipping, class-wise NMS, best ``detections_per_image``). It is
  data-dependent control flow (a variable number of candidates per level), which is why it stays
  outside: the model's own function runs on the runtime's outputs, so nothing is re-implemented.

Everything needed outside is stored in the file's ``metadata_props`` (:data:`METADATA_KEYS`): the
architecture code, the recipe, the class count and names, the input normalisation and the DCN form.

Weights: ``ckpt=<file>`` exports a trained checkpoint (``arch=``, when typed, must match). Without
``ckpt``, ``arch=<code>`` exports seeded random weights (``seed``) for tests and latency work; to
make a parity check of such a model meaningful, :func:`randomize_for_check` also draws the DCN offset
and mask predictors (zero at initialisation, which would sample only the regular grid) and lifts the
classification prior so that detections pass the score threshold.

The deformable convolutions are exported as ``dcn=decomposed`` (default; standard operators, runs
in ONNX Runtime) or ``dcn=native`` (the opset-19 ``DeformConv`` node); see :mod:`detector.deploy.onnx_deform`.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detector.errors import UserError
from detector.deploy.onnx_deform import DCN_FORMS, DEFORM_CONV_OPSET, exportable_deform_convs, register_native_symbolic

INPUT_NAME = "images"
HEAD_KEYS = ("cls_logits", "bbox_reg", "centerness")
LEVEL_NAMES = ("p3", "p4", "p5", "p6", "p7")
OUTPUT_NAMES = tuple(f"{key}_{level}" for key in HEAD_KEYS for level in LEVEL_NAMES)
DECOMPOSED_OPSET = 17  # GridSample needs 16
METADATA_KEYS = ("arch", "num_classes", "class_names", "recipe", "pixel_mean", "pixel_std", "input_format",
                 "size_divisible", "dcn")


class ExportError(UserError):
    """Bad settings for export or its check."""


class HeadMaps(nn.Module):
    """FCOS network without pre- and post-processing: padded batch -> the 15 per-level head maps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        head_out = self.model.head(self.model.forward_features(images))
        return tuple(head_out[key][level] for key in HEAD_KEYS for level in range(len(LEVEL_NAMES)))


def metadata(model: nn.Module, arch: str, dcn: str, class_names: list[str] | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an exported file (JSON values), see :data:`METADATA_KEYS`."""
    names = class_names or [str(i) for i in range(model.num_classes)]
    return {
        "arch": arch,
        "num_classes": json.dumps(int(model.num_classes)),
        "class_names": json.dumps(list(names)),
        "recipe": json.dumps(dataclasses.asdict(model.recipe)),
        "pixel_mean": json.dumps(model.pixel_mean.flatten().tolist()),
        "pixel_std": json.dumps(model.pixel_std.flatten().tolist()),
        "input_format": model.input_format,
        "size_divisible": json.dumps(int(model.size_divisible)),
        "dcn": dcn,
    }


def export_onnx(model: nn.Module, path: str | Path, arch: str, dcn: str = "decomposed", opset: int | None = None,
                sample_size: tuple[int, int] = (320, 320), class_names: list[str] | None = None) -> Path:
    """Write ``model`` (an eval-mode FCOS on the CPU) as ONNX to ``path``; returns the path.

    The graph is traced on a zero batch of two images of ``sample_size`` (multiples of 32) with dynamic batch,
    height and width. ``opset`` defaults to 17 (decomposed) or 19 (native, the DeformConv opset).
    """
    import onnx

    if dcn not in DCN_FORMS:
        raise ExportError(f"dcn={dcn}: choose one of {', '.join(DCN_FORMS)}")
    opset = int(opset) if opset else (DEFORM_CONV_OPSET if dcn == "native" else DECOMPOSED_OPSET)
    if dcn == "native" and opset < DEFORM_CONV_OPSET:
        raise ExportError(f"dcn=native needs opset >= {DEFORM_CONV_OPSET} (DeformConv), got {opset}")
    height, width = (int(v) for v in sample_size)
    if height % 32 or width % 32 or height < 32 or width < 32:
        raise ExportError(f"export sample size {height}x{width}: both sides must be positive multiples of 32")
    if dcn == "native":
        register_native_symbolic()
    path = Path(path)
    model = model.eval()
    sample = torch.zeros(2, 3, height, width)  # 2: GroupNorm refuses one value per group (width 32, 1x1 P7)
    dynamic = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({name: {0: "batch", 2: f"{name}_h", 3: f"{name}_w"} for name in OUTPUT_NAMES})
    with exportable_deform_convs(model, dcn), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape comparisons: shapes follow strides
        torch.onnx.export(HeadMaps(model).eval(), (sample,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic,
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    for key, value in metadata(model, arch, dcn, class_names).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def randomize_for_check(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make seeded random weights exercise what a parity check must see (see the module doc).

    DCN offset/mask predictors get N(0, 0.01) weights and N(0, 0.5) biases (offsets of about a
    pixel, fractional: the bilinear sampling is tested); the classification bias becomes -1.5, so
    many (point, class) pairs pass the score threshold and NMS has work to do.
    """
    from detector.model.deform import ModulatedDeformConv

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModulatedDeformConv):
                weight, bias = module.offset_mask.weight, module.offset_mask.bias
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.01)
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.5)
        cls = getattr(model.head, "cls_logits", None)
        if isinstance(cls, nn.Conv2d) and cls.bias is not None:
            cls.bias.fill_(-1.5)
    return model


def model_for_export(cfg: Any) -> tuple[nn.Module, str, list[str] | None]:
    """(eval-mode CPU model, its code, class names) from ``ckpt=`` or, without it, ``arch=`` + ``seed``."""
    from detector.model.build import build_detector_from_cfg
    from detector.commands.eval import checked_checkpoint
    from detector.engine.evaluate import model_from_checkpoint
    from detector.arch.zoo import resolve_arch

    if cfg.get("ckpt", None):
        payload = checked_checkpoint(cfg)
        return model_from_checkpoint(payload, "cpu"), str(payload["arch"]), payload.get("class_names")
    arch = resolve_arch(str(cfg.arch))
    cfg.backbone.weights = "none"  # random weights: never download
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        model = build_detector_from_cfg(cfg, arch)
    return randomize_for_check(model.eval(), int(cfg.seed)), str(arch), None


def check_format(cfg: Any) -> None:
    """``format=onnx`` (the only format; the config's default ``text`` of describe/bench means onnx here)."""
    from detector.commands.eval import typed_override

    typed = typed_override("format")
    if typed is not None and typed != "onnx":
        raise ExportError(f"format={typed}: export writes format=onnx only")


def output_path(cfg: Any) -> Path:
    """``out=<file>.onnx``, refused when it exists (nothing is overwritten) or its folder is missing."""
    out = cfg.get("out", None)
    if out is None or not str(out).strip():
        raise ExportError("out is not set; pass out=<file>.onnx")
    path = Path(str(out)).expanduser()
    if path.exists():
        raise ExportError(f"out={path} already exists; pass a new file name (nothing was overwritten)")
    if not path.parent.is_dir():
        raise ExportError(f"out={path}: folder {path.parent} does not exist; create it first")
    return path


def export_command(cfg: Any) -> Path:
    """``python -m detector export``: write the ONNX file, then run the parity check when ``check=true``."""
    check_format(cfg)
    path = output_path(cfg)
    dcn = str(cfg.get("dcn", "decomposed"))
    if dcn not in DCN_FORMS:
        raise ExportError(f"dcn={dcn}: choose one of {', '.join(DCN_FORMS)}")
    model, arch, class_names = model_for_export(cfg)
    sample = tuple(cfg.export.sample_size)
    export_onnx(model, path, arch, dcn, cfg.export.get("opset", None), sample, class_names)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, dcn={dcn}, dynamic batch/height/width) for {arch}")
    if bool(cfg.get("check", False)):
        from detector.deploy.export_check import run_check

        run_check(cfg, path, model)
    return path
