"""One trial on cached features: statuses, determinism, reward, reporting, fault injection, building.

A tiny synthetic dataset is prepared once (ResNet-18 at random init, 96 px); every trial trains a
real decoder (width 32) for a few iterations on CPU and scores it with pycocotools.
"""
import dataclasses
import math
import pickle
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from detector.cli import CONF_DIR, compose
from detector.model.recipe import Recipe
from detector.model.backbone import ShapeSpec
from detector.arch.zoo import resolve_arch, zoo_arch
from experiment_scripts import load_experiment
from proxy_eval import cached as cached_module
from proxy_eval.toy import ToyProxy
from proxy_eval.build import build_evaluator
from proxy_eval.settings import BackboneSpec, PrepareSettings
from proxy_eval.prepare import prepare_features
from proxy_eval.result import FLOOR_REWARD
from proxy_eval.cached import CachedEvaluator
from proxy_eval.settings import TrialSettings
from detector.model.cost import decoder_cost
from proxy_eval.result import injected_failure

RECIPE = Recipe.from_cfg(OmegaConf.load(CONF_DIR / "recipe" / "nasfcos.yaml"))
SETTINGS = TrialSettings(iters=3, batch_size=4, lr=0.01, warmup_iters=1, width=32, eval_batch_size=8,
                         report_every=1, device="cpu")
DCN_CODE = ("fpn:c3-c5-dcn-sep3-sum/c4-c5-skip-dcn-cat/c5-c4-sep3d3-skip-sum/c3-b0-dcn-skip-sum"
            "+head:s1-dcn-conv3-sep3-conv1-skip-dcn")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_synthetic_root):
    root = tiny_synthetic_root
    settings = PrepareSettings(train_images=12, val_images=6, resolution=96, width=32, adapt_iters=1,
                               adapt_batch_size=4)
    data_cfg = {"name": "synthetic", "root": str(root), "train_split": "train", "val_split": "val", "num_classes": 6}
    cache = prepare_features(settings, data_cfg, BackboneSpec("resnet18"), RECIPE, 6,
                             cache_dir=tmp_path_factory.mktemp("cache"))
    return root, cache


def evaluator(cache, **changes) -> CachedEvaluator:
    return CachedEvaluator(cache.path, dataclasses.replace(SETTINGS, **changes), RECIPE)


def test_a_trial_returns_ok_with_finite_reward_decoder_cost_and_reports(prepared):
    _, cache = prepared
    reports = []
    result = evaluator(cache).evaluate(zoo_arch("fcos"), seed=0, report=reports.append)
    assert result.status == "ok", result.error
    assert math.isfinite(result.reward) and result.reward == result.ap and 0 <= result.ap <= 1
    assert math.isfinite(result.loss) and result.loss > 0
    assert result.params > 0 and result.gflops > 0 and 0 < result.seconds < 60
    assert [r["iteration"] for r in reports] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in reports)


def test_each_report_carries_the_mean_loss_since_the_previous_report(prepared):
    _, cache = prepared
    every, pairs = [], []
    evaluator(cache).evaluate(zoo_arch("fcos"), seed=0, report=every.append)
    losses = [r["loss"] for r in every]
    assert [r["loss_window"] for r in every] == pytest.approx(losses)
    evaluator(cache, report_every=2).evaluate(zoo_arch("fcos"), seed=0, report=pairs.append)
    assert [r["iteration"] for r in pairs] == [2, 3]
    assert [r["loss_window"] for r in pairs] == pytest.approx([(losses[0] + losses[1]) / 2, losses[2]], rel=1e-5)


def test_a_deformable_code_trains_on_cpu(prepared):
    _, cache = prepared
    result = evaluator(cache, iters=2).evaluate(DCN_CODE, seed=1)
    assert result.status == "ok", result.error
    assert result.params > 0
    without_dcn = resolve_arch(DCN_CODE.replace("dcn", "sep3"), num_blocks=None, num_head_layers=None)
    shapes = {"c3": ShapeSpec(128, 8), "c4": ShapeSpec(256, 16), "c5": ShapeSpec(512, 32)}
    _, sep_gflops = decoder_cost(without_dcn, shapes, 6, RECIPE, 32, 96)
    assert result.gflops > sep_gflops > 0  # deformable convolutions are counted (like dense 3x3 convs)


def test_same_seed_gives_the_same_result_and_another_seed_another(prepared):
    _, cache = prepared
    first = evaluator(cache, reward="neg_loss").evaluate("fcos", seed=5)
    again = evaluator(cache, reward="neg_loss").evaluate("fcos", seed=5)
    other = evaluator(cache, reward="neg_loss").evaluate("fcos", seed=6)
    assert first.status == again.status == other.status == "ok"
    assert first.reward == again.reward and first.ap == again.ap and first.loss == again.loss
    assert other.loss != first.loss


def test_neg_loss_reward_ranks_like_minus_the_loss_and_above_the_failure_floor(prepared):
    _, cache = prepared
    result = evaluator(cache, reward="neg_loss").evaluate("fcos", seed=0)
    assert result.status == "ok" and result.reward == pytest.approx(math.exp(-result.loss))
    assert result.reward > FLOOR_REWARD  # a failed trial must never outrank a finished one


def test_training_lowers_the_validation_loss(prepared):
    _, cache = prepared
    short = evaluator(cache, iters=1, warmup_iters=0).evaluate("fcos", seed=0)
    longer = evaluator(cache, iters=15, warmup_iters=0, lr=0.02).evaluate("fcos", seed=0)
    assert longer.loss < short.loss


def test_injected_nan_gives_diverged(prepared):
    _, cache = prepared
    reports = []
    result = evaluator(cache, inject_nan=1).evaluate("fcos", seed=0, report=reports.append)
    assert result.status == "diverged" and "iteration 1" in result.error
    assert result.reward == 0.0 and result.params > 0
    assert [r["iteration"] for r in reports] == [1]  # stopped at the NaN


def test_injected_failure_gives_error(prepared):
    _, cache = prepared
    result = evaluator(cache, fail_prob=1.0).evaluate("fcos", seed=0)
    assert result.status == "error" and "injected failure" in result.error


def test_fault_injection_is_seeded_by_seed_and_arch():
    arch = zoo_arch("nasfcos")
    outcomes = [injected_failure(seed, arch, 0.5) for seed in range(40)]
    assert outcomes == [injected_failure(seed, arch, 0.5) for seed in range(40)]
    assert 5 < sum(outcomes) < 35
    assert not any(injected_failure(seed, arch, 0.0) for seed in range(40))


def test_time_limit_gives_timeout(prepared):
    _, cache = prepared
    result = evaluator(cache, timeout_s=1e-6).evaluate("fcos", seed=0)
    assert result.status == "timeout" and "timeout_s" in result.error


def test_out_of_memory_gives_oom(prepared, monkeypatch):
    _, cache = prepared

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cached_module, "build_decoder", out_of_memory)
    result = evaluator(cache).evaluate("fcos", seed=0)
    assert result.status == "oom" and "out of memory" in result.error


def test_a_bad_code_or_a_corrupt_cache_gives_error_not_an_exception(prepared, tmp_path):
    _, cache = prepared
    bad = evaluator(cache).evaluate("fpn:c3-c9-skip-skip-sum+head:fcos")
    assert bad.status == "error" and "c9" in bad.error
    copy = tmp_path / cache.path.name
    shutil.copytree(cache.path, copy)
    tensor_file = copy / cache.tensor_file.name
    data = bytearray(tensor_file.read_bytes())
    data[len(data) // 3] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    broken = CachedEvaluator(copy, SETTINGS, RECIPE).evaluate("fcos")
    assert broken.status == "error" and "sha256" in broken.error


def test_the_evaluator_survives_pickling_without_its_features(prepared):
    _, cache = prepared
    original = evaluator(cache)
    assert original.evaluate("fcos", seed=2).ok  # loads features into the instance
    payload = pickle.dumps(original)
    assert len(payload) < 10_000  # settings and a path, not tensors
    copy = pickle.loads(payload)
    assert copy.evaluate("fcos", seed=2).reward == original.evaluate("fcos", seed=2).reward


def test_build_evaluator_reads_the_cached_config(prepared, tmp_path):
    root, cache = prepared
    cfg = compose("search", [f"data.root={root}", f"cache_dir={tmp_path}", "backbone.weights=none",
                             "device=cpu", "reward=neg_loss", "proxy_eval=cached", "proxy_eval.iters=2",
                             "proxy_eval.batch_size=4", "proxy_eval.width=32", "proxy_eval.inject_nan=0"])
    built = build_evaluator(cfg, cache=cache)
    assert isinstance(built, CachedEvaluator)
    assert built.settings.reward == "neg_loss" and built.settings.iters == 2 and built.settings.width == 32
    assert built.evaluate("fcos").status == "diverged"


def test_toy_proxy_follows_the_contract_and_injects_faults():
    cfg = compose("search", ["proxy_eval=toy"])
    toy = build_evaluator(cfg)
    assert isinstance(toy, ToyProxy)
    fpn_stage = "nasfcos-fpn"  # a searched FPN with the fixed FCOS head: scored in the fpn stage's space
    reports = []
    result = toy.evaluate(fpn_stage, seed=0, report=reports.append)
    assert result.ok and 0 <= result.reward <= 1 and reports == [{"iteration": 1, "loss": result.loss}]
    assert toy.evaluate(fpn_stage, seed=0).reward == result.reward
    failing = build_evaluator(compose("search", ["proxy_eval=toy", "proxy_eval.fail_prob=1.0"]))
    assert failing.evaluate(fpn_stage).status == "error"
    nan = build_evaluator(compose("search", ["proxy_eval=toy", "proxy_eval.inject_nan=3"]))
    assert nan.evaluate(fpn_stage).status == "diverged"


def test_the_benchmark_reads_the_coco_proxy_settings_like_hydra():
    """experiments/bench_proxy.py parses conf/proxy_eval/coco.yaml without omegaconf; it must agree."""
    bench = load_experiment("bench_proxy")
    flat, resolution, val_images = bench.trial_settings(
        bench.read_flat_yaml(CONF_DIR / "proxy_eval" / "coco.yaml"), "cuda", quick=False)
    cfg = compose("search", ["proxy_eval=coco", "device=cuda"])
    from proxy_eval.settings import trial_settings

    assert flat == trial_settings(cfg)
    assert (resolution, val_images) == (cfg.proxy_eval.resolution, cfg.proxy_eval.val_images) == (384, 500)
    assert Recipe.from_cfg(bench.read_flat_yaml(CONF_DIR / "recipe" / "nasfcos.yaml")) == RECIPE
