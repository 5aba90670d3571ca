"""Where a SuperNode's client keeps its files, from its node config and the ids in a message: no torch,
so the relay and the SecAgg+ handler of a ClientApp process can use it."""

from __future__ import annotations

import re
from pathlib import Path

from ...rundir import says_out_of_memory


def store_path(state_dir: Path, run_id, client: int) -> Path:
    """Where client ``client`` keeps its private store for the run ``run_id`` (the id the server names in
    every message, 12 hex digits): a run id that is not a plain name (a path, '..') is refused, so a
    message cannot make a SuperNode write, prune or load files outside its state directory."""
    if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        raise RefusedMessage(f"refused a message whose run_id {str(run_id)[:80]!r} is not a plain name of letters, "
                         "digits, '-' and '_' (a fedmoe server sends 12 hex digits)")
    return Path(state_dir) / run_id / f"client-{int(client)}"


DEFAULT_STATE_DIR = Path.home() / ".fedmoe" / "client-state"


class NodeConfigError(ValueError):
    """A SuperNode's node config lacks a key or holds a value fedmoe cannot take (its text names the key)."""


class RefusedMessage(ValueError):
    """A message a node refuses for what the server put in it (its text quotes the message, not the node's data)."""


# what a node tells its server of an error it met: the type and text of these (fedmoe's own, which quote no data: a
# node config value, the node's privacy budget, a worker that could not be reached); of any other only its type. An
# error raised while reading, validating or tokenising the node's data quotes the data (the row that failed), and a
# server chooses the settings (data.field_map, ...) that make the first row fail: its text stays in the node's log
PUBLIC_ERRORS = ("NodeConfigError", "RefusedMessage", "BudgetRefusal", "PermissionError", "WorkerError")


def node_error_text(e: BaseException, node_config, deployed: bool = True) -> str:
    """What of ``e`` a node sends its server (see :data:`PUBLIC_ERRORS`): all of it in a simulation (``deployed``
    False: one process of one user) or where the node config says ``share-errors=true``."""
    name = type(e).__name__
    try:
        share = node_flag(node_config, "share-errors", False)
    except NodeConfigError:
        share = False
    text = f"{name}: {e}".strip()
    # running out of memory quotes no data, and the server has the remedy for it (directories.with_memory_hint);
    # the CPU allocator raises a plain RuntimeError that says so
    if not deployed or share or name in PUBLIC_ERRORS or says_out_of_memory(text):
        return text
    return (f"{name} on this node (its reason, which may quote the node's data, is in the node's log; the node config "
            "share-errors=true sends reasons to the server)")


# a SuperNode's node config values arrive as Flower parsed them from --node-config 'key=value ...': numbers, booleans
# or strings. Each key fedmoe reads is parsed here, once, and a value it cannot take is an error naming the key (a
# flag that cannot be read is never taken as its default: share-examples="off" must not send the examples)
def _given(node_config, key: str):
    raw = (node_config or {}).get(key)
    return None if raw is None or (isinstance(raw, str) and raw.strip() == "") else raw


def node_int(node_config, key: str, default: int | None, lo: int = 0, example: str = "1") -> int | None:
    """An integer node config value >= ``lo`` (a whole number written as one: 2, "2"; not 1.7, not true)."""
    raw = _given(node_config, key)
    if raw is None:
        return default
    text = str(raw).strip()
    if isinstance(raw, bool) or isinstance(raw, float) or not re.fullmatch(r"[+-]?\d+", text) or int(text) < lo:
        raise NodeConfigError(f"node config {key} = {raw!r}: give a whole number >= {lo}, e.g. --node-config "
                              f"'{key}={example}'")
    return int(text)


def node_float(node_config, key: str, default: float | None, lo: float = 0.0, example: str = "1",
               inclusive: bool = False, hi: float = float("inf")) -> float | None:
    """A finite number node config value > ``lo`` (>= with ``inclusive``) and < ``hi``."""
    raw = _given(node_config, key)
    if raw is None:
        return default
    try:
        value = float("nan") if isinstance(raw, bool) else float(raw)  # Flower gives key=true as a boolean
    except (TypeError, ValueError):
        value = float("nan")
    if not ((value >= lo if inclusive else value > lo) and value < hi) or value == float("inf"):
        want = (f"in ({lo:g}, {hi:g})" if hi != float("inf") else f"{'>=' if inclusive else '>'} {lo:g}")
        raise NodeConfigError(f"node config {key} = {raw!r}: give a number {want}, e.g. --node-config "
                              f"'{key}={example}'")
    return value


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def node_flag(node_config, key: str, default: bool) -> bool:
    """A true/false node config value (true, false, 1, 0, yes, no)."""
    raw = _given(node_config, key)
    if raw is None:
        return default
    text = str(raw).strip().lower()
    if text not in _TRUE + _FALSE:
        raise NodeConfigError(f"node config {key} = {raw!r}: give true or false (or 1 / 0, yes / no), e.g. --node-config "
                         f"'{key}=false'")
    return text in _TRUE


def node_identity(node_config, options: dict) -> tuple[int, str | None, str]:
    """(client id, its own data file or None, its state directory) from a SuperNode's node config."""
    if "partition-id" not in node_config:
        raise NodeConfigError("this SuperNode has no partition-id in its node config: start it with "
                         "--node-config 'partition-id=N' (N = its client id, 0..num_clients-1)")
    state_dir = node_config.get("state-dir") or options.get("state-root") or str(DEFAULT_STATE_DIR)
    if not Path(str(state_dir)).expanduser().is_absolute():
        # relative to whatever directory the SuperNode (or a worker) was started in: another start elsewhere would
        # find no private stores and no privacy ledger, and its node's budget would begin again at zero
        raise NodeConfigError(f"node config state-dir = '{state_dir}': give it as an absolute path (e.g. "
                         "state-dir=\"/var/lib/fedmoe\"): a relative one depends on the directory the SuperNode "
                         "was started in")
    cid = node_int(node_config, "partition-id", None, example="0")
    if cid is None:
        raise NodeConfigError("node config partition-id is empty: give this SuperNode's client id, e.g. --node-config "
                              "'partition-id=0'")
    return cid, node_config.get("data-path") or None, str(Path(str(state_dir)).expanduser())


__all__ = ["DEFAULT_STATE_DIR", "NodeConfigError", "PUBLIC_ERRORS", "RefusedMessage", "node_error_text", "node_flag", "node_float",
           "node_identity", "node_int", "store_path"]
