"""``describe``: parameter counts per part derived by hand from DESIGN section 4, GFLOPs by hand
(deformable convs included), parity of the part split with torchvision's FCOS, the JSON/text
outputs and the command's bad-input handling."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from detector.cli import CONF_DIR
from detector.model.deform import ModulatedDeformConv
from detector.model.cost import describe, flop_counter
from detector.commands.describe import describe_command
from detector.errors import UserError
from detector.model.recipe import Recipe
from detector.arch.zoo import zoo_arch

ROOT = Path(__file__).resolve().parents[2]
W = 256  # decoder width
K = 80  # classes
RESNET50_CHANNELS = {"c3": 512, "c4": 1024, "c5": 2048}
# ResNet-50 feature sizes for an 800x1333 image (each stride-2 step rounds up).
SIZES = {"c3": (100, 167), "c4": (50, 84), "c5": (25, 42), "p6": (13, 21), "p7": (7, 11)}
JSON_KEYS = {"arch", "backbone", "num_classes", "params", "gflops", "input_size"}


def _recipe(name: str) -> Recipe:
    return Recipe.from_cfg(OmegaConf.load(CONF_DIR / "recipe" / f"{name}.yaml"))


@pytest.fixture(scope="module")
def nasfcos_r50():
    return describe(zoo_arch("nasfcos"), "resnet50", K, input_size=(800, 1333))


# ---------------------------------------------------------------- by-hand formulas
# Parameters of one op at width w (DESIGN section 4): convs, biases, norm affine (2w).
DCN = 9 * W * W + W + (54 * 9 * W + 54)  # deformable 3x3 with bias + offset/mask 3x3 conv with bias
DCN_WITH_NORM = DCN + 2 * W  # + BN (FPN) or GN (head)
CAT = 2 * (2 * W) + 2 * W  # BN(2w) affine + grouped 1x1 conv 2w -> w, groups=w: weight (w, 2, 1, 1)
ADAPTERS = sum(c * W + 2 * W for c in RESNET50_CHANNELS.values())  # 1x1 no bias + BN
P6_P7 = 2 * (9 * W * W + W)
CONV3_GN = 9 * W * W + 2 * W
CONV1_GN = W * W + 2 * W
PREDICTORS = (9 * W * K + K) + (9 * W * 4 + 4) + (9 * W + 1)
SCALES = 5


def test_nasfcos_fpn_parameters_match_the_hand_count(nasfcos_r50):
    # Published FPN: 3 adapters, 12 DCNs (the 2 skips have no parameters), 7 cat aggregations, P6/P7.
    assert nasfcos_r50["params"]["fpn"] == ADAPTERS + 12 * DCN_WITH_NORM + 7 * CAT + P6_P7 == 10_690_696


def test_nasfcos_head_parameters_match_the_hand_count(nasfcos_r50):
    # head:s0-dcn-conv3-dcn-conv1-skip-skip, all layers shared, two towers, then predictors and scales.
    tower = DCN_WITH_NORM + CONV3_GN + DCN_WITH_NORM + CONV1_GN
    assert nasfcos_r50["params"]["head"] == 2 * tower + PREDICTORS + SCALES == 4_368_946


def test_params_total_is_the_sum_of_the_parts(nasfcos_r50):
    params = nasfcos_r50["params"]
    assert params["total"] == params["backbone"] + params["fpn"] + params["head"]
    assert params["backbone"] > 20_000_000  # ResNet-50 without its classifier


def _area(level):
    h, w = SIZES[level]
    return h * w


def test_nasfcos_gflops_match_the_hand_count(nasfcos_r50):
    # FLOPs = 2 * MACs. A DCN costs a dense 3x3 conv plus its 54-channel offset/mask 3x3 conv.
    dcn = 2 * (W * W * 9 + W * 54 * 9)
    cat = 2 * (W * 2)  # per output position: w outputs, 2 inputs each
    # Ops run at their input's resolution: 8 DCNs read C5-sized maps, 3 read C3-sized, 1 reads C4.
    fpn = (
        sum(2 * c * W * _area(level) for level, c in RESNET50_CHANNELS.items())  # adapters
        + dcn * (8 * _area("c5") + 3 * _area("c3") + 1 * _area("c4"))
        + cat * (4 * _area("c5") + 3 * _area("c3"))  # b0, b1, b2, b4 at stride 32; b3, b5, b6 at 8
        + 2 * W * W * 9 * (_area("p6") + _area("p7"))
    )
    per_position = 2 * (2 * dcn + 2 * 9 * W * W + 2 * W * W) + 2 * 9 * W * (K + 4 + 1)  # towers + predictors
    head = per_position * sum(_area(level) for level in ("c3", "c4", "c5", "p6", "p7"))
    assert nasfcos_r50["gflops_per_part"]["fpn"] == pytest.approx(fpn / 1e9, abs=1e-3)
    assert nasfcos_r50["gflops_per_part"]["head"] == pytest.approx(head / 1e9, abs=1e-3)
    parts = nasfcos_r50["gflops_per_part"]
    assert nasfcos_r50["gflops"] == pytest.approx(sum(parts.values()), abs=2e-3)
    assert nasfcos_r50["gmacs"] == pytest.approx(nasfcos_r50["gflops"] / 2, abs=1e-3)


def test_deformable_convs_are_counted_like_dense_convs_plus_their_offset_conv():
    dcn = ModulatedDeformConv(32, 48, 3)
    x = torch.randn(1, 32, 10, 12)
    with flop_counter() as counter:
        dcn(x)
    assert counter.get_total_flops() == 2 * 10 * 12 * 9 * (32 * 48 + 32 * 54)


def test_fcos_part_split_matches_torchvision_fcos():
    from torchvision.models.detection import fcos_resnet50_fpn

    info = describe(zoo_arch("fcos"), "resnet50", 91, recipe=_recipe("torchvision"))
    with torch.device("meta"):
        reference = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    assert info["params"]["fpn"] == sum(p.numel() for p in reference.backbone.fpn.parameters())
    assert info["params"]["head"] == sum(p.numel() for p in reference.head.parameters())


# ---------------------------------------------------------------- outputs and the command
def _cfg(**overrides):
    cfg = {
        "arch": "nasfcos",
        "backbone": {"name": "resnet18"},
        "data": {"num_classes": 6},
        "model": {"width": 64},
        "recipe": OmegaConf.to_container(OmegaConf.load(CONF_DIR / "recipe" / "nasfcos.yaml")),
        "input_size": [256, 320],
        "format": "json",
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def test_describe_command_prints_one_json_object_with_the_documented_keys(capsys):
    info = describe_command(_cfg())
    printed = json.loads(capsys.readouterr().out)
    assert printed == info
    assert JSON_KEYS <= set(printed)
    assert set(printed["params"]) == {"backbone", "fpn", "head", "total"}
    assert printed["arch"] == str(zoo_arch("nasfcos")) and printed["backbone"] == "resnet18"
    assert printed["num_classes"] == 6 and printed["input_size"] == [256, 320] and printed["width"] == 64
    assert printed["gflops"] > 0


def test_describe_command_text_table_names_every_part(capsys):
    describe_command(_cfg(format="text"))
    out = capsys.readouterr().out
    for word in ("backbone", "fpn", "head", "total", "GFLOPs", "256 x 320"):
        assert word in out


@pytest.mark.parametrize("overrides, message", [
    ({"arch": "fpn:nonsense"}, "arch"),
    ({"format": "xml"}, "format=xml"),
    ({"input_size": [800]}, "input_size"),
    ({"backbone": {"name": "vgg16"}}, "vgg16"),
])
def test_describe_command_turns_bad_input_into_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        describe_command(_cfg(**overrides))


def test_cli_describe_prints_json_and_exits_0():
    # Bad input is covered in-process above: every failure is a UserError, which the CLI maps to exit 2.
    run = subprocess.run([sys.executable, "-m", "detector", "describe", "arch=nasfcos", "format=json",
                          "input_size=[128,160]"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert JSON_KEYS <= set(json.loads(run.stdout))
