"""Which trainable tensors belong to which routed expert: by MoE layer, and row by row.

An expert LoRA tensor of a layer stacks every expert's factor on dim 0 (``(E, r, in)`` for A,
``(E, out, r)`` for B), so expert (l, j) is row j of each of its layer's expert tensors. FLAME, FC-MoE
and the runtime's update-conflict diagnostic read the same grouping from here; which tensor belongs
to which MoE layer comes from the model's inventory (:meth:`fedmoe.moe.Inventory.expert_layers`).
"""

from __future__ import annotations

import torch


def expert_groups(names: list[str], layer_of: dict[str, int], num_experts_of: dict[int, int]):
    """[(group key, [(tensor name, expert row or None)])]: one group per expert (l, j), then the
    shared group of every non-expert tensor (key None)."""
    groups = []
    for layer in sorted(set(layer_of.values())):
        tensors = [n for n in names if layer_of.get(n) == layer]
        for j in range(num_experts_of[layer]):
            groups.append(((layer, j), [(n, j) for n in tensors]))
    shared = [(n, None) for n in names if n not in layer_of]
    if shared:
        groups.append((None, shared))
    return groups


def flat_group(state: dict[str, torch.Tensor], members) -> torch.Tensor:
    """A group's tensors (each the whole tensor, or its expert row) flattened into one float64 vector."""
    return torch.cat([(state[n] if j is None else state[n][j]).reshape(-1).to(torch.float64) for n, j in members])


def expert_layout(inventory, num_experts: int) -> tuple[dict[str, int], dict[int, list[int]] | None]:
    """(MoE layer of each expert LoRA tensor, the expert of each row per MoE layer, or None when every
    tensor holds every expert; ``lora.experts_per_layer`` holds some: row j of a layer's tensors is then
    expert ``experts[layer][j]``, which is what a per-expert count or frequency must be read at)."""
    rows = inventory.expert_rows()
    full = all(r == tuple(range(num_experts)) for r in rows.values())
    return inventory.expert_layers(), None if full else {layer: list(r) for layer, r in rows.items()}


__all__ = ["expert_groups", "expert_layout", "flat_group"]
