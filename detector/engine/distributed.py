"""Device choice and torch.distributed plumbing for training and evaluation.

``torchrun --nproc_per_node N -m detector train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``MASTER_ADDR/PORT``; :func:`setup` then joins the process group (nccl on
GPU, gloo on CPU) and pins the process to ``cuda:LOCAL_RANK``. Without those variables it is a
single process and nothing distributed happens. Only rank 0 writes files (:attr:`Context.is_main`).

Loss normalisation across processes is the loss's business (``detector.model.loss.reduce_num_positives``
averages the positive count once a process group exists); DDP then averages gradients, so N
processes on N shards of a global batch take the same step as one process on the whole batch.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from detector.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(UserError):
    """The requested device does not exist on this machine."""


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU -> DeviceError."""
    preference = str(preference).strip().lower()
    if preference not in DEVICES:
        raise DeviceError(f"device={preference}: use one of {', '.join(DEVICES)}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("device=cuda but no CUDA GPU is visible to torch; use device=cpu or device=auto")
    if local_rank >= torch.cuda.device_count():
        raise DeviceError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                          "use fewer processes per node")
    return torch.device("cuda", local_rank)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def setup(device_preference: str) -> Context:
    """Pick the device and, under torchrun (``WORLD_SIZE`` > 1), join the process group."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = select_device(device_preference, local_rank if world_size > 1 else 0)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=30))
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown(ctx: Context) -> None:
    """Leave the process group (a no-op in a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def mean_over_processes(values: dict[str, float], ctx: Context) -> dict[str, float]:
    """Average a dict of floats over processes (every process must call; same keys everywhere)."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= ctx.world_size
    return dict(zip(keys, packed.tolist()))


def gather_objects(obj: Any, ctx: Context) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, returned on every process."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, ctx: Context) -> Any:
    """Rank 0's ``obj`` on every process (e.g. a decision only rank 0 could make)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def per_process_batch(global_batch: int, ctx: Context) -> int:
    """``train.batch_size`` is the global batch; each process takes an equal share."""
    if global_batch < 1:
        raise UserError(f"train.batch_size={global_batch} must be >= 1")
    if global_batch % ctx.world_size:
        raise UserError(f"train.batch_size={global_batch} (the global batch) is not divisible by the "
                        f"{ctx.world_size} processes; pass a multiple of {ctx.world_size}")
    return global_batch // ctx.world_size


AMP_SETTINGS = ("auto", "bf16", "fp16", "off")


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``train.amp``: auto -> bf16 on GPU and off (None) on CPU; fp16 needs a GPU."""
    setting = str(setting).strip().lower()
    if setting not in AMP_SETTINGS:
        raise UserError(f"train.amp={setting}: use one of {', '.join(AMP_SETTINGS)}")
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "fp16" and device.type != "cuda":
        raise UserError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 or off on CPU")
    return torch.float16 if setting == "fp16" else torch.bfloat16
