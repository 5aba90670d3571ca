"""The run directory ``runs/<name>/`` (a contract, see docs): config, metrics log, summary, report.

Every file is written atomically (temp file in the same folder, fsync, ``os.replace``) or, for
the metrics log, appended one fsync'ed line at a time, so that a crash never leaves a torn file
behind and a run can resume from what is on disk.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not possible on every platform, so best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK = os.umask(0)
os.umask(_UMASK)


def ordinary_permissions(paths) -> None:
    """Give each of ``paths`` (files fedmoe wrote) the permissions of a file created under the process's
    umask (0644 under umask 022): safetensors' ``save_file`` (0.8) writes 0600, which a serving engine
    running as another user cannot read. Symbolic links and folders are left alone."""
    for path in paths:
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, 0o666 & ~_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


# mkstemp's names: prefix, 8 characters of tempfile's alphabet, suffix (as atomic_write_bytes calls it)
_TMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")


def atomic_write_leftovers(path: str | Path) -> list[Path]:
    """The temporary files :func:`atomic_write_bytes` ``(path, ...)`` left beside ``path`` when its process was
    killed mid-write (``.NAME.XXXXXXXX.tmp``, regular files of exactly that pattern, nothing else). Remove them
    only while no other process may be writing ``path`` (under the run's lock)."""
    path = Path(path)
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    return [Path(e.path) for e in entries
            if (m := _TMP_NAME.fullmatch(e.name)) and m["target"] == path.name and e.is_file(follow_symlinks=False)]


# --------------------------------------------------------------------------------------------
# JSON that stays strict JSON


# Non-finite numbers are written as these strings (strict JSON has no NaN): never as null, which would
# read as "no value". fedmoe's readers (read_metrics, read_summary, loads) turn them back into floats.
NONFINITE_TEXT = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# values under these keys are text, never decoded (a generated answer may well be "NaN")
TEXT_KEYS = frozenset({"examples", "prediction", "reference", "error", "category", "kind", "split", "stage", "algorithm",
                       "model", "name", "verdict", "accounting"})


class UnsafeFileError(ValueError):
    """A .pt file that holds Python objects (a pickle) rather than tensors and plain values."""


class DamagedFileError(ValueError):
    """A file whose bytes no longer match the checksums written with them (a bit changed on disk or in a copy)."""


def check_zip_records(path: str | Path, what: str = "file") -> None:
    """Every record of a zip-format file (what ``torch.save`` writes) against the CRC-32 stored with it: torch.load
    does not check them, so a flipped bit in a tensor's bytes loaded as a silently different number. Raises
    :class:`DamagedFileError` naming the record; a file that is no zip is left to its reader."""
    import zipfile

    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):  # not a zip, or torn: the reader says what it is
        return
    with z:
        # torch.save stores every record as it is: a compressed one is no file fedmoe or torch wrote, and a few
        # hundred kilobytes of it can inflate to gigabytes as it loads
        packed = next((i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED), None)
        if packed is not None:
            raise DamagedFileError(f"{path}: this {what} holds a compressed record ({packed}), which torch.save never "
                                   "writes, so it was not loaded")
        try:
            bad = z.testzip()
        except Exception as e:  # noqa: BLE001 - a damaged record header raises BadZipFile, a codec error, ...
            bad = f"(unreadable: {type(e).__name__}: {e})"
    if bad is not None:
        raise DamagedFileError(f"{path}: this {what} is damaged: its record {bad} does not match the checksum written "
                               "with it (a bit changed on disk or in a copy), so it was not loaded")


def load_tensor_file(path: str | Path, what: str = "file"):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers of them, never
    code, after every record's checksum (:func:`check_zip_records`: a damaged file is refused, not loaded
    with a changed number). A file holding other Python objects (an old fedmoe checkpoint, or a planted payload)
    is refused with one line that names it; nothing in it runs. An empty, torn or foreign file is a
    :class:`DamagedFileError` naming it (torch.load raises anything from EOFError to IndexError for one)."""
    import pickle

    import torch

    check_zip_records(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe(path, what, e) from None
    except IsADirectoryError:
        raise DamagedFileError(f"{path}: this {what} is a folder, not a file") from None
    except (EOFError, RuntimeError, KeyError, IndexError, AttributeError, ValueError) as e:  # what torch.load raises
        if "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower():
            raise  # the machine's problem, not the file's
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        raise DamagedFileError(f"{path}: this {what} cannot be read ({'an empty file' if size == 0 else type(e).__name__}"
                               f"): it is torn, or not a file torch.save wrote, so it was not loaded") from None


def _unsafe(path, what: str, e: Exception) -> UnsafeFileError:
    found = next((line.split("GLOBAL", 1)[1].split()[0] for line in str(e).splitlines() if "GLOBAL" in line), "?")
    return UnsafeFileError(f"{path}: this {what} holds a Python object ({found}), not only tensors and plain values, "
                           "so it was not loaded (loading it could run code). A checkpoint written by fedmoe before "
                           "2026-12-05 held numpy objects: if you wrote it yourself, convert it once with `fedmoe "
                           "migrate-checkpoint RUN_DIR`")


def _nonfinite_text(value: float) -> str:
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def to_jsonable(value: Any) -> Any:
    """Plain-JSON form of a value: tensors/numpy scalars -> python numbers, NaN/±inf -> the strings
    "NaN", "Infinity", "-Infinity" (:func:`from_jsonable` reads them back)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _nonfinite_text(value)
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # torch / numpy scalars
    if callable(item):
        return to_jsonable(item())
    tolist = getattr(value, "tolist", None)  # small tensors / arrays
    if callable(tolist):
        return to_jsonable(tolist())
    raise TypeError(f"cannot write a {type(value).__name__} to JSON: {value!r}")


def dumps(value: Any, **kwargs) -> str:
    return json.dumps(to_jsonable(value), allow_nan=False, **kwargs)


def from_jsonable(value: Any, key: str | None = None) -> Any:
    """The inverse of :func:`to_jsonable` for numbers: "NaN", "Infinity", "-Infinity" -> float
    (except under the text keys in ``TEXT_KEYS``)."""
    if key in TEXT_KEYS:
        return value
    if isinstance(value, dict):
        return {k: from_jsonable(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v, key) for v in value]
    if isinstance(value, str) and value in NONFINITE_TEXT:
        return NONFINITE_TEXT[value]
    return value


def loads(text: str) -> Any:
    """JSON written by fedmoe (metrics row, summary.json), non-finite numbers as floats."""
    return from_jsonable(json.loads(text))


# --------------------------------------------------------------------------------------------


class RunDir:
    """``runs/<name>/``: where a run's config, metrics, summary, report and checkpoints live."""

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    REPORT = "report.md"
    CHECKPOINTS = "checkpoints"

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        self.new_run = False  # a new run's directory (prepare_run_dir), not one being resumed or read
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {self.path}")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def summary_path(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def report_path(self) -> Path:
        return self.path / self.REPORT

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    # -- config ------------------------------------------------------------------------------

    def write_config(self, config: dict) -> None:
        """Write the fully resolved config (a plain dict, e.g. ``config_to_dict(cfg)``) as YAML, and the marker
        that says fedmoe made this directory (:attr:`MARKER`)."""
        import yaml

        if not (self.path / self.MARKER).is_file():
            atomic_write_text(self.path / self.MARKER, json.dumps({"written_by": "fedmoe", "what": "a run directory: "
                                                                   "fedmoe may replace what it holds"}) + "\n")
        atomic_write_text(self.config_path, yaml.safe_dump(to_jsonable(config), sort_keys=False))

    # -- replacing a run ---------------------------------------------------------------------
    # fedmoe deletes only a directory it can prove it made (its MARKER), and a run that replaces another
    # (--overwrite, or a run that stopped before its first checkpoint) first moves the old files aside
    # (ASIDE) and deletes them only once its own setup finished (data and model loaded, every client set up);
    # a run that fails before that puts them back.

    MARKER = ".fedmoe-run"
    ASIDE = ".fedmoe-replaced"

    @property
    def aside_path(self) -> Path:
        return self.path / self.ASIDE

    def _own_entries(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name not in (self.LOCK, self.ASIDE)]

    def set_aside(self) -> bool:
        """Move everything here (but the lock) into :attr:`ASIDE`; True when there was something to move."""
        entries = self._own_entries()
        if not entries:
            return False
        self.aside_path.mkdir()
        for p in entries:
            os.replace(p, self.aside_path / p.name)
        return True

    def finish_replacement(self) -> None:
        """The new run finished its setup: the run it replaces is deleted."""
        import shutil

        if self.aside_path.is_dir():
            shutil.rmtree(self.aside_path)

    def restore_replaced(self) -> bool:
        """The new run failed before its setup finished: its files are removed and the replaced run's put back.
        True when there was one to put back. A replaced "run" that is only its config (one that itself failed
        before it wrote anything else: no metrics, no checkpoint, no summary) holds nothing to restore: it is
        deleted with the new run's files, and False returned."""
        import shutil

        if not self.aside_path.is_dir():
            return False
        for p in self._own_entries():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if self.only_config(list(self.aside_path.iterdir())):
            shutil.rmtree(self.aside_path)
            return False
        for p in self.aside_path.iterdir():
            os.replace(p, self.path / p.name)
        self.aside_path.rmdir()
        return True

    def only_config(self, entries: list[Path] | None = None) -> bool:
        """Whether ``entries`` (default: what this directory holds but its lock) are only what a new run writes
        before anything else: fedmoe's marker and config.yaml (a run that failed there left no result)."""
        entries = self._own_entries() if entries is None else entries
        return {p.name for p in entries} <= {self.MARKER, self.CONFIG}

    def remove_unstarted(self) -> bool:
        """Delete this new run's directory (:attr:`new_run`) if it holds only its marker and config.yaml
        (:meth:`only_config`): a run that failed before it wrote anything else leaves no directory behind. Call it under the lock; the directory
        itself goes only once empty (after :meth:`unlock`: :meth:`remove_if_empty`). True when it did."""
        if not self.new_run or not self.path.is_dir() or self.aside_path.exists() or not self.only_config():
            return False  # a resumed run's directory is never removed (its config.yaml is what a resume names)
        for p in self._own_entries():
            p.unlink()
        return True

    def remove_if_empty(self) -> None:
        try:
            self.path.rmdir()
        except OSError:  # not empty (another run took it meanwhile), or gone
            pass

    # -- metrics -----------------------------------------------------------------------------

    def log_metrics(self, record: dict) -> None:
        """Append one row to metrics.jsonl and make it durable (flush + fsync)."""
        if not isinstance(record, dict):
            raise TypeError(f"log_metrics expects a dict, got {type(record).__name__}")
        if "round" not in record:
            raise ValueError(f"metrics row has no 'round' key: {record!r}")
        line = dumps(record) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict]:
        """All rows of metrics.jsonl ([] when there is none yet). Each row's ``kind`` says what it is:
        ``train`` (a client's round), ``test`` (an evaluation: a client's own model, or the global one
        with ``client`` None), ``server`` (aggregation), ``round`` (the round's timing), ``failure``.

        A torn last line (a crash mid-append) is skipped; a bad line elsewhere is an error.
        """
        if not self.metrics_path.exists():
            return []
        text = self.metrics_path.read_text(encoding="utf-8")
        lines = text.split("\n")
        rows = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = loads(line)
            except json.JSONDecodeError as e:
                is_torn_tail = lineno == len(lines) and not text.endswith("\n")
                if is_torn_tail:
                    break
                raise ValueError(f"{self.metrics_path}: line {lineno} is not valid JSON: {e}") from None
            if isinstance(row, dict) and "split" in row and "kind" not in row:
                row["kind"] = row.pop("split")  # a row written before 2026-12-04 named its kind "split"
            rows.append(row)
        return rows

    def truncate_metrics(self, after_round: int) -> int:
        """Keep only rows with ``round <= after_round`` (on resume); returns how many were dropped.

        Rows without a round number are kept.
        """
        if not self.metrics_path.exists():
            return 0
        rows = self.read_metrics()
        kept = [r for r in rows if not isinstance(r.get("round"), (int, float)) or r["round"] <= after_round]
        atomic_write_text(self.metrics_path, "".join(dumps(r) + "\n" for r in kept))
        return len(rows) - len(kept)

    # -- summary -----------------------------------------------------------------------------

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_path, dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict:
        if not self.summary_path.exists():
            raise FileNotFoundError(f"no summary.json in {self.path}: the run has not finished")
        return loads(self.summary_path.read_text(encoding="utf-8"))

    # -- lock --------------------------------------------------------------------------------
    # One process writes a run directory at a time: two runs appending to one metrics.jsonl would
    # double every row. The lock is a file naming its holder (pid, host), created atomically (written
    # aside, then hard-linked into place, which fails if it exists), removed when the run ends. A lock
    # whose process is gone (a crash, SIGKILL) is stale and taken over with a warning, by one process
    # only when several find it at once (:meth:`RunDir._remove_stale_lock`).

    LOCK = "run.lock"

    @property
    def lock_path(self) -> Path:
        return self.path / self.LOCK

    def lock_holder(self) -> dict | None:
        """The lock's holder ({"pid", "host", "since"}), {} for an unreadable lock file, None if unlocked."""
        try:
            text = self.lock_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def lock(self, log=print) -> None:
        """Take the run directory's lock, or raise :class:`RunDirBusy` naming the process that holds it."""
        import socket
        import time

        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{self.LOCK}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(me, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, self.lock_path)  # atomic: fails when a lock exists
                return
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: create it exclusively, then fill it
                try:
                    fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump(me, f)
                    return
            finally:
                os.unlink(tmp)
            holder = self.lock_holder()
            if holder is None:
                continue  # released meanwhile: try again
            if _holder_alive(holder, me["host"]):
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}" if holder
                       else f"unreadable lock file {self.lock_path}")
                raise RunDirBusy(
                    f"{self.path} is in use by another fedmoe run ({who}): wait for it to finish (or stop it), or "
                    f"choose another directory (--set name=...). If no such process runs any more, delete "
                    f"{self.lock_path}")
            log(f"warning: {self.path}: the run that held it (pid {holder.get('pid')} on {holder.get('host')}) is no "
                "longer running (it crashed or was killed); its stale lock is taken over")
            self._remove_stale_lock(holder)
        raise RunDirBusy(f"{self.path}: could not take the lock {self.lock_path} (another run keeps taking it)")

    def _remove_stale_lock(self, stale: dict) -> None:
        """Delete the lock file if it still names ``stale``. Two processes that both found the same stale lock
        would otherwise both take it: the second's delete would remove the lock the first had just taken. The
        check and the delete are made under an exclusive flock on the run directory itself (no file added to
        it), so the second finds the first's live lock and is refused. Stale locks are only ever found on the
        holder's own host (:func:`_holder_alive`), where the flock is shared."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # a directory this user may write but not read: no guard, the compare alone
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError:  # a file system without flock on directories: the compare alone
                    pass
            if self.lock_holder() == stale:
                try:
                    self.lock_path.unlink()
                except FileNotFoundError:
                    pass
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock

    def unlock(self) -> None:
        """Release the lock if this process holds it."""
        holder = self.lock_holder()
        if holder and holder.get("pid") == os.getpid():
            import socket

            if holder.get("host") == socket.gethostname():
                try:
                    self.lock_path.unlink()
                except FileNotFoundError:
                    pass


class RunDirBusy(RuntimeError):
    """The run directory is locked by another live fedmoe process."""


def _holder_alive(holder: dict, host: str) -> bool:
    """Whether the lock's holder may still be running: True unless it is on this host and its pid is gone
    (or a zombie). An unreadable lock counts as held (it may be being written)."""
    pid = holder.get("pid")
    if holder.get("host") != host or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet still has a pid
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# --------------------------------------------------------------------------------------------
# commands a message suggests, and a folder given where a run directory is wanted


def md_cell(text) -> str:
    """``text`` as one cell of a markdown table: its pipes escaped and its line breaks made spaces (a category or
    label name from the user's data may hold either, and would break the table's columns or rows)."""
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").splitlines())


def shell_quote(value) -> str:
    """``value`` (a path, a name) as it must be typed in a command a message suggests for pasting: quoted for a
    POSIX shell where it holds a space or another character the shell would read (:func:`shlex.quote`), as it is
    otherwise (``runs/fedit`` stays ``runs/fedit``)."""
    import shlex

    return shlex.quote(str(value))


def says_out_of_memory(text: str) -> bool:
    """Whether an error's text (its type's name and message) says the process ran out of memory: CUDA's
    OutOfMemoryError, Python's MemoryError, the CPU allocator's "can't allocate memory"."""
    low = text.lower()
    return "out of memory" in low or "memoryerror" in low or "can't allocate memory" in low


FLOWER_RUN = "flower-run.json"  # in the run directory: the Flower run that writes it, and on which SuperLink


def resume_command(path) -> str:
    """The command that continues the run in ``path``: ``fedmoe run --resume PATH``, with ``--federation NAME`` for a
    run on a Flower deployment (its SuperLink's name, from :data:`FLOWER_RUN`; a resume without it is refused)."""
    cmd = f"fedmoe run --resume {shell_quote(path)}"
    try:
        superlink = json.loads((Path(path) / FLOWER_RUN).read_text(encoding="utf-8")).get("superlink")
    except (OSError, ValueError, AttributeError):
        return cmd
    return cmd + (f" --federation {shell_quote(superlink)}" if isinstance(superlink, str) and superlink else "")


SWEEP_REPORT = "sweep_report.md"
_REPORT_LINK = re.compile(r"\[([^\]\n]+)\]\(\1/report\.md\)")


def sweep_report_points(path: str | Path) -> list[str] | None:
    """The points a sweep's folder's ``sweep_report.md`` lists (those of the sweep's last run, in its order); None
    without a readable report."""
    try:
        return _REPORT_LINK.findall((Path(path) / SWEEP_REPORT).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def sweep_points_in(path: str | Path) -> list[Path] | None:
    """The point directories (those holding a config.yaml) of a sweep's folder — ``output_dir/name`` of a config
    with a ``sweep:`` section, which holds its ``sweep_report.md`` (once the sweep finished) and one run directory
    per point, each named ``key=value,...`` — in the sweep's order where its report lists them; None when ``path``
    is not a sweep's folder (a run directory, an ``output_dir`` of runs, any other folder)."""
    path = Path(path)
    if not path.is_dir() or (path / RunDir.CONFIG).exists():
        return None
    try:
        points = sorted(p for p in path.iterdir() if p.is_dir() and (p / RunDir.CONFIG).is_file())
    except OSError:
        return None
    report = path / SWEEP_REPORT
    if not report.is_file() and not (points and all("=" in p.name for p in points)):
        return None
    order = sweep_report_points(path) or []
    rank = {name: i for i, name in enumerate(order)}
    return sorted(points, key=lambda p: (rank.get(p.name, len(rank)), p.name))


def sweep_source(path: str | Path) -> str | None:
    """The config a sweep's folder was run from, as its ``sweep_report.md`` names it (``# Sweep: CONFIG``, the
    path as it was given then); None without a readable report."""
    try:
        first = (Path(path) / SWEEP_REPORT).read_text(encoding="utf-8").split("\n", 1)[0]
    except (OSError, UnicodeDecodeError):
        return None
    return first.removeprefix("# Sweep:").strip() or None if first.startswith("# Sweep:") else None


# what to give instead of a sweep's folder, per command that wants one run (the first point as the example)
_ONE_POINT = {"export": "fedmoe export {} OUT", "generate": "fedmoe generate {}", "mmlu": "fedmoe mmlu {}",
              "migrate-checkpoint": "fedmoe migrate-checkpoint {}", "compare": "fedmoe compare {}"}


def run_dir_problem(path: str | Path, use: str) -> str | None:
    """Why ``path`` is not a run directory, and what to do instead, for the command ``use`` that wants one
    (``resume``, ``export``, ``generate``, ``mmlu``, ``migrate-checkpoint``, ``compare``); None when it is one
    (it holds a config.yaml). A path that does not exist, a file (a config given to ``--resume``) and a sweep's
    folder (:func:`sweep_points_in`) are each named as such."""
    path = Path(path)
    if (path / RunDir.CONFIG).is_file():
        return None
    give = "give the directory of a run (`fedmoe run` writes output_dir/name, e.g. runs/fedit)"
    if not path.exists():
        return f"{path} does not exist: {give}"
    if not path.is_dir():
        if use == "resume" and path.suffix in (".yaml", ".yml"):
            return (f"{path} is a config file, not a run directory: start a run from it with `fedmoe run "
                    f"{shell_quote(path)}` (--resume continues the run in a directory `fedmoe run` wrote)")
        return f"{path} is a file, not a run directory: {give}"
    points = sweep_points_in(path)
    if points is None and (path / RunDir.ASIDE / RunDir.CONFIG).is_file():
        return (f"{path} holds a run that another run with its name set aside ({RunDir.ASIDE}) and was stopped before "
                f"its setup finished: the next `fedmoe run` of that name puts it back, or move the contents of "
                f"{path / RunDir.ASIDE} back into {path} yourself")
    if points is None:
        return f"{path} is not a fedmoe run directory (no config.yaml): {give}"
    names = ", ".join(p.name for p in points) or "none with a config.yaml"
    if use == "resume":
        source = sweep_source(path)
        how = (f"`fedmoe run {shell_quote(source)}` (the config its sweep_report.md names, as it was given then)"
               if source else "`fedmoe run CONFIG` with the sweep's config")
        return (f"{path} is a sweep's folder (points: {names}), not one run: a sweep resumes by running it again, "
                f"{how}, with the --set options it ran with: its finished points are kept and the others continue from "
                "their checkpoints" + (f"; one point alone resumes with `fedmoe run --resume {shell_quote(points[0])}`"
                                       if points else ""))
    example = f", e.g. `{_ONE_POINT[use].format(shell_quote(points[0]))}`" if points and use in _ONE_POINT else ""
    return f"{path} is a sweep's folder, not one run: give one of its points{example}; its points: {names}"
