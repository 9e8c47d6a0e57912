"""Every option of every config group composes with its primary config (train or search)."""
from pathlib import Path

import pytest

from detector.cli import CONF_DIR, compose

SEARCH_ONLY = {"space", "controller", "proxy_eval", "executor"}
TRAIN_ONLY = {"schedule", "experiment"}


def _group_options():
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(group_dir.glob("*.yaml")):
            group = group_dir.name
            primaries = ["train"] if group in TRAIN_ONLY else ["search"] if group in SEARCH_ONLY else ["train", "search"]
            for primary in primaries:
                yield pytest.param(primary, group, option.stem, id=f"{primary}:{group}={option.stem}")


@pytest.mark.parametrize("primary, group, option", list(_group_options()))
def test_every_group_option_composes(primary, group, option):
    cfg = compose(primary, [f"{group}={option}"])
    assert cfg is not None
    if group not in ("experiment",):
        assert group in cfg


def test_config_dir_holds_the_documented_groups():
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    assert {"data", "backbone", "recipe", "schedule", "logger", "experiment", "controller",
            "proxy_eval", "executor", "space"} <= groups
