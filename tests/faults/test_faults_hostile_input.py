"""Hostile input: fuzzed architecture codes and override values, malformed datasets, all through
the command line's error path. The contract (DESIGN section 2): exit 0, or exit 2 with exactly one
line ``error: ...`` on stderr and no traceback; never a crash (exit 1).

Each override case runs :func:`detector.cli.dispatch` in this process (compose, then the command)
up to a *boundary*: the first function that would start real work (a search's prepare, a
training's seeding, a describe's FLOP count, a sample's generator) raises :class:`Accepted`
instead. Everything before it - Hydra's grammar, composition, interpolation, our validation - is
the real code. CI runs a seeded sample; ``-m slow`` runs the full 10,000 (and 20 subprocesses).
The malformed-dataset cases themselves are tests/data/test_bad_data.py; here three of them go through
the real ``python -m detector train`` (one subprocess, two in-process).
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from detector.arch.grammar import ArchError, parse
from detector.arch.zoo import ZOO, resolve_arch
from faults import (CaseTimeout, CliOutcome, assert_one_line_bad_input, files_changed, memory_limit, record_fault,
                    run_cli, run_cli_in_process, snapshot, time_limit)
from detector.arch.space import space_from_cfg

FUZZ_CASES = 10_000
CI_OVERRIDE_CASES = 120
CI_CLI_CODES = 40
CASE_SECONDS = 20  # per fuzzed command line; an input that makes a command hang fails the test
CASE_MEMORY = 3 << 30  # bytes the fuzz loop may add to this process; past it allocations fail
HOSTILE_ALPHABET = string.printable + "é中\x00\x7f\x85\u2028\U0001F600'\"\\${}[](),=~+@#%&*"


class Accepted(BaseException):
    """Raised at a command's boundary: the input got through every check."""


# ---------------------------------------------------------------------- generators
def valid_codes(rng: random.Random, count: int) -> list[str]:
    from omegaconf import OmegaConf

    from detector.cli import CONF_DIR

    space = space_from_cfg(OmegaConf.load(CONF_DIR / "space" / "default.yaml"), "joint")
    return [str(space.sample(rng)) for _ in range(count)] + list(ZOO.values())


def mutate(rng: random.Random, text: str, alphabet: str = HOSTILE_ALPHABET) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 5)):
        pos = rng.randrange(len(chars) + 1)
        kind = rng.randrange(4)
        if kind == 0:
            chars.insert(pos, rng.choice(alphabet))
        elif kind == 1 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif kind == 2 and chars:
            chars[min(pos, len(chars) - 1)] = rng.choice(alphabet)
        elif chars:  # duplicate or drop a whole chunk
            start = rng.randrange(len(chars))
            chunk = chars[start: start + rng.randint(1, 20)]
            chars[pos:pos] = chunk if rng.random() < 0.5 else []
    return "".join(chars)


def hostile_paths(root: Path) -> list[str]:
    """Files and folders an ``arch=`` value may name, most of them wrong."""
    (root / "no-best").mkdir()
    (root / "run").mkdir()
    (root / "run" / "best.txt").write_bytes(b"\xff\xfe\x00garbage")
    (root / "empty.txt").write_text("")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "code.txt").write_text(ZOO["nasfcos"] + "\n")
    (root / "loop").symlink_to(root / "loop")
    return [str(root / name) for name in ("no-best", "run", "empty.txt", "binary.bin", "code.txt", "loop")] + [
        str(root), "/", ".", "..", "~", "/dev/null", "/proc/self/status", "x" * 300, "/" + "y" * 5000]


def fuzzed_arch(rng: random.Random, seeds: list[str], paths: list[str]) -> str:
    roll = rng.random()
    if roll < 0.6:
        return mutate(rng, rng.choice(seeds))
    if roll < 0.75:
        return "".join(rng.choice(HOSTILE_ALPHABET) for _ in range(rng.randint(0, 60)))
    if roll < 0.85:
        return mutate(rng, rng.choice(paths), string.ascii_letters + "/.~\n\x00")
    if roll < 0.9:
        return rng.choice(list(ZOO)) + rng.choice(["", " ", "\n", "-", "x", "\t"])
    if roll < 0.95:
        return rng.choice(seeds) * rng.randint(2, 40)  # far too long
    return rng.choice(paths)


TYPE_CONFUSION = ["abc", "-1", "0", "1.5", "1e309", "-1e309", "nan", "inf", "true", "false", "null", "[]",
                  "[1,2]", "{}", "{a:1}", "''", '""', "[[[]]]", "99999999999999999999999", "0x10", "1_000", " ",
                  ",", ":", "???", "-0", "+5", "1e3", "[fpn,]", "[fpn,head,fpn]", "['fpn']"]
INTERPOLATIONS = ["${oops}", "${search.budget}", "${now:%Y}", "${oc.env:HOME}", "${oc.env:NASFCOS_UNSET_VAR}",
                  "${oc.decode:'[1'}", "${", "}", "$", "${..x}", "${a.b.c}", "${seed}", "${oc.create:{a:1}}",
                  "${oc.select:nope}", "${oc.dict.keys:search}"]


@dataclass(frozen=True)
class Target:
    """A command to fuzz: its fixed arguments, the keys to fuzz with their valid values, and the
    boundary where accepted input would start real work."""

    app: str
    command: str
    fixed: Callable[[Path], list[str]]
    keys: dict[str, list[str]]
    boundary: tuple[str, str]  # module, attribute replaced by a function raising Accepted


TARGETS = [
    Target("search", "run",
           lambda d: ["proxy_eval=toy", "executor=local", f"search.run_dir={d / 'run'}", f"cache_dir={d / 'cache'}"],
           {"search.budget": ["3"], "search.workers": ["2"], "search.retries": ["0"], "search.top_k": ["3"],
            "search.stages": ["[fpn,head]", "[joint]", "fpn"], "search.fixed_fpn": ["nasfcos", "fpn:standard"],
            "search.fixed_head": ["head:fcos"], "executor": ["local", "ray"], "controller": ["ppo", "random"],
            "reward": ["ap", "neg_loss"], "seed": ["3"], "device": ["cpu", "auto"], "proxy_eval": ["toy", "cached"],
            "space.num_blocks": ["7"], "space.levels": ["[c3,c4,c5]"], "space.fpn_ops": ["[sep3,skip]"],
            "logger": ["none"], "ray.cpus_per_trial": ["1"], "proxy_eval.sleep_s": ["0"]},
           ("search.run", "_prepare")),
    Target("search", "sample", lambda d: ["n=2"],
           {"n": ["3"], "seed": ["1"], "space": ["default", "with_c2"], "space.num_blocks": ["5"],
            "space.num_head_layers": ["4"], "space.head_ops": ["[conv3,skip]"], "space.aggregations": ["[sum]"]},
           ("search.show", "random")),
    Target("detector", "train",
           lambda d: ["experiment=synthetic_tiny", "device=cpu", f"out_dir={d / 'train'}", f"cache_dir={d / 'cache'}"],
           {"arch": ["fcos", "nasfcos"], "seed": ["1"], "device": ["cpu"], "train.batch_size": ["4"],
            "train.amp": ["off", "auto"], "train.workers": ["0"], "schedule.iterations": ["4"],
            "schedule.lr": ["0.01"], "train.clip_grad": ["0"], "resume": ["false", "true"],
            "backbone": ["resnet18", "mobilenet_v2"], "recipe": ["nasfcos", "torchvision"], "model.width": ["64"]},
           ("detector.engine.train", "seed_everything")),
    Target("detector", "describe", lambda d: ["format=json"],
           {"arch": ["fcos", "nasfcos"], "format": ["text", "json"], "input_size": ["[256,320]"],
            "backbone": ["resnet18", "resnet50"], "backbone.name": ["resnet34"], "data.num_classes": ["3"],
            "model.width": ["64"], "recipe": ["torchvision"], "recipe.box_activation": ["exp_scale"]},
           ("detector.model.cost", "measure_flops")),
]


def fuzzed_value(rng: random.Random, valid: list[str], codes: list[str]) -> str:
    roll = rng.random()
    if roll < 0.25:
        return rng.choice(TYPE_CONFUSION)
    if roll < 0.35:
        return rng.choice(INTERPOLATIONS)
    if roll < 0.55:
        return mutate(rng, rng.choice(valid))
    if roll < 0.7:
        return "".join(rng.choice(HOSTILE_ALPHABET) for _ in range(rng.randint(0, 30)))
    if roll < 0.78:
        return rng.choice(codes)
    if roll < 0.8:
        return rng.choice(valid) * 2000  # very long
    return rng.choice(valid)


def fuzzed_override(rng: random.Random, target: Target, codes: list[str]) -> str:
    roll = rng.random()
    if roll < 0.8:
        key = rng.choice(list(target.keys))
        return f"{key}={fuzzed_value(rng, target.keys[key], codes)}"
    if roll < 0.9:  # an unknown or mangled key
        key = mutate(rng, rng.choice(list(target.keys)), string.ascii_letters + "._-~+ =")
        return f"{key}={rng.choice(TYPE_CONFUSION)}"
    prefix = rng.choice(["~", "+", "++"])  # delete or add keys
    key = rng.choice(list(target.keys) + ["seed", "search", "train", "data", "nope.nope"])
    return prefix + key + ("" if prefix == "~" else f"={rng.choice(TYPE_CONFUSION)}")


# ---------------------------------------------------------------------- harness
@dataclass
class FuzzReport:
    cases: int = 0
    accepted: int = 0  # got through every check (exit 0 or the boundary)
    refused: int = 0  # exit 2 with one error line
    failures: list[str] = field(default_factory=list)  # anything else: crash, hang, bad output


def run_override_fuzz(cases: int, seed: int, workdir: Path, monkeypatch) -> FuzzReport:
    """``cases`` fuzzed overrides spread over :data:`TARGETS`, each through dispatch in-process."""
    import importlib

    def accept(*args, **kwargs):
        raise Accepted

    class AcceptingRandom:  # search.show's ``random`` module: ``Random(seed)`` is the boundary
        @staticmethod
        def Random(seed):  # noqa: N802 - the name it replaces
            raise Accepted

    for target in TARGETS:
        module_name, attr = target.boundary
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, attr, AcceptingRandom if attr == "random" else accept)
    rng = random.Random(seed)
    codes = valid_codes(random.Random(seed), 20)
    report = FuzzReport()
    with memory_limit(CASE_MEMORY):
        fuzz_cases(cases, rng, codes, workdir, report)
    return report


def fuzz_cases(cases: int, rng: random.Random, codes: list[str], workdir: Path, report: FuzzReport) -> None:
    for case in range(cases):
        target = TARGETS[case % len(TARGETS)]
        casedir = workdir / f"case-{case}"
        argv = [target.command, *target.fixed(casedir),
                *(fuzzed_override(rng, target, codes) for _ in range(1 + (rng.random() < 0.2)))]
        report.cases += 1
        try:
            with time_limit(CASE_SECONDS):
                outcome = run_cli_in_process(target.app, argv)
        except Accepted:
            report.accepted += 1
            continue
        except (Exception, CaseTimeout) as err:  # noqa: BLE001 - a crash is what the fuzz looks for
            report.failures.append(f"{target.app} {argv!r}: crashed with {type(err).__name__}: {err}"[:400])
            continue
        if outcome.code == 0:
            report.accepted += 1
            continue
        try:
            assert_one_line_bad_input(outcome, f"{target.app} {argv!r}")
        except AssertionError as err:
            report.failures.append(str(err)[:400])
        else:
            report.refused += 1


def assert_fuzz_clean(report: FuzzReport) -> None:
    assert not report.failures, f"{len(report.failures)} of {report.cases} inputs broke the contract:\n" + \
        "\n".join(report.failures[:15])
    assert report.refused > report.cases // 3 and report.accepted > 10  # the fuzz hits both sides


# ---------------------------------------------------------------------- codes
def render_cli_error(message: str) -> CliOutcome:
    """What the CLI prints for a UserError with ``message`` (detector.cli.fail)."""
    import contextlib
    import io

    from detector.cli import fail

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        fail(message)
    return CliOutcome(int(exit_info.value.code), "", err.getvalue())


def test_10000_fuzzed_arch_values_resolve_or_fail_in_one_line(tmp_path, record_property):
    rng = random.Random(0)
    seeds, paths = valid_codes(rng, 50), hostile_paths(tmp_path)
    resolved = refused = 0
    failures = []
    for _ in range(FUZZ_CASES):
        value = fuzzed_arch(rng, seeds, paths)
        try:
            arch = resolve_arch(value)
        except ArchError as err:
            refused += 1
            try:
                assert_one_line_bad_input(render_cli_error(str(err)), f"arch={value[:80]!r}")
            except AssertionError as failure:
                failures.append(str(failure)[:300])
        except Exception as err:  # noqa: BLE001
            failures.append(f"arch={value[:80]!r}: {type(err).__name__}: {err}"[:300])
        else:
            resolved += 1
            assert parse(str(arch), None, None) == arch  # whatever resolves is a canonical code
    assert not failures, f"{len(failures)} arch values broke the contract:\n" + "\n".join(failures[:15])
    assert refused > FUZZ_CASES // 2 and resolved > 50
    record_fault(record_property, FUZZ_CASES, None)


def rejected_codes(count: int, seed: int, root: Path) -> list[str]:
    rng = random.Random(seed)
    seeds, paths = valid_codes(rng, 50), hostile_paths(root)
    found = []
    while len(found) < count:
        value = fuzzed_arch(rng, seeds, paths)
        try:
            resolve_arch(value)
        except Exception:  # noqa: BLE001 - the CLI must turn each of these into one line
            found.append(value)
    return found


def check_codes_through_dispatch(codes: list[str]) -> list[str]:
    failures = []
    for value in codes:
        outcome = run_cli_in_process("search", ["show", f"arch={value}", "out=/nonexistent/never-written.png"])
        try:
            assert_one_line_bad_input(outcome, f"search show arch={value[:80]!r}")
        except AssertionError as err:
            failures.append(str(err)[:300])
    return failures


def test_rejected_arch_values_through_the_real_dispatch_give_one_line(tmp_path, record_property):
    failures = check_codes_through_dispatch(rejected_codes(CI_CLI_CODES, 1, tmp_path))
    assert not failures, "\n".join(failures[:15])
    record_fault(record_property, CI_CLI_CODES, None)


# ---------------------------------------------------------------------- overrides
def test_fuzzed_overrides_are_accepted_or_refused_in_one_line(tmp_path, monkeypatch, record_property):
    assert_fuzz_clean(run_override_fuzz(CI_OVERRIDE_CASES, 0, tmp_path, monkeypatch))
    record_fault(record_property, CI_OVERRIDE_CASES, None)


@pytest.mark.slow
def test_10000_fuzzed_overrides_are_accepted_or_refused_in_one_line(tmp_path, monkeypatch, record_property):
    assert_fuzz_clean(run_override_fuzz(FUZZ_CASES, 1, tmp_path, monkeypatch))
    (tmp_path / "codes").mkdir()
    failures = check_codes_through_dispatch(rejected_codes(1000, 2, tmp_path / "codes"))
    assert not failures, "\n".join(failures[:15])
    record_fault(record_property, FUZZ_CASES + 1000, None)


def subprocess_sample(count: int, seed: int, root: Path) -> list[list[str]]:
    """Fuzzed ``python -m search`` command lines that fail before any work (no boundary needed)."""
    rng = random.Random(seed)
    codes = valid_codes(random.Random(seed), 20)
    lines = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            lines.append(["show", f"arch={fuzzed_arch(rng, codes, [str(root)])}", f"out={root / 'x.png'}"])
        elif kind == 1:
            lines.append(["sample", f"n={rng.choice(TYPE_CONFUSION[:8] + INTERPOLATIONS[:3])}"])
        elif kind == 2:
            lines.append(["run", "proxy_eval=toy", f"search.run_dir={root / str(i)}",
                          f"search.budget={rng.choice(['-1', 'abc', '0', '1.5', '${oops}', '[]'])}"])
        else:
            lines.append(["report", f"run={mutate(rng, str(root / 'nope'))}"])
    # A real argv cannot hold a NUL byte (exec refuses it before the program starts); the in-process
    # fuzzers cover NUL in values, here it becomes another control character.
    return [[arg.replace("\0", "\x01") for arg in line] for line in lines]


@pytest.mark.parametrize("count", [pytest.param(6, id="ci"), pytest.param(20, id="slow", marks=pytest.mark.slow)])
def test_a_sample_of_hostile_command_lines_in_real_subprocesses(tmp_path, count, record_property):
    failures = []
    for argv in subprocess_sample(count, 3, tmp_path):
        done = run_cli("search", *argv, timeout=120)
        if done.returncode == 0:
            continue  # a value that happens to be valid
        try:
            assert_one_line_bad_input(done, f"python -m search {argv!r}")
        except AssertionError as err:
            failures.append(str(err)[:400])
    assert not failures, "\n".join(failures)
    record_fault(record_property, count, None)


# ---------------------------------------------------------------------- malformed datasets
def write_coco(root: Path, annotations: str | None = None, images: dict[str, bytes] | None = None) -> Path:
    """A COCO-layout folder (train2017/val2017) with the given annotation text and images."""
    from PIL import Image

    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations").mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), (10, 200, 30)).save(root / split / "a.png")
        for name, data in (images or {}).items():
            (root / split / name).write_bytes(data)
        text = annotations if annotations is not None else json.dumps({
            "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]})
        (root / "annotations" / f"instances_{split}.json").write_text(text)
    return root


def missing_image_annotations() -> str:
    return json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64},
                   {"id": 2, "file_name": "gone.png", "width": 64, "height": 64}],
        "annotations": [], "categories": [{"id": 1, "name": "thing"}]})


def annotations_with(image_id: object = 1, category_id: object = 1, ann_id: object = 1) -> str:
    """One image, one box, one category, with the ids given (of any JSON type)."""
    return json.dumps({
        "images": [{"id": image_id, "file_name": "a.png", "width": 64, "height": 64}],
        "annotations": [{"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [4, 4, 20, 20],
                         "area": 400, "iscrowd": 0}],
        "categories": [{"id": category_id, "name": "thing"}]})


DATA_CASES = {
    "truncated JSON": (lambda root: write_coco(root, '{"images": [{"id": 1, "file_na'), "not valid JSON"),
    # #22: string ids crashed training, failed the final evaluation or scored AP 0 silently
    "string image ids": (lambda root: write_coco(root, annotations_with(image_id="img_17")), "image id 'img_17'"),
    "numeric-string image ids": (lambda root: write_coco(root, annotations_with(image_id="17")), "image id '17'"),
    "string category ids": (lambda root: write_coco(root, annotations_with(category_id="90")), "category id '90'"),
    "string annotation ids": (lambda root: write_coco(root, annotations_with(ann_id="a-1")), "annotation id 'a-1'"),
    "missing image file": (lambda root: write_coco(root, missing_image_annotations()), "gone.png"),
    "root that does not exist": (lambda root: root / "nowhere", "nowhere"),
}


def train_on(root: Path, tmp_path: Path) -> list[str]:
    return ["train", "data=coco", f"data.root={root}", "data.num_classes=1", "device=cpu",
            f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "schedule.iterations=1",
            "train.workers=0", "train.batch_size=1"]


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_a_malformed_dataset_stops_training_with_one_line(tmp_path, case, record_property):
    make, fragment = DATA_CASES[case]
    root = make(tmp_path / "coco")
    if case == "truncated JSON":  # one through a real process, the others in-process (same dispatch)
        outcome = run_cli("detector", *train_on(root, tmp_path), timeout=300)
        line = assert_one_line_bad_input(outcome, case, strict=False)
    else:
        line = assert_one_line_bad_input(run_cli_in_process("detector", train_on(root, tmp_path)), case,
                                         strict=False)
    assert fragment in line
    assert not (tmp_path / "out" / "last.pt").exists()
    record_fault(record_property, 1, None)


@pytest.mark.parametrize("config,override", [("train", "backbone=${oc.select:nope}"), ("train", "schedule=${oc.select:nope}"),
                                             ("search", "space=${oc.select:nope}"),
                                             ("search", "proxy_eval=${oc.select:nope}")])
def test_an_interpolated_config_group_option_is_refused_in_one_line(config, override):
    """Found by the 10,000-override fuzz: Hydra asserted (a traceback) on these."""
    from detector.cli import compose
    from detector.errors import UserError

    with pytest.raises(UserError, match="config group option must be a name") as err:
        compose(config, [override])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- #22: settings a search checks up front
TOY = ["proxy_eval=toy", "executor=local", "search.budget=1", "search.stages=[fpn]"]
BAD_SEARCH_SETTINGS = {
    "data.root missing": ["proxy_eval=cached", "data.root=/nonexistent/nasfcos"],
    "data=coco without root": ["proxy_eval=cached", "data=coco"],
    "data.root without the split": ["proxy_eval=end_to_end", "data.root={tmp}"],
    "search.fixed_fpn garbage": ["search.stages=[head]", "search.fixed_fpn=garbage"],
    "search.fixed_fpn a head code": ["search.stages=[fpn,head]", "search.fixed_fpn=head:fcos"],
    "search.fixed_head garbage": ["search.fixed_head=fpn:nope"],
    "device=cuda without a GPU": ["device=cuda"],
    "device=tpu": ["device=tpu"],
}


@pytest.mark.parametrize("case", list(BAD_SEARCH_SETTINGS))
@pytest.mark.parametrize("explicit_dir", [True, False], ids=["run_dir", "default_dir"])
def test_bad_search_settings_leave_no_run_dir_and_the_corrected_command_runs(tmp_path, monkeypatch, case,
                                                                               explicit_dir, record_property):
    """They were found after the run directory and its config.yaml existed: the corrected command
    was then refused ("already holds a search run"), and every attempt left a runs/search/<time>/."""
    if case.startswith("device=cuda"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    where = [f"search.run_dir={run_dir}"] if explicit_dir else []
    bad = [value.format(tmp=tmp_path) for value in BAD_SEARCH_SETTINGS[case]]
    line = assert_one_line_bad_input(run_cli_in_process("search", ["run", *TOY, *where, *bad]), case, strict=False)
    assert not run_dir.exists() and not (tmp_path / "runs").exists(), line
    done = run_cli_in_process("search", ["run", *TOY, *where])
    assert done.code == 0, done.stderr
    record_fault(record_property, 1, None)


def test_a_run_stopped_before_its_first_trial_is_restarted_with_corrected_settings(tmp_path, record_property):
    """A run directory holding only its config.yaml (stopped while preparing): the corrected
    command reuses it, and resume= takes every setting given, since no trial depends on the old ones."""
    from omegaconf import OmegaConf

    from detector.cli import compose
    from search.run_dir import create_run_dir

    for way in ("fresh", "resume"):
        run_dir = tmp_path / way
        with create_run_dir(run_dir) as run:
            run.write_config(OmegaConf.to_container(compose("search", [*TOY, "search.budget=5"]), resolve=True))
        argv = [*TOY, "search.budget=2"] + ([f"search.run_dir={run_dir}"] if way == "fresh" else [f"resume={run_dir}"])
        done = run_cli_in_process("search", ["run", *argv])
        assert done.code == 0, done.stderr
        assert OmegaConf.load(run_dir / "config.yaml").search.budget == 2
        assert sum(1 for _ in (run_dir / "history.jsonl").open()) == 2
    record_fault(record_property, 2, None)


def test_the_head_stage_hint_names_a_command_that_works(tmp_path, record_property):
    """Every FPN trial failed: the head stage said "set search.fixed_fpn=<code>", but resume
    ignored that key, and no report was written for the finished stage."""
    run_dir = tmp_path / "run"
    first = run_cli_in_process("search", ["run", "proxy_eval=toy", "executor=local", "search.budget=2",
                                          "proxy_eval.inject_nan=0", f"search.run_dir={run_dir}"])
    line = assert_one_line_bad_input(first, "all FPN trials failed", strict=False)
    hint = line.split("run python -m search run ", 1)[1]
    assert hint.startswith(f"resume={run_dir} search.fixed_fpn=")
    assert (run_dir / "report.md").is_file(), "the finished fpn stage gets its report"
    second = run_cli_in_process("search", ["run", f"resume={run_dir}", "search.fixed_fpn=nasfcos"])
    assert second.code == 0, second.stderr
    rows = [json.loads(row) for row in (run_dir / "history.jsonl").read_text().splitlines()]
    nasfcos_fpn = str(resolve_arch("nasfcos").fpn)
    head_rows = [r for r in rows if r["stage"] == "head"]
    assert len(head_rows) == 2 and all(r["code"].startswith(nasfcos_fpn + "+") for r in head_rows)
    third = run_cli_in_process("search", ["run", f"resume={run_dir}"])  # the fixed FPN was saved with the run
    assert third.code == 0 and "already complete" in third.stdout
    record_fault(record_property, 1, 0)


# ---------------------------------------------------------------------- #22: what is a search run
def _training_run(path: Path) -> Path:
    from omegaconf import OmegaConf

    from detector.cli import compose

    path.mkdir()
    (path / "config.yaml").write_text(OmegaConf.to_yaml(compose("train", ["experiment=synthetic_tiny"])))
    (path / "metrics.json").write_text('{"AP": 0.1}')
    return path


NOT_SEARCH_RUNS = {
    "a training run": _training_run,
    "a folder with some config.yaml": lambda p: (p.mkdir(), (p / "config.yaml").write_text("a: 1\n"), p)[-1],
    "an empty config.yaml": lambda p: (p.mkdir(), (p / "config.yaml").write_text(""), p)[-1],
    "a list as config.yaml": lambda p: (p.mkdir(), (p / "config.yaml").write_text("- search\n- space\n"), p)[-1],
}


@pytest.mark.parametrize("case", list(NOT_SEARCH_RUNS))
@pytest.mark.parametrize("command", ["report", "resume", "run_dir"])
def test_a_folder_that_is_not_a_search_run_is_refused_in_one_line(tmp_path, case, command, record_property):
    """`report run=<training run>` wrote a bogus report.md into it; `resume=` said `Missing key search`;
    `search.run_dir=` named it as a search run."""
    folder = NOT_SEARCH_RUNS[case](tmp_path / "dir")
    before = snapshot(folder)
    argv = {"report": ["report", f"run={folder}"], "resume": ["run", f"resume={folder}"],
            "run_dir": ["run", *TOY, f"search.run_dir={folder}"]}[command]
    line = assert_one_line_bad_input(run_cli_in_process("search", argv), case)
    assert "not a search run directory" in line or "not a search's" in line
    assert snapshot(folder) == before and not (folder / ".lock").exists()
    record_fault(record_property, 1, files_changed(before, folder))


# ---------------------------------------------------------------------- #22: multirun
BAD_SWEEPS = [
    ("search", ["run", "-m", "controller=ppo,nope", "proxy_eval=toy"]),
    ("search", ["run", "-m", "search.budget=2,-1,abc", "proxy_eval=toy"]),
    ("search", ["sample", "--multirun", "n=1,${oops}"]),
    ("detector", ["train", "-m", "experiment=synthetic_tiny,nope"]),
    ("detector", ["train", "-m", "seed=1,abc", "experiment=synthetic_tiny"]),
    ("detector", ["train", "-m", "experiment=synthetic_tiny", "schedule=1x,nope"]),
    ("detector", ["describe", "-m", "seed=1,"]),
]


@pytest.mark.parametrize("app,argv", BAD_SWEEPS, ids=[" ".join(a) for _, a in BAD_SWEEPS])
def test_a_multirun_with_a_bad_value_is_refused_in_one_line_before_any_job(tmp_path, monkeypatch, app, argv,
                                                                           record_property):
    """It printed Hydra's multi-line error and exited 1; the single-run form is one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    assert_one_line_bad_input(run_cli_in_process(app, [*argv, f"hydra.sweep.dir={tmp_path / 'sweep'}"]), str(argv))
    assert not (tmp_path / "sweep").exists() and not list(tmp_path.iterdir())
    record_fault(record_property, 1, None)


def test_a_sweep_goes_on_past_a_diverging_job_and_summary_says_diverged(tmp_path, record_property):
    """`schedule.lr=1e6,0.01`: the diverging first job ended the sweep, the second never ran, and
    `summary` listed the first as unfinished."""
    sweep = tmp_path / "sweep"
    done = run_cli("detector", "train", "-m", "experiment=synthetic_tiny", "device=cpu", "schedule.lr=1e6,0.01",
                   "schedule.iterations=3", "schedule.warmup_iters=0", "data.num_train=8", "data.num_val=2",
                   f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    line = assert_one_line_bad_input(done, "sweep with a diverging job", strict=False)
    assert "1 job(s) of the sweep failed" in line and "job 0" in line
    assert (sweep / "1" / "metrics.json").is_file(), "the second job ran to the end"
    table = run_cli("detector", "summary", f"sweep={sweep}", cwd=tmp_path, timeout=120)
    assert table.returncode == 0, table.stderr
    status = {line.split()[0]: line.split()[-1] for line in table.stdout.splitlines()[1:]}
    assert status == {"0": "diverged", "1": "finished"}
    record_fault(record_property, 1, 0)


def test_the_sweep_check_expands_choices_and_ranges_and_leaves_globs_to_hydra():
    from detector.cli import check_sweep, sweep_values

    assert sweep_values(["seed=range(1,3)", "+x=1", "experiment=glob(synthetic*)", "hydra.sweep.dir=/x",
                         "a=interval(0,1)"]) == [["seed=1", "seed=2"], ["+x=1"]]
    assert check_sweep("train", ["seed=range(0,3)", "experiment=synthetic_tiny,synthetic_fcos",
                                 "hydra.sweep.dir=/tmp/x"]) == 6
