"""Suite-wide settings.

``tests/`` mirrors the packages (``tests/model/`` for ``detector/model/``, ...); shared test machinery
lives in ``tests/helpers/`` (fault injection, experiment-script loading, the Triton interpreter, a
multi-node Ray cluster) and is importable by name from every test (``from faults import ...``).

Torch's intra-op threads oversubscribe small machines when several test processes (or other work)
share the cores: a ResNet forward ran ~15x slower with 2 threads under load than with 1. CI runs
alone on 2 cores and keeps torch's default; elsewhere tests use one thread unless
NASFCOS_TEST_THREADS says otherwise.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

_threads = os.environ.get("NASFCOS_TEST_THREADS") or ("" if os.environ.get("CI") else "1")
if _threads:
    torch.set_num_threads(int(_threads))


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory):
    """A tiny synthetic COCO-format dataset, written once per session and only read by the tests
    that share it: 20 train / 2 val images of 64-96 px, at most 3 objects of 8 px or more, 6 classes."""
    from detector.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("tiny_synthetic")
    write_dataset(root, num_train=20, num_val=2, seed=0, workers=1, image_min_side=64, image_max_side=96,
                  large_every=0, max_objects=3, min_object_size=8)
    return root
