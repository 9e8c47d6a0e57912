"""``python -m search run [resume=<run_dir>] key=value ...``: prepare, run the stages, report.

:func:`run_search` does the work and returns the run directory; :func:`run_command` (the CLI
entry) runs it and then writes the report. Phases:

1. The run directory is created (or, with ``resume=``, reopened) and locked; its
   ``config.yaml`` is the resolved configuration.
2. With ``proxy_eval=cached`` the feature cache is prepared once, in this process (reused if
   it exists), before any trial; workers reopen it from its path.
3. The stages run in order (:mod:`search.loop`) on the executor (``executor=ray`` or ``local``),
   with a progress bar and, with ``logger=wandb``, one log entry per finished trial, both from
   this driver process only.

Every setting that can be checked without running a trial (numbers, stages, fixed parts,
executor, device, the data's folders) is checked before the run directory is created; a fresh run
that still fails before its first trial (bad data found while preparing) removes what it wrote
(:meth:`RunDir.discard_unstarted`), and a run directory that never began a trial may be reused by
the corrected command.

Resuming. The run's saved config defines the search. Only the runtime keys
``executor``, ``search.workers``, ``search.retries``, ``search.top_k``, ``ray``, ``device`` and
``logger`` may change on resume, and only when given with a value other than their default;
``search.fixed_fpn`` (``fixed_head``) may too while no head (fpn) trial exists, so that the head
stage's hint ``resume=<run> search.fixed_fpn=<code>`` works; ``search.budget`` may be raised (never
lowered) while only the first stage has trials, which continues that stage, finished or not, to the
new budget; a run that never began a trial takes every override. Such settings are written into the run's config.yaml. Other overrides are ignored
with a warning. A finished run resumed does nothing and says so. A run stopped by bad settings
after some trials still gets its report for the trials done.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from detector.errors import UserError, WriteError
from search.history import History, best_row
from search.early_stopping import stopping_settings
from search.loop import SearchRecord, check_search_settings, run_stages, stage_names
from search.run_dir import RunDir, create_run_dir, open_run_dir

log = logging.getLogger(__name__)

CACHED_ON_GPU = ("proxy_eval=cached on a GPU: the cached proxy did not rank architectures like full training "
                 "(Kendall tau 0.17-0.25, experiments/search_quality/pretrained/README.md); with a GPU use "
                 "proxy_eval=end_to_end (tau 0.53-0.78)")

RUNTIME_KEYS = ("executor", "search.workers", "search.retries", "search.top_k", "ray", "device", "logger")
EXECUTORS = ("ray", "local")


# ---------------------------------------------------------------------- configuration
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _container(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _settable_on_resume(rows: list[dict[str, Any]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(runtime keys, keys of the search's definition) a resume may set, given the history rows."""
    if not rows:
        return RUNTIME_KEYS, ("",)  # never began a trial: every key
    stages = {row.get("stage") for row in rows}
    fixed = tuple(f"search.fixed_{part}" for part, stage in (("fpn", "head"), ("head", "fpn")) if stage not in stages)
    # a larger budget continues the first stage; once a later stage began, it would reopen a stage
    # whose best the later one already fixed
    budget = ("search.budget",) if all(row.get("stage_index", 0) == 0 for row in rows) else ()
    return RUNTIME_KEYS, fixed + budget


def resume_config(cfg: Any, saved: Any, rows: list[dict[str, Any]] | None = None) -> Any:
    """The saved config with the keys the user set on the resume command line that a resume may
    change (see the module doc; ``rows``: the run's history, None for a run with trials whose rows
    are not given)."""
    from omegaconf import OmegaConf

    from detector.cli import compose

    runtime, definition = _settable_on_resume(rows) if rows is not None else (RUNTIME_KEYS, ())
    default, current, old = (_flatten(_container(c)) for c in (compose("search", []), cfg, saved))
    merged = OmegaConf.create(_container(saved))
    changed, redefined, ignored = [], [], []
    for key, value in current.items():
        if key in ("resume", "run") or value == default.get(key, object()) or value == old.get(key, object()):
            continue
        if any(key == k or key.startswith(k + ".") for k in runtime):
            changed.append(f"{key}={value}")
        elif any(k == "" or key == k or key.startswith(k + ".") for k in definition):
            redefined.append(f"{key}={value}")
        else:
            ignored.append(key)
            continue
        OmegaConf.update(merged, key, value, merge=False, force_add=True)
    if rows is None or rows:  # a run that never began a trial takes any budget
        _check_budget_raise(saved, merged)
    if changed or redefined:
        log.info("resume: using %s from the command line", ", ".join(changed + redefined))
    if ignored:
        log.warning("resume: ignoring %s: the saved config.yaml of the run defines the search",
                    ", ".join(sorted(ignored)))
    return merged


def _check_budget_raise(saved: Any, merged: Any) -> None:
    """A resume of a run with trials may raise ``search.budget`` (more trials for the same search), never lower it."""
    old, new = int(saved.search.budget), int(merged.search.budget)
    if new < old:
        raise UserError(f"search.budget={new}: a resume can raise the run's budget ({old} trained trials per "
                        f"stage), not lower it; leave search.budget out or give a value of at least {old}")


def _definition_changed(saved: Any, merged: Any) -> bool:
    """Whether ``merged`` changes a key of the search's definition (not a runtime key) of ``saved``."""
    old, new = _flatten(_container(saved)), _flatten(_container(merged))
    return any(old.get(key, object()) != value for key, value in new.items()
               if not any(key == k or key.startswith(k + ".") for k in RUNTIME_KEYS))


def _open_run(cfg: Any) -> tuple[RunDir, Any, bool]:
    """The locked run dir, the config to run with, and whether this is a resume."""
    from omegaconf import OmegaConf

    if cfg.get("resume"):
        run_dir = open_run_dir(cfg.resume)
        try:
            saved = run_dir.read_config()
            run_cfg = resume_config(cfg, saved, History(run_dir.history_path).rows)
            _check(run_cfg)
            if _definition_changed(saved, run_cfg):
                OmegaConf.update(run_cfg, "search.run_dir", str(run_dir.path), merge=False)
                run_dir.write_config(_container(run_cfg))
        except Exception:
            run_dir.unlock()
            raise
        return run_dir, run_cfg, True
    _check(cfg)
    run_dir = create_run_dir(cfg.search.get("run_dir"))
    run_cfg = OmegaConf.create(_container(cfg))
    OmegaConf.update(run_cfg, "search.run_dir", str(run_dir.path), merge=False)
    run_dir.write_config(_container(run_cfg))
    return run_dir, run_cfg, False


def _check(cfg: Any) -> None:
    """Everything that can be checked before a run directory is created (see the module doc)."""
    from detector.data.coco import check_data_paths
    from proxy_eval.settings import proxy_name, resolve_device, resolve_reward

    check_search_settings(cfg)
    resolve_reward(cfg)  # a bad reward: a trial would refuse it only once the run had started
    stopping_settings(cfg)
    name = cfg.executor.get("name") if cfg.get("executor") else None
    if name not in EXECUTORS:
        raise UserError(f"executor={name}: choose one of {', '.join(EXECUTORS)}")
    resolve_device(cfg.get("device", "auto"))
    if proxy_name(cfg) != "toy":  # also checks every proxy_eval key against the proxy's YAML
        check_data_paths(cfg.data, ("train",))


# ---------------------------------------------------------------------- executors
def _make_executor(cfg: Any, run_dir: RunDir, cache: Any) -> Any:
    retries, workers, seed = int(cfg.search.retries), int(cfg.search.workers), int(cfg.seed)
    stopping, threads = stopping_settings(cfg), cfg.proxy_eval.get("threads", None)
    if cfg.executor.name == "local":
        from proxy_eval.build import build_evaluator
        from search.local_executor import LocalExecutor

        return LocalExecutor(lambda: build_evaluator(cfg, cache=cache), seed=seed, retries=retries, workers=workers,
                             stopping=stopping, threads=threads)
    try:
        from search.ray_executor import RayExecutor
    except ImportError as err:
        raise UserError(f"executor=ray needs Ray Tune ({err}); pip install 'ray[tune]' or use executor=local") from None
    cache_path = str(cache.path) if hasattr(cache, "path") else None  # end_to_end / toy: prepared per worker
    return RayExecutor(_container(cfg), cache_path, run_dir.path, seed=seed, retries=retries, workers=workers,
                       address=cfg.ray.get("address"), cpus_per_trial=float(cfg.ray.cpus_per_trial),
                       gpus_per_trial=float(cfg.ray.gpus_per_trial), stopping=stopping, threads=threads)


def _prepare(cfg: Any) -> Any:
    """Built once here, before any trial: the feature cache (``proxy_eval=cached``), the data and
    proxy splits (``end_to_end``), or None (``toy``)."""
    from proxy_eval.build import prepare_proxy
    from proxy_eval.settings import proxy_name, resolve_device

    if proxy_name(cfg) == "cached" and resolve_device(cfg.get("device", "auto")) != "cpu":
        log.warning(CACHED_ON_GPU)
    start = time.perf_counter()
    prepared = prepare_proxy(cfg)
    if hasattr(prepared, "path"):
        log.info("feature cache ready in %.1f s: %s", time.perf_counter() - start, prepared.path)
    return prepared


# ---------------------------------------------------------------------- observers
class ProgressBar:
    """tqdm bar over trained trials of all stages: done/total, best reward, stage, elapsed."""

    def __init__(self, record: SearchRecord) -> None:
        from tqdm import tqdm

        total = record.budget * len(record.stages)
        done = sum(min(record.budget, sum(not r["reused"] for r in record.history.stage_rows(i)))
                   for i in range(len(record.stages)))
        self.bar = tqdm(total=total, initial=done, desc="search", unit="trial", dynamic_ncols=True)
        self.record = record
        self._postfix(record)
        record.stage_observers.append(lambda stage: self._postfix(self.record))

    def _postfix(self, record: SearchRecord) -> None:
        best = "-" if record.best is None else f"{record.best['reward']:.4f}"
        stage = record.current.name if record.current else "-"
        self.bar.set_postfix_str(f"stage={stage} best={best}")

    def __call__(self, row: dict[str, Any], record: SearchRecord) -> None:
        if not row["reused"]:
            self.bar.update(1)
        self._postfix(record)

    def close(self) -> None:
        self.bar.close()


class LoggerObserver:
    """Logs every history row through the run logger (``<run_dir>/log.jsonl``, and wandb with
    ``logger=wandb``), from the driver only: numbers go to wandb, text fields to the file only."""

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        from detector.engine.loggers import build_logger

        self.logger = build_logger(cfg, run_dir, arch_code="", name=f"search-{Path(run_dir).name}")

    def __call__(self, row: dict[str, Any], record: SearchRecord) -> None:
        self.logger.log({
            "reward": row["reward"], "best_reward": record.best["reward"] if record.best else None,
            "ok": int(row["status"] == "ok"), "reused": int(bool(row["reused"])), "stage_index": row["stage_index"],
            "ap": row.get("ap"), "seconds": row.get("seconds"),
            "status": row["status"], "stage": row["stage"], "code": row["code"],  # text: log.jsonl only
        }, step=int(row["trial"]))

    def finish(self, record: SearchRecord) -> None:
        best = record.best
        self.logger.log_summary({"trials": len(record.history), "trained": record.trained_count(),
                                 "best_reward": best["reward"] if best else None,
                                 "best_code": best["code"] if best else None})
        self.logger.finish()


# ---------------------------------------------------------------------- entry points
def run_search(cfg: Any) -> Path:
    """Run (or resume) a search; returns its run directory. Bad settings raise UserError; one
    raised after some trials carries ``run_dir`` (the report of those trials can be written); a
    fresh run stopped by one before its first trial is removed (:meth:`RunDir.discard_unstarted`).
    A :class:`WriteError` (full disk) leaves everything as it was."""
    run_dir, run_cfg, resumed = _open_run(cfg)
    try:
        return _run_stages(run_dir, run_cfg, resumed)
    except WriteError:
        raise  # a full disk: every file stays as it was, the same command continues (resume=)
    except UserError as err:
        if run_dir.started():
            err.run_dir = run_dir.path
        elif not resumed:
            run_dir.discard_unstarted()
        raise


def _run_stages(run_dir: RunDir, run_cfg: Any, resumed: bool) -> Path:
    logger = None
    progress = None
    executor = None
    try:
        from controller.build import build_searcher

        history = History(run_dir.history_path)
        record = SearchRecord(run_dir, history, stage_names(run_cfg), int(run_cfg.search.budget))
        if resumed:
            state = run_dir.read_state()
            if state.get("status") == "finished" and int(state.get("budget_per_stage", 0)) >= record.budget:
                _say_complete(run_dir, record)
                return run_dir.path
            log.info("resuming %s: %d trials in history", run_dir.path, len(history))
        else:
            log.info("search run dir: %s", run_dir.path)
        start = time.perf_counter()
        cache = _prepare(run_cfg)
        executor = _make_executor(run_cfg, run_dir, cache)
        progress = ProgressBar(record)
        record.observers.append(progress)
        logger = LoggerObserver(run_cfg, run_dir.path)
        record.observers.append(logger)
        worked = run_stages(run_cfg, record, executor,
                            lambda space, seed: build_searcher(run_cfg.controller, space, seed))
        progress.close()
        progress = None
        logger.finish(record)
        logger = None
        if not worked:
            _say_complete(run_dir, record)
        else:
            _say_summary(run_dir, record, time.perf_counter() - start)
        return run_dir.path
    finally:
        if progress is not None:
            progress.close()
        if logger is not None:
            logger.logger.finish()
        if executor is not None:
            executor.close()
        run_dir.unlock()


def _say_complete(run_dir: RunDir, record: SearchRecord) -> None:
    print(f"run {run_dir.path} is already complete ({len(record.history)} trials in history); nothing to do")


def _say_summary(run_dir: RunDir, record: SearchRecord, seconds: float) -> None:
    rows = record.history.rows
    failed = sum(r["status"] not in ("ok", "stopped") and not r["reused"] for r in rows)
    stopped = sum(r["status"] == "stopped" and not r["reused"] for r in rows)
    best = best_row(rows)
    print(f"search finished in {seconds:.0f} s: {record.trained_count()} trials trained "
          f"({failed} failed{f', {stopped} stopped early' if stopped else ''}), "
          f"{sum(bool(r['reused']) for r in rows)} reused; run dir {run_dir.path}")
    if best is not None:
        print(f"best reward {best['reward']:.4f}: {best['code']}")


def run_command(cfg: Any) -> None:
    """``python -m search run``: the search, then its report (report.md, plots, retrain command)."""
    from search.report import write_report

    try:
        run_path = run_search(cfg)
    except UserError as err:
        if getattr(err, "run_dir", None) is not None:  # stopped by bad settings after some trials
            try:
                write_report(err.run_dir, top_k=int(cfg.search.top_k))
            except (OSError, UserError) as report_err:  # the error that stopped the run is the one to show
                log.warning("no report for %s: %s", err.run_dir, report_err)
        raise
    write_report(run_path, top_k=int(cfg.search.top_k))
