"""Suite-wide settings.

Torch's intra-op threads oversubscribe small machines when several test processes (or other work)
share the cores: a ResNet forward ran ~15x slower with 2 threads under load than with 1. CI runs
alone on 2 cores and keeps torch's default; elsewhere tests use one thread unless
NASFCOS_TEST_THREADS says otherwise.
"""
import os

import torch

_threads = os.environ.get("NASFCOS_TEST_THREADS") or ("" if os.environ.get("CI") else "1")
if _threads:
    torch.set_num_threads(int(_threads))
