"""fedmoe.federation — the runtimes that pass a method's messages between its server half and its
clients: client sampling, the round loop, evaluation, checkpoint/resume, sweeps.

The names below are imported on first use, so that a module of a subpackage (the Flower relay, which
a SuperNode starts for every message) can be imported without torch."""

from importlib import import_module

_NAMES = {"Federation": ".runtime", "RunDirError": ".checkpoint", "continue_run": ".entry", "resume_federated": ".entry",
          "run_federated": ".entry", "run_sweep": ".sweep", "sample_clients": ".sampling", "start_run": ".entry"}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(import_module(_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
