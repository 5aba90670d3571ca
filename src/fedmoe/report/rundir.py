"""The run directory ``runs/<name>/`` (a contract, see docs): config, metrics log, summary, report.

Every file is written atomically (temp file in the same folder, fsync, ``os.replace``) or, for
the metrics log, appended one fsync'ed line at a time, so that a crash never leaves a torn file
behind and a run can resume from what is on disk.
"""

from __future__ import annotations

import json
import math
import os
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


# --------------------------------------------------------------------------------------------
# JSON that stays strict JSON


def to_jsonable(value: Any) -> Any:
    """Plain-JSON form of a value: tensors/numpy scalars -> python numbers, NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
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
        """Write the fully resolved config (a plain dict, e.g. ``config_to_dict(cfg)``) as YAML."""
        import yaml

        atomic_write_text(self.config_path, yaml.safe_dump(to_jsonable(config), sort_keys=False))

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
        """All rows of metrics.jsonl ([] when there is none yet).

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
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                is_torn_tail = lineno == len(lines) and not text.endswith("\n")
                if is_torn_tail:
                    break
                raise ValueError(f"{self.metrics_path}: line {lineno} is not valid JSON: {e}") from None
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
        return json.loads(self.summary_path.read_text(encoding="utf-8"))
