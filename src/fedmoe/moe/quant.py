"""Quantized frozen bases (``model.quantization``): 4-bit NF4 / FP4 and 8-bit weights for the fused
expert tensors and the decoder's linear layers, in plain PyTorch (CPU and GPU alike).

Why fedmoe does this itself: Hugging Face's ``BitsAndBytesConfig`` replaces only ``nn.Linear``
modules, so the fused 3-D expert tensors of a transformers v5 MoE (``gate_up_proj`` (E, 2I, H),
``down_proj`` (E, H, I)) — nine tenths of the weights — stay in full precision (bitsandbytes issue
1849). Here every expert tensor is quantized, and its experts are dequantized **one at a time**, only
for the experts that have routed tokens, inside fedmoe's own expert forward (never the whole stack
per forward): the expert LoRA keeps its cost in proportion to the routed tokens.

Schemes (absmax scaling per block of the last dimension, the input features):

* ``nf4``: the 16 levels of 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA", Appendix E: the
  quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero), blocks of 64, two codes per byte;
* ``fp4``: the 4-bit float e2m1 (magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, signed: the OCP levels of
  MXFP4/NVFP4) rescaled to [-1, 1], blocks of 64, two codes per byte. Not bitsandbytes' ``fp4``, whose
  levels are 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1 (signed): on N(0, 1) weights at block 64 the relative
  error of these levels is 0.106 against bitsandbytes' 0.122;
* ``int8``: symmetric 8-bit integers with one absmax per output row (weight-only, as LLM.int8's
  vector-wise scaling without its outlier split).

NF4 is bitsandbytes' NF4 bit for bit (the packed codes, high nibble first, and the float32 absmax
per block; tests/test_quant.py), so where bitsandbytes is installed its dequantization kernel (CPU and
CUDA) reads fedmoe's codes and gives the same tensor as the plain PyTorch path here; without it the
plain path runs (``USE_BITSANDBYTES = False`` forces it).

A stack stored transposed (gpt-oss: (E, H, 2I) and (E, I, H), each expert's weight (in, out)) is quantized
as its transpose, so its blocks and int8 rows run along the input features as every other family's do
(``QuantizedWeight(w, scheme, transposed=True)``); it still answers the stored shape, and ``w[e]`` gives the
expert's weight as stored.

A 4-bit block holds 64 weights unless the input dimension is smaller or not a multiple of 64 (the
tiny test models): then the largest even divisor of it up to 64. The absmax scales are kept in
float32 (QLoRA's second quantization of them is not done: 0.5 bits per weight more at block 64).
What is not quantized: embeddings, the LM head, norms, routers and any linear whose input size is odd;
LoRA adapters stay in the compute dtype on top. ``quantize_model`` replaces the weights in place;
the full-precision base can be rebuilt from the model id (checkpoints never hold the base) and
``fedmoe export --merged`` folds LoRA into a full-precision reload of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("none", "nf4", "fp4", "int8")
BLOCK = 64

# 4-bit NormalFloat levels (QLoRA, Appendix E), ascending
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# e2m1 magnitudes / 6, signed (the negative zero is a second code for 0), ascending
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_LEVELS = tuple(sorted([-m / 6.0 for m in _E2M1] + [m / 6.0 for m in _E2M1]))


def _levels(scheme: str) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS if scheme == "nf4" else FP4_LEVELS, dtype=torch.float32)


def block_size(last: int) -> int:
    """The 4-bit block along a last dimension of ``last``: 64, or the largest even divisor up to 64."""
    if last % BLOCK == 0:
        return BLOCK
    for b in range(min(BLOCK, last), 1, -1):
        if last % b == 0 and b % 2 == 0:
            return b
    raise ValueError(f"cannot quantize a tensor whose last dimension ({last}) is odd to 4 bits")


def quantize_tensor(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(codes, absmax, block) of ``w`` (any shape, blocks along the last dimension): 4-bit codes packed
    two per uint8 (high nibble first), int8 values; absmax in float32."""
    w = w.detach().float()
    if scheme == "int8":
        absmax = w.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        codes = torch.round(w / scale * 127).clamp_(-127, 127).to(torch.int8)
        return codes, absmax.squeeze(-1), w.shape[-1]
    if scheme not in ("nf4", "fp4"):
        raise ValueError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    b = block_size(w.shape[-1])
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // b, b)
    absmax = blocks.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = blocks / scale[..., None]
    levels = _levels(scheme).to(w.device)
    mids = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(normed.contiguous(), mids).to(torch.uint8).reshape(*w.shape[:-1], -1)
    codes = (idx[..., 0::2] << 4) | idx[..., 1::2]
    return codes.contiguous(), absmax, b


_PAIRS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _byte_table(scheme: str, device: torch.device) -> torch.Tensor:
    """(256, 2): the two levels a packed byte holds (high nibble first): one lookup per byte."""
    key = (scheme, device)
    if key in _PAIRS:
        return _PAIRS[key]
    levels = _levels(scheme)
    b = torch.arange(256)
    table = torch.stack([levels[b >> 4], levels[b & 0xF]], dim=-1).to(device)
    if type(table) is torch.Tensor:  # not a fake tensor of a memory plan (fedmoe.plan): those are not kept
        _PAIRS[key] = table
    return table


# bitsandbytes' dequantization kernel (CPU and CUDA), used for NF4 where it is installed: its NF4 codes
# and scales are fedmoe's bit for bit (tests/test_quant.py), so it gives the same tensor, ~28x faster on
# this CPU for an OLMoE expert. None: not resolved yet; False: not available (plain PyTorch then).
_BNB_DEQUANT = None
BNB_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
USE_BITSANDBYTES = True  # False: always the plain PyTorch path (tests compare the two)


def _bnb_dequant():
    global _BNB_DEQUANT
    if _BNB_DEQUANT is None:
        import logging

        quiet = logging.getLogger("bitsandbytes")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its import warns about optional CPU matmul kernels fedmoe does not use
        try:
            import bitsandbytes  # noqa: F401 - registers torch.ops.bitsandbytes

            _BNB_DEQUANT = torch.ops.bitsandbytes.dequantize_4bit.default
        except Exception:  # noqa: BLE001 - not installed, or no binary for this platform: plain PyTorch
            _BNB_DEQUANT = False
        finally:
            quiet.setLevel(level)
    return _BNB_DEQUANT or None


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, block: int, scheme: str, dtype: torch.dtype) -> torch.Tensor:
    """The tensor that :func:`quantize_tensor` encoded, in ``dtype``: each level times its block's absmax
    in float32, then rounded to ``dtype`` (NF4 through bitsandbytes' kernel where it is installed, the
    same numbers)."""
    if scheme == "int8":
        return (codes.to(torch.float32) * (absmax[..., None] / 127)).to(dtype)
    n = codes.shape[-1] * 2
    shape = (*codes.shape[:-1], n)
    kernel = (_bnb_dequant() if scheme == "nf4" and USE_BITSANDBYTES and block in BNB_BLOCKS
              and type(codes) is torch.Tensor and dtype in (torch.float32, torch.bfloat16, torch.float16) else None)
    if kernel is not None:
        return kernel(codes.contiguous().reshape(-1, 1), absmax.reshape(-1).float(), block, "nf4", shape, dtype)
    # one float32 pair per byte (int32 indices: a quarter of int64's traffic), scaled in place
    vals = _byte_table(scheme, codes.device).index_select(0, codes.reshape(-1).int())
    vals = vals.reshape(*codes.shape[:-1], n // block, block).mul_(absmax[..., None])
    return vals.reshape(shape).to(dtype)


class QuantizedWeight(nn.Module):
    """A frozen weight held quantized (buffers ``codes`` and ``absmax``), read in ``dtype``: ``w[e]``
    dequantizes the rows of its first dimension that are asked for (one expert of a fused stack),
    :meth:`dequantize` the whole tensor. It answers ``shape``, ``dtype``, ``device`` and
    ``element_size()`` as the full-precision tensor did. ``transposed``: a stack of (in, out) weights
    (gpt-oss), quantized as its transpose (blocks along the input features); ``w[e]`` and
    :meth:`dequantize` give it back as stored, :func:`linear_q` multiplies by it as by the others."""

    def __init__(self, w: torch.Tensor, scheme: str, chunk: int = 2**22, transposed: bool = False):
        super().__init__()
        if transposed and w.dim() != 3:
            raise ValueError("only a stack of expert weights (3-D) is held transposed")
        # a slab of the first dimension at a time (an expert, or rows of a linear): the float32 working
        # copies of quantization stay ~``chunk`` elements, never the size of a whole expert stack
        step = max(1, chunk // max(1, w[0].numel())) if w.dim() > 1 else w.shape[0]
        parts = [quantize_tensor(w[i : i + step].transpose(-2, -1) if transposed else w[i : i + step], scheme)
                 for i in range(0, w.shape[0], step)]
        codes, absmax, block = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2]
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax)
        self.scheme, self.block, self.shape, self.dtype = scheme, block, tuple(w.shape), w.dtype
        self.transposed = transposed
        # the shape of what the codes hold: (…, out, in)
        self.linear_shape = (*self.shape[:-2], self.shape[-1], self.shape[-2]) if transposed else self.shape
        self.requires_grad = False

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def nbytes_stored(self) -> int:
        """Bytes held: the codes and the float32 scales."""
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()

    def dequantize(self) -> torch.Tensor:
        w = dequantize(self.codes, self.absmax, self.block, self.scheme, self.dtype)
        return w.transpose(-2, -1) if self.transposed else w

    def __getitem__(self, idx) -> torch.Tensor:
        w = dequantize(self.codes[idx], self.absmax[idx], self.block, self.scheme, self.dtype)
        return w.transpose(-2, -1) if self.transposed else w

    def extra_repr(self) -> str:
        return (f"{self.scheme}, shape={self.shape}, dtype={self.dtype}, block={self.block}"
                + (", transposed" if self.transposed else ""))


class _DequantLinear(torch.autograd.Function):
    """``x @ W.T`` with W dequantized from its codes in the forward and again in the backward: what
    autograd keeps is the codes (already held), never the full-precision W (QLoRA's arrangement; saving
    the dequantized W for the backward would hold every used expert in full precision at once)."""

    @staticmethod
    def forward(ctx, x, codes, absmax, block, scheme, dtype, shape):
        ctx.save_for_backward(codes, absmax)
        ctx.meta = (block, scheme, dtype, shape)
        return F.linear(x, dequantize(codes, absmax, block, scheme, dtype).reshape(shape).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        codes, absmax = ctx.saved_tensors
        block, scheme, dtype, shape = ctx.meta
        w = dequantize(codes, absmax, block, scheme, dtype).reshape(shape).to(grad.dtype)
        return grad @ w, None, None, None, None, None, None


def linear_q(x: torch.Tensor, w: QuantizedWeight, idx=None) -> torch.Tensor:
    """``F.linear(x, w[idx])`` (or of the whole 2-D ``w``) without keeping the dequantized weight for the
    backward. ``idx``: an expert (an int, or a one-element index tensor: no host sync)."""
    codes, absmax = (w.codes, w.absmax) if idx is None else (w.codes[idx], w.absmax[idx])
    return _DequantLinear.apply(x, codes, absmax, w.block, w.scheme, w.dtype, tuple(w.linear_shape[-2:]))


def quantized_proj(a: torch.Tensor, w) -> torch.Tensor:
    """``proj`` of :func:`fedmoe.moe.lora.expert_ffn` for a quantized stack: ``w`` is (stack, expert)."""
    return linear_q(a, w[0], w[1])


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with a :class:`QuantizedWeight`: dequantized for each forward and backward (the
    layer's output is the full-precision layer's up to the quantization error)."""

    def __init__(self, linear: nn.Linear, scheme: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = QuantizedWeight(linear.weight, scheme)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_q(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedWeight)


def quantize_model(mm, scheme: str) -> dict:
    """Quantize ``mm``'s frozen base in place: every MoE layer's fused ``gate_up_proj`` and ``down_proj``
    (gpt-oss's transposed stacks as their transposes; their biases stay as they are) and every ``nn.Linear`` inside the decoder layers but the routers and linears with an odd input
    size (attention, shared experts, dense MLPs). Returns {"tensors": n, "bytes_before": ..,
    "bytes_after": ..} over what was quantized. Call before adapters are added (they wrap the
    quantized modules)."""
    if scheme == "none":
        return {"tensors": 0, "bytes_before": 0, "bytes_after": 0}
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    from .arch import decoder_layers

    if mm.trainable_names():
        raise ValueError("quantize the base before adding adapters (the adapters wrap its modules)")
    stats = {"tensors": 0, "bytes_before": 0, "bytes_after": 0}

    def count(before: torch.Tensor, q: QuantizedWeight) -> None:
        stats["tensors"] += 1
        stats["bytes_before"] += before.numel() * before.element_size()
        stats["bytes_after"] += q.nbytes_stored()

    routers = {id(layer.router) for layer in mm.layers}
    for layer in mm.layers:
        experts = layer.experts
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name)
            if is_quantized(w):
                continue
            q = QuantizedWeight(w, scheme, transposed=layer.form.transposed)
            count(w, q)
            delattr(experts, name)
            setattr(experts, name, q)
    for block in decoder_layers(mm.model):
        for parent in list(block.modules()):
            if id(parent) in routers or isinstance(parent, QuantizedLinear):  # no adapters yet (checked above)
                continue
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear and id(child) not in routers and child.in_features % 2 == 0 \
                        and child.out_features > 1:
                    q = QuantizedLinear(child, scheme)
                    count(child.weight, q.weight)
                    setattr(parent, child_name, q)
    return stats


def stored_bytes(module: nn.Module) -> int:
    """Bytes of a module's frozen weights as held: quantized ones by their codes and scales, the rest by
    their parameters and buffers (adapters included). A tensor two modules share (tied input and output
    embeddings) is counted once."""
    total = 0
    seen: set[int] = set()
    for m in module.modules():
        held = list(m.parameters(recurse=False))
        if not isinstance(m, QuantizedWeight):  # (its buffers are counted below, once)
            held += list(m.buffers(recurse=False))
        for t in held:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    for m in module.modules():
        if isinstance(m, QuantizedWeight):
            total += m.nbytes_stored()
    return total


__all__ = ["FP4_LEVELS", "NF4_LEVELS", "SCHEMES", "QuantizedLinear", "QuantizedWeight", "block_size", "dequantize",
           "is_quantized", "linear_q", "quantize_model", "quantize_tensor", "quantized_proj", "stored_bytes"]
