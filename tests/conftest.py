"""Shared test set-up: offline Hugging Face, and a one-thread fixture for tests of tiny matmuls."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the hub: everything it loads ships with fedmoe
# the processes a test starts (python -m fedmoe.cli, in the test's own directory) import the fedmoe this process
# imports: a relative PYTHONPATH=src would mean another folder there, and they would import whichever fedmoe the
# environment has installed (from a git worktree: the main checkout's, a test of other code than this one). Its
# entries are made absolute; without one, this checkout's src comes first (an explicit absolute one is kept first:
# a copy of src with a planted mistake stays the code under test)
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
_PATHS = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join(_PATHS or [_SRC])
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test`: two workers on two cores. One thread each (and in every process a test starts, which
    # inherits the variable), so the workers' matmuls do not oversubscribe the cores.
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # torch may have read the variable before this file


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: intra-op threads only add contention on a busy machine (and a fixed thread count
    fixes the order in which kernels sum). Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# `make test` runs the suite on two workers (pytest-xdist, `--dist loadgroup` without groups: each test goes to
# whichever worker is free). The tests that start real processes and wait on them
# with timeouts (Flower deployments and simulations, workers, signals: test_flower, test_worker, test_secagg and
# those marked `processes`) run beside the others, each on whichever worker is free, so their timeouts allow for a
# busy machine. (An xdist_group meant to run them one after another never took effect: this file's hook ran after
# xdist had read the groups. Taking effect, it would chain ~15 minutes of them on one worker.)
PROCESS_MODULES = {"test_flower.py", "test_worker.py", "test_secagg.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:  # every test of these files starts processes: marked, so `-m "not processes"` leaves them out
        if item.path.name in PROCESS_MODULES:
            item.add_marker(pytest.mark.processes)
