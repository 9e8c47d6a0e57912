"""proxy_eval.train_last_stage: the adapted ResNet layer4 trains with the decoder, C3/C4 stay cached.

A tiny synthetic dataset (ResNet-18 at random init, 96 px, one adaptation iteration) is prepared
twice, with and without the last stage; trials train real decoders for a few CPU iterations.
"""
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from detector.cli import CONF_DIR, compose
from detector.errors import UserError
from detector.model.recipe import Recipe
from proxy_eval import decoder_training
from proxy_eval.settings import prepare_arguments, trial_settings
from proxy_eval.feature_cache import FeatureCache
from proxy_eval.last_stage import LastStageError, build_last_stage, with_last_stage
from proxy_eval.settings import BackboneSpec, PrepareSettings
from proxy_eval.prepare import prepare_features
from proxy_eval.cached import CachedEvaluator
from proxy_eval.settings import TrialSettings

RECIPE = Recipe.from_cfg(OmegaConf.load(CONF_DIR / "recipe" / "nasfcos.yaml"))
PREPARE = PrepareSettings(train_images=12, val_images=6, resolution=96, width=32, adapt_iters=1, adapt_batch_size=4)
TRIAL = TrialSettings(iters=4, batch_size=4, lr=0.02, warmup_iters=1, width=32, eval_batch_size=8, device="cpu",
                      train_last_stage=True)


def data_cfg(root):
    return {"name": "synthetic", "root": str(root), "train_split": "train", "val_split": "val", "num_classes": 6}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_synthetic_root):
    """(data root, cache dir, plain cache, cache with the last stage)."""
    root = tiny_synthetic_root
    cache_dir = tmp_path_factory.mktemp("cache")
    plain = prepare_features(PREPARE, data_cfg(root), BackboneSpec("resnet18"), RECIPE, 6, cache_dir=cache_dir)
    with_stage = prepare_features(dataclasses.replace(PREPARE, train_last_stage=True), data_cfg(root),
                                  BackboneSpec("resnet18"), RECIPE, 6, cache_dir=cache_dir)
    return root, cache_dir, plain, with_stage


def test_the_last_stage_is_in_the_cache_key_and_the_plain_cache_has_none(caches):
    _, _, plain, with_stage = caches
    assert plain.key != with_stage.key
    assert "last_stage" not in plain.meta()["material"]  # old caches keep their key
    assert with_stage.meta()["material"]["last_stage"] is True
    assert plain.load().last_stage is None
    stored = with_stage.load().last_stage
    assert stored["backbone"] == "resnet18" and stored["input"] == "c4" and stored["output"] == "c5"
    assert with_stage.meta()["last_stage_params"] == sum(t.numel() for t in stored["state"].values()) > 1_000_000


def test_both_caches_hold_the_same_features(caches):
    _, _, plain, with_stage = caches
    a, b = plain.load(), with_stage.load()
    for level in ("c3", "c4", "c5"):
        assert torch.equal(a.train.features[level], b.train.features[level])
        assert torch.equal(a.val.features[level], b.val.features[level])


def test_the_cached_last_stage_maps_cached_c4_to_cached_c5(caches):
    _, _, _, with_stage = caches
    data = with_stage.load()
    stage = build_last_stage(data.last_stage).eval()
    with torch.no_grad():
        c5 = with_last_stage({"c4": data.val.features["c4"].float()}, stage)["c5"]
    cached = data.val.features["c5"].float()
    assert c5.shape == cached.shape
    # cached C5 came from the fp32 C4; here C4 went through fp16 first
    assert torch.allclose(c5, cached, atol=2e-2 * cached.abs().max().item(), rtol=2e-2)


def test_a_trial_trains_layer4_from_the_adapted_weights_on_the_cached_c3_c4(caches, monkeypatch):
    _, _, _, with_stage = caches
    data = with_stage.load()
    adapted = {k: v.clone() for k, v in data.last_stage["state"].items()}
    start_stage = build_last_stage(data.last_stage).train()
    seen, stages = [], []
    original_with_last_stage = decoder_training.with_last_stage

    def spy(features, stage):
        out = original_with_last_stage(features, stage)
        if stage.training:
            with torch.no_grad():
                seen.append({"c3": features["c3"].clone(), "c4": features["c4"].clone(), "c5": out["c5"].clone(),
                             "expected_c5": start_stage(features["c4"]) if not seen else None})
            stages.append(stage)
        return out

    monkeypatch.setattr(decoder_training, "with_last_stage", spy)
    result = CachedEvaluator(with_stage.path, TRIAL, RECIPE).evaluate("fcos", seed=0)
    assert result.status == "ok", result.error
    assert len(seen) == TRIAL.iters and len({id(s) for s in stages}) == 1

    # C3 / C4 fed to the trial are rows of the cached features, unchanged
    cached = {level: data.train.features[level].float() for level in ("c3", "c4")}
    for batch in seen:
        for level in ("c3", "c4"):
            for row in batch[level]:
                assert any(torch.equal(row, other) for other in cached[level])
    # the first iteration's C5 is the adapted layer4 applied to the cached C4
    assert torch.allclose(seen[0]["c5"], seen[0]["expected_c5"], atol=1e-5)
    # later iterations see a layer4 that has moved ...
    trained = stages[0].state_dict()
    changed = [k for k, v in adapted.items() if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert any(k.endswith("conv1.weight") for k in changed)
    # ... while the cache's copy (the start of every trial) has not
    for key, value in data.last_stage["state"].items():
        assert torch.equal(value, adapted[key])


def test_trials_with_the_last_stage_are_deterministic_and_differ_from_frozen_c5(caches):
    _, _, plain, with_stage = caches
    first = CachedEvaluator(with_stage.path, TRIAL, RECIPE).evaluate("fcos", seed=3)
    again = CachedEvaluator(with_stage.path, TRIAL, RECIPE).evaluate("fcos", seed=3)
    frozen = CachedEvaluator(plain.path, dataclasses.replace(TRIAL, train_last_stage=False), RECIPE).evaluate(
        "fcos", seed=3)
    assert first.status == again.status == frozen.status == "ok"
    assert first.loss == again.loss and first.ap == again.ap
    assert first.loss != frozen.loss


def test_the_setting_on_a_cache_without_the_last_stage_is_a_clear_error(caches):
    _, _, plain, _ = caches
    result = CachedEvaluator(plain.path, TRIAL, RECIPE).evaluate("fcos", seed=0)
    assert result.status == "error" and "train_last_stage" in result.error and "no last stage" in result.error


@pytest.mark.parametrize("backbone, words", [
    (BackboneSpec("mobilenet_v2"), "ResNet"),
    (BackboneSpec("resnet18", levels=("c3", "c5")), "c4"),
    (BackboneSpec("resnet18", frozen_stages=4), "frozen_stages"),
])
def test_unsupported_backbones_are_a_user_error_before_any_work(backbone, words, tmp_path):
    settings = dataclasses.replace(PREPARE, train_last_stage=True)
    with pytest.raises(LastStageError, match=words) as info:
        prepare_features(settings, {"name": "synthetic", "root": str(tmp_path / "never-made")}, backbone, RECIPE,
                         6, cache_dir=tmp_path)
    assert isinstance(info.value, UserError) and "train_last_stage" in str(info.value)
    assert not (tmp_path / "never-made").exists() and not list(tmp_path.glob("features/*"))


def test_the_config_key_reaches_prepare_and_trials(caches):
    root, cache_dir, _, with_stage = caches
    base = [f"data.root={root}", f"cache_dir={cache_dir}", "device=cpu"]
    assert compose("search", base).proxy_eval.train_last_stage is False  # the default
    cfg = compose("search", base + ["proxy_eval.train_last_stage=true"])
    assert prepare_arguments(cfg)["settings"].train_last_stage is True
    assert trial_settings(cfg).train_last_stage is True
    with pytest.raises(UserError, match="train_last_stage"):
        trial_settings(compose("search", base + ["proxy_eval.train_last_stage=sometimes"]))
    assert isinstance(FeatureCache(cache_dir / "features", with_stage.key).load().last_stage, dict)
