"""The entry points of a run on any runtime (``federation.runtime``): in-process (:mod:`.runtime`),
Flower's simulation engine or a Flower deployment (:mod:`.flower.launch`). Here, not in the runtime,
so the Flower apps (which drive :class:`~fedmoe.federation.runtime.Federation`) and the runtime do not
import each other."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, RunConfig, load_config
from ..data import resolve_labels
from ..rundir import RunDir
from .runtime import (RunDirError, _lock_existing, _locked, check_model, open_run_dir, prepare_run_dir,
                      resume_federated, run_federated)


def start_run(cfg: RunConfig, show_progress: bool = False, federation: str | None = None, log=print,
              overwrite: bool = False):
    """A run from scratch on ``cfg.federation.runtime``; returns (summary, run dir). ``federation``:
    the SuperLink's name in $FLWR_HOME/config.toml (runtime ``flower``); ``overwrite``: replace a run
    of the same name (:func:`prepare_run_dir`)."""
    if cfg.federation.runtime == "local":
        return run_federated(cfg, show_progress=show_progress, log=log, overwrite=overwrite)
    from .flower.launch import require_flower, run_deployment, run_simulation

    require_flower()
    name = _federation(federation) if cfg.federation.runtime == "flower" else None
    check_model(cfg)
    cfg = resolve_labels(cfg)
    rd = prepare_run_dir(cfg, overwrite=overwrite, log=log)
    if cfg.federation.runtime == "flower-sim":
        return _locked(rd, lambda: run_simulation(cfg, rd)), rd
    return _locked(rd, lambda: run_deployment(cfg, rd, name)), rd


def continue_run(path: str | Path, show_progress: bool = False, federation: str | None = None, log=print):
    """Continue the run in ``path`` from its last checkpoint, on the runtime it ran on."""
    path = Path(path)
    if not (path / RunDir.CONFIG).is_file():
        raise RunDirError(f"{path} is not a fedmoe run directory (no config.yaml)")
    cfg = load_config(path / RunDir.CONFIG)
    if cfg.federation.runtime == "local":
        return resume_federated(path, show_progress=show_progress, log=log)
    from .flower.launch import run_deployment, run_simulation

    name = _federation(federation) if cfg.federation.runtime == "flower" else None
    rd = _lock_existing(path, log)

    def work():
        open_run_dir(path, log=log)  # a changed config or no readable checkpoint: refused before Flower starts
        if cfg.federation.runtime == "flower-sim":
            return run_simulation(cfg, rd, resume=True)
        return run_deployment(cfg, rd, name, resume=True)

    return _locked(rd, work), rd


def _federation(name: str | None) -> str:
    if not name:
        raise ConfigError("--runtime flower needs --federation NAME: the SuperLink's entry in $FLWR_HOME/config.toml "
                          "(README, \"Running on Flower\")")
    return name


__all__ = ["continue_run", "start_run"]
