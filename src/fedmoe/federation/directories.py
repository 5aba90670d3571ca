"""Run directories: which directory a new run takes (a finished run is never deleted implicitly), the
lock that keeps two processes out of one run, what Ctrl-C and a full disk become, and the opening of
a run to resume (its newest readable checkpoint and a config that still matches it). The loop that
fills a directory is :class:`~fedmoe.federation.runtime.Federation`; the entry points that join the
two are in :mod:`fedmoe.federation.entry`."""

from __future__ import annotations

import errno
import itertools
from pathlib import Path

from ..config import RunConfig, config_to_dict, load_config
from ..rundir import RunDir, RunDirBusy, resume_command, run_dir_problem, says_out_of_memory, shell_quote
from .checkpoint import (CHECKPOINT_FILE, Checkpoint, RunDirError, check_data_fingerprint, check_fingerprint,
                         check_resume_overrides, has_checkpoint, load_checkpoint)


def _run_dir_kind(path: Path) -> str:
    """``new`` (absent or empty), ``started`` (a run's config.yaml, no checkpoint, no summary: it stopped
    before its first checkpoint, nothing to resume), ``unfinished`` (a checkpoint, no summary),
    ``finished`` (summary.json), ``other`` (files fedmoe cannot prove it wrote: no :attr:`RunDir.MARKER`,
    whatever else is there) or ``file`` (not a directory)."""
    if not path.exists():
        return "new"
    if not path.is_dir():
        return "file"
    if not {p.name for p in path.iterdir()} - {RunDir.LOCK}:
        return "new"
    if not (path / RunDir.MARKER).is_file():
        return "other"
    if (path / RunDir.SUMMARY).is_file():
        return "finished"
    if has_checkpoint(path):
        return "unfinished"
    return "started" if (path / RunDir.CONFIG).is_file() else "other"


def _lock(path: Path, fresh: bool, log) -> RunDir | None:
    """``path`` locked by this process; None when another run holds it and ``fresh`` (a numbered directory: the
    next one is tried), else :class:`RunDirBusy`."""
    rd = RunDir(path)
    try:
        rd.lock(log)
    except RunDirBusy:
        if fresh:
            return None
        raise
    return rd


def _claim(path: Path, overwrite: bool, fresh: bool, log) -> RunDir | None:
    """``path`` emptied (but for its lock) and locked for a new run, or None when it is not to be used:
    it holds a finished run (without ``overwrite``) or other files; ``fresh`` (a numbered directory):
    anything but a new or started one, and one in use."""
    if (path / RunDir.ASIDE).is_dir():  # a run that was replacing the one here was killed before its setup finished
        rd = _lock(path, fresh, log)
        if rd is None:
            return None
        try:
            if rd.restore_replaced():
                log(f"warning: {path}: a run that was replacing the one here stopped before its setup finished; the "
                    "replaced run is restored")
        finally:
            rd.unlock()
    kind = _run_dir_kind(path)
    if kind == "file":
        raise RunDirError(f"{path} exists and is not a directory: choose another name (--set name=...) or "
                          "output_dir (--set output_dir=...)")
    if kind == "other" and overwrite and not fresh:
        raise RunDirError(f"{path} holds files that are not a fedmoe run (no {RunDir.MARKER} marker: not written by "
                          "fedmoe, or by a fedmoe older than the marker), which --overwrite does not delete: delete them "
                          "yourself, or choose another name (--set name=...)")
    if kind == "other" or (fresh and kind != "new" and kind != "started") or (kind == "finished" and not overwrite):
        return None
    rd = _lock(path, fresh, log)
    if rd is None:
        return None
    try:
        kind = _run_dir_kind(path)  # again, now that no other run can change it
        if kind == "unfinished" and not overwrite:
            raise RunDirError(f"{path} holds an unfinished run (a checkpoint, no summary.json): continue it with "
                              f"`{resume_command(path)}`, start it over with --overwrite (its checkpoint "
                              "is lost), or choose another name with --set name=...")
        if kind == "other" or (kind == "finished" and not overwrite):
            rd.unlock()
            return None
        rd.set_aside()  # deleted once the new run's setup finished, put back if it fails before
    except BaseException:
        rd.unlock()
        raise
    return rd


def prepare_run_dir(cfg: RunConfig, overwrite: bool = False, log=print) -> RunDir:
    """The directory of a new run, ``output_dir/name``, with its config.yaml, locked by this process
    (release it with ``rd.unlock()``).

    A finished run there is never deleted implicitly: the new run goes to the first free numbered
    directory beside it (``name-2``, ``name-3``, ...), and says so, unless ``overwrite``. An unfinished
    run (a checkpoint, no summary) is refused with the command that resumes it, unless ``overwrite``. A
    run that stopped before its first checkpoint left nothing to resume: its directory is reused. A
    directory without fedmoe's marker is never touched (a new run goes beside it). What a new run
    replaces is moved aside, deleted once its setup finished and put back if it fails before
    (:meth:`RunDir.set_aside`, :func:`locked`)."""
    base = Path(cfg.output_dir) / cfg.run_name()
    try:
        rd = _claim(base, overwrite, fresh=False, log=log)
        if rd is None:
            what = ("a finished run (kept; --overwrite replaces it)" if _run_dir_kind(base) == "finished"
                    else f"files fedmoe did not mark as its own run (kept; a run an older fedmoe wrote has no "
                         f"{RunDir.MARKER})")
            rd = next(r for n in itertools.count(2)
                      if (r := _claim(base.with_name(f"{base.name}-{n}"), False, fresh=True, log=log)) is not None)
            log(f"{base} holds {what}: this run writes to {rd.path}")
        try:
            tree = config_to_dict(cfg)
            if rd.path != base:
                tree["name"] = rd.path.name  # config.yaml names the directory it is in
            rd.write_config(tree)
            rd.new_run = True
        except BaseException:
            rd.unlock()
            raise
    except OSError as e:
        raise RunDirError(f"cannot write the run directory {base}: {e.strerror or e}"
                          + (f" ({e.filename})" if e.filename else "")
                          + ": set output_dir to a writable directory (--set output_dir=...)") from None
    return rd


def lock_existing(path: Path, log) -> RunDir:
    """The existing run directory ``path``, locked by this process."""
    if (problem := run_dir_problem(path, "resume")) is not None:
        raise RunDirError(problem)
    rd = RunDir(path, create=False)
    rd.lock(log)
    return rd


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run; ``path``: its run directory; ``signal``: the signal's name where it was another
    (SIGTERM) and its handler could not say so itself."""

    def __init__(self, path: Path, signal: str | None = None):
        super().__init__(f"interrupted: {path}")
        self.path = Path(path)
        self.signal = signal


def _out_of_memory(e: BaseException) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError))


def out_of_memory_advice(path: Path, e: BaseException) -> str:
    """What to do after a run ran out of memory: it stopped at its last checkpoint; activation
    checkpointing changes no number (an execution key), so the run resumes with it; the other remedies
    change the run, so they start a new one."""
    path = Path(path)
    config = path / RunDir.CONFIG
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    head = f"out of memory ({first[:200]})"
    try:
        on = load_config(config).train.checkpoints_every_layer
    except Exception:  # noqa: BLE001 - an unreadable config.yaml: advise as if it were off
        on = False
    resumable = has_checkpoint(path)
    if not on:  # off, or on every n-th layer only: at every layer it saves the most
        why = (" (activation checkpointing at every layer changes no number, only memory; `fedmoe plan "
               f"{shell_quote(config)} --set train.activation_checkpointing=true` shows the new peak)")
        if resumable:
            return (head + ". The run stopped at its last checkpoint: continue it with `fedmoe run --resume "
                    f"{shell_quote(path)} --set train.activation_checkpointing=true`" + why)
        return (head + " before its first checkpoint: run it again with `--set train.activation_checkpointing=true`"
                + why)
    return (head + f". Activation checkpointing is on at every layer already: `fedmoe plan {shell_quote(config)}` says which keys "
            "make the step fit (a smaller train.batch_size with more train.grad_accum, model.quantization=nf4, a shorter "
            "data.max_length); they change the run, so start a new run with them")


def with_memory_hint(failure: str) -> str:
    """A client's failure text, with what to do when it says the client ran out of memory (a node's
    reason arrives as text: CUDA's and the CPU allocator's wording are recognised)."""
    if says_out_of_memory(failure):
        return (failure + " [out of memory: `train.activation_checkpointing: true` changes no number and may be set on "
                "resume (`fedmoe run --resume DIR --set train.activation_checkpointing=true`); `fedmoe plan` says what "
                "else fits]")
    return failure


def locked(rd: RunDir, work):
    """``work()`` under the run directory's lock (already taken), released however it ends; Ctrl-C
    becomes :class:`RunInterrupted` (naming the directory), a full or read-only disk a RunDirError
    that says the last checkpoint is intact. A run that fails before its setup finished puts back the
    run it was to replace (:meth:`RunDir.restore_replaced`); one that fails before it wrote anything but its
    config (a data source or model that cannot be read) leaves no directory behind (:meth:`RunDir.remove_unstarted`)."""
    removed = False
    try:
        try:
            return work()
        except KeyboardInterrupt as e:
            raise RunInterrupted(rd.path, getattr(e, "signal", None)) from None
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not _out_of_memory(e):
                raise
            raise RunDirError(out_of_memory_advice(rd.path, e)) from e
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            raise RunDirError(f"writing {e.filename or rd.path} failed: {e.strerror}. The last checkpoint in {rd.path} "
                              "is intact: make room (or make it writable), then "
                              f"`{resume_command(rd.path)}`") from None
    except BaseException:
        if rd.restore_replaced():
            import sys

            print(f"{rd.path}: this run stopped before its setup finished; the run it was to replace is restored",
                  file=sys.stderr)
        else:
            removed = rd.remove_unstarted()
        raise
    finally:
        rd.unlock()
        if removed:
            rd.remove_if_empty()


def open_run_dir(path: str | Path, log=print, check_data: bool = False, overrides: list[str] | None = None,
                 use: str = "resume") -> tuple[RunConfig, RunDir, Checkpoint]:
    """(config, run dir, checkpoint) of a run to resume: the newest readable checkpoint, and a
    config.yaml that is still the config the run was checkpointed with; ``check_data`` (a resume, not a
    read of its model): the data files it fingerprinted are unchanged too (:func:`check_data_fingerprint`).
    ``overrides``: ``--set`` of execution keys (:data:`RESUME_SET_KEYS`), written into config.yaml first
    (call it under the run's lock), so the directory keeps describing the run as it continues. ``use``: the command
    that opens it (``resume``, ``export``, ...), for what a path that is no run directory is told
    (:func:`~fedmoe.rundir.run_dir_problem`)."""
    path = Path(path)
    if (problem := run_dir_problem(path, use)) is not None:
        raise RunDirError(problem)
    if not has_checkpoint(path) and use != "resume":
        raise RunDirError(f"{path} has no checkpoint ({path / RunDir.CHECKPOINTS / CHECKPOINT_FILE} is missing), so "
                          f"there is no model to {use}")
    if not has_checkpoint(path):
        raise RunDirError(f"{path} has no checkpoint to resume from ({path / RunDir.CHECKPOINTS / CHECKPOINT_FILE} is "
                          f"missing): start it again with `fedmoe run {shell_quote(path / RunDir.CONFIG)} --overwrite`")
    if overrides:
        check_resume_overrides(overrides)
        changed = load_config(path / RunDir.CONFIG, overrides)
        RunDir(path).write_config(config_to_dict(changed))
        log(f"{path / RunDir.CONFIG}: " + ", ".join(overrides))
    cfg = load_config(path / RunDir.CONFIG)
    ck = load_checkpoint(path, log, use)
    check_fingerprint(cfg, ck.state, path, log, use)
    if check_data:
        check_data_fingerprint(cfg, ck.state, path, log)
    return cfg, RunDir(path), ck


__all__ = ["RunInterrupted", "lock_existing", "locked", "open_run_dir", "out_of_memory_advice", "prepare_run_dir",
           "with_memory_hint"]
