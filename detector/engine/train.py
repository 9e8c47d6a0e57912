"""Detector training, behind ``python -m detector train arch=<code|zoo name|file|search run dir>``
(:mod:`detector.commands.train` prints the result).

:func:`train` is a straight-line loop over iterations::

    device, architecture, run directory checks  ->  datasets  ->  model, SGD, lr schedule
    -> (resume: weights, optimizer, scheduler, scaler, RNG, iteration from the last checkpoint)
    -> for each iteration: batch -> losses -> backward -> clip -> step -> lr step
         every log_every: log losses, lr, speed;  every eval_every: COCO eval on val;
         every ckpt_every: checkpoint
    -> final checkpoint, final COCO eval, detections_val.json, final.pt, metrics.json

Config keys read (``conf/train.yaml`` and its groups): ``arch``, ``seed``, ``device``,
``cache_dir``, ``out_dir``, ``resume``, ``data.*``, ``backbone.*``, ``recipe.*``,
``model.width``, ``schedule.*`` (``detector.engine.optim``), and ``train.*``: ``batch_size`` (the
GLOBAL batch; each of N processes takes batch_size / N), ``workers``, ``amp`` (auto | bf16 |
fp16 | off), ``channels_last``, ``clip_grad``, ``log_every``, ``eval_every``, ``ckpt_every``,
``keep_checkpoints``, ``eval_batch_size``, ``max_eval_images``, ``progress``,
``find_unused_parameters``, ``cuda_graph`` / ``cuda_graph_pad`` / ``cuda_graph_multiple``
(:mod:`detector.fast.graphs.training`, one CUDA process) and ``stop_after`` (a test hook: write a
checkpoint after that many iterations and return as if the process had been killed there).

Reproducibility: the data stream is a function of (seed, iteration) (``detector.data.stream``) and
checkpoints hold every RNG, so a run stopped and resumed with ``resume=true`` ends with the same
weights and metrics as an unbroken one (on the same device; CPU is bitwise).
"""
from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from detector.engine import run_dir as run_dirs
from detector.engine.checkpoint import (capture_rng_state, check_arch, load_latest, restore_rng_state, save_atomic,
                                 write_training_checkpoint)
from detector.data.coco_eval import METRIC_NAMES
from detector.data.coco import build_dataset
from detector.engine.distributed import (Context, autocast_dtype, barrier, broadcast_object, mean_over_processes,
                                  per_process_batch, setup, teardown)
from detector.errors import UserError
from detector.engine.evaluate import eval_loader, evaluate
from detector.fast.switch import set_fast_paths, training_fast_paths
from detector.engine.loggers import build_logger
from detector.engine.optim import Schedule, build_optimizer, build_scheduler
from detector.engine.step import forward_losses, optimizer_step
from detector.data.stream import batch_to_device, build_train_stream
from detector.arch.zoo import resolve_arch

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _main_first(ctx: Context, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then on the other ranks; a UserError on rank 0 is raised on every rank.

    Used for steps that may write shared files (generating the synthetic set, downloading
    weights) or whose outcome must be decided once (the run directory).
    """
    if not ctx.distributed:
        return fn()
    result, message = None, None
    if ctx.is_main:
        try:
            result = fn()
        except UserError as err:
            message = str(err)
    message = broadcast_object(message, ctx)
    if message is not None:
        raise UserError(message)
    return result if ctx.is_main else fn()


def _resume_flag(cfg: Any) -> bool:
    value = cfg.resume
    if value is None or isinstance(value, bool):
        return bool(value)
    raise UserError(f"resume={value}: training resumes with resume=true out_dir=<the run directory> "
                    "(resume=<dir> is the search's form)")


def _checked_run_dir(cfg: Any, code: str, resume: bool) -> str:
    path = run_dirs.resolve(cfg.out_dir, code)
    if resume and not (cfg.out_dir or run_dirs.hydra_job_dir()):
        raise run_dirs.RunDirError("resume=true needs out_dir=<the run directory to continue>")
    run_dirs.prepare_check(path, resume)
    return str(path)


def _finished_metrics(path: Path, code: str) -> dict[str, Any]:
    """The metrics of a finished run resumed; CheckpointError when it was trained as another arch."""
    metrics = json.loads((path / run_dirs.METRICS_FILE).read_text(encoding="utf-8"))
    check_arch(metrics, code, source=f"finished run {path}")
    log.info("%s already holds a finished run; its metrics are returned unchanged", path)
    return metrics


def training_graph_settings(cfg: Any, ctx: Context) -> tuple[tuple[int, int] | None, int] | None:
    """``train.cuda_graph``: None when off, else the ``(pad_to, multiple)`` bucket of
    :mod:`detector.fast.graphs.training` (``train.cuda_graph_pad`` / ``cuda_graph_multiple``).
    UserError for a setting that cannot work: no CUDA device, several processes, a bad bucket."""
    if not bool(cfg.train.cuda_graph):
        return None
    if ctx.device.type != "cuda":
        raise UserError("train.cuda_graph=true needs a CUDA device; drop it (or set train.cuda_graph=false) on CPU")
    if ctx.distributed:
        raise UserError("train.cuda_graph=true is for single-process training; drop it under torchrun (DDP)")
    from detector.fast.graphs.training import check_padding

    pad = cfg.train.cuda_graph_pad
    return check_padding(list(pad) if pad is not None else None, int(cfg.train.cuda_graph_multiple))


def train(cfg: Any) -> dict[str, Any]:
    """Train the detector described by ``cfg``; returns what ``metrics.json`` holds.

    With ``train.stop_after`` set, returns ``{"stopped_at": iteration, "run_dir": ...}`` instead.
    """
    ctx = setup(str(cfg.device))
    finished = False
    try:
        result = _train(cfg, ctx)
        finished = True
        return result
    finally:
        if finished:
            teardown(ctx)
        elif ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Any, ctx: Context) -> dict[str, Any]:
    arch = resolve_arch(str(cfg.arch))
    code = str(arch)
    amp_dtype = autocast_dtype(str(cfg.train.amp), ctx.device)
    fast_paths = training_fast_paths(cfg.train.fast_paths, ctx.device)  # checked before any file
    graph_settings = training_graph_settings(cfg, ctx)
    resume = _resume_flag(cfg)
    schedule = Schedule.from_cfg(cfg.schedule)
    batch = per_process_batch(int(cfg.train.batch_size), ctx)
    run_dir = Path(_main_first(ctx, lambda: _checked_run_dir(cfg, code, resume)))
    if resume and run_dirs.is_finished(run_dir):
        return _finished_metrics(run_dir, code)

    seed_everything(int(cfg.seed))
    cache_dir = cfg.cache_dir
    # uint8 pixels through the loader (4x fewer bytes to pin and copy); the model converts them on the device
    train_set = _main_first(ctx, lambda: build_dataset(cfg.data, "train", train=True, cache_dir=cache_dir,
                                                       uint8_images=True))
    val_set = _main_first(ctx, lambda: build_dataset(cfg.data, "val", train=False, cache_dir=cache_dir))

    model, train_graphs = _build_model(cfg, arch, ctx, fast_paths, graph_settings)
    optimizer = build_optimizer(model, schedule)
    scheduler = build_scheduler(optimizer, schedule)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)

    if resume:
        start, train_seconds, evals = _restore(run_dir, code, model, optimizer, scheduler, scaler)
    else:
        start, train_seconds, evals = 0, 0.0, []
        _main_first(ctx, lambda: run_dirs.ensure_writable(run_dir))
        if ctx.is_main:
            run_dirs.save_config(cfg, run_dir)

    net: nn.Module = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                      find_unused_parameters=bool(cfg.train.find_unused_parameters))
    logger = build_logger(cfg, run_dir, code) if ctx.is_main else None
    workers = int(cfg.train.workers)
    eval_batch = int(cfg.train.eval_batch_size or batch)
    val_loader = eval_loader(val_set, eval_batch, workers, ctx, cfg.train.max_eval_images)
    stream = iter(build_train_stream(train_set, int(cfg.train.batch_size), int(cfg.seed), ctx.rank, ctx.world_size,
                                     start, workers, pin_memory=ctx.device.type == "cuda"))

    def checkpoint_payload(done: int) -> dict[str, Any]:
        return {
            "arch": code, "config": OmegaConf.to_container(cfg, resolve=True), "iteration": done,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": capture_rng_state(),
            "train_seconds": train_seconds, "evals": evals,
            "class_names": list(train_set.class_names), "label_to_cat_id": list(train_set.label_to_cat_id),
        }

    def run_eval(done: int) -> tuple[dict[str, float], list[dict]]:
        metrics, detections = evaluate(model, val_loader, ctx, amp_dtype, progress=bool(cfg.train.progress))
        evals.append({"iteration": done, **metrics})
        log.info("iteration %d: val AP %.4f, AP50 %.4f", done, metrics.get("AP", float("nan")),
                 metrics.get("AP50", float("nan")))
        if logger is not None:
            logger.log({f"val/{k}": v for k, v in metrics.items()}, step=done)
        return metrics, detections

    total = schedule.iterations
    log_every, eval_every = max(int(cfg.train.log_every), 1), int(cfg.train.eval_every)
    ckpt_every, keep = int(cfg.train.ckpt_every), int(cfg.train.keep_checkpoints)
    stop_after = cfg.train.stop_after
    clip = float(cfg.train.clip_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    last_losses: dict[str, float] = {}
    bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, leave=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0,  # redirected logs stay small
               disable=not (ctx.is_main and bool(cfg.train.progress)))
    net.train()
    window_start, window_iters = time.perf_counter(), 0
    for iteration in range(start, total):
        step_start = time.perf_counter()
        images, targets = batch_to_device(*next(stream), ctx.device)
        losses = forward_losses(net, images, targets, ctx.device, amp_dtype)
        optimizer_step(sum(losses.values()), optimizer, params, clip, scaler)
        lr = optimizer.param_groups[0]["lr"]  # the weights' lr used by this step
        scheduler.step()
        done = iteration + 1
        train_seconds += time.perf_counter() - step_start
        window_iters += 1
        bar.update(1)

        if done % log_every == 0 or done == total or done == stop_after:
            values = _checked_losses(losses, done, ctx, run_dir)
            speed = window_iters * int(cfg.train.batch_size) / max(time.perf_counter() - window_start, 1e-9)
            window_start, window_iters = time.perf_counter(), 0
            last_losses = values
            if logger is not None:
                logger.log({**values, "lr": lr, "images_per_s": speed}, step=done)
            bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{speed:.1f}", refresh=False)
        if eval_every > 0 and done % eval_every == 0 and done < total:
            run_eval(done)
        if stop_after is not None and done == int(stop_after) and done < total:
            if ctx.is_main:
                write_training_checkpoint(checkpoint_payload(done), run_dir, keep)
            barrier(ctx)
            bar.close()
            if logger is not None:
                logger.finish()
            return {"stopped_at": done, "run_dir": str(run_dir)}
        if ckpt_every > 0 and done % ckpt_every == 0 and done < total and ctx.is_main:
            write_training_checkpoint(checkpoint_payload(done), run_dir, keep)
    bar.close()
    del stream  # stops the loader's workers
    if train_graphs is not None and ctx.is_main:
        log.info("CUDA-graph training step: %d capture(s)%s", train_graphs.captures,
                 f"; ran eagerly for: {train_graphs.failures}" if train_graphs.failures else "")

    if ctx.is_main and start < total:
        write_training_checkpoint(checkpoint_payload(total), run_dir, keep)
    final, detections = run_eval(total)
    result = {
        "arch": code, "arch_name": run_dirs.short_arch_name(code), "seed": int(cfg.seed), "iterations": total,
        "batch_size": int(cfg.train.batch_size), "world_size": ctx.world_size, "device": ctx.device.type,
        "train_seconds": round(train_seconds, 2), **{name: final[name] for name in METRIC_NAMES},
        "final_losses": last_losses, "evals": evals, "run_dir": str(run_dir),
    }
    if ctx.is_main:
        _write_final(cfg, run_dir, model, train_set, detections, result)
        logger.log_summary({name: final[name] for name in METRIC_NAMES} | {"train_seconds": result["train_seconds"]})
        logger.finish()
    barrier(ctx)
    return result


def _build_model(cfg: Any, arch: Any, ctx: Context, fast_paths: tuple[str, ...],
                 graph_settings: tuple | None) -> tuple[nn.Module, Any]:
    """The detector on the device with its fast paths (and the CUDA-graph step when asked)."""
    from detector.model.build import build_detector_from_cfg

    model = _main_first(ctx, lambda: build_detector_from_cfg(cfg, arch)).to(ctx.device)
    if bool(cfg.train.channels_last):
        model = model.to(memory_format=torch.channels_last)
    set_fast_paths(model, fast_paths, deform="auto")  # same function and state dict keys as the reference code
    if ctx.is_main and fast_paths:
        log.info("fast paths on: %s", ", ".join(fast_paths))
    train_graphs = None
    if graph_settings is not None:
        from detector.fast.graphs.training import install_training_graph

        train_graphs = install_training_graph(model, *graph_settings)
        log.info("CUDA-graph training step on (batches padded to at least %s, multiple %d)", *graph_settings)
    return model, train_graphs


def _restore(run_dir: Path, code: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             scaler: torch.amp.GradScaler) -> tuple[int, float, list[dict[str, Any]]]:
    """Load the last checkpoint into the training state; (iteration, training seconds, evaluations)."""
    payload, path = load_latest(run_dir)
    check_arch(payload, code, source=f"checkpoint {path}")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    restore_rng_state(payload["rng"])
    start = int(payload["iteration"])
    log.info("resuming %s from %s at iteration %d", run_dir, path.name, start)
    return start, float(payload.get("train_seconds", 0.0)), list(payload.get("evals", []))


def _checked_losses(losses: dict[str, torch.Tensor], done: int, ctx: Context, run_dir: Path) -> dict[str, float]:
    """The step's losses (and their sum, ``loss``) averaged over processes; TrainingDiverged when not
    finite (the run dir then records it, so ``python -m detector summary`` lists the run as diverged)."""
    values = {name: float(value.detach()) for name, value in losses.items()}
    values["loss"] = sum(values.values())
    values = mean_over_processes(values, ctx)
    if not math.isfinite(values["loss"]):
        diverged = TrainingDiverged(f"the loss is {values['loss']} at iteration {done}; lower schedule.lr "
                                    "or set train.clip_grad (e.g. 10)")
        if ctx.is_main:
            run_dirs.write_json(run_dir / run_dirs.DIVERGED_FILE, {"iteration": done, "error": str(diverged)})
        raise diverged
    return values


def _write_final(cfg: Any, run_dir: Path, model: nn.Module, train_set: Any, detections: list[dict],
                 result: dict[str, Any]) -> None:
    """final.pt (weights, arch, config, class names), the val detections and metrics.json."""
    save_atomic({"arch": result["arch"], "config": OmegaConf.to_container(cfg, resolve=True),
                 "iteration": result["iterations"], "model": model.state_dict(),
                 "class_names": list(train_set.class_names), "label_to_cat_id": list(train_set.label_to_cat_id)},
                run_dir / run_dirs.FINAL_WEIGHTS)
    run_dirs.write_json(run_dir / run_dirs.DETECTIONS_FILE, detections)
    run_dirs.write_json(run_dir / run_dirs.METRICS_FILE, result)


