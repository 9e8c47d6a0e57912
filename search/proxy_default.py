"""Which proxy ``python -m search run`` uses when its command line names none: the end-to-end proxy
where a GPU runs the trials, the cached one on a CPU.

The evidence (README "How good is the search"; experiments/search_quality/pretrained/README.md):
on the embedded task the cached progressive-adaptation proxy does not rank architectures like full
training (Kendall tau 0.17 / 0.25 on two proxy instances) and the end-to-end one does (0.65 / 0.53
at 300 iterations); PPO's best code of a search with the end-to-end proxy retrained 0.087 AP above
random search's, PPO's best of the cached proxy below random's. The end-to-end proxy costs a few GPU
seconds per candidate but minutes on 2 CPU cores, so the CPU keeps ``cached`` (conf/search.yaml).

:func:`proxy_for_machine` adds ``proxy_eval=end_to_end`` in front of the user's overrides when all
of these hold: no ``proxy_eval=`` and no ``resume=`` on the command line (a resumed run keeps its
own proxy), the overrides compose to one config (a sweep keeps the config's proxy), its ``device``
resolves to a GPU, the trials run there (``executor=local``, or Ray with ``ray.gpus_per_trial`` not
set to 0 on the command line), and every ``proxy_eval.<key>=`` given is a key the end-to-end proxy
has (one only the cached proxy has means the user tunes that one). With Ray and no
``ray.gpus_per_trial`` given (the config's 0 would hide the GPU from the trials), it also adds
``ray.gpus_per_trial=1/search.workers``: the trials share the GPU.
"""
from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger(__name__)

CHOSEN_FOR_GPU = ("a GPU runs the trials and no proxy_eval= was given: proxy_eval=end_to_end (the proxy that ranks "
                  "like full training; proxy_eval=cached to use the cached one)")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _end_to_end_keys() -> set[str]:
    from omegaconf import OmegaConf

    from detector.cli import CONF_DIR

    return set(OmegaConf.load(CONF_DIR / "proxy_eval" / "end_to_end.yaml").keys())


def proxy_for_machine(overrides: Sequence[str]) -> list[str]:
    """``overrides``, with ``proxy_eval=end_to_end`` (and a GPU share for Ray trials) in front when the
    module docstring's rule says so."""
    from detector.cli import compose
    from detector.errors import UserError
    from proxy_eval.settings import resolve_device

    overrides = list(overrides)
    keys = [_key(override) for override in overrides]
    if "proxy_eval" in keys or "resume" in keys:
        return overrides
    if resolve_device("auto") == "cpu":  # no GPU visible: nothing to decide, no second composition at start-up
        return overrides
    try:
        cfg = compose("search", overrides)
    except Exception:  # noqa: BLE001 - a sweep, or bad input that the real composition reports in one line
        return overrides
    try:
        if resolve_device(cfg.get("device", "auto")) == "cpu":
            return overrides
    except UserError:  # the run's own checks report a bad device in one line
        return overrides
    tuned = {key.split(".", 1)[1].split(".")[0] for key in keys if key.startswith("proxy_eval.")}
    if tuned - _end_to_end_keys():
        return overrides
    chosen = ["proxy_eval=end_to_end"]
    if cfg.executor.get("name") == "ray" and float(cfg.ray.gpus_per_trial) == 0:
        if "ray.gpus_per_trial" in keys:  # trials kept on CPUs on purpose: the cached proxy suits them
            return overrides
        chosen.append(f"ray.gpus_per_trial={round(1.0 / max(1, int(cfg.search.workers)), 4)}")
    log.info("%s: %s", CHOSEN_FOR_GPU, " ".join(chosen))
    return [*chosen, *overrides]
