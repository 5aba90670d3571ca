"""fedmoe.federation — the runtimes that pass a method's messages between its server half and its
clients: client sampling, the round loop, evaluation, checkpoint/resume, sweeps."""

from .checkpoint import RunDirError
from .entry import resume_federated, run_federated
from .runtime import Federation
from .sampling import sample_clients

__all__ = ["Federation", "RunDirError", "resume_federated", "run_federated", "sample_clients"]
