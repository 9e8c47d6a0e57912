"""DDP: two gloo processes on halves of a global batch train exactly like one process on the whole batch.

This holds only if (a) the data stream gives the two processes the two halves of the same global
batches, (b) the loss normalisers (positive counts, centerness sums) are averaged across
processes (``detector.model.loss.reduce_num_positives``), so that DDP's gradient averaging yields the
single-process gradient, and (c) only rank 0 writes files.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from detector.engine.checkpoint import load_checkpoint
from detector.cli import compose
from detector.engine.train import train
from detector.data.stream import StreamBatchSampler

ROOT = Path(__file__).resolve().parents[2]
# same-size images (96x96, flips keep the size) so both settings pad identically; frozen BN so that
# batch statistics do not depend on how the batch is split
OVERRIDES = ["experiment=synthetic_tiny", "device=cpu", "backbone.norm=frozen_bn", "schedule.iterations=3",
             "train.batch_size=4", "train.ckpt_every=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def test_stream_shards_are_the_halves_of_the_single_process_batches():
    single = iter(StreamBatchSampler(20, 4, seed=3, rank=0, world_size=1))
    shards = [iter(StreamBatchSampler(20, 4, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    for _ in range(12):  # crosses epoch boundaries (5 batches per epoch)
        whole = next(single)
        halves = [next(s) for s in shards]
        assert sorted(whole) == sorted(halves[0] + halves[1]) and len(halves[0]) == len(halves[1]) == 2


def test_two_gloo_processes_match_one_process(tmp_path):
    cache = tmp_path / "cache"
    single_run, ddp_run = tmp_path / "single", tmp_path / "ddp"
    train(compose("train", [*OVERRIDES, f"cache_dir={cache}", f"out_dir={single_run}"]))

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "detector", "train", *OVERRIDES,
               f"cache_dir={cache}", f"out_dir={ddp_run}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    single, ddp = _losses(single_run), _losses(ddp_run)
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 2, 3]
    for a, b in zip(single, ddp):
        for key in ("classification", "bbox_regression", "bbox_ctrness"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    weights_single = load_checkpoint(single_run / "final.pt")["model"]
    weights_ddp = load_checkpoint(ddp_run / "final.pt")["model"]
    for name, value in weights_single.items():
        torch.testing.assert_close(weights_ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert json.loads((ddp_run / "metrics.json").read_text())["world_size"] == 2
    # only rank 0 wrote: one log line per logged step, as in the single process
    lines = [(run / "log.jsonl").read_text().splitlines() for run in (single_run, ddp_run)]
    assert len(lines[0]) == len(lines[1])
