"""The entry points of a run on any runtime (``federation.runtime``): in-process (the loop of
:mod:`.runtime` over :mod:`.local`'s transport), Flower's simulation engine or a Flower deployment
(:mod:`.flower.launch`). Each checks the model, claims and locks a run directory
(:mod:`.directories`) and runs the loop under that lock. Here, not in the runtime, so the Flower apps
(which drive :class:`~fedmoe.federation.runtime.Federation`) and the runtime do not import each other."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, RunConfig, load_config, refuse_for_a_new_run, refuse_unread
from ..data import resolve_labels
from ..rundir import RunDir, loads, run_dir_problem
from .checkpoint import RunDirError, check_resume_overrides
from .directories import lock_existing, locked, open_run_dir, prepare_run_dir
from .dp import resolve_noise
from .runtime import Federation


def check_model(cfg: RunConfig, log=print, fits: bool = True, new: bool = True) -> None:
    """Before anything is written: for a run that starts now (``new``), what an older fedmoe took and changed
    (:func:`~fedmoe.config.refuse_for_a_new_run`); the model's config can be read (a hub id offline is not),
    ``data.max_length`` fits its context, ``train.aux_loss`` has the family's load-balancing loss, a simulated
    client's reservation fits this machine, and on a GPU the training step fits its memory
    (:func:`fedmoe.plan.check_fits`; ``fits=False`` leaves that out: a sweep checks its points' other settings
    before the first point runs, each point plans its own memory when it starts)."""
    from ..moe.arch import check_supported
    from ..moe.loss import load_balancing_loss, no_aux_loss
    from ..moe.model import check_context, check_device, load_model_config
    from ..plan import check_fits

    if new:
        refuse_for_a_new_run(cfg)
    try:
        config = load_model_config(cfg.model.name)
        check_supported(config.model_type)  # a dense model is refused before a directory is made
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.name: {e}") from None
    check_context(config, cfg.data.max_length, cfg.model.name)
    from .clients import answer_prompt_limit

    try:  # the answers' new tokens leave room for a prompt in the model's positions
        answer_prompt_limit(cfg, config)
    except ValueError as e:
        raise ConfigError(f"eval.max_new_tokens = {cfg.eval.max_new_tokens}: {e}") from None
    if cfg.train.aux_loss and load_balancing_loss(config) is None:
        raise ConfigError(no_aux_loss(config.model_type))
    if cfg.federation.runtime != "flower":  # a deployment's clients train on their own machines' devices
        check_device(cfg.model.device)
    if cfg.federation.runtime == "flower-sim":  # what each simulated client reserves fits this machine
        from .flower.launch import simulation_resources

        simulation_resources(cfg)
    if cfg.eval.general_blocks and cfg.federation.runtime != "flower":  # (a deployment's clients check it)
        _check_general_blocks(cfg)
    if fits:
        check_fits(cfg, log)


def _check_general_blocks(cfg: RunConfig) -> None:
    """``eval.general_blocks`` within what the general text holds at ``data.max_length`` (a fraction of a second),
    before the run starts rather than at its round-0 evaluation."""
    from ..data import DataError
    from ..data.general import general_blocks
    from ..moe.model import load_tokenizer

    try:
        general_blocks(load_tokenizer(cfg.model.tokenizer or cfg.model.name), cfg.data.max_length,
                       cfg.eval.general_blocks)
    except DataError as e:
        raise ConfigError(str(e)) from None


def run_federated(cfg: RunConfig, show_progress: bool = False, stop_after_round: int | None = None,
                  log=print, observe=None, overwrite: bool = False) -> tuple[dict | None, RunDir]:
    """Run a configured federated experiment from scratch in this process; returns (summary, run dir).
    ``overwrite``: replace a run in ``output_dir/name`` (else a finished one is kept and the run goes
    to ``name-2``, ...; :func:`~fedmoe.federation.directories.prepare_run_dir`)."""
    check_model(cfg, log)
    cfg = resolve_noise(resolve_labels(cfg))
    rd = prepare_run_dir(cfg, overwrite=overwrite, log=log)
    return locked(rd, lambda: Federation(cfg, rd, show_progress=show_progress, log=log, observe=observe).run(
        stop_after_round=stop_after_round)), rd


def resume_federated(path: str | Path, show_progress: bool = False, stop_after_round: int | None = None,
                     log=print, observe=None, overrides: list[str] | None = None) -> tuple[dict | None, RunDir]:
    """Continue the in-process run in ``path`` from its last checkpoint (its own config.yaml is used, with
    ``overrides`` of execution keys written into it first: :func:`open_run_dir`, which refuses any other key
    before it writes)."""
    rd = lock_existing(Path(path), log)

    def work():
        cfg, _, ck = open_run_dir(path, log=log, check_data=True, overrides=overrides)
        return Federation(cfg, rd, show_progress=show_progress, log=log, resuming=True,
                          observe=observe).resume(ck, stop_after_round)

    return locked(rd, work), rd



def start_run(cfg: RunConfig, show_progress: bool = False, federation: str | None = None, log=print,
              overwrite: bool = False, unread_ok: bool = False):
    """A run from scratch on ``cfg.federation.runtime``; returns (summary, run dir). ``federation``:
    the SuperLink's name in $FLWR_HOME/config.toml (runtime ``flower``); ``overwrite``: replace a run
    of the same name (:func:`prepare_run_dir`). A setting the run would not read is refused
    (:func:`~fedmoe.config.refuse_unread`) unless ``unread_ok`` (a sweep's point: the sweep checked its points)."""
    if not unread_ok:
        refuse_unread(cfg)
    check_federation_name(federation, [cfg.federation.runtime])
    if cfg.federation.runtime == "local":
        return run_federated(cfg, show_progress=show_progress, log=log, overwrite=overwrite)
    from .flower.launch import absolute_local_paths, require_flower, run_deployment, run_simulation

    require_flower()
    name = _federation(federation) if cfg.federation.runtime == "flower" else None
    if cfg.federation.runtime == "flower":  # its config.yaml names them so too: a resume reads them the same way
        cfg = absolute_local_paths(cfg, log)
    check_model(cfg, log)
    cfg = resolve_noise(resolve_labels(cfg))
    rd = prepare_run_dir(cfg, overwrite=overwrite, log=log)
    if cfg.federation.runtime == "flower-sim":
        return locked(rd, lambda: run_simulation(cfg, rd, log=log)), rd
    return locked(rd, lambda: run_deployment(cfg, rd, name)), rd


def continue_run(path: str | Path, show_progress: bool = False, federation: str | None = None, log=print,
                 overrides: list[str] | None = None):
    """Continue the run in ``path`` from its last checkpoint, on the runtime it ran on; ``overrides``:
    ``--set`` of execution keys (:data:`~fedmoe.federation.checkpoint.RESUME_SET_KEYS`), written into its
    config.yaml under the run's lock."""
    path = Path(path)
    if (problem := run_dir_problem(path, "resume")) is not None:
        raise RunDirError(problem)
    if (path / RunDir.SUMMARY).is_file():  # finished: nothing to continue, and nothing of it is written again
        if overrides:
            check_resume_overrides(overrides)  # a key no resume may change is named as such first
            raise RunDirError(f"{path} holds a finished run (summary.json): there is nothing to resume, and --set "
                              f"{', '.join(overrides)} would make its config.yaml name settings it never ran with")
        log(f"{path} holds a finished run: nothing to resume (its summary.json and report.md are as it wrote them)")
        return loads((path / RunDir.SUMMARY).read_text()), RunDir(path, create=False)
    was = load_config(path / RunDir.CONFIG)  # its runtime (not an execution key: the overrides keep it)
    check_federation_name(federation, [was.federation.runtime], resume=True)
    if overrides:
        check_resume_overrides(overrides)
    # as a start checks it, before anything is written (config.yaml gets the overrides): the device it would run on
    # here (a run from a GPU machine resumed on another), the context, the memory
    now = load_config(path / RunDir.CONFIG, overrides or [])
    if now.federation.runtime != "flower":  # (a deployment's clients train on their own devices)
        from ..moe.model import check_device

        try:
            check_device(now.model.device)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}; resume with --set model.device=cpu (or auto): where a run executes "
                              "changes none of its numbers") from None
    check_model(now, log, new=False)
    if was.federation.runtime == "local":
        return resume_federated(path, show_progress=show_progress, log=log, overrides=overrides)
    from .flower.launch import run_deployment, run_simulation

    name = _federation(federation) if was.federation.runtime == "flower" else None
    rd = lock_existing(path, log)

    def work():
        # a changed config (or, in a simulation, data) or no readable checkpoint: refused before Flower starts. A
        # deployment's ServerApp may see data.source elsewhere (another machine): it checks the data itself
        cfg, _, _ = open_run_dir(path, log=log, check_data=was.federation.runtime == "flower-sim",
                                 overrides=overrides)
        if cfg.federation.runtime == "flower-sim":
            return run_simulation(cfg, rd, resume=True, log=log)
        return run_deployment(cfg, rd, name, resume=True)

    return locked(rd, work), rd


def check_federation_name(federation: str | None, runtimes: list[str], resume: bool = False) -> None:
    """``--federation NAME`` names the SuperLink of a Flower deployment: refused (rather than ignored) where none of
    the runs it would apply to (``runtimes``: the run's, or a sweep's points') runs on ``flower``."""
    if federation is None or "flower" in runtimes:
        return
    ran = ", ".join(sorted(set(runtimes)))
    if resume:
        raise ConfigError(f"--federation {federation} names the SuperLink of a Flower deployment, but this run ran on "
                          f"federation.runtime {ran}, which a resume keeps: leave --federation out")
    raise ConfigError(f"--federation {federation} names the SuperLink of a Flower deployment (--runtime flower), but "
                      f"this run's federation.runtime is {ran}: add --runtime flower to run on that SuperLink, or leave "
                      "--federation out to run as configured")


def _federation(name: str | None) -> str:
    if not name:
        raise ConfigError("--runtime flower needs --federation NAME: the SuperLink's entry in $FLWR_HOME/config.toml "
                          "(README, \"Running on Flower\")")
    return name


__all__ = ["check_federation_name", "check_model", "continue_run", "resume_federated", "run_federated", "start_run"]
