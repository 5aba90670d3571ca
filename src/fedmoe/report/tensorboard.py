"""metrics.jsonl as TensorBoard scalars (``report.tensorboard: true``; extra ``fedmoe[tensorboard]``).

Every numeric value of every row becomes a scalar at step = round, tagged ``<kind>/<key>`` with
``/global`` (rows of no client: the global model, the server, the round) or ``/client_<id>``; a
per-layer list (a key ending in ``_by_layer`` or ``_per_layer``) adds ``/layer_<i>``, another list ``/<i>``, a dict
(ROUGE-L by category, bytes by client) ``/<name>``. Lists of client ids (the clients aggregated, Krum's choice,
SecAgg+'s participants) are not measurements and make no scalar. The folder is rebuilt
from metrics.jsonl as a whole (into a temporary folder, then swapped in), so a resumed run, whose
redone rounds replace their rows, never shows a round twice.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

FOLDER = "tensorboard"
_SKIP = {"round", "client", "kind", "clients", "error", "stage", "krum_selected", "secagg_clients"}
PER_LAYER = ("_by_layer", "_per_layer")  # the suffixes of the keys whose lists run over the MoE layers


def require_tensorboard() -> None:
    """Fail before a run starts, not after it ends, when the package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise RuntimeError("report.tensorboard: true needs the tensorboard package: pip install 'fedmoe[tensorboard]' "
                           "(or set report.tensorboard: false)") from None


def scalars(rows: list[dict]) -> Iterator[tuple[str, float, int]]:
    """(tag, value, step) of every number in the rows; None (not measured) is skipped, NaN kept."""
    for row in rows:
        step = row.get("round")
        if not isinstance(step, (int, float)):
            continue
        who = "global" if row.get("client") is None else f"client_{row['client']}"
        kind = row.get("kind", "metrics")
        for key, value in row.items():
            if key in _SKIP:
                continue
            for suffix, v in _flatten(value, per_layer=key.endswith(PER_LAYER)):
                yield f"{kind}/{key}/{who}{suffix}", float(v), int(step)


def _flatten(value, suffix: str = "", per_layer: bool = False):
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield suffix, value
    elif isinstance(value, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in value):
            for i, v in enumerate(value):
                if v is not None:
                    yield f"{suffix}/{'layer_' if per_layer else ''}{i}", v
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{suffix}/{k}", per_layer)


def write_tensorboard(rows: list[dict], run_path: str | Path) -> int:
    """Rebuild ``<run>/tensorboard/`` from the rows; returns the number of scalars written."""
    from torch.utils.tensorboard import SummaryWriter

    final = Path(run_path) / FOLDER
    tmp = Path(run_path) / f".{FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    n = 0
    with SummaryWriter(log_dir=str(tmp)) as w:
        for tag, value, step in scalars(rows):
            w.add_scalar(tag, value, step)
            n += 1
    old = Path(run_path) / f".{FOLDER}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return n
