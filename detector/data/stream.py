"""The training data stream: a reproducible, resumable, shardable sequence of batches.

Training counts iterations, not epochs. Batch ``t`` of the stream is a pure function of
(seed, t): epoch ``e = t // batches_per_epoch`` shuffles the dataset with a generator seeded by
(seed, e), global batch ``t`` is the next ``global_batch`` indices of that permutation (the last
partial batch of an epoch is dropped), and process ``r`` of ``W`` takes positions ``r, r+W, ...``
of it. Each sample's augmentation (short side, flip: torch's RNG in the transform) is seeded by
(seed, epoch, index) inside a forked RNG, so it does not depend on the number of loader workers
or processes and does not touch the trainer's RNG.

Hence: a run resumed at iteration ``k`` sees exactly the batches an unbroken run sees from ``k``
on, and N processes together see exactly the global batches of one process.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detector.data.errors import DataError
from detector.data.transforms import collate

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant for seed mixing
_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one sample's augmentation in one epoch."""
    return ((seed * _MIX) ^ (epoch * 1_000_003 + index)) & _MASK


class SeededSamples(Dataset):
    """``dataset[(index, seed)]`` = ``base[index]`` drawn with torch's CPU RNG seeded by ``seed``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


class StreamBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless per-process batches of ``(index, sample seed)`` starting at ``start_iteration``."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_iteration: int = 0) -> None:
        if num_samples < global_batch:
            raise DataError(f"the training split has {num_samples} images, fewer than one batch "
                            f"(train.batch_size={global_batch}); lower train.batch_size or add images")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.start_iteration = start_iteration
        self.batches_per_epoch = num_samples // global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator()
        generator.manual_seed((self.seed * 1_000_003 + epoch) & _MASK)
        return torch.randperm(self.num_samples, generator=generator)  # (num_samples,)

    def batch(self, iteration: int, order: torch.Tensor) -> list[tuple[int, int]]:
        epoch, position = divmod(iteration, self.batches_per_epoch)
        start = position * self.global_batch
        chunk = order[start:start + self.global_batch].tolist()[self.rank::self.world_size]
        return [(index, sample_seed(self.seed, epoch, index)) for index in chunk]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration, epoch, order = self.start_iteration, None, None
        while True:
            current = iteration // self.batches_per_epoch
            if current != epoch:
                epoch, order = current, self.permutation(current)
            yield self.batch(iteration, order)
            iteration += 1


def batch_to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device):
    """A collated batch (images, targets) on ``device``: images and the targets' boxes and labels
    (non-blocking copies: pinned batches overlap the transfer); other target keys stay as they are."""
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{**t, "boxes": t["boxes"].to(device, non_blocking=True),
                "labels": t["labels"].to(device, non_blocking=True)} for t in targets]
    return images, targets


def build_train_stream(dataset: Dataset, global_batch: int, seed: int, rank: int, world_size: int,
                       start_iteration: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over :class:`StreamBatchSampler`: iterate it once, it never ends."""
    sampler = StreamBatchSampler(len(dataset), global_batch, seed, rank, world_size,  # type: ignore[arg-type]
                                 start_iteration)
    return DataLoader(SeededSamples(dataset), batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=False)
