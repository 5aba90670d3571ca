"""Checkpoints of a run: written atomically with the previous round's kept as a fallback, read back
(falling back when the latest cannot be read), the RNG states, and the config fingerprint a resume is
checked against."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, RunConfig, config_to_dict
from ..configbase import flat_keys
from ..rundir import (UnsafeFileError, load_tensor_file, RunDir, atomic_write_bytes, atomic_write_leftovers,
                      atomic_write_text, run_dir_problem, shell_quote)

CHECKPOINT_FILE = "state.pt"


def rng_states() -> dict:
    """Every global RNG's state in types ``torch.load(weights_only=True)`` reads back (numpy's key array
    as a tensor, not a pickled ndarray)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(cached)],
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked (the message says why and what to do)."""


# ---------------------------------------------------------------------- checkpoints
# The checkpoint it replaces is kept as the previous round's (one round back), so that a latest
# checkpoint that cannot be read (truncated, emptied, overwritten) still leaves a way forward.
PREVIOUS_CHECKPOINT_FILE = "state.prev.pt"

# Config keys that say where and how a run executes, not what it computes: a resumed run may change
# them (another device or machine, other Flower timeouts, TensorBoard or the report's figures on or off, the directory moved,
# activation checkpointing after running out of memory: the same numbers with less memory; the resources a
# simulated client reserves on another machine).
# Every other key is part of the run's fingerprint: a resume whose config.yaml differs in one is refused.
EXECUTION_KEYS = ("name", "output_dir", "model.device", "federation.round_timeout_s", "federation.node_wait_s",
                  "federation.max_inflight", "federation.on_client_error", "report.tensorboard", "report.figures",
                  "train.activation_checkpointing", "federation.simulation")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a checkpoint write killed midway left in ``folder`` (``.state.pt.XXXXXXXX.tmp``,
    ``.state.prev.pt.XXXXXXXX.tmp``: :func:`~fedmoe.rundir.atomic_write_leftovers`; ``.state.prev.pt.tmp``, the
    hard link of :func:`write_checkpoint`), nothing else; returns them. Only under the run's lock."""
    folder = Path(folder)
    stale = [*atomic_write_leftovers(folder / CHECKPOINT_FILE), *atomic_write_leftovers(folder / PREVIOUS_CHECKPOINT_FILE)]
    link = folder / f".{PREVIOUS_CHECKPOINT_FILE}.tmp"
    if link.is_file() and not link.is_symlink():
        stale.append(link)
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def write_checkpoint(folder: Path, data: bytes) -> None:
    """``state.pt`` written atomically, after the one it replaces became ``state.prev.pt`` (a hard link
    renamed into place, so that ``state.pt`` itself never goes missing); what an earlier write killed
    midway left behind is removed first (:func:`remove_stale_temporaries`)."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    latest = folder / CHECKPOINT_FILE
    if latest.is_file():
        tmp = folder / f".{PREVIOUS_CHECKPOINT_FILE}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(latest, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(latest, tmp)
        os.replace(tmp, folder / PREVIOUS_CHECKPOINT_FILE)
    atomic_write_bytes(latest, data)


def has_checkpoint(path: str | Path) -> bool:
    folder = Path(path) / RunDir.CHECKPOINTS
    return (folder / CHECKPOINT_FILE).is_file() or (folder / PREVIOUS_CHECKPOINT_FILE).is_file()


@dataclass
class Checkpoint:
    """A checkpoint as read: the federation's state (``Federation.checkpoint_state``), the file it came
    from, and the newer checkpoint file that could not be read, if any (a resume sets it aside)."""

    state: dict
    path: Path
    unreadable: Path | None = None


def load_checkpoint(path: str | Path, log=print, use: str = "resume") -> Checkpoint:
    """The newest readable checkpoint of the run in ``path``: ``state.pt``, or, when that is missing or
    cannot be read, the previous round's ``state.prev.pt`` (with a warning, and the unreadable file
    named in the result). ``use``: what the caller does with it (``resume``; ``export``, ...), for the error."""
    folder = Path(path) / RunDir.CHECKPOINTS
    problems, unreadable = [], None
    for f in (folder / CHECKPOINT_FILE, folder / PREVIOUS_CHECKPOINT_FILE):
        if not f.is_file():
            problems.append(f"{f} is missing")
            continue
        try:
            ck = load_tensor_file(f, "checkpoint")
            if not isinstance(ck, dict) or not {"round", "global_state", "rng"} <= set(ck):
                raise ValueError("not a fedmoe checkpoint")
        except UnsafeFileError as e:  # never loaded: named as such, with the way out
            problems.append(str(e))
            unreadable = unreadable or f
            continue
        except Exception as e:  # noqa: BLE001 - a torn file raises anything from EOFError to UnpicklingError
            why = str(e).splitlines()[0] if str(e) else "empty file" if f.stat().st_size == 0 else ""
            problems.append(f"{f} is unreadable ({type(e).__name__}: {why})")
            unreadable = unreadable or f
            continue
        if problems:
            log(f"warning: {'; '.join(problems)}: falling back to the previous checkpoint {f} (round {ck['round']}); "
                "the rounds after it are run again")
        return Checkpoint(ck, f, unreadable)
    if use != "resume":  # fedmoe export, generate, mmlu: there is no model to take, and the run is not replaced
        raise RunDirError(f"{path} has no readable checkpoint ({'; '.join(problems)}), so there is no model to {use}; "
                          f"its config.yaml runs it again (`fedmoe run {shell_quote(Path(path) / RunDir.CONFIG)} --set "
                          "name=...`)")
    raise RunDirError(f"{path} has no readable checkpoint ({'; '.join(problems)}), so the run cannot be resumed: "
                      f"start it again with `fedmoe run {shell_quote(Path(path) / RunDir.CONFIG)} --overwrite` "
                      f"(replaces {path}) or under another name (--set name=...)")


def _field_default(key: str, missing):
    """The default of the config field at dotted ``key`` by the config's models, through sections that are
    absent by default (``federation.dp.reports`` of a run with ``federation.dp``), or ``missing``."""
    import typing

    from pydantic import BaseModel

    model = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return missing
        if i == len(parts) - 1:
            if field.is_required():
                return missing
            value = field.get_default(call_default_factory=True)
            return missing if isinstance(value, BaseModel) else value
        inner = [a for a in (field.annotation, *typing.get_args(field.annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return missing
        model = inner[0]
    return missing


def execution_key(key: str, keys: tuple[str, ...] = EXECUTION_KEYS) -> bool:
    """``key`` is one of ``keys`` or inside one of them."""
    return any(key == k or key.startswith(k + ".") for k in keys)


# the execution keys `fedmoe run --resume DIR --set KEY=VALUE` may change (name and output_dir are the
# directory itself: move it instead)
RESUME_SET_KEYS = tuple(k for k in EXECUTION_KEYS if k not in ("name", "output_dir"))


def check_resume_overrides(overrides: list[str]) -> None:
    """Refuse, naming them, ``--set`` keys a resumed run may not change (everything but
    :data:`RESUME_SET_KEYS`: another value would make it another run)."""
    from ..config import parse_override

    keys = [".".join(path) for path, _ in map(parse_override, overrides)]
    bad = [key for key in keys if not execution_key(key, RESUME_SET_KEYS)]
    if bad:
        raise RunDirError(f"--resume --set {', '.join(bad)}: a resumed run continues the run it checkpointed, so only "
                          f"{', '.join(RESUME_SET_KEYS)} may change; start a new run to change the others")


def config_fingerprint(cfg: RunConfig) -> dict:
    """What defines a run: every config key but :data:`EXECUTION_KEYS`, flattened (``keys``), and its
    SHA-256; stored in every checkpoint."""
    keys = {k: v for k, v in flat_keys(config_to_dict(cfg)).items() if not execution_key(k)}
    return {"sha256": hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest(), "keys": keys}


def check_fingerprint(cfg: RunConfig, ck: dict, path: str | Path, log=print, use: str = "resume") -> None:
    """Refuse a run directory whose config.yaml differs from the config its checkpoint was written
    with, naming the keys; a checkpoint written before fingerprints only gets a warning. A key a newer
    fedmoe added counts as its default in an older fingerprint."""
    stored = ck.get("config_fingerprint")
    if stored is None:
        log(f"warning: the checkpoint in {path} predates config fingerprints: resuming without checking that "
            "config.yaml is still the config the run started with")
        return
    now = config_fingerprint(cfg)
    if now["sha256"] == stored["sha256"]:
        return
    diffs = fingerprint_diffs(stored["keys"], now["keys"])
    if diffs and use != "resume":
        raise RunDirError(f"{Path(path) / RunDir.CONFIG} differs from the config its checkpoint was written with "
                          f"({'; '.join(diffs)}): the checkpoint's model is read with the config it was trained with, "
                          f"so put back {'that value' if len(diffs) == 1 else 'those values'} to {use} it")
    if diffs:
        raise RunDirError(f"{Path(path) / RunDir.CONFIG} differs from the config its checkpoint was written with "
                          f"({'; '.join(diffs)}): a resumed run continues the run it checkpointed, so put back "
                          f"{'that value' if len(diffs) == 1 else 'those values'} (only {', '.join(EXECUTION_KEYS)} "
                          "may change on resume), or start a new run with the new config")


def fingerprint_diffs(old: dict, new: dict) -> list[str]:
    """``key: before -> after`` for each key in which two fingerprints' ``keys`` (:func:`config_fingerprint`)
    differ. A key a newer fedmoe added counts as its default where the other side lacks it."""
    default, missing = config_fingerprint(RunConfig())["keys"], object()

    def show(v):
        return "(not set)" if v is missing else json.dumps(v)

    def added(key, side):
        """A key ``side`` lacks: the config's default where a newer fedmoe added it (also inside an optional
        section that ``side`` has), never where ``side`` lacks the whole section or has it whole (a section
        added or removed is a change)."""
        parts = key.split(".")
        if any(".".join(parts[:i]) in side for i in range(1, len(parts))) or any(k.startswith(key + ".") for k in side):
            return missing
        return default[key] if key in default else _field_default(key, missing)

    diffs = []
    for key in sorted(set(old) | set(new)):
        before = old[key] if key in old else added(key, old)
        after = new[key] if key in new else added(key, new)
        if before != after and not execution_key(key):
            diffs.append(f"{key}: {show(before)} -> {show(after)}")
    return diffs


# ---------------------------------------------------------------------- the data a run reads
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_files(source: str) -> tuple[str, Path | None, list[str]]:
    """(kind, where, files) of one ``data.source`` as :func:`fedmoe.data.sources.load_examples` resolves it
    here: ``builtin`` (the shipped file), ``file``, ``dir`` (its files, relative, sorted) or ``other`` (a hub
    dataset, or nothing at that path on this machine: not fingerprinted)."""
    from ..data.sources import DataError, _builtin_key, builtin_path

    if _builtin_key(source) is not None and not Path(source).exists():
        try:
            return "builtin", builtin_path(source), ["."]
        except DataError:
            return "other", None, []
    path = Path(source).expanduser()
    if path.is_file():
        return "file", path, ["."]
    if path.is_dir():
        return "dir", path, sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return "other", None, []


def data_fingerprint(cfg: RunConfig) -> dict:
    """Every local file of ``data.source`` (the shipped file for the built-in data, every file under a
    folder): its size and SHA-256 (streamed); stored in every checkpoint, checked on resume
    (:func:`check_data_fingerprint`). Only what this process (the server) can read at ``data.source``:
    on the Flower runtimes a client with its own data file (node config ``data-path``) or a SuperNode on
    another machine reads data this fingerprint does not cover, and a hub dataset (``hf:``) is covered only
    by ``data.revision`` in the config fingerprint."""
    sources = cfg.data.source if isinstance(cfg.data.source, list) else [cfg.data.source]
    out = []
    for source in sources:
        kind, where, files = _source_files(source)
        out.append({"source": source, "kind": kind,
                    "files": {f: [(where / f).stat().st_size, _sha256(where / f)] for f in files}})
    return {"sources": out}


DATA_FINGERPRINT_FILE = "data-fingerprint.json"  # beside the checkpoints: the data fingerprint alone, to read cheaply


def write_data_fingerprint(folder: Path, fingerprint: dict | None) -> None:
    """The run's data fingerprint as ``folder/data-fingerprint.json`` (atomically; once, or when it differs), so that
    whoever checks the data of a run (a sweep before it continues its points) need not read a whole checkpoint."""
    if fingerprint is None:
        return
    path = Path(folder) / DATA_FINGERPRINT_FILE
    text = json.dumps({"data_fingerprint": fingerprint}, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def data_fingerprint_file(path: str | Path) -> dict | None:
    """The data fingerprint in the run ``path``'s ``checkpoints/data-fingerprint.json``, or None where that file is
    missing or cannot be read (a run written before it)."""
    try:
        got = json.loads((Path(path) / RunDir.CHECKPOINTS / DATA_FINGERPRINT_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return got["data_fingerprint"] if isinstance(got, dict) and isinstance(got.get("data_fingerprint"), dict) else None


def stored_data_fingerprint(path: str | Path) -> dict:
    """``{"data_fingerprint": ...}`` of the run in ``path``: from ``checkpoints/data-fingerprint.json`` when it is
    readable, else from its checkpoint (a run written before that file: a full read)."""
    got = data_fingerprint_file(path)
    if got is not None:
        return {"data_fingerprint": got}
    return load_checkpoint(path, log=lambda *a: None).state


def check_data_fingerprint(cfg: RunConfig, ck: dict, path: str | Path, log=print) -> None:
    """Refuse to resume the run in ``path`` when a data file its checkpoint fingerprinted
    (:func:`data_fingerprint`) is missing or differs now, naming the file; a checkpoint written before
    data fingerprints only gets a warning."""
    stored = ck.get("data_fingerprint")
    if stored is None:
        log(f"warning: the checkpoint in {path} predates data fingerprints: resuming without checking that the data "
            f"(data.source) is still the data the run started with")
        return
    for old in stored["sources"]:
        if old["kind"] == "other" or not old["files"]:
            continue
        kind, where, files = _source_files(old["source"])
        now = set(files) if kind == old["kind"] else set()
        base = where if where is not None else Path(old["source"]).expanduser()
        why = None
        for f in sorted(set(old["files"]) | now):
            shown = base if f == "." else base / f
            if f not in now:
                why = f"{shown} is missing"
            elif f not in old["files"]:
                why = f"{shown} was added"
            else:
                size = (base / f).stat().st_size
                if size != old["files"][f][0]:
                    why = f"{shown} changed (size {old['files'][f][0]} -> {size} bytes)"
                elif _sha256(base / f) != old["files"][f][1]:
                    why = f"{shown} changed (same size, other content: SHA-256 differs)"
            if why:
                restore = ("install the fedmoe version that started the run (this is the data it ships)"
                           if old["kind"] == "builtin" else "put the data back as it was")
                raise RunDirError(
                    f"the data of the run in {path} changed since its checkpoint: {why} (data.source: "
                    f"{old['source']!r}): a resumed run must read the data it started with, so {restore}, or start "
                    f"a new run (`fedmoe run {shell_quote(Path(path) / RunDir.CONFIG)} --overwrite` replaces this "
                    "one, --set name=... keeps it)")


def migrate_checkpoints(path: str | Path, log=print) -> list[Path]:
    """Rewrite the checkpoints of the run in ``path`` that an older fedmoe wrote (numpy's RNG state
    pickled as numpy objects) in today's format, which loads without running code. This loads them
    with pickle once: only for files the user trusts (their own). Returns the files rewritten."""
    import io

    folder = Path(path) / RunDir.CHECKPOINTS
    if (problem := run_dir_problem(path, "migrate-checkpoint")) is not None:
        raise FileNotFoundError(problem)
    done = []
    for f in (folder / CHECKPOINT_FILE, folder / PREVIOUS_CHECKPOINT_FILE):
        if not f.is_file():
            continue
        try:
            load_tensor_file(f, "checkpoint")
            continue  # already safe
        except UnsafeFileError:
            pass
        ck = torch.load(f, map_location="cpu", weights_only=False)  # the user vouched for this file
        rng = ck.get("rng", {})
        if isinstance(rng.get("numpy"), tuple):
            name, keys, pos, has_gauss, cached = rng["numpy"]
            rng["numpy"] = [name, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss),
                            float(cached)]
        buf = io.BytesIO()
        torch.save(ck, buf)
        try:
            torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise RunDirError(f"{f}: still holds objects other than tensors after the conversion ({e}); not rewritten")
        atomic_write_bytes(f, buf.getvalue())
        log(f"rewrote {f} in the current checkpoint format")
        done.append(f)
    return done
