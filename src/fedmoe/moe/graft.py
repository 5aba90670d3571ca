"""FLEx's expert grafting (SPEC.md §3): choose, per MoE layer, the pretrained expert that best
reproduces the layer's routed output on a client's data, and graft a personal copy of it beside the
MoE block behind a sigmoid gate:  y = MoE(x) + σ(g(x)) · G(x).

Scoring follows the expert-pruning criterion of Lu et al. (ACL 2024) with one retained expert:
L_l(e) = Σ_batches ‖Z_l − E_e(X_l)‖_F, Z_l the routed output (shared experts excluded), in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .arch import MoELayer
from .lora import ExpertsWithLoRA, _init_lora_A_


def _expert_forward(base: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, base.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(base.act_fn(gate) * up, base.down_proj[e])


@torch.inference_mode()
def score_experts(mm, batches, num_grafts: int = 1, stats: dict | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy expert choice per MoE layer on calibration ``batches`` (dicts with input_ids and
    attention_mask). Returns (chosen expert ids per layer, the first step's scores (L, E) in float64).

    ``stats``, if given, receives ``calibration_tokens`` (non-padding tokens scored),
    ``scoring_peak_bytes`` (the largest set of scoring tensors alive at once: one layer's X, Z and
    two float64 predictions for one batch; the batches are streamed, never all cached) and
    ``cached_bytes`` (what caching X and Z of every layer for the whole calibration set in the
    model's dtype would take, the approach the FLEx paper describes).

    Step 1 picks argmin_e Σ‖Z − E_e(X)‖_F; step s > 1 adds the expert that minimises
    Σ‖Z − Σ_{chosen ∪ {e}} E(X)‖_F (each retained expert with weight 1)."""
    model = mm.model
    was_training = model.training
    model.eval()
    L, E = len(mm.layers), mm.num_experts
    chosen: list[list[int]] = [[] for _ in range(L)]
    first_scores = None
    peak, tokens = 0, 0
    for step in range(num_grafts):
        scores = torch.zeros(L, E, dtype=torch.float64)
        handles = []
        for layer in mm.layers:
            experts: ExpertsWithLoRA = layer.block.experts

            def hook(module, args, output, li=layer.index):
                x = args[0]
                mask = mm.tracker.token_mask
                if mask is not None and mask.numel() == x.shape[0]:
                    x, output = x[mask], output[mask]
                z = output.to(torch.float64)
                base_sum = torch.zeros_like(z)
                nonlocal peak, tokens
                peak = max(peak, x.numel() * x.element_size() + output.numel() * output.element_size()
                           + 3 * z.numel() * z.element_size())  # z, base_sum, pred
                if step == 0 and li == 0:
                    tokens += x.shape[0]
                for c in chosen[li]:
                    base_sum += _expert_forward(module.base, c, x).to(torch.float64)
                for e in range(E):
                    if e in chosen[li]:
                        scores[li, e] = math.inf
                        continue
                    pred = base_sum + _expert_forward(module.base, e, x).to(torch.float64)
                    scores[li, e] += torch.linalg.norm(z - pred)

            handles.append(experts.register_forward_hook(hook))
        try:
            for batch in batches:
                mask = batch.get("attention_mask")
                with mm.tracking(mask):
                    model(input_ids=batch["input_ids"].to(mm.device),
                          attention_mask=None if mask is None else mask.to(mm.device))
        finally:
            for h in handles:
                h.remove()
        if first_scores is None:
            first_scores = scores.clone()
        for li in range(L):
            chosen[li].append(int(torch.argmin(scores[li])))
    model.train(was_training)
    if stats is not None:
        elem = next(mm.layers[0].block.experts.base.parameters()).element_size()
        stats.update(calibration_tokens=tokens, scoring_peak_bytes=peak,
                     cached_bytes=2 * L * tokens * mm.config.hidden_size * elem)
    return chosen, first_scores


class GraftedExperts(nn.Module):
    """The personal experts of one MoE layer: copies of pretrained experts (by index into the
    frozen expert stack, so nothing is duplicated unless trained in full), each with a gate
    Linear(hidden -> 1) and either LoRA on its projections or full trainable weights."""

    def __init__(self, layer: MoELayer, num_grafts: int = 1, rank: int = 8, alpha: float = 16.0,
                 train_full: bool = False, gate: str = "sigmoid"):
        super().__init__()
        base = layer.experts
        E, two_i, hidden = base.gate_up_proj.shape
        inter = base.down_proj.shape[2]
        dev, dt = base.gate_up_proj.device, base.gate_up_proj.dtype
        self.base = [base]  # a list: not registered as a child (its weights stay the model's own)
        self.router = [layer.router]
        self.num_grafts, self.train_full, self.gate_kind = num_grafts, train_full, gate
        self.register_buffer("source", torch.zeros(num_grafts, dtype=torch.long), persistent=False)
        self.gate = nn.Parameter(torch.zeros(num_grafts, hidden, device=dev, dtype=dt))
        n = num_grafts
        if train_full:
            self.gate_up_proj = nn.Parameter(torch.zeros(n, two_i, hidden, device=dev, dtype=dt))
            self.down_proj = nn.Parameter(torch.zeros(n, hidden, inter, device=dev, dtype=dt))
        else:
            self.scaling = alpha / rank
            self.gate_up_lora_A = nn.Parameter(torch.empty(n, rank, hidden, device=dev, dtype=dt))
            self.gate_up_lora_B = nn.Parameter(torch.zeros(n, two_i, rank, device=dev, dtype=dt))
            self.down_lora_A = nn.Parameter(torch.empty(n, rank, inter, device=dev, dtype=dt))
            self.down_lora_B = nn.Parameter(torch.zeros(n, hidden, rank, device=dev, dtype=dt))
            _init_lora_A_(self.gate_up_lora_A)
            _init_lora_A_(self.down_lora_A)
        self.enabled = True

    def init_from(self, experts: list[int]) -> None:
        """Point the grafts at these pretrained experts and reset their trainables: gates from the
        experts' router rows, LoRA A random / B zero (or full weights copied)."""
        router_w = self.router[0].weight
        with torch.no_grad():
            self.source.copy_(torch.tensor(experts, dtype=torch.long))
            self.gate.copy_(router_w[self.source].to(self.gate.dtype))
            if self.train_full:
                self.gate_up_proj.copy_(self.base[0].gate_up_proj[self.source])
                self.down_proj.copy_(self.base[0].down_proj[self.source])
            else:
                _init_lora_A_(self.gate_up_lora_A)
                _init_lora_A_(self.down_lora_A)
                self.gate_up_lora_B.zero_()
                self.down_lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base[0]
        out = torch.zeros_like(x)
        for j in range(self.num_grafts):
            e = int(self.source[j])
            if self.train_full:
                W_gu, W_d = self.gate_up_proj[j], self.down_proj[j]
                gu = F.linear(x, W_gu)
            else:
                gu = F.linear(x, base.gate_up_proj[e]) + F.linear(
                    F.linear(x, self.gate_up_lora_A[j]), self.gate_up_lora_B[j]) * self.scaling
                W_d = base.down_proj[e]
            gate_in, up = gu.chunk(2, dim=-1)
            h = base.act_fn(gate_in) * up
            y = F.linear(h, W_d)
            if not self.train_full:
                y = y + F.linear(F.linear(h, self.down_lora_A[j]), self.down_lora_B[j]) * self.scaling
            if self.gate_kind == "sigmoid":
                y = y * torch.sigmoid(F.linear(x, self.gate[j : j + 1].to(x.dtype)))
            out = out + y
        return out


def attach_grafts(mm, num_grafts: int = 1, rank: int = 8, alpha: float = 16.0, train_full: bool = False,
                  gate: str = "sigmoid") -> list[GraftedExperts]:
    """Add a GraftedExperts module to every MoE block (as ``block.grafted``) and a forward hook that
    adds its output to the block's: the shared expert (Qwen2-MoE, DeepSeek) stays where it is."""
    grafts = []
    for layer in mm.layers:
        g = GraftedExperts(layer, num_grafts, rank, alpha, train_full, gate)
        layer.block.grafted = g

        def add_graft(module, args, output, g=g):
            if not g.enabled:
                return output
            x = args[0]
            return output + g(x.reshape(-1, x.shape[-1])).reshape(output.shape)

        layer.block.register_forward_hook(add_graft)
        grafts.append(g)
    return grafts
