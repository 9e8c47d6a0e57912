"""Proxy splits: seeded proxy-train / proxy-val image lists drawn from the training set only.

The proxy never sees the official validation set: the search would otherwise be tuned on the
images the final model is scored on. Both lists come from one seeded permutation of the
training split's image ids (sorted first, so the order of the annotation file does not matter):
the first ``val_images`` ids of the permutation are proxy-val, the next ``train_images`` are
proxy-train. Growing the train list therefore never changes the val list.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable

from detector.errors import UserError


class SplitError(UserError):
    """The requested proxy split sizes do not fit the training set."""


@dataclass(frozen=True)
class ProxySplits:
    """Image ids of the proxy-train and proxy-val lists (disjoint, both from the training split)."""

    train_ids: tuple[int, ...]
    val_ids: tuple[int, ...]
    seed: int

    def __post_init__(self) -> None:
        overlap = set(self.train_ids) & set(self.val_ids)
        if overlap:
            raise ValueError(f"proxy splits overlap on {len(overlap)} image ids, e.g. {min(overlap)}")


def make_splits(image_ids: Iterable[int], train_images: int | None, val_images: int, seed: int) -> ProxySplits:
    """Draw ``val_images`` proxy-val ids and ``train_images`` proxy-train ids (None = all the rest).

    ``image_ids`` are the ids of the *training* split. Raises :class:`SplitError` when a size is not
    positive or the two sizes together exceed the number of training images.
    """
    ids = sorted({int(i) for i in image_ids})
    if val_images is None or int(val_images) < 1:
        raise SplitError(f"proxy_eval.val_images={val_images}: need at least 1 proxy-val image")
    val_images = int(val_images)
    if train_images is None:
        train_images = len(ids) - val_images
    train_images = int(train_images)
    if train_images < 1:
        raise SplitError(f"proxy_eval.train_images={train_images}: need at least 1 proxy-train image "
                         f"(the training set has {len(ids)} images, {val_images} go to proxy-val)")
    if train_images + val_images > len(ids):
        raise SplitError(
            f"proxy_eval.train_images={train_images} + val_images={val_images} exceed the {len(ids)} "
            "images of the training split; lower them (the proxy never uses the official val split)")
    order = list(ids)
    random.Random(int(seed)).shuffle(order)
    val = tuple(sorted(order[:val_images]))
    train = tuple(sorted(order[val_images:val_images + train_images]))
    return ProxySplits(train_ids=train, val_ids=val, seed=int(seed))
