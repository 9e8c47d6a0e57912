"""ONNX export: the DCN in both exported forms, and the parity check of whole detectors.

Detectors are small (resnet18 with random weights, decoder width 32, the 2 val images of the suite's
tiny synthetic dataset); the export is traced at 64x64 and run at the val images' sizes (padded to
96 px), so the dynamic axes are exercised too.
"""
import random

import numpy as np
import pytest
import torch
from torchvision.ops import deform_conv2d

from detector.cli import compose
from detector.model.deform import ModulatedDeformConv
from detector.deploy.export_check import ParityError, check_export_command
from detector.deploy.onnx_deform import deform_conv2d_decomposed, exportable_deform_convs, register_native_symbolic
from detector.deploy.onnx_export import ExportError, export_command
from detector.deploy.onnx_runtime import OnnxDetector
from detector.arch.space import space_from_cfg

SMALL = ["model.width=32", "export.sample_size=[64,64]", "export.batch=4", "backbone.weights=none"]


@pytest.fixture
def val_root(tiny_synthetic_root):
    """The suite's tiny synthetic dataset (conftest): its 2 val images of 64-96 px are the check's images."""
    return tiny_synthetic_root


def _cfg(arch, root, out, *extra):
    return compose("train", [f"arch={arch}", "experiment=synthetic_tiny", f"data.root={root}", f"out={out}",
                             *SMALL, *extra])


@pytest.mark.parametrize("size", [(7, 9), (1, 1), (5, 3)])
def test_decomposed_dcn_equals_torchvision(size):
    """GridSample + mask + 1x1 conv gives torchvision's modulated deform_conv2d, borders and 1x1 maps included."""
    gen = torch.Generator().manual_seed(0)
    h, w = size
    x = torch.randn(2, 8, h, w, generator=gen, dtype=torch.float64)
    offset = torch.randn(2, 2 * 2 * 9, h, w, generator=gen, dtype=torch.float64) * 2  # 2 offset groups
    mask = torch.rand(2, 2 * 9, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 8, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    want = deform_conv2d(x, offset, weight, bias, padding=(1, 1), mask=mask)
    got = deform_conv2d_decomposed(x, offset, weight, bias, padding=(1, 1), mask=mask)
    assert torch.allclose(got, want, atol=1e-12)


def _dcn_module():
    torch.manual_seed(0)
    dcn = ModulatedDeformConv(8, 6, 3, offset_groups=2).eval()
    with torch.no_grad():  # fractional offsets and varied masks (a fresh DCN samples the plain grid)
        dcn.offset_mask.weight.normal_(0, 0.1)
        dcn.offset_mask.bias.normal_(0, 0.5)
    return torch.nn.Sequential(dcn).eval()


@pytest.mark.parametrize("form", ["native", "decomposed"])
def test_exported_dcn_reproduces_the_module(tmp_path, form):
    """Both forms export with dynamic sizes and reproduce the module: native (a DeformConv node) in
    onnx.reference's evaluator, decomposed (GridSample, no DeformConv) in ONNX Runtime."""
    import onnx
    import onnxruntime
    from onnx.reference import ReferenceEvaluator

    model = _dcn_module()
    register_native_symbolic()
    path = tmp_path / f"dcn_{form}.onnx"
    with exportable_deform_convs(model, form) as swapped, torch.no_grad():
        assert swapped == 1
        torch.onnx.export(model, (torch.randn(2, 8, 7, 9),), str(path), dynamo=False, opset_version=19,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    assert isinstance(model[0], ModulatedDeformConv)  # restored after the export
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert ("DeformConv" in ops) == (form == "native")
    assert form == "native" or "GridSample" in ops
    if form == "native":
        evaluator = ReferenceEvaluator(proto)
    else:
        evaluator = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 8, 5, 4), (2, 8, 3, 2)]:  # small: the reference DeformConv is pure Python (~0.1 s a pixel)
        x = torch.randn(*shape)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(evaluator.run(None, {"x": x.numpy()})[0], want, atol=1e-5)


def _random_code(seed):
    space = space_from_cfg(compose("search", []).space, "joint")
    return str(space.sample(random.Random(seed)))


@pytest.mark.parametrize("arch", ["fcos", "nasfcos", "random:3", pytest.param("random:11", marks=pytest.mark.slow)])
def test_export_passes_parity_check(tmp_path, val_root, arch):
    """Export (decomposed DCN) and check: every detection matched, AP equal to 3 decimals, report written."""
    code = _random_code(int(arch.split(":")[1])) if arch.startswith("random") else arch
    out = tmp_path / "model.onnx"
    export_command(_cfg(code, val_root, out, "check=true"))
    record = __import__("json").loads((tmp_path / "model.onnx.check.json").read_text())
    assert record["passed"] and record["images"] == 2
    assert record["detections"] > 0 and record["matched"] == record["detections"] and record["unmatched"] == 0
    assert record["max_box_diff"] <= 0.01 and record["max_head_diff"] < 1e-3
    assert abs(record["ap_pytorch"] - record["ap_onnx"]) < 5e-4


def test_check_fails_when_the_export_differs(tmp_path, val_root):
    """A file exported from other weights (seed) than the model it is checked against fails the check."""
    out = tmp_path / "fcos.onnx"
    export_command(_cfg("fcos", val_root, out, "seed=1"))
    with pytest.raises(ParityError, match="without a partner"):
        check_export_command(_cfg("fcos", val_root, "unused", f"onnx={out}", "seed=2", "export.max_images=2"))


SMALL_DCN_CODE = "fpn:c3-c4-dcn-skip-sum/c4-c5-skip-skip-sum/c3-c5-skip-skip-sum+head:s0-dcn-skip"


def test_native_export_holds_deform_conv_nodes_and_onnxruntime_refuses_it(tmp_path, val_root):
    """dcn=native writes an opset-19 DeformConv node per DCN call (a valid model); ONNX Runtime, which has no
    DeformConv kernel, is refused in one line (the module-level test above checks the node's values)."""
    import onnx

    out = tmp_path / "native.onnx"
    export_command(_cfg(SMALL_DCN_CODE, val_root, out, "dcn=native"))
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    # one call per DCN application: 1 in the FPN, and the head's 2 towers (1 DCN each) run on 5 levels
    assert sum(node.op_type == "DeformConv" for node in proto.graph.node) == 1 + 2 * 5
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 19
    with pytest.raises(Exception, match="does not implement"):
        OnnxDetector(out, "onnxruntime")


@pytest.mark.slow
def test_native_export_passes_parity_check_in_onnx_reference(tmp_path, val_root):
    """The whole detector with DeformConv nodes, run by onnx.reference: a pure-Python evaluator, more than
    30 minutes on a loaded 2-core CPU (not yet seen to finish); the node's values are checked on a module."""
    out = tmp_path / "native.onnx"
    export_command(_cfg(SMALL_DCN_CODE, val_root, out, "dcn=native"))
    record = check_export_command(_cfg(SMALL_DCN_CODE, val_root, "unused", f"onnx={out}",
                                       "export.runtime=reference", "export.max_images=2"))
    assert record["passed"] and record["dcn"] == "native"


def test_export_refuses_bad_settings(tmp_path, val_root):
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep")
    with pytest.raises(ExportError, match="already exists"):
        export_command(_cfg("fcos", val_root, existing))
    assert existing.read_bytes() == b"keep"
    with pytest.raises(ExportError, match="dcn=fast"):
        export_command(_cfg("fcos", val_root, tmp_path / "new.onnx", "dcn=fast"))
    with pytest.raises(ExportError, match="onnx is not set"):
        check_export_command(_cfg("fcos", val_root, "unused"))
