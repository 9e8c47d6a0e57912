"""The end-to-end proxy (proxy_eval=end_to_end): whole detectors trained on the proxy split.

A tiny synthetic dataset is written once; every trial builds a real FCOS (ResNet-18 at random
init, width 32), trains it for a few iterations on CPU and scores it on proxy-val with pycocotools.
"""
import dataclasses
import math
import pickle

import pytest
import torch

from detector.cli import compose
from detector.errors import UserError
from proxy_eval import end_to_end
from proxy_eval.build import build_evaluator, prepare_proxy
from proxy_eval.end_to_end import EndToEndData, EndToEndEvaluator, prepare_data
from proxy_eval.result import FLOOR_REWARD
from proxy_eval.splits import SplitError

DCN_CODE = ("fpn:c3-c5-dcn-sep3-sum/c4-c5-skip-dcn-cat/c5-c4-sep3d3-skip-sum/c3-b0-dcn-skip-sum"
            "+head:s1-dcn-conv3-sep3-conv1-skip-dcn")


@pytest.fixture(scope="module")
def data_root(tiny_synthetic_root):
    return tiny_synthetic_root


def config(root, *overrides):
    return compose("search", [f"data.root={root}", "proxy_eval=end_to_end", "device=cpu", "model.width=32",
                              "proxy_eval.train_images=12", "proxy_eval.val_images=6", "proxy_eval.iters=3",
                              "proxy_eval.batch_size=4", "proxy_eval.warmup_iters=1", "proxy_eval.report_every=1",
                              "proxy_eval.eval_batch_size=8", "proxy_eval.cost_resolution=96", *overrides])


@pytest.fixture(scope="module")
def evaluator(data_root):
    return build_evaluator(config(data_root))


def changed(evaluator: EndToEndEvaluator, **settings) -> EndToEndEvaluator:
    return EndToEndEvaluator(evaluator.data, evaluator.model, dataclasses.replace(evaluator.settings, **settings),
                             cost_resolution=evaluator.cost_resolution)


def test_a_trial_trains_the_whole_detector_and_scores_it_with_coco_ap(evaluator, monkeypatch):
    trained = []
    real = end_to_end.train_detector
    monkeypatch.setattr(end_to_end, "train_detector", lambda model, *a, **k: trained.append(model) or real(model, *a, **k))
    reports = []
    result = evaluator.evaluate("fcos", seed=0, report=reports.append)
    assert result.status == "ok", result.error
    assert 0 <= result.ap <= 1
    assert result.reward == pytest.approx(math.exp(-result.loss))  # reward=auto: this proxy's loss (ranked best)
    assert math.isfinite(result.loss) and result.loss > 0 and math.isfinite(result.extra["train_loss"])
    assert result.params > 0 and result.gflops > 0
    assert [r["iteration"] for r in reports] == [1, 2, 3]
    model = trained[0]
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    assert backbone_params, "the end-to-end proxy must train backbone parameters"
    assert all(p.grad is not None for p in backbone_params[-3:])  # the last backbone layers got gradients


def test_each_report_carries_the_mean_loss_since_the_previous_report(evaluator):
    every = []
    evaluator.evaluate("fcos", seed=0, report=every.append)  # report_every=1: each iteration's loss
    losses = [r["loss"] for r in every]
    assert [r["loss_window"] for r in every] == pytest.approx(losses)
    pairs = []
    changed(evaluator, report_every=2).evaluate("fcos", seed=0, report=pairs.append)  # reports at 2 and 3
    assert [r["iteration"] for r in pairs] == [2, 3]
    assert [r["loss"] for r in pairs] == pytest.approx(losses[1:], rel=1e-5)
    assert [r["loss_window"] for r in pairs] == pytest.approx([(losses[0] + losses[1]) / 2, losses[2]], rel=1e-5)


def test_a_trial_records_where_its_setup_went_and_opens_the_datasets_once_per_process(evaluator):
    fresh = changed(evaluator)  # nothing opened yet
    first, second = fresh.evaluate("fcos", seed=0), fresh.evaluate("fcos", seed=1)
    assert first.status == second.status == "ok"
    for result in (first, second):
        assert set(result.extra["setup_seconds"]) == {"data", "build"}
        assert result.extra["setup_seconds"]["build"] > 0
    assert second.extra["setup_seconds"]["data"] < first.extra["setup_seconds"]["data"]  # reused, not reopened


def test_splits_come_from_the_training_split_only_and_are_disjoint(evaluator):
    from detector.data.coco import CocoDetection, split_paths
    from pathlib import Path

    splits = evaluator.data.splits
    assert len(splits.train_ids) == 12 and len(splits.val_ids) == 6
    assert not set(splits.train_ids) & set(splits.val_ids)
    image_dir, ann_file = split_paths(evaluator.data.data_cfg, Path(evaluator.data.data_cfg["root"]), "train")
    train_ids = set(CocoDetection(image_dir, ann_file, None).image_ids)
    assert set(splits.train_ids) | set(splits.val_ids) <= train_ids


def test_same_seed_gives_the_same_result_and_another_seed_another(evaluator):
    first = evaluator.evaluate("fcos", seed=3)
    again = evaluator.evaluate("fcos", seed=3)
    other = evaluator.evaluate("fcos", seed=4)
    assert first.status == again.status == other.status == "ok"
    assert (first.ap, first.loss, first.extra["train_loss"]) == (again.ap, again.loss, again.extra["train_loss"])
    assert first.loss != other.loss


def test_the_caller_rng_is_left_alone(evaluator):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluator.evaluate("fcos", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_neg_loss_reward_is_exp_of_minus_the_validation_loss_and_ap_the_coco_ap(evaluator):
    result = changed(evaluator, reward="neg_loss").evaluate("fcos", seed=0)
    assert result.status == "ok"
    assert result.reward == pytest.approx(math.exp(-result.loss)) and result.reward > FLOOR_REWARD
    by_ap = changed(evaluator, reward="ap").evaluate("fcos", seed=0)
    assert by_ap.reward == by_ap.ap


def test_more_training_lowers_the_validation_loss(evaluator):
    short = changed(evaluator, iters=1).evaluate("fcos", seed=0)
    longer = changed(evaluator, iters=12, lr=0.005).evaluate("fcos", seed=0)
    assert short.status == longer.status == "ok"
    assert longer.loss < short.loss


def test_a_deformable_code_trains_end_to_end_on_cpu(evaluator):
    result = changed(evaluator, iters=2).evaluate(DCN_CODE, seed=1)
    assert result.status == "ok", result.error


def test_failures_are_results_not_exceptions(evaluator):
    assert changed(evaluator, inject_nan=1).evaluate("fcos").status == "diverged"
    assert changed(evaluator, fail_prob=1.0).evaluate("fcos").status == "error"
    assert changed(evaluator, timeout_s=1e-6).evaluate("fcos").status == "timeout"
    bad = evaluator.evaluate("fpn:not-a-code")
    assert bad.status == "error" and bad.reward == FLOOR_REWARD and bad.error


def test_out_of_memory_gives_oom(evaluator, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(end_to_end, "train_detector", boom)
    result = evaluator.evaluate("fcos")
    assert result.status == "oom" and "out of memory" in result.error


def test_the_evaluator_pickles_without_its_datasets(evaluator):
    evaluator.evaluate("fcos", seed=0)
    assert evaluator._state is not None
    copy = pickle.loads(pickle.dumps(evaluator))
    assert copy._state is None
    assert copy.evaluate("fcos", seed=3).status == "ok"


def test_prepare_proxy_checks_split_sizes_before_any_trial(data_root):
    prepared = prepare_proxy(config(data_root))
    assert isinstance(prepared, EndToEndData) and len(prepared.splits.val_ids) == 6
    with pytest.raises(SplitError, match="exceed the 20 images"):
        prepare_proxy(config(data_root, "proxy_eval.train_images=18"))


def test_cached_only_settings_are_refused(data_root):
    with pytest.raises(UserError, match="train_last_stage"):
        build_evaluator(config(data_root, "+proxy_eval.train_last_stage=true"))


def test_prepare_data_generates_the_embedded_dataset(tmp_path):
    data_cfg = {"name": "synthetic", "root": None, "train_split": "train", "val_split": "val", "num_classes": 6,
                "image_dir": "{split}", "ann_file": "annotations/instances_{split}.json", "num_train": 8, "num_val": 2,
                "seed": 0, "image_min_side": 64, "image_max_side": 64, "large_every": 0, "large_max_side": 64,
                "max_objects": 2, "min_object_size": 8, "image_format": "jpg"}
    data = prepare_data(data_cfg, str(tmp_path), train_images=None, val_images=3, split_seed=1)
    assert len(data.splits.train_ids) == 5 and len(data.splits.val_ids) == 3
    assert (tmp_path / "synthetic").is_dir()


def test_a_search_with_the_end_to_end_proxy_runs_real_trials_without_a_feature_cache(data_root, tmp_path):
    from search.history import read_history
    from search.run import run_command

    run_dir = tmp_path / "run"
    cfg = config(data_root, "executor=local", "search.budget=2", "search.stages=[fpn]", "search.workers=1",
                 f"search.run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}", "proxy_eval.iters=2")
    run_command(cfg)
    rows = read_history(run_dir / "history.jsonl").rows
    assert len(rows) == 2 and all(row["status"] == "ok" and row["params"] > 0 for row in rows)
    assert not (tmp_path / "cache").exists()  # no adaptation, no features: the data was given by data.root


def test_the_cached_proxy_on_a_gpu_gets_a_warning_and_the_end_to_end_one_does_not(data_root, monkeypatch, caplog):
    import proxy_eval.build
    import proxy_eval.settings
    import search.run

    monkeypatch.setattr(proxy_eval.settings, "resolve_device", lambda value: "cuda")
    monkeypatch.setattr(proxy_eval.build, "prepare_proxy", lambda cfg: None)
    with caplog.at_level("WARNING", logger="search.run"):
        search.run._prepare(compose("search", ["proxy_eval=cached"]))
        assert search.run.CACHED_ON_GPU in caplog.text
        caplog.clear()
        search.run._prepare(config(data_root))
        assert search.run.CACHED_ON_GPU not in caplog.text


def test_cuda_graph_settings_are_read_checked_and_pad_to_the_datas_largest_side(data_root):
    settings = build_evaluator(config(data_root)).settings
    assert settings.cuda_graph is False and settings.cuda_graph_pad is None  # opt-in
    with pytest.raises(UserError, match="cuda_graph=true needs CUDA trials"):
        build_evaluator(config(data_root, "proxy_eval.cuda_graph=true"))  # device=cpu
    with pytest.raises(UserError, match="cuda_graph=.maybe."):
        build_evaluator(config(data_root, "device=auto", "proxy_eval.cuda_graph=maybe"))
    with pytest.raises(UserError, match=r"cuda_graph_pad=\[0, 64\]"):
        build_evaluator(config(data_root, "device=auto", "proxy_eval.cuda_graph_pad=[0,64]"))
    graphed = build_evaluator(config(data_root, "device=auto", "proxy_eval.cuda_graph=true"))
    side = graphed.data.data_cfg["image_max_side"]
    assert graphed.graph_pad() == (math.ceil(side / 32) * 32,) * 2  # one shape holds every batch
    padded = build_evaluator(config(data_root, "device=auto", "proxy_eval.cuda_graph=true",
                                    "proxy_eval.cuda_graph_pad=[96,160]"))
    assert padded.graph_pad() == (96, 160)


@pytest.mark.skipif(torch.cuda.is_available(), reason="device=auto picks the GPU here")
def test_cuda_graph_on_a_machine_without_a_gpu_trains_eagerly(evaluator, monkeypatch):
    """device=auto on a CPU-only worker: the option installs no graph and the trial runs as without it."""
    built = []
    real = EndToEndEvaluator._build
    monkeypatch.setattr(EndToEndEvaluator, "_build", lambda self, *a: built.append(real(self, *a)) or built[-1])
    result = changed(evaluator, cuda_graph=True, device="auto").evaluate("fcos", seed=0)
    assert result.status == "ok", result.error
    assert getattr(built[0], "train_graphs", None) is None and "cuda_graph_captures" not in result.extra
    assert result.loss == changed(evaluator, device="auto").evaluate("fcos", seed=0).loss


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_trial_with_cuda_graph_trains_from_one_captured_graph(data_root, monkeypatch):
    built = []
    real = EndToEndEvaluator._build
    monkeypatch.setattr(EndToEndEvaluator, "_build", lambda self, *a: built.append(real(self, *a)) or built[-1])
    evaluator = build_evaluator(config(data_root, "device=cuda", "proxy_eval.cuda_graph=true", "proxy_eval.iters=6"))
    result = evaluator.evaluate("fcos", seed=0)
    assert result.status == "ok", result.error
    # one capture, no failure: every batch padded to one shape; recorded in the result (and history)
    assert (result.extra["cuda_graph_captures"], result.extra["cuda_graph_failures"]) == (1, 0)
    assert built[0].train_graphs is None  # the graph's memory pool is freed when training ends
    eager = build_evaluator(config(data_root, "device=cuda", "proxy_eval.iters=6")).evaluate("fcos", seed=0)
    assert result.loss == pytest.approx(eager.loss, rel=0.1)  # the same training, up to kernel rounding


def test_the_default_graph_pad_holds_every_training_batch_so_one_capture_serves_a_trial(data_root):
    """The padding rule's premise: no training batch of the proxy (after the loader's transforms and
    FCOS's padding to a multiple of 32) is larger than graph_pad(), so the shape never changes."""
    from detector.data.stream import build_train_stream
    from detector.data.transforms import pad_batch

    # the tiny dataset's images are 64-96 px: the data config says so, as the embedded one says 128
    graphed = build_evaluator(config(data_root, "device=auto", "proxy_eval.cuda_graph=true", "data.image_max_side=96"))
    pad_h, pad_w = graphed.graph_pad()
    assert (pad_h, pad_w) == (96, 96)
    stream = iter(build_train_stream(graphed._loaded()["train"], 4, 0, 0, 1, 0, 0, pin_memory=False))
    shapes = set()
    for _ in range(12):
        images, _ = next(stream)
        padded, _ = pad_batch([image.float() for image in images], 32)
        shapes.add(tuple(padded.shape[-2:]))
    assert all(h <= pad_h and w <= pad_w for h, w in shapes), (shapes, (pad_h, pad_w))
    assert (pad_h, pad_w) in shapes  # and no larger than needed: some batch fills it
