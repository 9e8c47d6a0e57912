"""Run an exported detector (:mod:`detector.deploy.onnx_export`) with the same contract as ``FCOS`` in eval mode.

``OnnxDetector(path)(images)`` takes a list of ``(3, H_i, W_i)`` RGB images in 0..1 and returns one
``{"boxes" (M, 4) xyxy, "scores" (M,), "labels" (M,)}`` per image, exactly as the PyTorch model:

1. outside the graph: normalise with the file's ``pixel_mean`` / ``pixel_std`` / ``input_format``
   and zero-pad to a multiple of ``size_divisible`` (the steps of ``FCOS.preprocess``);
2. the graph, in the chosen runtime: ``onnxruntime`` (CPU execution provider) or ``reference``
   (``onnx.reference``'s evaluator, slow, but it implements ``DeformConv`` for ``dcn=native``);
3. outside the graph: :func:`detector.model.postprocess.postprocess` on the per-level maps, with points
   from :func:`detector.model.points.points_for` and the recipe stored in the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detector.data.transforms import pad_batch, unit_float
from detector.errors import UserError
from detector.deploy.onnx_export import HEAD_KEYS, INPUT_NAME, LEVEL_NAMES, METADATA_KEYS, OUTPUT_NAMES
from detector.model.points import points_for
from detector.model.postprocess import postprocess
from detector.model.recipe import Recipe

RUNTIMES = ("onnxruntime", "reference")


def read_metadata(proto: Any, path: Path) -> dict[str, Any]:
    """The export metadata of a loaded ``onnx.ModelProto`` (JSON values decoded)."""
    props = {p.key: p.value for p in proto.metadata_props}
    missing = [key for key in METADATA_KEYS if key not in props]
    if missing:
        raise UserError(f"{path} lacks the export metadata {missing}; export it with python -m detector export")
    decoded = {key: props[key] for key in ("arch", "input_format", "dcn")}
    decoded.update({key: json.loads(props[key]) for key in METADATA_KEYS if key not in decoded})
    return decoded


class OnnxDetector:
    """An exported detector in ONNX Runtime (or the ONNX reference evaluator); see the module doc."""

    def __init__(self, path: str | Path, runtime: str = "onnxruntime", threads: int | None = None) -> None:
        import onnx

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"onnx={self.path} does not exist; pass a file written by python -m detector export")
        if runtime not in RUNTIMES:
            raise UserError(f"runtime={runtime}: choose one of {', '.join(RUNTIMES)}")
        try:
            proto = onnx.load(str(self.path))
        except Exception as err:  # noqa: BLE001 - protobuf raises several types for a bad file
            raise UserError(f"cannot read {self.path} as ONNX ({type(err).__name__}); pass an exported .onnx file") \
                from None
        self.meta = read_metadata(proto, self.path)
        self.recipe = Recipe.from_cfg(self.meta["recipe"])
        self.mean = torch.tensor(self.meta["pixel_mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(self.meta["pixel_std"], dtype=torch.float32).view(3, 1, 1)
        self.runtime = runtime
        if runtime == "onnxruntime":
            if self.meta["dcn"] == "native":
                raise UserError(f"{self.path} holds the opset-19 DeformConv node (dcn=native), which ONNX Runtime "
                                "does not implement; export with dcn=decomposed or use runtime=reference")
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
                options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        else:
            from onnx.reference import ReferenceEvaluator

            self._session = ReferenceEvaluator(proto)

    @staticmethod
    def read_arch(path: Path) -> str:
        """The architecture code stored in an exported file (its weights are not read)."""
        import onnx

        if not Path(path).is_file():
            raise UserError(f"onnx={path} does not exist; pass a file written by python -m detector export")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # noqa: BLE001 - protobuf raises several types for a bad file
            raise UserError(f"cannot read {path} as ONNX ({type(err).__name__}); pass an exported .onnx file") from None
        return read_metadata(proto, Path(path))["arch"]

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """List of (3, H_i, W_i) RGB -> (normalised, padded (N, 3, H, W), [(H_i, W_i)]), as FCOS.preprocess."""
        normalised = []
        for image in images:
            image = unit_float(image.cpu()).to(torch.float32)
            if self.meta["input_format"] == "bgr255":
                image = image.flip(0) * 255.0
            normalised.append((image - self.mean) / self.std)
        return pad_batch(normalised, int(self.meta["size_divisible"]))

    def head_maps(self, padded: Tensor) -> dict[str, list[Tensor]]:
        """The graph on a padded batch: ``{"cls_logits", "bbox_reg", "centerness"}`` per-level lists."""
        feed = {INPUT_NAME: padded.numpy().astype(np.float32, copy=False)}
        outputs = self._session.run(list(OUTPUT_NAMES), feed)  # the same call in both runtimes
        maps = [torch.from_numpy(np.asarray(o)) for o in outputs]
        count = len(LEVEL_NAMES)
        return {key: maps[i * count:(i + 1) * count] for i, key in enumerate(HEAD_KEYS)}

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        padded, sizes = self.preprocess(images)
        head_out = self.head_maps(padded)
        return postprocess(head_out, points_for(head_out["cls_logits"], self.recipe.point_offset), sizes, self.recipe)
