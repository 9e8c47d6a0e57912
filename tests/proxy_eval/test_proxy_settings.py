"""proxy_eval.settings: the YAML of each proxy kind is the one source of its settings."""
import pytest
import yaml

from detector.cli import compose
from detector.errors import UserError
from proxy_eval.settings import (PROXY_CONF, prepare_arguments, proxy_keys, proxy_name, resolve_reward, toy_arguments,
                                 trial_settings)


@pytest.mark.parametrize("proxy", ["cached", "end_to_end", "coco"])
def test_trial_settings_take_every_value_from_the_proxy_yaml(proxy):
    cfg = compose("search", [f"proxy_eval={proxy}"])
    values = yaml.safe_load((PROXY_CONF / f"{proxy}.yaml").read_text())
    settings = trial_settings(cfg)
    for key in ("iters", "batch_size", "lr", "momentum", "weight_decay", "warmup_iters", "clip_grad", "amp",
                "eval_batch_size", "timeout_s", "report_every", "fail_prob", "deform_impl"):
        assert getattr(settings, key) == values[key], key


def test_cached_prepare_settings_come_from_the_yaml_too():
    cfg = compose("search", ["proxy_eval=cached"])
    values = yaml.safe_load((PROXY_CONF / "cached.yaml").read_text())
    settings = prepare_arguments(cfg)["settings"]
    for key in ("train_images", "val_images", "split_seed", "resolution", "adapt_iters", "adapt_batch_size",
                "adapt_lr", "min_box_size", "extract_batch_size", "workers", "train_last_stage"):
        assert getattr(settings, key) == values[key], key


def test_toy_arguments_come_from_the_yaml():
    cfg = compose("search", ["proxy_eval=toy"])
    values = yaml.safe_load((PROXY_CONF / "toy.yaml").read_text())
    arguments = toy_arguments(cfg)
    assert {k: arguments[k] for k in ("target_seed", "noise", "seed", "weight_spread", "fail_prob", "sleep_s")} == \
        {k: values[k] for k in ("target_seed", "noise", "seed", "weight_spread", "fail_prob", "sleep_s")}


@pytest.mark.parametrize("proxy,override,message", [
    ("cached", "+proxy_eval.iterations=10", r"proxy_eval\.iterations: not a setting of the 'cached' proxy; its settings are name, "),
    ("toy", "+proxy_eval.iters=10", r"proxy_eval\.iters: not a setting of the 'toy' proxy"),
    ("end_to_end", "+proxy_eval.adapt_iters=5", r"proxy_eval\.adapt_iters: not a setting of the 'end_to_end' proxy"),
    ("cached", "~proxy_eval.warmup_iters", r"proxy_eval\.warmup_iters is missing; a 'cached' proxy needs every key"),
    ("cached", "proxy_eval.name=mystery", r"proxy_eval\.name=mystery: choose one of cached, end_to_end, toy"),
])
def test_unknown_or_missing_proxy_keys_are_refused_naming_the_valid_ones(proxy, override, message):
    cfg = compose("search", [f"proxy_eval={proxy}", override])
    with pytest.raises(UserError, match=message):
        proxy_name(cfg)


def test_every_proxy_yaml_declares_the_keys_of_its_kind():
    for path in PROXY_CONF.glob("*.yaml"):
        values = yaml.safe_load(path.read_text())
        assert set(values) == set(proxy_keys(values["name"])), path.name


@pytest.mark.parametrize("overrides, reward", [
    ([], "ap"),                                                  # the cached proxy: its AP ranked no worse
    (["proxy_eval=end_to_end"], "neg_loss"),                     # end to end: the loss ranked better on both instances
    (["proxy_eval=end_to_end", "reward=ap"], "ap"),              # a reward given is kept
    (["proxy_eval=cached", "reward=neg_loss"], "neg_loss"),
    (["proxy_eval=end_to_end", "search.objective=ap_at_latency"], "ap"),  # that objective multiplies the AP
])
def test_reward_auto_picks_the_reward_that_ranked_best_for_the_proxy(overrides, reward):
    cfg = compose("search", overrides)
    assert cfg.reward == "auto" or "reward=" in " ".join(overrides)
    assert resolve_reward(cfg) == reward
    if "search.objective=ap_at_latency" not in overrides:
        assert trial_settings(cfg).reward == reward


def test_an_unknown_reward_is_refused_with_the_choices():
    with pytest.raises(UserError, match="reward=loss: choose one of auto, ap, neg_loss"):
        trial_settings(compose("search", ["reward=loss"]))
