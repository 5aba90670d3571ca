"""Where a SuperNode's client keeps its files, from its node config and the ids in a message: no torch,
so the relay and the SecAgg+ handler of a ClientApp process can use it."""

from __future__ import annotations

import re
from pathlib import Path


def store_path(state_dir: Path, run_id, client: int) -> Path:
    """Where client ``client`` keeps its private store for the run ``run_id`` (the id the server names in
    every message, 12 hex digits): a run id that is not a plain name (a path, '..') is refused, so a
    message cannot make a SuperNode write, prune or load files outside its state directory."""
    if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        raise ValueError(f"refused a message whose run_id {str(run_id)[:80]!r} is not a plain name of letters, "
                         "digits, '-' and '_' (a fedmoe server sends 12 hex digits)")
    return Path(state_dir) / run_id / f"client-{int(client)}"


DEFAULT_STATE_DIR = Path.home() / ".fedmoe" / "client-state"


def node_identity(node_config, options: dict) -> tuple[int, str | None, str]:
    """(client id, its own data file or None, its state directory) from a SuperNode's node config."""
    if "partition-id" not in node_config:
        raise ValueError("this SuperNode has no partition-id in its node config: start it with "
                         "--node-config 'partition-id=N' (N = its client id, 0..num_clients-1)")
    state_dir = node_config.get("state-dir") or options.get("state-root") or str(DEFAULT_STATE_DIR)
    if not Path(str(state_dir)).expanduser().is_absolute():
        # relative to whatever directory the SuperNode (or a worker) was started in: another start elsewhere would
        # find no private stores and no privacy ledger, and its node's budget would begin again at zero
        raise ValueError(f"node config state-dir = '{state_dir}': give it as an absolute path (e.g. "
                         "state-dir=\"/var/lib/fedmoe\"): a relative one depends on the directory the SuperNode "
                         "was started in")
    return int(node_config["partition-id"]), node_config.get("data-path") or None, str(Path(str(state_dir)).expanduser())


__all__ = ["DEFAULT_STATE_DIR", "node_identity", "store_path"]
