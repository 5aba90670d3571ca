"""LoRA adapters: on attention projections (nn.Linear) and per expert on fused expert tensors.

A pair A (r x in), B (out x r), update ΔW = (alpha / r) · B A (Hu et al., 2021). B starts at zero,
A like nn.Linear's default (Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), so a
fresh adapter changes nothing.

Three places carry adapters: attention projections (:class:`LoRALinear`), the routed experts
(:class:`ExpertsWithLoRA`: one pair per expert and projection, in the ``fused`` or ``split`` layout,
see :func:`expert_lora_pairs`) and, optionally, each MoE layer's router weight
(:class:`RouterWithLoRA`).

On a weightless skeleton (a model on PyTorch's meta device, which is how the server learns the
names, shapes and initial values of the trainable tensors from the model's config alone) the
adapters are created on the CPU, so their seeded initial values are real.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .experts import STANDARD, ExpertForm, expert_biases, expert_form
from .inventory import Role, TensorInfo

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def adapter_device(t: torch.Tensor) -> torch.device:
    """Where an adapter of the frozen tensor ``t`` lives: beside it, or on the CPU for a meta skeleton."""
    return torch.device("cpu") if t.device.type == "meta" else t.device


def adapter_dtype(t) -> torch.dtype:
    """The dtype of a trainable adapter of the frozen tensor ``t``: float32 where ``t`` is bf16 or fp16 (as PEFT's
    ``autocast_adapter_dtype``), else ``t``'s. An update of an Adam step is about lr; in bf16 (8 bits of mantissa) it
    is rounded away from a weight much larger than 256·lr, and in fp16 Adam's ε of 1e-8 is 0, so the first step
    (LoRA B = 0: A's gradient 0) divides 0 by 0. The forward casts the adapter to its input's dtype; its gradient
    and optimizer state stay float32."""
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype


def _init_lora_A_(a: torch.Tensor) -> None:
    """U(-1/sqrt(in), 1/sqrt(in)), drawn from the CPU generator whatever the device: a client's adapters
    on a GPU get the very values the server's CPU skeleton has (a CUDA generator would draw others)."""
    bound = 1.0 / math.sqrt(a.shape[-1])
    with torch.no_grad():
        if a.device.type == "cpu":
            a.uniform_(-bound, bound)
        else:
            a.copy_(torch.empty(a.shape, dtype=a.dtype).uniform_(-bound, bound))


EXPERT_LAYOUTS = ("fused", "split")


def expert_lora_pairs(layout: str, targets, hidden: int, inter: int) -> list[tuple[str, int, int]]:
    """(name prefix, fan_in, fan_out) of every per-expert LoRA pair, in creation order.

    ``fused``: one pair on the fused ``gate_up_proj`` (H -> 2I; its A is shared by the gate and the
    up projection) and one on ``down_proj`` (I -> H). ``split``: a pair of its own for the gate
    (H -> I), the up (H -> I) and the down projection (I -> H), as PEFT puts on the per-expert
    ``nn.Linear`` layers of pre-v5 checkpoints (the layout FLAME's Table 1 counts). The target
    ``gate_up_proj`` means the gate and the up pair in the split layout. The tensors are
    ``<prefix>_lora_A`` (E, r, fan_in) and ``<prefix>_lora_B`` (E, fan_out, r)."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert LoRA layout {layout!r} is unknown; choose from {EXPERT_LAYOUTS} (lora.expert_layout)")
    pairs = []
    if "gate_up_proj" in targets:
        pairs += ([("gate_up", hidden, 2 * inter)] if layout == "fused"
                  else [("gate", hidden, inter), ("up", hidden, inter)])
    if "down_proj" in targets:
        pairs.append(("down", inter, hidden))
    return pairs


def lora_pair_info(a_name: str, b_name: str, A: torch.Tensor, B: torch.Tensor, role: Role, rank: int,
                   scaling: float, **kw) -> list[TensorInfo]:
    """The two :class:`TensorInfo` of a LoRA pair (names relative to their module)."""
    return [TensorInfo(a_name, tuple(A.shape), role, factor="A", partner=b_name, rank=rank, scaling=scaling, **kw),
            TensorInfo(b_name, tuple(B.shape), role, factor="B", partner=a_name, rank=rank, scaling=scaling, **kw)]


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, dropout=None) -> torch.Tensor:
    """One LoRA pair's term on rows ``x``: (alpha/r) · B A x, with A (r, in) and B (out, r) (the
    attention adapters, the per-expert loop and FLEx's grafts). The scale multiplies the r-dimensional
    intermediate A x, not the output: the same value, r instead of ``out`` multiplications per row."""
    if dropout is not None:
        x = dropout(x)
    return F.linear(F.linear(x, A.to(x.dtype)) * scaling, B.to(x.dtype))


def expert_ffn(x: torch.Tensor, gate_up, down, act_fn, *, split: bool = False, delta=None, proj=None,
               form: ExpertForm = STANDARD, bias=(None, None)) -> torch.Tensor:
    """An expert FFN on its rows ``x``: ``down(glu(gate, up))`` with ``gate, up`` from ``gate_up(x)``, the one
    forward of every routed expert (fedmoe's per-expert loop and grouped path) and grafted expert.

    ``form`` says how the family's experts compute (:class:`fedmoe.moe.experts.ExpertForm`): which of
    gate_up's outputs are the gate's, the activation (``act_fn(gate) * up``, or gpt-oss's clamped SwiGLU) and
    how a weight is stored. ``proj(a, w)`` applies a projection weight (default: one expert's weight as the
    form stores it; the grouped path passes a grouped matmul over the stacked weights, a quantized stack its
    dequantizing product). ``bias``: the (gate_up, down) biases to add to the projections' outputs (one
    expert's rows, or one row per input row), or None. ``delta(name, a)``, if given, returns the LoRA term
    added to projection ``name`` on input ``a``, or None: ``gate_up`` (fused layout) or ``gate`` and ``up``
    (``split``), then ``down``."""
    proj = form.linear if proj is None else proj
    gu = proj(x, gate_up)
    if bias[0] is not None:
        gu = gu + bias[0].to(gu.dtype)
    if delta is not None and not split:
        d = delta("gate_up", x)
        gu = gu if d is None else gu + d
    gate, up = form.split(gu)
    if delta is not None and split:
        dg, du = delta("gate", x), delta("up", x)
        gate = gate if dg is None else gate + dg
        up = up if du is None else up + du
    h = form.glu(gate, up, act_fn)
    y = proj(h, down)
    if bias[1] is not None:
        y = y + bias[1].to(y.dtype)
    if delta is not None:
        d = delta("down", h)
        y = y if d is None else y + d
    return y


class LoRALinear(nn.Module):
    """nn.Linear + LoRA; the base layer stays frozen and shared."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        p = base.weight
        dev = adapter_device(p)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=adapter_dtype(p)))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=adapter_dtype(p)))
        _init_lora_A_(self.lora_A)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self):  # some model code reads proj.weight (dtype/device checks)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the LoRA branch first: the backward then sums x's two gradients in the order it always has
        lora = lora_delta(x, self.lora_A, self.lora_B, self.scaling, self.dropout)
        return self.base(x) + lora

    def describe(self) -> list[TensorInfo]:
        return lora_pair_info("lora_A", "lora_B", self.lora_A, self.lora_B, Role.ATTENTION, self.rank, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B A (out, in), in float32: what merging adds to the base weight."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling


class RouterWithLoRA(nn.Module):
    """A MoE router with LoRA on its weight: the router's own forward (softmax or sigmoid scores,
    grouping, top-k, normalisation: whatever the architecture does) run on W + (alpha / r) · B A.

    Every supported router (transformers v5: OlmoeTopKRouter, Qwen2Moe/Qwen3Moe/Mixtral TopKRouter,
    DeepseekV3TopkRouter, GraniteMoeTopKRouter, Lfm2MoeTopKRouter, ...) holds ``weight`` (E, H) and computes its
    logits as F.linear(hidden, weight). Whatever else its block passes it is passed on as it is (LFM2-MoE's block
    calls ``gate(hidden, expert_bias)``: the block's load-balancing bias, added to the sigmoid scores to choose).
    Rather than re-implement five routing rules, the wrapped router is called with its weight
    substituted (``torch.func.functional_call``): its base weight stays the frozen, shared tensor,
    its own forward hooks (transformers records the router logits for the load-balancing loss there)
    still fire, and the update is the plain LoRA one, logits = x · (W + (alpha / r) · B A)ᵀ. The
    update is merged into the (E, H) weight once per forward, so ``lora.dropout`` does not apply to
    the router (a dropout on x cannot be expressed in a merged weight).

    Trainables: ``lora_A`` (r, H), ``lora_B`` (E, r): a non-expert tensor like attention LoRA.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        w = base.weight
        num_experts, hidden = w.shape
        dev = adapter_device(w)
        self.lora_A = nn.Parameter(torch.empty(rank, hidden, device=dev, dtype=adapter_dtype(w)))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, device=dev, dtype=adapter_dtype(w)))
        _init_lora_A_(self.lora_A)

    @property
    def weight(self) -> torch.Tensor:
        """The effective router weight W + (alpha / r) · B A."""
        w = self.base.weight
        return w + (self.lora_B.to(w.dtype) * self.scaling) @ self.lora_A.to(w.dtype)  # scale the (E, r) factor

    @property
    def top_k(self):  # read and set on the wrapped router, which the MoE block's routing uses
        return self.base.top_k

    @top_k.setter
    def top_k(self, k):
        self.base.top_k = k

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.func.functional_call(self.base, {"weight": self.weight}, (hidden_states, *args), kwargs)

    def describe(self) -> list[TensorInfo]:
        return lora_pair_info("lora_A", "lora_B", self.lora_A, self.lora_B, Role.ROUTER, self.rank, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B A (E, H), in float32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling


def expert_histogram(idx: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """How many of ``idx``'s entries (expert ids, any shape) name each expert, each counted with its
    ``weight`` (same shape; None: 1), added into ``out`` (a (num_experts,) long tensor; None: a new one).
    On ``idx``'s device, without reading it: ``bincount``'s size is the largest id + 1, a host sync on a
    GPU and a data-dependent shape in a compiled graph."""
    flat = idx.reshape(-1)
    ones = weight.reshape(-1) if weight is not None else torch.ones((), dtype=flat.dtype, device=flat.device).expand_as(flat)
    target = flat.new_zeros(num_experts) if out is None else out
    return target.index_add_(0, flat, ones)


class ActivationTracker:
    """Counts, per MoE layer and expert, the non-padding tokens routed there.

    Shared by every expert module of a model. Counting is on only inside ``tracking(mask)``,
    where ``mask`` is the (batch, seq) attention mask of the forward pass being counted.
    """

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.token_mask: torch.Tensor | None = None
        self.enabled = False
        self.forward_mask: torch.Tensor | None = None  # the attention mask of the forward in progress
        self.skip_padding = True  # route only the tokens the attention mask keeps (model.skip_padding)
        self.planning = False  # fake tensors (fedmoe.plan): the experts take an even split, nothing is read
        self._rows: dict[int, torch.Tensor | None] = {}
        self.reset()

    def set_forward_mask(self, mask) -> None:
        """The (batch, seq) attention mask of the forward pass that starts now (None: every token is
        real). Set by a pre-hook on the decoder (:class:`~fedmoe.moe.model.MoEModel`); it stays until
        the next forward, so a gradient-checkpointed layer recomputed in the backward drops the same rows."""
        usable = self.skip_padding and isinstance(mask, torch.Tensor) and mask.dim() == 2
        self.forward_mask = mask.bool() if usable else None
        self._rows = {}

    def real_rows(self, num_tokens: int) -> torch.Tensor | None:
        """The flattened token rows of the current forward that are not padding (their indices, in
        order), or None when every row is real or the mask does not describe these rows. The rows are
        the last ``num_tokens / batch`` positions of the mask (the queries of this forward: all of them,
        or the new tokens after a key/value cache). Computed once per forward and row count: one
        device-to-host sync per forward, not one per layer."""
        m = self.forward_mask
        if m is None or self.planning:  # (a plan's forward has every row real: its worst case, and nothing read)
            return None
        if num_tokens not in self._rows:
            b, s = m.shape
            rows = None
            if num_tokens % b == 0 and 0 < num_tokens // b <= s:
                q = m[:, s - num_tokens // b:].reshape(-1)
                if not bool(q.all()):
                    rows = q.nonzero().squeeze(1)
            self._rows[num_tokens] = rows
        return self._rows[num_tokens]

    def reset(self) -> None:
        # the tables live where the routing happens (made there at the first record after a reset, so
        # counting never moves data between the device and the host); read through ``counts``/``tokens``
        self._counts: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        self._mask_on: dict[torch.device, torch.Tensor] = {}

    @property
    def counts(self) -> torch.Tensor:
        """(layers, experts) tokens routed to each expert since the reset, on the CPU (one copy from the
        device per read: read once per local training, never per layer)."""
        if self._counts is None:
            return torch.zeros(self.num_layers, self.num_experts, dtype=torch.long, device="cpu")
        return self._counts.to("cpu", copy=True)

    @property
    def tokens(self) -> torch.Tensor:
        """(layers,) tokens counted in each MoE layer since the reset, on the CPU."""
        if self._tokens is None:
            return torch.zeros(self.num_layers, dtype=torch.long, device="cpu")
        return self._tokens.to("cpu", copy=True)

    def record(self, layer: int, top_k_index: torch.Tensor) -> None:
        """Add one MoE layer's routing (``top_k_index``: (tokens, k)) to the counts: only the tokens the
        tracking mask keeps, each expert once per token routed to it. No host sync, no shape that
        depends on the data (a padded token is counted with weight 0, not dropped): it runs in a
        captured graph (``torch.compile(fullgraph=True)``, CUDA graphs)."""
        idx = top_k_index
        dev = idx.device
        if self._counts is None or self._counts.device != dev:
            counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long, device=dev)
            tokens = torch.zeros(self.num_layers, dtype=torch.long, device=dev)
            if self._counts is not None:  # counted on another device before: carried over (rare)
                counts += self._counts.to(dev)
                tokens += self._tokens.to(dev)
            self._counts, self._tokens = counts, tokens
        mask = self.token_mask
        if mask is not None and mask.numel() == idx.shape[0]:
            keep = self._mask_on.get(dev)
            if keep is None:  # the mask on the routing's device, once per tracking context
                keep = self._mask_on[dev] = mask.to(dev, torch.long)
            expert_histogram(idx, self.num_experts, keep[:, None].expand(idx.shape), out=self._counts[layer])
            self._tokens[layer] += keep.sum()
        else:
            expert_histogram(idx, self.num_experts, out=self._counts[layer])
            self._tokens[layer] += idx.shape[0]

    class _Tracking:
        def __init__(self, tracker, mask):
            self.tracker, self.mask = tracker, mask

        def __enter__(self):
            self.tracker.enabled = True
            self.tracker.token_mask = None if self.mask is None else self.mask.reshape(-1).bool()
            self.tracker._mask_on = {}
            return self.tracker

        def __exit__(self, *exc):
            self.tracker.enabled = False
            self.tracker.token_mask = None
            self.tracker._mask_on = {}

    def tracking(self, attention_mask: torch.Tensor | None):
        return ActivationTracker._Tracking(self, attention_mask)


class _FrozenCastGroupedMM(torch.autograd.Function):
    """``grouped_mm(a, w.to(a.dtype), offs)`` for a frozen weight stack ``w`` in another dtype (an fp32
    model's experts under bf16 autocast). Autograd would keep the cast copy for the backward — one
    bf16 copy of every layer's expert stack alive until the backward reaches it (16 × 0.8 GB on
    OLMoE-1B-7B); here the backward casts again from ``w``, which is kept anyway. No gradient for ``w``
    or ``offs``."""

    @staticmethod
    def forward(ctx, a, w, offs):
        ctx.save_for_backward(w, offs)
        return F.grouped_mm(a, w.to(a.dtype), offs=offs)

    @staticmethod
    def backward(ctx, grad):
        w, offs = ctx.saved_tensors
        return F.grouped_mm(grad, w.to(grad.dtype).transpose(-2, -1), offs=offs), None, None


# how many experts a memory plan spreads a layer's routed slots over (ExpertsWithLoRA.forward)
PLAN_EXPERT_GROUPS = 8


class ExpertsWithLoRA(nn.Module):
    """Drop-in replacement for a transformers v5 fused experts module, with per-expert LoRA.

    Tokens are sorted by expert once; each expert then runs its base projection and its LoRA
    on *its own tokens only*, so the LoRA cost scales with the number of routed (token, expert)
    pairs, i.e. with k. Nothing of size E x out x in is ever built (unlike PEFT's
    ``target_parameters``, which materialises W + ΔW for every expert at every step).

    Trainables (each only if targeted), ``layout="fused"`` (default):
      gate_up_lora_A (E, r, H), gate_up_lora_B (E, 2I, r)
      down_lora_A    (E, r, I), down_lora_B    (E, H, r)
    ``layout="split"`` (separate adapters for the gate and the up projection, each with its own
    dropout draw, as PEFT's adapters on separate nn.Linear layers):
      gate_lora_A (E, r, H), gate_lora_B (E, I, r)
      up_lora_A   (E, r, H), up_lora_B   (E, I, r)
      down_lora_A (E, r, I), down_lora_B (E, H, r)
    ``output_scale`` (optional, :meth:`MoEModel.add_output_scale`) multiplies the routed output.

    ``scale_input``: the routing weight multiplies each routed row before its expert, expert(w·x), where the family's
    block does so (Llama-4: :func:`fedmoe.moe.arch.scales_expert_input`); otherwise the expert's output, w·expert(x).
    The LoRA then sees the scaled rows, as it would inside a merged weight.

    The stacks are read as the family holds them (``self.form``, :mod:`fedmoe.moe.experts`): gpt-oss's
    are transposed, interleave the gate's and the up's outputs, carry biases (gathered per routed row on the
    grouped path) and compute a clamped SwiGLU; its LoRA tensors have the same shapes as every family's,
    gate_up_lora_B's rows in the stacked tensor's own output order (interleaved), as PEFT's are.
    """

    def __init__(
        self,
        base: nn.Module,
        layer_index: int,
        tracker: ActivationTracker | None,
        rank: int | None = None,
        alpha: float = 16.0,
        targets: tuple[str, ...] = ("gate_up_proj", "down_proj"),
        dropout: float = 0.0,
        lora_experts: list[int] | None = None,
        layout: str = "fused",
        scale_input: bool = False,
    ):
        super().__init__()
        self.base = base
        self.scale_input = scale_input
        self.layer_index = layer_index
        self.tracker = tracker
        # how the family's experts hold and compute their weights (gpt-oss: transposed, interleaved, biased,
        # a clamped SwiGLU; fedmoe.moe.experts)
        self.form = expert_form(base)
        self.num_experts = base.gate_up_proj.shape[0]
        hidden, inter = self.form.hidden(base.gate_up_proj), self.form.inter(base.down_proj)
        self.rank = rank
        self.scaling = alpha / rank if rank else 0.0
        self.targets = tuple(targets) if rank else ()
        dev, dt = adapter_device(base.gate_up_proj), adapter_dtype(base.gate_up_proj)
        # LoRA on a subset of the experts (the "MoE + X" baselines: one random expert per layer):
        # the tensors hold only those experts; ``_full`` places them in the expert stack.
        self.lora_experts = None if lora_experts is None else sorted(int(e) for e in lora_experts)
        if self.lora_experts is not None:
            self.register_buffer("_lora_index", torch.tensor(self.lora_experts, dtype=torch.long, device=dev),
                                 persistent=False)
        E = self.num_experts if self.lora_experts is None else len(self.lora_experts)
        self.layout = layout
        # created (and A drawn) pair by pair in a fixed order: gate_up | gate, up; then down
        for prefix, fan_in, fan_out in expert_lora_pairs(layout, self.targets, hidden, inter):
            a = nn.Parameter(torch.empty(E, rank, fan_in, device=dev, dtype=dt))
            setattr(self, f"{prefix}_lora_A", a)
            setattr(self, f"{prefix}_lora_B", nn.Parameter(torch.zeros(E, fan_out, rank, device=dev, dtype=dt)))
            _init_lora_A_(a)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_scale: nn.Parameter | None = None
        self.grouped = True  # use grouped_mm where torch has it (set False for the per-expert loop)
        # how the expert outputs return to their tokens: "index_add" (a scatter-add of the T·k rows,
        # atomic on a GPU) or "gather" (each token's k rows gathered and summed, no atomics); the
        # same numbers on a CPU in fp32 (tested), and index_add is faster there
        self.combine = "index_add"

    def describe(self) -> list[TensorInfo]:
        """Each LoRA pair (stacked over the experts it adapts: ``rows`` are their ids) and the output scale."""
        rows = tuple(range(self.num_experts)) if self.lora_experts is None else tuple(self.lora_experts)
        out = []
        for prefix, _, _ in expert_lora_pairs(self.layout, self.targets, 0, 0):
            out += lora_pair_info(f"{prefix}_lora_A", f"{prefix}_lora_B", getattr(self, f"{prefix}_lora_A"),
                                  getattr(self, f"{prefix}_lora_B"), Role.EXPERT, self.rank, self.scaling,
                                  stacked=True, rows=rows, of_experts=self.num_experts)
        if self.output_scale is not None:
            out.append(TensorInfo("output_scale", tuple(self.output_scale.shape), Role.RESCALER))
        return out

    # transformers code may read these attributes from the experts module
    @property
    def gate_up_proj(self):
        return self.base.gate_up_proj

    @property
    def down_proj(self):
        return self.base.down_proj

    @property
    def act_fn(self):  # the standard families' activation (gpt-oss's experts have none: ExpertForm.glu)
        return getattr(self.base, "act_fn", None)

    @property
    def hidden_size(self) -> int:
        return self.form.hidden(self.base.gate_up_proj)

    @property
    def intermediate_size(self) -> int:
        return self.form.inter(self.base.down_proj)

    def _full(self, t: torch.Tensor) -> torch.Tensor:
        """A LoRA tensor over all experts (zeros for experts without LoRA)."""
        if self.lora_experts is None:
            return t
        full = t.new_zeros((self.num_experts, *t.shape[1:]))
        return full.index_copy(0, self._lora_index, t)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        tracker = self.tracker
        if tracker is not None and tracker.enabled:
            tracker.record(self.layer_index, top_k_index)
        # padding never reaches the experts: only the rows the attention mask keeps are routed (a real
        # token never attends to a padded one, so its output is the same; a pad's expert output is 0)
        rows = tracker.real_rows(hidden_states.shape[0]) if tracker is not None else None
        if rows is not None:
            top_k_index, top_k_weights = top_k_index.index_select(0, rows), top_k_weights.index_select(0, rows)
        k = top_k_index.shape[1]
        flat_expert = top_k_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of_slot = order // k if rows is None else rows[order // k]
        compute = self._compute_dtype(hidden_states)
        grouped = self.grouped and self._grouped_ok(compute)  # the path the real step takes
        if tracker is not None and tracker.planning:
            # a memory plan on fake tensors (fedmoe.plan): the routing's sizes without reading it. Where the real
            # step takes the grouped path but fake tensors cannot trace it (fp32), the T·k slots go to one expert:
            # the loop then holds what the grouped path holds, all slots' rows at once (with fewer groups the
            # loop's transients were those of a group's rows only, which without gradients, in an evaluation,
            # planned an eighth of the experts' intermediate). Where the real step takes the per-expert loop (a
            # quantized stack), they are spread evenly over the first PLAN_EXPERT_GROUPS experts: the bytes a
            # training step keeps depend on the slots, not on how many experts share them; the loop then runs 8
            # times a layer, not E (Qwen3-30B-A3B in NF4: 48 x 128 on fake tensors took minutes), and its
            # transients are those of E/8 experts' rows at once: a little more, never less
            groups = 1 if grouped else min(self.num_experts, PLAN_EXPERT_GROUPS)
            per, extra = divmod(flat_expert.numel(), groups)
            count_list = [per + (e < extra) if e < groups else 0 for e in range(self.num_experts)]
            counts = torch.tensor(count_list, device=flat_expert.device)
        else:
            counts = expert_histogram(flat_expert, self.num_experts)  # on the device, nothing read
            count_list = None
        # index_select, not hidden_states[token_of_slot]: the backward of advanced indexing with repeated
        # indices (each token appears k times) is an atomic scatter-add on CPU whose summation order
        # depends on thread timing; index_select's backward (index_add_) is deterministic.
        x_sorted = hidden_states.index_select(0, token_of_slot)
        w_sorted = top_k_weights.reshape(-1).index_select(0, order)
        if self.scale_input:  # Llama-4: each routed row times its weight before the expert, in the rows' dtype
            x_sorted = x_sorted * w_sorted[:, None].to(x_sorted.dtype)
        # a plan takes the grouped path where torch can trace it on fake tensors (bf16 only), so its
        # count is of what the run keeps (the per-expert loop under autocast keeps each cast weight)
        traceable = count_list is None or compute == torch.bfloat16
        if grouped and traceable:
            # every one of the T·k slots belongs to an expert of this module: no count is read here
            y_sorted = self._experts_grouped(x_sorted.to(compute), counts)
        else:
            y_sorted = self._experts_loop(x_sorted, count_list if count_list is not None else counts.tolist())
        if not self.scale_input:
            y_sorted = y_sorted * w_sorted[:, None].to(y_sorted.dtype)
        y_sorted = y_sorted.to(hidden_states.dtype)
        if self.combine == "gather":
            out = self._gather_sum(y_sorted, order, k, rows, hidden_states)
        else:
            out = torch.zeros_like(hidden_states).index_add_(0, token_of_slot, y_sorted)
        if self.output_scale is not None:
            out = out * self.output_scale.to(out.dtype)
        return out

    @staticmethod
    def _gather_sum(y_sorted: torch.Tensor, order: torch.Tensor, k: int, rows: torch.Tensor | None,
                    hidden_states: torch.Tensor) -> torch.Tensor:
        """Each token's k expert outputs gathered from the expert-sorted rows and summed: no scatter-add
        (bf16 atomics on a GPU). A token's slots are summed in the order of their position among the
        sorted rows (expert order), as index_add_ adds them on a CPU, and in fp32."""
        slot = torch.arange(order.numel(), device=order.device)
        position = torch.empty_like(order).scatter_(0, order, slot)  # where each (token, j) slot went
        position = position.view(-1, k).sort(dim=1).values.reshape(-1)
        summed = y_sorted.index_select(0, position).view(-1, k, y_sorted.shape[1]).sum(1, dtype=torch.float32)
        summed = summed.to(hidden_states.dtype)
        if rows is None:
            return summed
        return torch.zeros_like(hidden_states).index_copy(0, rows, summed)

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        """The dtype the grouped experts compute in: autocast's (bf16) where autocast is on for ``x``'s
        device, else ``x``'s. grouped_mm is not on autocast's list, so without this the experts of an
        fp32 model under bf16 autocast ran in fp32 (measured on an H200: no faster than fp32). The
        routed rows and the expert weights are cast, as autocast casts a linear layer's input and
        weight; the outputs are scattered back in ``x``'s dtype (no bf16 atomics into an fp32 model)."""
        dt = x.device.type
        if x.is_floating_point() and torch.is_autocast_enabled(dt):
            return torch.get_autocast_dtype(dt)
        return x.dtype

    def _grouped_ok(self, dtype: torch.dtype) -> bool:
        """grouped_mm needs 16-byte aligned row strides: every inner size (H, 2I, I) times the element
        size must be a multiple of 16. The LoRA rank need not be: :meth:`_experts_grouped` pads it with
        zero rows of A and columns of B (rank 20 in bf16, FLAME's, would otherwise take the loop, ~9x
        slower on an H200 at the OLMoE shape)."""
        if not _HAS_GROUPED_MM or not isinstance(self.base.gate_up_proj, torch.Tensor):
            return False  # a quantized stack is dequantized expert by expert (the per-expert path)
        dims = [self.hidden_size, 2 * self.intermediate_size, self.intermediate_size]
        size = torch.empty((), dtype=dtype).element_size()
        return all(d * size % 16 == 0 for d in dims)

    def _experts_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts in one grouped matmul per projection (rows sorted by expert, ``offs`` the
        cumulative row counts): no Python loop, and each expert's LoRA sees only its rows. A biased
        family's (gpt-oss) biases are gathered per row, by each sorted row's expert."""
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)

        def gmm(a, w):  # (S, in) @ per-expert (E, in, out) -> (S, out)
            if w.dtype != a.dtype and not w.requires_grad:  # a frozen stack in another dtype (autocast)
                return _FrozenCastGroupedMM.apply(a, w, offs)
            return F.grouped_mm(a, w.to(a.dtype), offs=offs)

        align = 16 // x.element_size()
        pad = -(self.rank or 0) % align  # zero rank components: the same product, aligned strides

        def lora(prefix, a):  # the prefix's LoRA on every expert's rows (None: not targeted)
            if not self._targets(prefix):
                return None
            A, B = self._full(getattr(self, f"{prefix}_lora_A")), self._full(getattr(self, f"{prefix}_lora_B"))
            if pad:
                A, B = F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad))
            return gmm(gmm(self.dropout(a), A.transpose(-2, -1)) * self.scaling, B.transpose(-2, -1))

        form = self.form
        bias = expert_biases(self.base, form)
        if form.bias:  # each row's expert, from the counts (output_size given: no host sync)
            expert_of_row = torch.repeat_interleave(torch.arange(self.num_experts, device=counts.device), counts,
                                                    output_size=x.shape[0])
            bias = tuple(b.index_select(0, expert_of_row) for b in bias)
        return expert_ffn(x, self.base.gate_up_proj, self.base.down_proj, self.act_fn, split=self.layout == "split",
                          delta=lora, proj=lambda a, w: gmm(a, form.in_out(w)), form=form, bias=bias)

    def _targets(self, prefix: str) -> bool:
        """Whether this module has the LoRA pair ``prefix`` (gate_up, gate, up: on gate_up_proj; down)."""
        return ("down_proj" if prefix == "down" else "gate_up_proj") in self.targets

    def _experts_loop(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One expert at a time (the fallback where grouped_mm is unavailable)."""
        W_gu, W_d = self.base.gate_up_proj, self.base.down_proj
        slot = ({e: e for e in range(self.num_experts)} if self.lora_experts is None
                else {e: i for i, e in enumerate(self.lora_experts)})

        def lora_of(j):
            def delta(prefix, a):
                if j is None or not self._targets(prefix):
                    return None
                return lora_delta(a, getattr(self, f"{prefix}_lora_A")[j], getattr(self, f"{prefix}_lora_B")[j],
                                  self.scaling, self.dropout)
            return delta

        quantized = not isinstance(W_gu, torch.Tensor)  # a QuantizedWeight: one expert dequantized at a time
        if quantized:
            from .quant import quantized_proj
        form, split = self.form, self.layout == "split"
        b_gu, b_d = expert_biases(self.base, form)
        outputs = []
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            x = x_sorted[start : start + c]
            start += c
            bias = (None if b_gu is None else b_gu[e], None if b_d is None else b_d[e])
            if quantized:
                outputs.append(expert_ffn(x, (W_gu, e), (W_d, e), self.act_fn, split=split, delta=lora_of(slot.get(e)),
                                          proj=quantized_proj, form=form, bias=bias))
            else:
                outputs.append(expert_ffn(x, W_gu[e], W_d[e], self.act_fn, split=split, delta=lora_of(slot.get(e)),
                                          form=form, bias=bias))
        if not outputs:
            return x_sorted.new_zeros(0, self.hidden_size)
        return torch.cat(outputs)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Each expert's ΔW = s·B·A, (out, in) as ``nn.Linear`` holds a weight, in float32: ``gate_up_proj``
        (E, 2I, H) and ``down_proj`` (E, H, I) as targeted (zeros for experts without LoRA). gate_up's rows
        are in the stored order of its outputs: split gate and up deltas are joined as the forward splits
        them (halves; gpt-oss: interleaved). A stack stored transposed (gpt-oss, (E, in, out)) takes the
        transpose (:meth:`ExpertForm.to_stored`; what ``fedmoe export --merged`` adds)."""
        def pair(prefix):
            A = self._full(getattr(self, f"{prefix}_lora_A").detach().float())
            B = self._full(getattr(self, f"{prefix}_lora_B").detach().float())
            return (B @ A) * self.scaling

        out = {}
        if "gate_up_proj" in self.targets:
            out["gate_up_proj"] = pair("gate_up") if self.layout == "fused" else self.form.join(pair("gate"), pair("up"), 1)
        if "down_proj" in self.targets:
            out["down_proj"] = pair("down")
        return out

    # --- conversion to/from PEFT's ParamWrapper layout (used by tests and for interop) ---
    @staticmethod
    def to_peft_layout(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, r, in), (E, out, r) -> PEFT lora_A.weight (E*r, in), lora_B.weight (out, r*E)."""
        E, r, fan_in = A.shape
        return A.reshape(E * r, fan_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)

    @staticmethod
    def from_peft_layout(peft_A: torch.Tensor, peft_B: torch.Tensor, num_experts: int):
        r = peft_A.shape[0] // num_experts
        A = peft_A.reshape(num_experts, r, peft_A.shape[1])
        B = peft_B.reshape(peft_B.shape[0], r, num_experts).permute(2, 0, 1)
        return A, B
