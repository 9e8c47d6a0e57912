"""A module-scoped fixture for test modules of tiny tensors: one torch thread while they run.

Import it into a test module (``from torch_threads import single_thread  # noqa: F401``) and pytest
applies it to every test there (autouse)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny tensors: one thread is as fast, and avoids OpenMP oversubscription on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
