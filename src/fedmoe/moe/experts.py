"""How a family's fused experts hold their weights and compute: the facts fedmoe's own expert paths read.

transformers v5 holds every supported family's routed experts as two stacked tensors, ``gate_up_proj`` and
``down_proj``, and most families alike: (E, 2I, H) and (E, H, I) (each expert's weight as ``nn.Linear`` holds it,
(out, in)), the gate's outputs the first half of gate_up's and the up's the second, no biases, and
``down(act(gate) * up)``. gpt-oss (``GptOssExperts``, transformers 5.23) differs in all four:

* **transposed**: (E, H, 2I) and (E, I, H), each expert's weight (in, out), applied as ``x @ W``;
* **interleaved**: the gate is gate_up's output 0, 2, 4, ..., the up output 1, 3, 5, ...;
* **biased**: ``gate_up_proj_bias`` (E, 2I) and ``down_proj_bias`` (E, H), added to each projection's output;
* **a clamped SwiGLU**: gate clamped to at most ``limit``, up to [-limit, limit], then
  ``(up + 1) * gate * sigmoid(alpha * gate)`` (``swiglu_limit`` 7.0, ``swiglu_alpha`` 1.702).

transformers marks the first three on the module (``is_transposed``, ``is_concatenated``, ``has_bias``: set by its
``use_experts_implementation``); the activation is the family's own (``GptOssExperts._apply_gate``). Llama-4's
``Llama4TextExperts`` is not built that way and carries no marks, but is transposed too: (E, H, 2I) and (E, I, H),
multiplied as ``torch.bmm(x, W)``, gate | up halves, no biases, ``down(act(gate) * up)``
(:data:`UNMARKED_TRANSPOSED_EXPERTS`).
:class:`ExpertForm` holds these facts for one experts module. fedmoe's expert forward (the per-expert loop, the
grouped path, FLEx's grafts and its scoring), its quantization and its exports read the stacks through it. A LoRA
pair on ``gate_up_proj`` is a map H -> 2I whose outputs are in the stored order (interleaved for gpt-oss), as
PEFT's ``target_parameters`` puts it: its ΔW (2I, H) is added to the stored stack transposed where the stack is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# the families whose experts compute the clamped SwiGLU (their module holds ``limit`` and ``alpha``)
CLAMPED_SWIGLU_ARCHITECTURES = ("gpt_oss",)
# transformers' fused experts modules that hold their stacks (E, in, out) without an ``is_transposed`` mark (they are
# not built by use_experts_implementation), by class name: Llama-4's (transformers 5.23), which has no config to tell
UNMARKED_TRANSPOSED_EXPERTS = ("Llama4TextExperts",)


@dataclass(frozen=True)
class ExpertForm:
    """How one fused experts module holds and computes its experts (module docstring)."""

    transposed: bool = False  # stacks (E, in, out): x @ W (gpt-oss); else (E, out, in): F.linear(x, W)
    interleaved: bool = False  # gate_up's outputs alternate gate, up (gpt-oss); else gate | up halves
    bias: bool = False  # gate_up_proj_bias (E, 2I) and down_proj_bias (E, H)
    limit: float | None = None  # the clamped SwiGLU's limit (gpt-oss); None: act_fn(gate) * up
    alpha: float = 1.0  # the clamped SwiGLU's sigmoid gain

    # ---- shapes of the stacks as stored
    def hidden(self, gate_up) -> int:
        return gate_up.shape[1] if self.transposed else gate_up.shape[2]

    def inter(self, down) -> int:
        return down.shape[1] if self.transposed else down.shape[2]

    def stack_shape(self, E: int, fan_out: int, fan_in: int) -> tuple[int, int, int]:
        """The stored shape of a stack of E weights mapping fan_in -> fan_out."""
        return (E, fan_in, fan_out) if self.transposed else (E, fan_out, fan_in)

    # ---- applying one expert's stored weight, or a stack in a grouped matmul
    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x`` through one expert's weight ``w`` as stored."""
        return x @ w.to(x.dtype) if self.transposed else F.linear(x, w.to(x.dtype))

    def in_out(self, stack):
        """A stack as (E, in, out), what ``grouped_mm`` multiplies rows by (a view, nothing copied)."""
        return stack if self.transposed else stack.transpose(-2, -1)

    def to_stored(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW of a stack, (E, out, in), in the orientation the stack is stored in."""
        return delta.transpose(-2, -1) if self.transposed else delta

    # ---- gate and up
    def split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) of gate_up's outputs (last dimension)."""
        if self.interleaved:
            return gate_up[..., 0::2], gate_up[..., 1::2]
        return gate_up.chunk(2, dim=-1)

    def join(self, gate: torch.Tensor, up: torch.Tensor, dim: int) -> torch.Tensor:
        """gate_up's outputs from the gate's and the up's along ``dim``: the inverse of :meth:`split`."""
        if not self.interleaved:
            return torch.cat([gate, up], dim)
        dim = dim % gate.dim()
        return torch.stack([gate, up], dim + 1).flatten(dim, dim + 1)  # gate 0, up 0, gate 1, up 1, ...

    def gate_rows(self, inter: int) -> tuple[slice, slice]:
        """The rows of gate_up's ΔW (2I, H) that are the gate's and the up's."""
        return (slice(0, None, 2), slice(1, None, 2)) if self.interleaved else (slice(0, inter), slice(inter, None))

    def glu(self, gate: torch.Tensor, up: torch.Tensor, act_fn=None) -> torch.Tensor:
        """The expert's hidden activation from its gate and up outputs."""
        if self.limit is None:
            return act_fn(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


STANDARD = ExpertForm()


def expert_form(experts) -> ExpertForm:
    """The :class:`ExpertForm` of a transformers fused experts module (a stack fedmoe wrapped: its base)."""
    experts = getattr(experts, "base", experts)
    model_type = getattr(getattr(experts, "config", None), "model_type", None)
    clamped = model_type in CLAMPED_SWIGLU_ARCHITECTURES
    transposed = bool(getattr(experts, "is_transposed", False)) or type(experts).__name__ in UNMARKED_TRANSPOSED_EXPERTS
    return ExpertForm(transposed=transposed,
                      interleaved=not bool(getattr(experts, "is_concatenated", True)),
                      bias=bool(getattr(experts, "has_bias", False)),
                      limit=float(experts.limit) if clamped else None,
                      alpha=float(experts.alpha) if clamped else 1.0)


def expert_biases(experts, form: ExpertForm) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(gate_up bias (E, 2I), down bias (E, H)) of a biased experts module, else (None, None)."""
    if not form.bias:
        return None, None
    return experts.gate_up_proj_bias, experts.down_proj_bias


__all__ = ["CLAMPED_SWIGLU_ARCHITECTURES", "STANDARD", "UNMARKED_TRANSPOSED_EXPERTS", "ExpertForm", "expert_biases", "expert_form"]
