"""The routed-expert path for accelerators (issue 27): no host sync and no data-dependent shape in an
MoE block's forward (it compiles with ``torch.compile(fullgraph=True)``: a graph break there is a
host sync or a shape read from the data), and the grouped experts of an fp32 model run in autocast's
dtype (grouped_mm is not on autocast's list, so they ran in fp32)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedmoe.moe.model import MoEModel
from tests.helpers import tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str, layout: str = "fused", router: bool = False, **config) -> MoEModel:
    mm = MoEModel(tiny_hf(arch, **config))
    mm.add_expert_lora(4, 8.0, layout=layout)
    if router:
        mm.add_router_lora(2, 4.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mm.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return mm


def _block_run(mm, block, x, mask=None, run=None):
    """(output, gradients of x and the block's LoRA, activation counts, tokens) of one forward+backward
    of ``block`` (through ``run``, e.g. its compiled form, when given)."""
    mm.reset_activation_counts()
    x = x.detach().clone().requires_grad_(True)
    params = {n: p for n, p in block.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    with mm.tracking(mask):
        out = (block if run is None else run)(x)
    y = out[0] if isinstance(out, tuple) else out
    (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    counts, tokens = mm.activation_counts()
    return y.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in params.items()}}, counts, tokens


class _SyncFinder:
    """A torch.compile backend (AOTAutograd, the ATen graphs run as traced) that records every node of
    the forward and backward graphs that reads a value on the host (``aten._local_scalar_dense``:
    ``int(t)``, ``t.item()``, ``t.tolist()``) or whose shape depends on the data (an unbacked size:
    ``bincount``, ``nonzero``, boolean-mask indexing). Under ``fullgraph=True`` torch captures these
    as unbacked values instead of breaking the graph, so the graph is read, not only its count."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

        self.found: list[str] = []
        self.graphs = 0

        def inspect(gm, example_inputs):
            self.graphs += 1
            for node in gm.graph.nodes:
                val = node.meta.get("val")
                vals = val if isinstance(val, (list, tuple)) else [val]
                if "_local_scalar_dense" in str(node.target) or any(
                        v is not None and free_unbacked_symbols(v) for v in vals):
                    self.found.append(str(node.target))
            return make_boxed_func(gm.forward)

        self.backend = aot_autograd(fw_compiler=inspect, bw_compiler=inspect)


@pytest.mark.parametrize("arch,layout,router", [("olmoe", "fused", False), ("qwen3_moe", "split", True)],
                         ids=["olmoe-fused", "qwen3-split-router"])
def test_moe_block_has_no_host_sync_and_compiles_as_one_graph(arch, layout, router):
    """The whole MoE block (router, routing, sort, grouped experts with LoRA, scatter, the tracker's
    counting) is one graph (``fullgraph=True``), forward and backward, with no host read and no
    data-dependent shape in it: a ``bincount`` (its size is the largest id + 1), ``int(counts.sum())``
    or the tracker's boolean-mask indexing would each be found. The compiled block gives the eager
    outputs, gradients and activation counts. In bf16: torch's compiled grouped_mm takes bf16 only
    (the eager CPU kernel also fp32)."""
    torch._dynamo.reset()
    mm = _model(arch, layout, router)
    mm.model.to(torch.bfloat16)
    mm.tracker.skip_padding = False  # skipping padding reads the mask (one sync per forward, not per layer)
    block = mm.layers[0].block
    H = mm.model.config.hidden_size
    x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0  # the tracker counts only the tokens the mask keeps (by weight, not by indexing)
    want = _block_run(mm, block, x, mask)
    finder = _SyncFinder()
    compiled = torch.compile(block, fullgraph=True, backend=finder.backend)
    got = _block_run(mm, block, x, mask, run=compiled)
    assert finder.graphs == 2 and finder.found == []  # one forward graph, one backward graph, no sync
    assert torch.equal(got[0], want[0])  # the eager kernels, in the same order
    assert got[1].keys() == want[1].keys() and len(got[1]) >= 3
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    k = mm.default_top_k
    assert int(want[3][0]) == 3 * 7 - 3 and int(want[2][0].sum()) == (3 * 7 - 3) * k  # 3 padded tokens left out
    assert int(want[3][1]) == 0  # layer 1 did not run


def test_counts_stay_on_the_routing_device_until_read():
    """Counting adds to tables beside the routing (no copy to the host per layer); reading them gives
    CPU tensors, and a reset starts from zero."""
    mm = _model("olmoe")
    ids = torch.randint(2, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    with mm.tracking(None):
        mm.model(input_ids=ids)
    assert mm.tracker._counts.device == ids.device
    counts, tokens = mm.activation_counts()
    assert counts.device.type == "cpu" and tokens.tolist() == [10, 10]
    assert counts.sum(1).tolist() == [10 * mm.default_top_k] * 2
    counts[0, 0] += 100  # a copy: the tracker's table is not changed through it
    assert torch.equal(mm.activation_counts()[0].sum(1), torch.tensor([10 * mm.default_top_k] * 2))
    mm.reset_activation_counts()
    assert mm.activation_counts()[0].sum() == 0 and mm.activation_counts()[1].sum() == 0


class _GroupedMMInputs(TorchDispatchMode):
    """Records the dtypes of every ``aten._grouped_mm`` call's two operands."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._grouped_mm:
            self.calls.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["fused", "split"])
def test_grouped_experts_of_an_fp32_model_run_in_autocast_dtype(layout):
    """Under bf16 autocast the grouped matmuls get bf16 operands (routed rows, expert weights, LoRA),
    the block's output keeps the model's fp32, the LoRA gradients are fp32 and close to the fp32
    step's; without autocast nothing changes (fp32 operands)."""
    mm = _model("olmoe", layout)
    mm.tracker.skip_padding = False
    experts = mm.layers[0].block.experts
    H = mm.model.config.hidden_size
    x = torch.randn(12, H, generator=torch.Generator().manual_seed(4))
    idx = torch.randint(0, mm.num_experts, (12, 2), generator=torch.Generator().manual_seed(5))
    w = torch.rand(12, 2, generator=torch.Generator().manual_seed(6))

    def run(autocast: bool):
        for p in experts.parameters():
            p.grad = None
        spy = _GroupedMMInputs()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), spy:
            y = experts(x, idx, w)
        y.pow(2).sum().backward()
        grads = {n: p.grad for n, p in experts.named_parameters() if p.requires_grad}
        return y.detach(), grads, spy.calls

    y32, g32, calls32 = run(False)
    y16, g16, calls16 = run(True)
    n_proj = 2 if layout == "fused" else 3
    assert len(calls32) == len(calls16) == 3 * n_proj - (n_proj - 2)  # base + A + B per pair, gate|up base fused
    assert set(calls32) == {(torch.float32, torch.float32)}
    assert set(calls16) == {(torch.bfloat16, torch.bfloat16)}
    assert y16.dtype == torch.float32
    rel = float((y16 - y32).norm() / y32.norm())
    assert 1e-5 < rel < 2e-2  # bf16's 8 significant bits: really computed in bf16, and close
    for n in g32:
        assert g16[n].dtype == torch.float32
        assert float((g16[n] - g32[n]).norm() / g32[n].norm()) < 5e-2, n


def test_autocast_keeps_no_cast_copy_of_the_expert_stack_for_the_backward(monkeypatch):
    """A frozen fp32 expert stack cast to bf16 for the grouped matmul is cast again in the backward,
    not kept: no bf16 tensor of the stack's size is saved for the backward (plain autograd keeps one
    per projection and layer, 0.8 GB a layer on OLMoE-1B-7B). The gradients are those of plain
    autograd, bit for bit."""
    from fedmoe.moe import lora

    mm = _model("olmoe")
    mm.tracker.skip_padding = False
    experts = mm.layers[0].block.experts
    E, two_i, H = experts.base.gate_up_proj.shape
    stack_sizes = {E * two_i * H, E * H * experts.base.down_proj.shape[2]}
    x0 = torch.randn(10, H, generator=torch.Generator().manual_seed(7))
    idx = torch.randint(0, E, (10, 2), generator=torch.Generator().manual_seed(8))
    w = torch.rand(10, 2, generator=torch.Generator().manual_seed(9))

    def run():
        saved = []

        def pack(t):
            saved.append((t.dtype, t.numel()))
            return t

        for p in experts.parameters():
            p.grad = None
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = experts(x, idx, w)
        y.pow(2).sum().backward()
        copies = [s for s in saved if s[0] == torch.bfloat16 and s[1] in stack_sizes]
        return copies, {"x": x.grad, **{n: p.grad for n, p in experts.named_parameters() if p.requires_grad}}

    copies, grads = run()
    assert copies == []
    monkeypatch.setattr(lora._FrozenCastGroupedMM, "apply",
                        staticmethod(lambda a, w, offs: torch.nn.functional.grouped_mm(a, w.to(a.dtype), offs=offs)))
    plain_copies, plain_grads = run()
    assert len(plain_copies) == 2  # what plain autograd keeps: the gate_up and the down stack in bf16
    assert grads.keys() == plain_grads.keys()
    for n in grads:
        assert torch.equal(grads[n], plain_grads[n]), n


def _set_combine(mm, combine: str) -> None:
    for layer in mm.layers:
        mm.experts_module(layer.index).combine = combine


@pytest.mark.parametrize("skip_padding", [True, False], ids=["padding-skipped", "all-rows"])
def test_gather_combine_equals_the_scatter_add(skip_padding):
    """``combine = "gather"`` (each token's k expert rows gathered and summed, no atomics on a GPU) gives
    the scatter-add's logits and every gradient bit for bit in fp32 on a CPU: the same additions in the
    same order (a token's slots in expert order). Summing them in top-k order instead, or dropping the
    padding rows' zeros, would differ (top-4: with two terms the order cannot matter). In bf16 both stay
    within bf16 rounding of the fp32 result."""
    mm = _model("olmoe", "fused", router=True, top_k=4)
    mm.tracker.skip_padding = skip_padding
    ids = torch.randint(2, 100, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def run(combine, dtype=torch.float32):
        _set_combine(mm, combine)
        mm.model.zero_grad()
        mm.reset_activation_counts()
        with mm.tracking(mask):
            out = mm.model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in mm.trainable_parameters().items()}
        return out.logits.detach(), grads, mm.activation_counts()[0]

    a, b = run("index_add"), run("gather")
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and len(a[1]) >= 6
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name
    assert torch.equal(a[2], b[2])
    mm.model.to(torch.bfloat16)
    for combine in ("index_add", "gather"):
        logits = run(combine)[0].float()
        torch.testing.assert_close(logits, a[0], rtol=0.05, atol=0.05)


def test_gather_combine_compiles_without_host_sync():
    """The gather path (inverse permutation by a scatter, a per-token sort of k positions) is one graph
    forward and backward with no host read, like the scatter-add."""
    torch._dynamo.reset()
    mm = _model("olmoe")
    mm.model.to(torch.bfloat16)
    mm.tracker.skip_padding = False
    _set_combine(mm, "gather")
    block = mm.layers[0].block
    x = torch.randn(2, 5, mm.model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    want = _block_run(mm, block, x)
    finder = _SyncFinder()
    got = _block_run(mm, block, x, run=torch.compile(block, fullgraph=True, backend=finder.backend))
    assert finder.graphs == 2 and finder.found == []
    assert torch.equal(got[0], want[0])
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name
