"""``python -m search run`` picks the end-to-end proxy where a GPU runs the trials and the command
line names no proxy (search/proxy_default.py), and keeps the config's cached proxy otherwise."""
from __future__ import annotations

import pytest

import search.proxy_default as proxy_default
from detector.cli import compose, dispatch


@pytest.fixture
def gpu(monkeypatch):
    """This machine as one with a GPU (device=auto resolves to cuda; a given device passes through)."""
    import proxy_eval.settings

    monkeypatch.setattr(proxy_eval.settings, "resolve_device", lambda value: "cuda" if value in (None, "auto") else value)


def test_on_a_gpu_the_search_without_a_proxy_gets_the_end_to_end_one_and_its_ray_trials_share_the_gpu(gpu):
    # the default executor is Ray with no GPU per trial, which would hide the GPU from the trials
    assert proxy_default.proxy_for_machine([]) == ["proxy_eval=end_to_end", "ray.gpus_per_trial=0.5"]
    assert proxy_default.proxy_for_machine(["search.workers=8"]) == [
        "proxy_eval=end_to_end", "ray.gpus_per_trial=0.125", "search.workers=8"]
    assert proxy_default.proxy_for_machine(["ray.gpus_per_trial=0.25"]) == ["proxy_eval=end_to_end", "ray.gpus_per_trial=0.25"]
    # keys both proxies have (iters, timeout_s) keep the choice, and apply to the end-to-end proxy
    overrides = ["executor=local", "proxy_eval.iters=50", "proxy_eval.timeout_s=900"]
    chosen = proxy_default.proxy_for_machine(overrides)
    assert chosen == ["proxy_eval=end_to_end", *overrides]
    cfg = compose("search", chosen)
    assert (cfg.proxy_eval.name, cfg.proxy_eval.iters, cfg.model.width) == ("end_to_end", 50, 64)


@pytest.mark.parametrize("overrides", [
    ["proxy_eval=cached"],                 # the user named a proxy
    ["proxy_eval=toy", "device=cuda"],
    ["resume=runs/search/x"],              # a resumed run keeps its own proxy
    ["device=cpu"],                        # the trials run on the CPU
    ["device=cpu,cuda"],                   # a sweep: each job keeps the config's proxy
    ["proxy_eval.resolution=128"],         # a key only the cached proxy has: the user tunes that one
    ["ray.gpus_per_trial=0"],              # Ray trials kept on CPUs on purpose
    ["search.budget=banana"],              # bad input: left for the real composition to report
])
def test_the_config_proxy_stays_where_the_rule_says_so(gpu, overrides):
    assert proxy_default.proxy_for_machine(overrides) == overrides


def test_without_a_gpu_nothing_changes():
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    assert proxy_default.proxy_for_machine(["search.budget=2"]) == ["search.budget=2"]
    assert proxy_default.proxy_for_machine(["device=cuda"]) == ["device=cuda"]  # refused later, in one line


def test_the_search_command_composes_its_config_after_the_machine_defaults(gpu, monkeypatch):
    import search.__main__ as search_main
    import search.run

    seen = []
    monkeypatch.setattr(search.run, "run_command", lambda cfg: seen.append(cfg))
    dispatch("search", "search", search_main.COMMANDS, ["run", "search.budget=3"])
    dispatch("search", "search", search_main.COMMANDS, ["run", "proxy_eval=cached"])
    assert [cfg.proxy_eval.name for cfg in seen] == ["end_to_end", "cached"]
    assert seen[0].search.budget == 3 and seen[0].ray.gpus_per_trial == 0.5 and seen[1].ray.gpus_per_trial == 0
