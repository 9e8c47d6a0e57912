"""CUDA-graph training step (detector.fast.graphs.training): padding rule, wiring into FCOS, bench options.

CPU tests cover everything but the capture itself (the padding rule and what it does to targets,
that the graph branch is skipped on CPU / in eval / without autograd, the flat network function,
the invalidation key, the keep-alive recorder, bench parsing); the ``gpu`` tests compare graphed
and eager training steps on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from detector.model.build import build_detector
from detector.cli import dispatch
from detector.commands.bench import settings_from_cfg
from detector.fast.switch import set_fast_paths
from detector.fast.graphs.training import (ExternalTensors, GraphedTraining, NetworkFunction, TrainGraphError,
                                       _detach_live_grads, bucket_shape, check_padding, install_training_graph,
                                       pad_bottom_right, remove_training_graph)
from detector.model.points import points_for
from detector.model.targets import assign_targets
from detector.bench.settings import BenchError, BenchSettings
from detector.bench.throughput import arch_ratios
from detector.bench.variants import default_variants, parse_graph_modes
from detector.bench.models import load_recipe
from detector.bench.timing import train_graph_pad_to
from detector.arch.zoo import resolve_arch
from detector.__main__ import COMMANDS

NUM_CLASSES = 5


def small_detector(arch: str = "nasfcos", fast: bool = False, norm: str = "frozen_bn"):
    torch.manual_seed(0)
    model = build_detector(resolve_arch(arch), NUM_CLASSES, load_recipe("nasfcos"), "resnet18", width=32,
                           frozen_stages=1, norm=norm)
    return set_fast_paths(model, "all" if fast else "none")


def some_batch(device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=gen), torch.rand(3, 80, 100, generator=gen)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 120.0, 90.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([2])}]
    images = [im.to(device=device, dtype=dtype) for im in images]
    targets = [{"boxes": t["boxes"].to(device=device, dtype=dtype), "labels": t["labels"].to(device)} for t in targets]
    return images, targets


class CudaLike:
    """Stands for a CUDA batch where only ``is_cuda`` is read (GraphedTraining.applies)."""

    is_cuda = True


# --- padding rule --------------------------------------------------------------------------------

@pytest.mark.parametrize("size,pad_to,multiple,expected", [
    ((800, 1312), None, 0, (800, 1312)),
    ((800, 1312), (800, 1344), 0, (800, 1344)),
    ((832, 1312), (800, 1344), 0, (832, 1344)),  # larger than pad_to: keeps its own size
    ((800, 1312), None, 128, (896, 1408)),
    ((800, 1312), (800, 1344), 64, (832, 1344)),
])
def test_bucket_shape(size, pad_to, multiple, expected):
    assert bucket_shape(*size, pad_to=pad_to, multiple=multiple) == expected


@pytest.mark.parametrize("pad_to,multiple,message", [((800,), 0, "pad_to"), ((0, 10), 0, "pad_to"),
                                                      (("a", 1), 0, "pad_to"), (None, -32, "multiple"),
                                                      (None, 1.5, "multiple")])
def test_bad_padding_rules_raise_one_line_user_errors(pad_to, multiple, message):
    with pytest.raises(TrainGraphError, match=message) as err:
        check_padding(pad_to, multiple)
    assert "\n" not in str(err.value)
    with pytest.raises(TrainGraphError):
        GraphedTraining(capacity=0)


def test_pad_bottom_right_adds_zeros_only_below_and_right():
    x = torch.rand(2, 3, 4, 5)
    y = pad_bottom_right(x, (6, 8))
    assert y.shape == (2, 3, 6, 8) and torch.equal(y[..., :4, :5], x)
    assert not y[..., 4:, :].any() and not y[..., :, 5:].any()
    assert pad_bottom_right(x, (4, 5)) is x
    with pytest.raises(ValueError):
        pad_bottom_right(x, (3, 8))


def test_points_on_the_added_padding_get_no_positives_and_the_others_keep_their_targets():
    recipe = load_recipe("nasfcos")
    _, targets = some_batch()
    strides = (8, 16, 32, 64, 128)
    small = [torch.empty(1, 1, -(-96 // s), -(-128 // s)) for s in strides]  # 96 x 128 (multiple of 32)
    large = [torch.empty(1, 1, -(-160 // s), -(-256 // s)) for s in strides]  # padded to 160 x 256
    a, b = (assign_targets(points_for(f, recipe.point_offset), targets, recipe) for f in (small, large))
    pa, pb = points_for(small, recipe.point_offset), points_for(large, recipe.point_offset)
    # the same point (same level and position) must get the same box; points outside the small maps none
    key_a = {(int(l), float(x), float(y)): i for i, (l, (x, y)) in enumerate(zip(pa.levels, pa.xy))}
    shared = torch.zeros(len(pb.xy), dtype=torch.bool)
    for j, (level, (x, y)) in enumerate(zip(pb.levels, pb.xy)):
        i = key_a.get((int(level), float(x), float(y)))
        if i is None:
            continue
        shared[j] = True
        assert torch.equal(a.matched[:, i], b.matched[:, j]) and torch.equal(a.labels[:, i], b.labels[:, j])
    assert a.foreground.any() and not b.foreground[:, ~shared].any()
    assert int(a.foreground.sum()) == int(b.foreground.sum())


def test_extra_padding_changes_the_loss_a_little_so_it_is_opt_in():
    """Not value-neutral (see the module doc): GroupNorm statistics, border receptive fields and the
    focal loss's extra negatives change; the change is small."""
    model = small_detector("fcos").double().train()
    images, targets = some_batch(dtype=torch.float64)
    plain = {k: v.detach() for k, v in model(images, targets).items()}
    preprocess = model.preprocess
    model.preprocess = lambda imgs: (lambda p, s: (pad_bottom_right(p, (128, 192)), s))(*preprocess(imgs))
    padded = {k: v.detach() for k, v in model(images, targets).items()}
    for name in plain:
        rel = abs(float(padded[name]) - float(plain[name])) / abs(float(plain[name]))
        assert rel < 0.05, (name, rel)
    assert any(float(padded[n]) != float(plain[n]) for n in plain)


# --- wiring into FCOS ----------------------------------------------------------------------------

def test_applies_only_on_cuda_in_train_mode_with_autograd():
    model = small_detector("fcos").train()
    assert GraphedTraining.applies(model, CudaLike())
    assert not GraphedTraining.applies(model, torch.zeros(1))  # CPU
    with torch.no_grad():
        assert not GraphedTraining.applies(model, CudaLike())
    with torch.inference_mode():
        assert not GraphedTraining.applies(model, CudaLike())
    assert not GraphedTraining.applies(model.eval(), CudaLike())


class RefusingGraphs(GraphedTraining):
    def run(self, model, padded):
        raise AssertionError("the training graph branch must not run here")


def test_branch_and_padding_are_skipped_on_cpu_in_eval_and_without_grad():
    model = small_detector("fcos")
    model.train_graphs = RefusingGraphs(pad_to=(256, 256))
    images, targets = some_batch()
    losses = model.train()(images, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert model.preprocess(images)[0].shape[-2:] == (96, 128)  # no bucket padding on the CPU
    with torch.no_grad():
        model.eval()(images)


class EagerGraphs(GraphedTraining):
    """Applies everywhere and runs the flat network function eagerly: exercises FCOS's wiring on the CPU."""

    calls = 0

    @staticmethod
    def applies(model, padded):
        return model.training and torch.is_grad_enabled()

    def run(self, model, padded):
        self.calls += 1
        self.shapes = tuple(padded.shape)
        function = NetworkFunction(model)
        flat = function(padded)
        return function.features, function.unflatten(flat)


def test_fcos_uses_the_graph_branch_and_pads_to_the_bucket_where_it_applies():
    model = small_detector("fcos").train()
    graphs = model.train_graphs = EagerGraphs(pad_to=(128, 160))
    images, targets = some_batch()
    losses = model(images, targets)
    assert graphs.calls == 1 and graphs.shapes == (2, 3, 128, 160)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)
    with torch.no_grad():
        model.eval()(images)
    assert graphs.calls == 1
    remove_training_graph(model)
    assert model.train_graphs is None
    assert isinstance(install_training_graph(model, pad_to=(800, 1344)), GraphedTraining)
    assert model.train_graphs.pad_to == (800, 1344)


@pytest.mark.parametrize("arch", ["fcos", "nasfcos"])
def test_network_function_returns_exactly_the_eager_features_and_head_outputs(arch):
    model = small_detector(arch).train()
    padded = torch.rand(2, 3, 96, 128)
    function = NetworkFunction(model)
    torch.manual_seed(3)  # BatchNorm statistics are the only state; same inputs -> same values
    flat = function(padded)
    head_out = function.unflatten(flat)
    features = model.forward_features(padded)
    expected = model.head(features)
    assert len(flat) == 3 * len(features) and function.levels == len(features)
    assert all(torch.equal(a, b) for a, b in zip(function.features, features))
    assert not any(f.requires_grad for f in function.features)
    for key in expected:
        assert len(head_out[key]) == len(expected[key])
        assert all(torch.equal(a, b) for a, b in zip(head_out[key], expected[key]))
    assert {id(p) for p in function.parameters()} == {id(p) for p in model.parameters()}


def test_weights_key_follows_storage_and_requires_grad_not_in_place_updates():
    model = small_detector("fcos")
    key = GraphedTraining.weights_key(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # an optimizer step: graphs read the storage, still valid
    assert GraphedTraining.weights_key(model) == key
    model.head.cls_logits.bias.data = model.head.cls_logits.bias.data.clone()  # new storage
    moved = GraphedTraining.weights_key(model)
    assert moved != key
    model.head.cls_logits.bias.requires_grad_(False)
    assert GraphedTraining.weights_key(model) != moved
    model.head.cls_logits.bias.requires_grad_(True)
    frozen = next(m for m in model.modules() if type(m).__name__.endswith("FrozenBatchNorm2d"))
    frozen.running_mean.add_(0.0)  # its scale/shift are cached outside the graph
    assert GraphedTraining.weights_key(model) != moved


def test_external_tensor_recorder_keeps_what_the_capture_reads_but_did_not_make():
    cached = torch.rand(4)
    recorder = ExternalTensors(capturing=lambda: True)
    with recorder:
        made = torch.ones(4) * 2.0
        out = made + cached
        view = out.view(2, 2)
        view.sum()
    kept = list(recorder.read.values())
    assert any(t.untyped_storage().data_ptr() == cached.untyped_storage().data_ptr() for t in kept)
    assert not any(t.untyped_storage().data_ptr() in (made.untyped_storage().data_ptr(),
                                                       out.untyped_storage().data_ptr()) for t in kept)
    idle = ExternalTensors(capturing=lambda: False)
    with idle:
        cached * 2
    assert not idle.read and not idle.made


def test_set_grads_are_replaced_by_copies_before_a_replay():
    model = small_detector("fcos")
    param = model.head.cls_logits.bias
    grad = torch.ones_like(param)
    param.grad = grad
    _detach_live_grads(model)
    assert param.grad is not grad and torch.equal(param.grad, grad)
    assert param.grad.data_ptr() != grad.data_ptr()


# --- bench options -------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [(False, (False,)), (True, (True,)), ("both", (False, True)),
                                            ("true", (True,)), ("False", (False,))])
def test_graph_modes(value, expected):
    assert parse_graph_modes(value) == expected


def test_bench_rows_for_graph_modes_and_the_reference_arch():
    variants = default_variants(resolve_arch("nasfcos"), deform_impls=("fast",), cuda_graph="both", also_arch="fcos")
    named = [(v.name, v.cuda_graph, v.arch, v.infer) for v in variants]
    assert named == [("torchvision fcos (frozen_bn)", False, None, True),
                     ("ours (all fast paths, dcn=fast)", False, None, True),
                     ("ours (all fast paths, dcn=fast, train graph)", True, None, False),
                     ("ours fcos (all fast paths)", False, "fcos", True),
                     ("ours fcos (all fast paths, train graph)", True, "fcos", False)]
    only = default_variants(resolve_arch("fcos"), cuda_graph=True, torchvision_layouts=("none",))
    assert [(v.name, v.cuda_graph, v.infer) for v in only] == [("ours (all fast paths, train graph)", True, True)]
    assert train_graph_pad_to(BenchSettings()) == (800, 1344)


def test_arch_ratios_pair_rows_with_the_same_graph_mode():
    rows = [{"name": "torchvision", "model": "torchvision", "train_images_per_s": 50.0},
            {"name": "a", "model": "ours", "cuda_graph": False, "train_images_per_s": 60.0},
            {"name": "a graph", "model": "ours", "cuda_graph": True, "train_images_per_s": 90.0},
            {"name": "b", "model": "ours", "cuda_graph": False, "reference_arch": True, "train_images_per_s": 120.0},
            {"name": "b graph", "model": "ours", "cuda_graph": True, "reference_arch": True,
             "train_images_per_s": 150.0}]
    assert arch_ratios(rows) == {"a": 0.5, "a graph": 0.6}


def test_bench_settings_read_cuda_graph_and_also_arch():
    _, options = settings_from_cfg({"device": "cpu", "bench": {"cuda_graph": "both", "also_arch": "fcos"}})
    assert options["cuda_graph"] == "both" and options["also_arch"] == "fcos"
    _, options = settings_from_cfg({"device": "cpu", "bench": {}})
    assert options["cuda_graph"] is False and options["also_arch"] is None
    with pytest.raises(BenchError, match="bench.cuda_graph"):
        settings_from_cfg({"device": "cpu", "bench": {"cuda_graph": "sometimes"}})


@pytest.mark.parametrize("override,message", [("bench.cuda_graph=sometimes", "bench.cuda_graph"),
                                              ("bench.also_arch=nosuch", "nosuch")])
def test_bad_graph_options_exit_2_with_one_line(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dispatch("detector", "train", COMMANDS, ["bench", "device=cpu", "bench.quick=true", override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_quick_bench_measures_eager_and_graphed_rows_in_one_process(capsys):
    from detector.commands.bench import bench_command
    from detector.cli import compose

    cfg = compose("bench", ["arch=fcos", "device=cpu", "bench.quick=true", "format=json", "bench.cuda_graph=both",
                            "bench.torchvision=none", "bench.self_check=false", "bench.also_arch=fcos"])
    result = bench_command(cfg)
    names = [row["name"] for row in result["rows"]]
    assert names == ["ours (all fast paths)", "ours (all fast paths, train graph)", "ours fcos (all fast paths)",
                     "ours fcos (all fast paths, train graph)"]
    graphed = result["rows"][1]
    assert graphed["cuda_graph"] and graphed["train_graph"]["captures"] == 0  # CPU: never applies
    assert "never applied" in graphed["train_graph_note"]
    assert set(result["arch_ratios"]) == {"ours (all fast paths)", "ours (all fast paths, train graph)"}


# --- GPU -----------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _losses_and_grads(model, batches, bf16, zero=True):
    """Forward + backward over ``batches`` (gradients accumulate across them); losses of the last."""
    if zero:
        for p in model.parameters():
            p.grad = None
    for images, targets in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            losses = model(images, targets)
        sum(losses.values()).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


def _check_close(eager, graphed, tol):
    (loss_e, grad_e), (loss_g, grad_g) = eager, graphed
    assert grad_e.keys() == grad_g.keys()
    for k in loss_e:
        assert abs(loss_e[k] - loss_g[k]) <= tol * max(1.0, abs(loss_e[k])), (k, loss_e[k], loss_g[k])
    total = sum(float(g.norm()) ** 2 for g in grad_e.values()) ** 0.5
    diff = sum(float((grad_e[n] - grad_g[n]).norm()) ** 2 for n in grad_e) ** 0.5
    assert diff <= tol * total, (diff, total)


def _graphed_vs_eager(arch, fast, norm, bf16, tol, steps=3, micro_batches=1, zero_in_place=False):
    """``steps`` SGD steps of a graphed model; before each, an eager copy with the same weights computes
    the same step: losses and gradients must agree at every step (no trajectory drift to compare)."""
    batch = some_batch("cuda")
    eager_model = small_detector(arch, fast, norm).cuda().to(memory_format=torch.channels_last).train()
    graphed_model = small_detector(arch, fast, norm).cuda().to(memory_format=torch.channels_last).train()
    graphs = install_training_graph(graphed_model)
    optimizer = torch.optim.SGD([p for p in graphed_model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for _ in range(steps):
        eager_model.load_state_dict(graphed_model.state_dict())
        eager = _losses_and_grads(eager_model, [batch] * micro_batches, bf16)
        if zero_in_place:
            optimizer.zero_grad(set_to_none=False)
        graphed = _losses_and_grads(graphed_model, [batch] * micro_batches, bf16, zero=not zero_in_place)
        _check_close(eager, graphed, tol)
        optimizer.step()
    assert not graphs.failures and graphs.captures == 1 and len(graphs) == 1, graphs.failures


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch,fast,bf16,norm", [("nasfcos", True, True, "frozen_bn"),
                                                  ("nasfcos", True, False, "frozen_bn"),
                                                  ("nasfcos", False, False, "bn"), ("fcos", True, True, "frozen_bn")])
def test_graphed_training_steps_match_eager_steps(arch, fast, bf16, norm):
    # bf16: the graph casts each weight per use (autocast cache off) and sums the per-level head
    # gradients in float32, eager sums them in bf16 behind one cached cast: ~1e-3 apart
    _graphed_vs_eager(arch, fast, norm, bf16, 3e-2 if bf16 else 2e-3)


@pytest.mark.gpu
@needs_cuda
def test_graphed_gradients_accumulate_over_micro_batches_and_in_place_zeroing():
    _graphed_vs_eager("fcos", True, "frozen_bn", False, 2e-3, micro_batches=2)
    _graphed_vs_eager("fcos", True, "frozen_bn", False, 2e-3, zero_in_place=True)


@pytest.mark.gpu
@needs_cuda
def test_a_shape_change_recaptures_and_padding_keeps_one_graph():
    model = small_detector("fcos", True).cuda().train()
    graphs = install_training_graph(model)
    images, targets = some_batch("cuda")
    model(images, targets)
    model([im[:, :64, :64] for im in images], [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]], device="cuda"),
                                                 "labels": torch.tensor([1], device="cuda")}] * 2)
    assert graphs.captures == 2 and len(graphs) == 1
    padded = install_training_graph(model, pad_to=(96, 128))
    model(images, targets)
    model([im[:, :64, :64] for im in images], [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]], device="cuda"),
                                                 "labels": torch.tensor([1], device="cuda")}] * 2)
    assert padded.captures == 1 and not padded.failures


@pytest.mark.gpu
@needs_cuda
def test_a_failing_capture_falls_back_to_eager_and_records_why():
    model = small_detector("fcos", True).cuda().train()
    graphs = install_training_graph(model)
    head_forward = model.head.forward

    def syncing_head(features):
        if float(features[0].detach().sum()) == float("nan"):  # a host read: not capturable
            pass
        return head_forward(features)

    model.head.forward = syncing_head
    images, targets = some_batch("cuda")
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert len(graphs.failures) == 1 and len(graphs) == 0
    assert all(torch.isfinite(v) for v in losses.values())
    again = model(images, targets)  # the failed key stays eager
    assert len(graphs.failures) == 1 and all(torch.isfinite(v) for v in again.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_check_script_refuses_to_run_without_a_gpu(capsys):
    from experiment_scripts import load_experiment

    assert load_experiment("check_train_graph").main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
