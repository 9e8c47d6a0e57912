"""The on-disk cache of frozen backbone features for the proxy splits.

Layout: ``<cache_dir>/features/<key>/`` holds

- ``features.pt``: one ``torch.save`` file (plain dicts, lists and tensors; loads with
  ``weights_only=True``) with, per split (``train``, ``val``), the C-level features in fp16
  ``{level: (N, C_l, R/s_l, R/s_l)}``, every image's boxes (xyxy, proxy-image pixels) and labels
  (0..C-1) concatenated with per-image counts, image ids and content sizes (h, w) inside the
  R x R letterboxed input; with ``proxy_eval.train_last_stage`` also ``last_stage``, the adapted
  weights of the backbone's last stage (:mod:`proxy_eval.last_stage`; caches without it load
  with ``None``, so the format version did not change);
- ``features.pt.sha256``: the sha256 of ``features.pt`` (``sha256sum`` format);
- ``meta.json``: the key material (what determines the cache) and a few facts, for humans.

``key`` is a hash of the key material (see :func:`cache_key`); the caller decides what goes in it.
A cache is written into a temporary sibling folder and renamed into place (``os.replace``), so a
crash or a concurrent writer never leaves a half-written cache under the key. Loading verifies the
checksum; a mismatch or an unreadable file raises :class:`CorruptCacheError`, and the writer of
the cache (``proxy_eval.prepare``) rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from detector.errors import WriteError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSOR_FILE = "features.pt"
CHECKSUM_FILE = TENSOR_FILE + ".sha256"
META_FILE = "meta.json"
SPLITS = ("train", "val")
_HASH_CHUNK = 1 << 22


class CorruptCacheError(Exception):
    """A cache folder exists but its tensor file is missing, unreadable or fails its checksum."""


def cache_key(material: Mapping[str, Any]) -> str:
    """A short stable hex digest of JSON-serialisable key material (key order does not matter)."""
    payload = json.dumps({"format": FORMAT_VERSION, **material}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class SplitFeatures:
    """Cached inputs of one proxy split (N images).

    features: ``{level: (N, C_l, H_l, W_l)}`` fp16 backbone outputs of the letterboxed R x R images.
    boxes / labels: per image ``(K_i, 4)`` float32 xyxy in proxy pixels / ``(K_i,)`` int64 in 0..C-1.
    image_ids: the training-set image id of each image. sizes: (h, w) of the image content inside
    the R x R input (the rest is zero padding at the bottom/right).
    """

    features: dict[str, Tensor]
    boxes: list[Tensor]
    labels: list[Tensor]
    image_ids: list[int]
    sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.image_ids)

    def targets(self, indices: list[int] | Tensor, device: torch.device | str = "cpu") -> list[dict[str, Tensor]]:
        """``[{"boxes": (K, 4), "labels": (K,)}]`` of the given images, on ``device``."""
        return [{"boxes": self.boxes[int(i)].to(device), "labels": self.labels[int(i)].to(device)}
                for i in indices]

    def to_payload(self) -> dict[str, Any]:
        counts = [len(b) for b in self.boxes]
        return {
            "features": {level: t.to(torch.float16).contiguous() for level, t in self.features.items()},
            "boxes": torch.cat(self.boxes).reshape(-1, 4).float() if self.boxes else torch.zeros(0, 4),
            "labels": torch.cat(self.labels).long() if self.labels else torch.zeros(0, dtype=torch.long),
            "box_counts": torch.tensor(counts, dtype=torch.long),
            "image_ids": torch.tensor(self.image_ids, dtype=torch.long),
            "sizes": torch.tensor(self.sizes, dtype=torch.long).reshape(-1, 2),
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> "SplitFeatures":
        counts = payload["box_counts"].tolist()
        return cls(
            features=dict(payload["features"]),
            boxes=list(payload["boxes"].split(counts)),
            labels=list(payload["labels"].split(counts)),
            image_ids=payload["image_ids"].tolist(),
            sizes=[tuple(s) for s in payload["sizes"].tolist()],
        )


@dataclass
class ProxyFeatures:
    """Everything a trial needs: both splits, the levels' (channels, stride), resolution, classes.

    ``last_stage``: the adapted last backbone stage (:func:`proxy_eval.last_stage.last_stage_payload`)
    when the cache was built with ``train_last_stage``, else None.
    """

    train: SplitFeatures
    val: SplitFeatures
    shapes: dict[str, tuple[int, int]]  # level -> (channels, stride)
    resolution: int
    num_classes: int
    last_stage: dict[str, Any] | None = None

    def to_payload(self) -> dict[str, Any]:
        extra = {} if self.last_stage is None else {"last_stage": self.last_stage}
        return {
            **extra,
            "format": FORMAT_VERSION,
            "train": self.train.to_payload(),
            "val": self.val.to_payload(),
            "shapes": {level: list(spec) for level, spec in self.shapes.items()},
            "resolution": int(self.resolution),
            "num_classes": int(self.num_classes),
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> "ProxyFeatures":
        if payload.get("format") != FORMAT_VERSION:
            raise CorruptCacheError(f"cache format {payload.get('format')} is not {FORMAT_VERSION}")
        return cls(
            train=SplitFeatures.from_payload(payload["train"]),
            val=SplitFeatures.from_payload(payload["val"]),
            shapes={level: (int(c), int(s)) for level, (c, s) in payload["shapes"].items()},
            resolution=int(payload["resolution"]),
            num_classes=int(payload["num_classes"]),
            last_stage=payload.get("last_stage"),
        )


class FeatureCache:
    """Handle of one feature cache: ``<root>/<key>/``. Cheap, picklable; loads nothing by itself.

    Once this handle has checked the tensor file against its checksum (or written it), later loads
    in the same process skip the second hash while the file's size, mtime and inode are unchanged
    (:attr:`verified`). That record does not travel with the handle to another process: a Ray
    worker, perhaps on another node, verifies its own copy.
    """

    def __init__(self, root: str | os.PathLike, key: str) -> None:
        self.root = Path(root)
        self.key = key
        self._verified_stat: tuple[int, int, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_verified_stat": None}

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.tensor_file.stat()
        except OSError:
            return None
        return (stat.st_size, stat.st_mtime_ns, stat.st_ino)

    @property
    def verified(self) -> bool:
        """Whether this handle checked (or wrote) the tensor file as it is now."""
        return self._verified_stat is not None and self._verified_stat == self._stat()

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r})"

    @property
    def path(self) -> Path:
        return self.root / self.key

    @property
    def tensor_file(self) -> Path:
        return self.path / TENSOR_FILE

    def exists(self) -> bool:
        return (self.path / CHECKSUM_FILE).is_file()

    def verify(self) -> None:
        """Raise :class:`CorruptCacheError` unless the tensor file matches its stored checksum."""
        checksum_file = self.path / CHECKSUM_FILE
        try:
            expected = checksum_file.read_text().split()[0]
            actual = file_sha256(self.tensor_file)
        except (OSError, IndexError) as err:
            raise CorruptCacheError(f"{self.path}: cannot read the cache files ({err})") from None
        if actual != expected:
            raise CorruptCacheError(f"{self.tensor_file}: sha256 {actual[:12]}... does not match the "
                                    f"stored {expected[:12]}...")
        self._verified_stat = self._stat()

    def load(self, verify: bool = True, mmap: bool = False) -> ProxyFeatures:
        """Read the cache (checksum first unless ``verify=False`` or already ``verified``);
        CorruptCacheError when unusable."""
        if verify and not self.verified:
            self.verify()
        try:
            payload = torch.load(self.tensor_file, map_location="cpu", weights_only=True, mmap=mmap)
            return ProxyFeatures.from_payload(payload)
        except CorruptCacheError:
            raise
        except Exception as err:  # torch raises many types on damaged zip files
            raise CorruptCacheError(f"{self.tensor_file}: unreadable ({type(err).__name__}: {err})") from None

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / META_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def write(self, features: ProxyFeatures, meta: Mapping[str, Any]) -> None:
        """Write atomically: a temp sibling folder, then ``os.replace`` onto the key folder.

        An existing (corrupt) folder under the key is moved aside and deleted first. When another
        process wins the race and a valid cache appears meanwhile, ours is discarded.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{self.key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            try:
                torch.save(features.to_payload(), tmp / TENSOR_FILE)
                digest = file_sha256(tmp / TENSOR_FILE)
                meta_out = {"key": self.key, "format": FORMAT_VERSION, "sha256": digest, **meta}
                (tmp / META_FILE).write_text(json.dumps(meta_out, indent=2, sort_keys=True, default=str) + "\n")
                (tmp / CHECKSUM_FILE).write_text(f"{digest}  {TENSOR_FILE}\n")  # written last: marks complete
            except (OSError, RuntimeError) as err:  # a full disk: torch reports "unexpected pos"
                raise WriteError.from_failure(self.tensor_file, err) from err
            if self.path.exists():
                self._move_aside()
            try:
                os.replace(tmp, self.path)
                self._verified_stat = self._stat()  # hashed as it was written, by this process
            except OSError:
                if not self.exists():  # not a lost race with another writer
                    raise
                log.info("another process wrote %s first; keeping its cache", self.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _move_aside(self) -> None:
        aside = self.root / f".corrupt-{self.key}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(self.path, aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)
