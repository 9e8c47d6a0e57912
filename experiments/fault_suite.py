"""Run every fault-injection case and print one table: fault, injected, survived, data lost.

    python experiments/fault_suite.py            # every case, the slow ones included (~10+ min on 2 cores)
    python experiments/fault_suite.py --fast     # the CI portion only (``-m 'not slow'``)
    python experiments/fault_suite.py --junit results.xml   # re-print the table of an earlier run

The cases are pytest tests: tests/faults/test_faults_*.py (this suite) plus the older tests that already
prove a case (listed in the "also" column). Each test of the suite reports, through junit XML
properties (`record_fault` in tests/helpers/faults.py), how many faults it injected and how much data
written before the fault it found lost afterwards (history rows, files, checkpoints; it asserts 0
too). "survived" means every test of the row passed. The table goes to stdout as markdown;
experiments/FAULTS.md holds the committed copy.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE_FILES = ["tests/faults/test_faults_search.py", "tests/faults/test_faults_training.py", "tests/faults/test_faults_files.py",
               "tests/faults/test_faults_hostile_input.py", "tests/commands/test_output_paths.py", "tests/search/test_ray_cluster.py"]


@dataclass(frozen=True)
class Fault:
    """One row: what is injected, and the tests (node-id fragments) that inject it."""

    name: str
    injection: str
    tests: tuple[str, ...]
    also: tuple[str, ...] = ()  # older tests proving the same case


FAULTS = [
    Fault("search driver SIGKILL while the feature cache is written (prepare)",
          "real SIGKILL; features.pt written to the temp folder, no checksum yet",
          ("test_sigkill_while_the_feature_cache_is_written",)),
    Fault("search driver SIGKILL mid-trial",
          "real SIGKILL inside the 3rd trial; resumed with `python -m search run resume=<dir>`",
          ("test_sigkilled_driver_resumes_to_the_exact_budget_without_training_a_code_twice[mid-trial]",),
          ("test_search_resume.py::test_resume_after_sigkill_completes_the_budget",)),
    Fault("search driver SIGKILL after a history append, before the searcher update",
          "real SIGKILL after history row 4 is fsync'ed",
          ("test_sigkilled_driver_resumes_to_the_exact_budget_without_training_a_code_twice[after-history-append]",)),
    Fault("search driver SIGKILL mid searcher-state save",
          "real SIGKILL after torch.save wrote the temp file, before the rename",
          ("test_sigkilled_driver_resumes_to_the_exact_budget_without_training_a_code_twice[mid-searcher-save]",)),
    Fault("training SIGKILL mid-run, then resume=true",
          "real SIGKILL after iteration 4, before its checkpoint",
          ("test_sigkilled_training_resumes_to_the_same_iteration_metrics_and_weights",),
          ("test_checkpoint.py::test_stopped_and_resumed_run_equals_an_unbroken_one",)),
    Fault("trial worker crash (executor=local)",
          "exception escaping the evaluator: once (retried), always (recorded as error)",
          ("test_a_trial_that_crashes_is_retried",),
          ("test_search_loop.py::test_injected_failures_are_retried",)),
    Fault("Ray trial worker SIGKILL mid-trial (executor=ray, slow)",
          "the worker process SIGKILLs itself inside the 2nd evaluation",
          ("test_a_ray_worker_sigkilled_mid_trial",),
          ("test_search_ray.py::test_a_trial_whose_worker_keeps_crashing",)),
    Fault("Ray cluster: search driver SIGKILLed, resumed against the running cluster",
          "real SIGKILL after history row 2 of a search on a 2-node cluster (separate `ray start` processes)",
          ("test_a_search_on_a_two_node_cluster_uses_both_nodes_and_resumes_after_a_driver_kill",)),
    Fault("Ray cluster: worker node SIGKILLed mid-trial (slow)",
          "every process of a 3rd node (raylet, its workers) SIGKILLed while it runs a trial",
          ("test_a_worker_node_killed_mid_trial",),
          ("test_search_ray.py::test_a_trial_whose_worker_keeps_crashing",)),
    Fault("Ray cluster: head gone (mid-search: slow; at start / resume: CI)",
          "head node SIGKILLed mid-search; resume while it is gone; head restarted on its port",
          ("test_the_head_gone_mid_search", "test_no_cluster_at_the_address")),
    Fault("Ray cluster: driver without the cluster's auth token",
          "driver started without RAY_AUTH_MODE=token against a token-auth head",
          ("test_a_driver_without_the_clusters_token",)),
    Fault("Ray cluster: a node that cannot see cache_dir (slow; fast twin in CI)",
          "a node in its own mount namespace with an empty tmpfs over cache_dir",
          ("test_a_node_that_cannot_see_cache_dir", "test_a_node_without_the_feature_cache")),
    Fault("NaN / inf training loss in a trial",
          "loss x NaN (trial 1) and x inf (trial 2) in the real loop; toy inject_nan",
          ("test_a_trial_whose_loss_becomes_nan_or_inf", "test_toy_inject_nan"),
          ("test_cached_proxy.py::test_injected_nan_gives_diverged",)),
    Fault("truncated / garbage last history line",
          "last line cut in half; binary garbage appended",
          ("test_a_damaged_last_history_line_is_dropped",),
          ("test_search_resume.py::test_a_history_line_cut_by_a_kill",)),
    Fault("corrupt history line before the last", "line 2 overwritten",
          ("test_a_damaged_history_line_before_the_last",)),
    Fault("truncated searcher state, corrupt config.yaml, garbage state.json",
          "bytes cut / overwritten on disk",
          ("test_a_damaged_searcher_state", "test_a_damaged_config", "test_a_damaged_state_json")),
    Fault("damaged feature cache", "truncated, flipped bytes, emptied checksum, tensor file deleted",
          ("test_a_damaged_feature_cache_is_detected", "test_a_search_over_a_truncated_feature_cache"),
          ("test_prepare.py::test_a_corrupt_cache_is_rebuilt", "test_feature_cache.py::test_flipped_bytes",
           "test_cached_proxy.py::test_a_bad_code_or_a_corrupt_cache")),
    Fault("damaged checkpoints", "last.pt cut to a third; every checkpoint zeroed",
          ("test_a_truncated_last_checkpoint", "test_every_checkpoint_damaged"),
          ("test_checkpoint.py::test_damaged_last_checkpoint_falls_back",)),
    Fault("full disk writing history / searcher state / state.json",
          "RLIMIT_FSIZE during one write: short write, then EFBIG",
          ("test_a_full_disk_is_one_line_keeps_every_file_whole",)),
    Fault("full disk writing a training checkpoint",
          "RLIMIT_FSIZE in-process (3rd checkpoint) and on a CLI subprocess",
          ("test_a_full_disk_while_a_checkpoint_is_written", "test_the_cli_reports_a_full_disk"),
          ("test_checkpoint.py::test_a_failed_write_leaves_the_old_checkpoint",)),
    Fault("full disk writing the feature cache", "RLIMIT_FSIZE while features.pt is written",
          ("test_a_full_disk_while_the_feature_cache_is_written",)),
    Fault("two searches on one run directory", "resume and a fresh run while the first holds the lock",
          ("test_a_second_search_on_a_run_dir_in_use",),
          ("test_search_loop.py::test_the_lock_refuses",)),
    Fault("fuzzed architecture values", "resolve_arch + the CLI's error line; rejected ones through dispatch",
          ("test_10000_fuzzed_arch_values", "test_rejected_arch_values_through_the_real_dispatch"),
          ("test_arch.py::test_fuzz_10000_strings_raise_only_arch_error",)),
    Fault("fuzzed override values", "keys x hostile values through compose + dispatch (4 commands)",
          ("test_fuzzed_overrides_are_accepted_or_refused", "test_10000_fuzzed_overrides")),
    Fault("hostile command lines in real subprocesses", "python -m search show/sample/run/report",
          ("test_a_sample_of_hostile_command_lines",)),
    Fault("malformed datasets through `python -m detector train`",
          "truncated JSON (subprocess), missing image, missing root, string / numeric-string image, category "
          "and annotation ids",
          ("test_a_malformed_dataset_stops_training",),
          ("test_bad_data.py",)),
    Fault("user-named output paths (`search show out=`, `eval`, `infer`, `synth`)",
          "an existing photo (png/jpg), another suffix, a path below a file, /proc, a name without suffix",
          ("test_show_never_replaces", "test_show_bad_out", "test_show_without_suffix"),
          ("test_eval_infer.py::test_eval_refuses_to_overwrite", "test_eval_infer.py::test_a_failed_infer",
           "test_eval_infer.py::test_infer_skips_unreadable")),
    Fault("bad search settings found before the run directory exists",
          "data.root missing / without split, data=coco without root, bad fixed_fpn / fixed_head, device=cuda "
          "without GPU; a run stopped before its first trial restarted",
          ("test_bad_search_settings_leave_no_run_dir", "test_a_run_stopped_before_its_first_trial")),
    Fault("every FPN trial fails: the head stage's hint is followed",
          "toy proxy_eval.inject_nan; `resume=<run> search.fixed_fpn=nasfcos` from the error line",
          ("test_the_head_stage_hint_names_a_command_that_works",)),
    Fault("report / resume on a folder that is not a search run",
          "a training run, other config.yaml files (mapping, empty, list)",
          ("test_a_folder_that_is_not_a_search_run",)),
    Fault("multirun: a bad swept value; a diverging job mid-sweep",
          "7 bad `-m` command lines (search, train, describe); `schedule.lr=1e6,0.01` (subprocess)",
          ("test_a_multirun_with_a_bad_value", "test_a_sweep_goes_on_past_a_diverging_job")),
]


@dataclass
class Case:
    nodeid: str
    outcome: str  # passed | failed | skipped
    seconds: float
    properties: dict[str, str] = field(default_factory=dict)


def run_pytest(fast: bool, junit: Path) -> int:
    also = sorted({ref.split("::")[0] for fault in FAULTS for ref in fault.also})
    files = SUITE_FILES + [str(next((ROOT / "tests").rglob(name)).relative_to(ROOT)) for name in also]  # tests/<package>/
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-o", "junit_family=xunit1", "-m", "not slow" if fast else ""]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    print("$", " ".join(command[1:]), file=sys.stderr, flush=True)
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def read_junit(path: Path) -> list[Case]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        nodeid = f"{module}.py::{case.get('name')}"
        outcome = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append(Case(nodeid, outcome, float(case.get("time", 0)), props))
    return cases


def matching(cases: list[Case], fragments: tuple[str, ...]) -> list[Case]:
    return [c for c in cases if any(fragment in c.nodeid for fragment in fragments)]


def table(cases: list[Case]) -> tuple[str, dict[str, int]]:
    lines = ["| # | fault | injected | survived | data lost | tests (also) |", "|---|---|---|---|---|---|"]
    totals = {"faults": 0, "injected": 0, "survived": 0, "lost": 0, "ran": 0}
    for number, fault in enumerate(FAULTS, start=1):
        ours, also = matching(cases, fault.tests), matching(cases, fault.also)
        ran = [c for c in ours + also if c.outcome != "skipped"]
        failed = [c for c in ran if c.outcome == "failed"]
        injected = sum(int(c.properties.get("faults_injected", 0)) for c in ours if c.outcome != "skipped")
        losses = [int(c.properties["data_lost"]) for c in ours if "data_lost" in c.properties]
        totals["faults"] += 1
        ours_ran = [c for c in ours if c.outcome != "skipped"]
        if not ours_ran:
            survived = "not run (slow case)" + (f"; {len(also)} older test(s) passed" if also and not failed else "")
        elif failed:
            survived = f"**NO** ({len(failed)} of {len(ran)} tests failed)"
        else:
            survived = f"yes ({len(ran)} test{'s' if len(ran) > 1 else ''})"
            totals["survived"] += 1
        totals["ran"] += bool(ours_ran)
        totals["injected"] += injected
        totals["lost"] += sum(losses)
        lost = str(sum(losses)) if losses else "n/a (no state)"
        names = ", ".join(sorted({c.nodeid.split("::")[1].split("[")[0] for c in ours})) or "-"
        refs = ", ".join(fault.also) if fault.also else ""
        lines.append(f"| {number} | {fault.name} | {injected} x {fault.injection} | {survived} | {lost} | "
                     f"{names}{f' (also {refs})' if refs else ''} |")
    return "\n".join(lines), totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="skip the slow cases (the CI portion)")
    parser.add_argument("--junit", type=Path, help="print the table of an existing junit XML instead of running")
    options = parser.parse_args(argv)
    start = time.perf_counter()
    if options.junit:
        junit, code = options.junit, 0
    else:
        junit = Path(tempfile.mkdtemp(prefix="fault-suite-")) / "junit.xml"
        code = run_pytest(options.fast, junit)
    cases = read_junit(junit)
    text, totals = table(cases)
    suite_seconds = sum(c.seconds for c in cases if c.nodeid.split("::")[0] in SUITE_FILES)
    print(text)
    print()
    print(f"faults injected: {totals['injected']} in {totals['ran']} fault kinds; survived: {totals['survived']} of "
          f"{totals['ran']} kinds; data lost: {totals['lost']}")
    print(f"tests: {sum(c.outcome == 'passed' for c in cases)} passed, {sum(c.outcome == 'failed' for c in cases)} "
          f"failed, {sum(c.outcome == 'skipped' for c in cases)} skipped; suite tests took {suite_seconds:.0f} s "
          f"(wall {time.perf_counter() - start:.0f} s)")
    print(f"command: python experiments/fault_suite.py{' --fast' if options.fast else ''}")
    return 0 if code == 0 and totals["survived"] == totals["ran"] and totals["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
