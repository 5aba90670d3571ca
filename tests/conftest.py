"""Shared test set-up: offline Hugging Face, and a one-thread fixture for tests of tiny matmuls."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the hub: everything it loads ships with fedmoe

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: intra-op threads only add contention on a busy machine (and a fixed thread count
    fixes the order in which kernels sum). Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
