"""summary.json: the final results of a run, in the schema of the run-directory contract."""

from __future__ import annotations

from typing import Any

CLIENT_KEYS = ("id", "k", "rank", "n_train", "rouge_l", "loss", "bytes_up", "bytes_down", "flops_per_seq")
GLOBAL_KEYS = ("rouge_l", "loss", "mmlu", "perplexity")


def build_summary(
    algorithm: str,
    model: str,
    rounds: int,
    seed: int,
    wall_s: float,
    clients: list[dict],
    global_metrics: dict,
    extra: dict | None = None,
) -> dict:
    """Assemble summary.json.

    Every client dict must carry all of ``CLIENT_KEYS`` (a value may be None); extra client keys
    are kept. Global metrics not given are None. ``extra`` adds top-level keys but may not
    replace the schema's own.
    """
    out_clients = []
    for index, client in enumerate(clients):
        if not isinstance(client, dict):
            raise ValueError(f"summary: client entry {index} must be a dict, got {type(client).__name__}")
        for key in CLIENT_KEYS:
            if key not in client:
                who = f"client {client['id']}" if "id" in client else f"client entry {index}"
                raise ValueError(f"summary: {who} is missing the required key '{key}'")
        out_clients.append({**{k: client[k] for k in CLIENT_KEYS}, **client})
    global_block: dict[str, Any] = {k: None for k in GLOBAL_KEYS}
    global_block.update(global_metrics or {})
    summary = {
        "algorithm": algorithm,
        "model": model,
        "rounds": rounds,
        "seed": seed,
        "wall_s": wall_s,
        "clients": out_clients,
        "global": global_block,
    }
    for key, value in (extra or {}).items():
        if key in summary:
            raise ValueError(f"summary: extra key '{key}' would replace a schema field; give it another name")
        summary[key] = value
    return summary
