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
# the SuperExecs of the tests' Flower deployments poll for work at Flower's default interval (1 s), not at the 0.1 s
# LocalDeployment sets for a small lab's latency: polling is a seventh of a Flower test's CPU at 0.1 s (81 against 68
# CPU-s for the same test at 1 s, which took no longer), and the suite has both cores busy from start to end
os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "1.0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test`: three workers on two cores. One thread each (and in every process a test starts, which
    # inherits the variable), so the workers' matmuls do not oversubscribe the cores further.
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


# `make test` runs the suite on three workers on two cores (pytest-xdist, `--dist load --maxschedchunk 2`: each
# test goes to whichever worker is free). The tests that start real processes and wait on them (Flower deployments
# and simulations, workers, signals: test_flower, test_worker, test_secagg, the GPU check's dry run) leave the
# cores idle while they wait (on a timeout, on Flower's polling); a third worker fills that time (a full run kept
# both cores 99.6 % busy). They are put first, the longest first, so that none is left running alone at the end;
# their timeouts allow for a busy machine. Marked `processes`, so `-m "not processes"` leaves them out.
PROCESS_MODULES = {"test_flower.py", "test_worker.py", "test_secagg.py", "test_gpu_check.py"}
# the longest of them, by their durations in full runs (20 s to 3 min each, alone; 2026-12-06)
LONGEST_FIRST = ["test_superlink_and_two_supernodes_run_flex", "test_a_supernode_killed_mid_run_leaves_the_run_to_the_other",
                 "test_a_worker_killed_mid_train_is_restarted_and_the_client_comes_back",
                 "test_a_worker_with_two_ranks_gives_the_in_process_numbers", "test_a_stopped_simulation_exits_and_resumes_exactly",
                 "test_gpu_check_dry_run_succeeds_in_every_step", "test_supernodes_under_their_own_privacy_budgets",
                 "test_flower_simulation_gives_the_in_process_numbers"]


def _first(item) -> tuple[int, int]:
    name = item.originalname if hasattr(item, "originalname") else item.name
    if name in LONGEST_FIRST:
        return (0, LONGEST_FIRST.index(name))
    return (1, 0) if item.path.name in PROCESS_MODULES else (2, 0)


def pytest_collection_modifyitems(config, items):
    for item in items:  # every test of these files starts processes: marked, so `-m "not processes"` leaves them out
        if item.path.name in PROCESS_MODULES:
            item.add_marker(pytest.mark.processes)
    items.sort(key=_first)  # stable: the order within each class is pytest's
