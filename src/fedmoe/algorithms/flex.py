"""FLEx (Zhang et al., 2025, "FLEx: Personalized Federated Learning for Mixture-of-Experts LLMs via
Expert Grafting"): personalisation by grafting one pretrained expert per layer.

Client: shared LoRA on the attention projections (q, k, v by default, as the paper); every pretrained
expert, router and shared expert frozen (router LoRA is refused). In its one-shot setup each client grafts, per MoE layer, the expert that best reproduces the
layer's routed output on its own calibration data, behind a sigmoid gate initialised from that
expert's router row: y = MoE(x) + σ(g(x)) · G(x) (where the family weighs its routed experts' input, Llama-4:
y = MoE(x) + G(σ(g(x)) · x), ``gate_on``). Private (never sent): the grafted experts' LoRA (or
full weights), the gates, the chosen expert ids. Reply: the shared attention LoRA and n_i. Server:
FedAvg by n_i (or a server optimizer) over the shared tensors only; the global model has no grafts.

Expert choice follows the expert-pruning criterion of Lu et al. (ACL 2024, "Not All Experts are
Equal") with one retained expert: L_l(e) = Σ_batches ‖Z_l − E_e(X_l)‖_F, Z_l the routed output
(shared experts excluded), in float64; several grafts are chosen greedily.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..configbase import StrictModel
from ..data.general import general_examples
from ..data.tokenize import collate_sft
from ..moe.arch import MoELayer
from ..moe.experts import expert_biases, expert_form
from ..moe.inventory import Role, TensorInfo
from ..moe.lora import (ExpertsWithLoRA, _init_lora_A_, adapter_device, adapter_dtype, expert_ffn, expert_lora_pairs,
                        lora_delta, lora_pair_info)
from ..moe.quant import quantized_proj
from .base import Client, Method
from .fedit import FedITServer

GRAFT_INDEX = "graft_index"  # private: the chosen expert ids, (MoE layers, grafts)


class FlexConfig(StrictModel):
    calibration_size: int = Field(64, ge=1)  # calibration sequences per client
    calibration: Literal["client", "general"] = "client"  # general = the built-in pretraining held-out text
    num_grafts: int = Field(1, ge=1)  # grafted experts per layer (greedy)
    gate: Literal["sigmoid", "none"] = "sigmoid"
    train_full: bool = False  # train the grafted expert in full instead of LoRA on it
    graft_rank: int | None = Field(None, ge=1)  # LoRA rank on the grafted expert (None = lora.rank)
    # (our choice; the paper's model weighs its experts' outputs) where the sigmoid gate acts: "auto" = as the model's
    # routed experts are weighed, on the grafted expert's input for a family whose routing weight scales the expert's
    # input (Llama-4: G(σ(g(x))·x)), on its output for the others (σ(g(x))·G(x)); "output" or "input" force one
    gate_on: Literal["auto", "output", "input"] = "auto"


# ------------------------------------------------------------------------------------ grafting
def _expert_forward(base: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Pretrained expert ``e`` of a fused stack on rows ``x`` (its biases and activation as its family's)."""
    form = expert_form(base)
    bias = tuple(None if b is None else b[e] for b in expert_biases(base, form))
    return expert_ffn(x, base.gate_up_proj[e], base.down_proj[e], getattr(base, "act_fn", None), form=form, bias=bias)


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
                    scores[li, e] += float(torch.linalg.norm(z - pred))  # a CPU table, any device

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
        elem = mm.layers[0].experts.gate_up_proj.element_size()  # the model's dtype (a quantized base's too)
        stats.update(calibration_tokens=tokens, scoring_peak_bytes=peak,
                     cached_bytes=2 * L * tokens * mm.config.hidden_size * elem)
    return chosen, first_scores


class GraftedExperts(nn.Module):
    """The personal experts of one MoE layer: copies of pretrained experts (by index into the
    frozen expert stack, so nothing is duplicated unless trained in full), each with a gate
    Linear(hidden -> 1) and either LoRA on its projections (in ``lora.expert_layout``: one pair on
    gate_up and one on down, or a pair each for gate, up and down) or full trainable weights.
    A grafted expert computes as its family's experts do (gpt-oss: its biases, interleaved gate and
    up, clamped SwiGLU; a full copy keeps the stored orientation and trains the biases too), and where
    the router has a bias (gpt-oss) the gate has one, started from the expert's router bias. The gate weighs the
    grafted expert as the family's router weighs its experts (``gate_on: auto``): its output, σ(g(x))·G(x), or, where
    the routing weight scales the expert's input (Llama-4, whose router gives a chosen expert σ(its logit), the very
    σ(g(x)) this gate starts as), its input, G(σ(g(x))·x)."""

    def __init__(self, layer: MoELayer, num_grafts: int = 1, rank: int = 8, alpha: float = 16.0,
                 train_full: bool = False, gate: str = "sigmoid", layout: str = "fused", gate_on: str = "auto"):
        super().__init__()
        if gate_on not in ("auto", "output", "input"):
            raise ValueError(f"algorithm.flex.gate_on = {gate_on!r}: use auto, output or input")
        self.gate_input = layer.scales_input if gate_on == "auto" else gate_on == "input"
        base = layer.experts
        form = self.form = layer.form
        hidden, inter = layer.hidden_size, layer.intermediate_size
        dev, dt = adapter_device(base.gate_up_proj), adapter_dtype(base.gate_up_proj)
        self.base = [base]  # a list: not registered as a child (its weights stay the model's own)
        self.router = [layer.router]
        self.num_grafts, self.train_full, self.gate_kind = num_grafts, train_full, gate
        self.register_buffer("source", torch.zeros(num_grafts, dtype=torch.long), persistent=False)
        self.gate = nn.Parameter(torch.zeros(num_grafts, hidden, device=dev, dtype=dt))
        router_bias = getattr(layer.router, "bias", None)
        self.gate_bias = (nn.Parameter(torch.zeros(num_grafts, device=dev, dtype=dt))
                          if isinstance(router_bias, torch.Tensor) else None)
        n = num_grafts
        if train_full:
            self.gate_up_proj = nn.Parameter(torch.zeros(form.stack_shape(n, 2 * inter, hidden), device=dev, dtype=dt))
            self.down_proj = nn.Parameter(torch.zeros(form.stack_shape(n, hidden, inter), device=dev, dtype=dt))
            if form.bias:
                self.gate_up_proj_bias = nn.Parameter(torch.zeros(n, 2 * inter, device=dev, dtype=dt))
                self.down_proj_bias = nn.Parameter(torch.zeros(n, hidden, device=dev, dtype=dt))
        else:
            self.scaling = alpha / rank
            pairs = expert_lora_pairs(layout, ("gate_up_proj", "down_proj"), hidden, inter)
            self.pairs = [prefix for prefix, _, _ in pairs]  # gate_up, down | gate, up, down
            for prefix, fan_in, fan_out in pairs:
                setattr(self, f"{prefix}_lora_A", nn.Parameter(torch.empty(n, rank, fan_in, device=dev, dtype=dt)))
                setattr(self, f"{prefix}_lora_B", nn.Parameter(torch.zeros(n, fan_out, rank, device=dev, dtype=dt)))
            for prefix in self.pairs:  # A drawn after all are created, in pair order
                _init_lora_A_(getattr(self, f"{prefix}_lora_A"))
        self.layout = layout
        self.enabled = True

    def init_from(self, experts: list[int]) -> None:
        """Point the grafts at these pretrained experts and reset their trainables: gates from the
        experts' router rows, LoRA A random / B zero (or full weights copied)."""
        router_w = self.router[0].weight
        with torch.no_grad():
            self.source.copy_(torch.tensor(experts, dtype=torch.long))
            self.gate.copy_(router_w[self.source].to(self.gate.dtype))
            if self.gate_bias is not None:
                self.gate_bias.copy_(self.router[0].bias[self.source].to(self.gate_bias.dtype))
            if self.train_full:
                self.gate_up_proj.copy_(self.base[0].gate_up_proj[self.source])
                self.down_proj.copy_(self.base[0].down_proj[self.source])
                if self.form.bias:
                    self.gate_up_proj_bias.copy_(self.base[0].gate_up_proj_bias[self.source])
                    self.down_proj_bias.copy_(self.base[0].down_proj_bias[self.source])
            else:
                for prefix in self.pairs:
                    _init_lora_A_(getattr(self, f"{prefix}_lora_A"))
                for prefix in self.pairs:
                    getattr(self, f"{prefix}_lora_B").zero_()

    def describe(self) -> list[TensorInfo]:
        """The gates (and, in LoRA mode, the cost of running the grafted pretrained FFNs on every token),
        then the LoRA pairs or the full weights; every tensor stacked over the grafts."""
        n = self.num_grafts
        hidden, inter = self.gate.shape[1], self.form.inter(self.base[0].down_proj)
        ffn = 3 * hidden * inter  # one expert's gate, up and down weights
        biases = 2 * inter + hidden if self.form.bias else 0  # and its biases (gpt-oss; no FLOPs counted)
        frozen = 0 if self.train_full else n
        out = [TensorInfo("gate", tuple(self.gate.shape), Role.GATE, stacked=True,
                          frozen_flops_per_token=2 * ffn * frozen, frozen_params=(ffn + biases) * frozen)]
        if self.gate_bias is not None:
            out.append(TensorInfo("gate_bias", tuple(self.gate_bias.shape), Role.GATE, stacked=True, bias=True))
        if self.train_full:
            full = ("gate_up_proj", "down_proj") + (("gate_up_proj_bias", "down_proj_bias") if self.form.bias else ())
            return out + [TensorInfo(w, tuple(getattr(self, w).shape), Role.GRAFT, stacked=True, bias=w.endswith("_bias"))
                          for w in full]
        for prefix in self.pairs:
            A, B = getattr(self, f"{prefix}_lora_A"), getattr(self, f"{prefix}_lora_B")
            out += lora_pair_info(f"{prefix}_lora_A", f"{prefix}_lora_B", A, B, Role.GRAFT, A.shape[1], self.scaling,
                                  stacked=True)
        return out

    def _gate(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """σ(g_j(x)) per row, (rows, 1)."""
        gb = None if self.gate_bias is None else self.gate_bias[j : j + 1].to(x.dtype)
        return torch.sigmoid(F.linear(x, self.gate[j : j + 1].to(x.dtype), gb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base[0]
        form, act_fn = self.form, getattr(base, "act_fn", None)
        out = torch.zeros_like(x)
        for j in range(self.num_grafts):
            gated = self.gate_kind == "sigmoid"
            xin = x * self._gate(x, j) if gated and self.gate_input else x  # Llama-4's way: the gate scales the input
            if self.train_full:
                bias = (self.gate_up_proj_bias[j], self.down_proj_bias[j]) if form.bias else (None, None)
                y = expert_ffn(xin, self.gate_up_proj[j], self.down_proj[j], act_fn, form=form, bias=bias)
            else:
                e = self.source[j : j + 1]  # gathered on the device: no host sync (and a plan on fake tensors works)

                def delta(prefix, a, j=j):
                    return lora_delta(a, getattr(self, f"{prefix}_lora_A")[j], getattr(self, f"{prefix}_lora_B")[j],
                                      self.scaling)

                if isinstance(base.gate_up_proj, torch.Tensor):
                    gu_w, d_w, proj = base.gate_up_proj[e][0], base.down_proj[e][0], form.linear
                else:  # a quantized base: dequantized in the forward and the backward, never kept
                    gu_w, d_w, proj = (base.gate_up_proj, e), (base.down_proj, e), quantized_proj
                bias = tuple(None if b is None else b[e][0] for b in expert_biases(base, form))
                y = expert_ffn(xin, gu_w, d_w, act_fn, split=self.layout == "split", delta=delta, proj=proj, form=form,
                               bias=bias)
            if gated and not self.gate_input:
                y = y * self._gate(x, j)
            out = out + y
        return out


# ------------------------------------------------------------------------------------ halves
class FlexServer(FedITServer):
    """FedAvg (or a server optimizer) over the shared tensors; the grafts never reach the server."""


class FlexClient(Client):
    personalized = True
    private_roles = (Role.GRAFT, Role.GATE)  # the grafted experts stay on the client

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.lora.router:
            raise ValueError("FLEx keeps every router frozen (it adapts attention and the grafted expert, whose gate "
                             "is its router row): set lora.router: false")

    @classmethod
    def unread_lora(cls, cfg) -> list[tuple[str, str]]:
        lc, default, fc = cfg.lora, type(cfg.lora)(), cfg.algorithm.flex
        out = [(f"lora.{k}", "FLEx adapts no routed expert (its LoRA is on the grafted experts: "
                             "algorithm.flex.graft_rank, lora.expert_layout)")
               for k in ("expert_targets", "experts_per_layer") if getattr(lc, k) != getattr(default, k)]
        if fc.train_full:
            out += [(key, "algorithm.flex.train_full is true (the grafted experts train in full, without LoRA)")
                    for key, changed in (("algorithm.flex.graft_rank", fc.graft_rank is not None),
                                         ("lora.expert_layout", lc.expert_layout != default.expert_layout)) if changed]
        return out

    @staticmethod
    def attention_targets(cfg, mm) -> list[str]:
        """``lora.attention_targets``, or FLEx's default: the query, key and value projections (the paper's
        q, k, v; not o), as the model family names them — in a hybrid model's linear-attention layers their
        input projections, not ``out_proj``."""
        if cfg.lora.attention_targets is not None:
            return list(cfg.lora.attention_targets)
        from ..moe.arch import OUTPUT_PROJECTIONS, default_attention_targets

        return [t for t in default_attention_targets(mm.model_type, mm.config) if t not in OUTPUT_PROJECTIONS]

    @classmethod
    def build(cls, cfg, mm) -> None:
        lc, fc = cfg.lora, cfg.algorithm.flex
        targets = cls.attention_targets(cfg, mm)
        if not targets:
            raise ValueError("FLEx shares the attention LoRA: set lora.attention_targets (null = q, k, v)")
        mm.add_attention_lora(lc.rank, lc.alpha, targets, lc.dropout)
        mm.attach_to_blocks("grafted", lambda layer: GraftedExperts(
            layer, fc.num_grafts, rank=fc.graft_rank or lc.rank, alpha=lc.alpha, train_full=fc.train_full, gate=fc.gate,
            layout=lc.expert_layout, gate_on=fc.gate_on))

    @staticmethod
    def grafts(mm) -> list[GraftedExperts]:
        return [layer.block.grafted for layer in mm.layers]

    def _calibration_batches(self, mm, train: list[dict]) -> list[dict]:
        fc = self.cfg.algorithm.flex
        if fc.calibration == "general":
            from ..moe import load_tokenizer

            tok = load_tokenizer(self.cfg.model.tokenizer or self.cfg.model.name)
            train = general_examples(tok, self.cfg.data.max_length, fc.calibration_size)
        examples = train[: fc.calibration_size]
        if not examples:
            raise ValueError("FLEx grafting needs calibration examples: this client has no training data")
        pad = int(getattr(mm.config, "pad_token_id", None) or 0)
        return [collate_sft(examples[i : i + 8], pad) for i in range(0, len(examples), 8)]

    def setup(self, client, mm, train):
        """Graft: score the experts on the pretrained model alone, point each layer's grafts at the best
        ones (gates from their router rows, LoRA A random, B zero)."""
        grafts = self.grafts(mm)
        for g in grafts:
            g.enabled = False
        stats: dict = {}
        chosen, _ = score_experts(mm, self._calibration_batches(mm, train), self.cfg.algorithm.flex.num_grafts,
                                  stats=stats)
        for g, experts in zip(grafts, chosen):
            g.init_from(experts)
        private = mm.get_state(self.private_names(mm))
        private[GRAFT_INDEX] = torch.tensor(chosen, dtype=torch.long)
        return private, stats

    def load(self, mm, client, message, private) -> None:
        super().load(mm, client, message, private)
        grafts = self.grafts(mm)
        if client is None or not private:
            for g in grafts:
                g.enabled = False
            return
        for g, experts in zip(grafts, private[GRAFT_INDEX].tolist()):
            g.enabled = True
            g.source.copy_(torch.tensor(experts, dtype=torch.long))


METHOD = Method(
    "flex", FlexServer, FlexClient, config=FlexConfig,
    summary="FLEx: one pretrained expert per layer grafted per client behind a sigmoid gate; only the "
            "attention LoRA is shared",
    notes={"calibration_tokens": "non-padding calibration tokens the client scored",
           "scoring_peak_bytes": "peak memory of expert scoring: one layer's X and Z and two float64 predictions "
                                 "for one batch (the batches are streamed)",
           "cached_bytes": "what caching every layer's X and Z for the whole calibration set would take instead, "
                           "the approach the FLEx paper describes"},
)
