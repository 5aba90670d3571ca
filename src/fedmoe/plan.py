"""Will it fit? The memory of one client's training step, before anything is loaded.

``memory_plan(cfg)`` builds the configured model with the run's method's adapters and quantization on
PyTorch's fake tensors (shapes and dtypes, no storage: nothing is read from disk or allocated) and
runs two training steps of it — forward, backward, optimizer step, at the configured batch size and
``data.max_length``, every token real, under bf16 autocast where the run trains with it — counting the
bytes of every tensor the steps create while it lives (a dispatch mode; the same count on real tensors
is what the tests compare with), once per budget level (its k; FLAME's clients activate fewer experts,
so they keep fewer activations). The peak it reports is what the real step
holds in tensors at its peak: the frozen weights (quantized or not) and the trainable adapters, then
what the step creates at its peak — the adapters' gradients and optimizer state (counted from their
sizes), what the method's objective holds beside them (a FedProx reference, SCAFFOLD's correction and
gradient sum: ``Client.plan_state_bytes``) and the rest, activations and temporaries. Every position but
the first carries a label (a short prompt leaves the response nearly the whole sequence, and the LM head
runs on every labelled position). The evaluation passes are planned too, without gradients: the test loss's
forward of ``eval.batch_size`` sequences of ``data.max_length`` tokens, whose logits over the vocabulary at
every position can outgrow a training step at a small batch; greedy generation where ROUGE-L is scored (the
key/value cache of a prompt and ``eval.max_new_tokens``); a choice task's option scoring (the evaluator's own: its
prompts' key/value cache, a batch of (prompt, option) rows over copies of it, and the options' logits); MMLU's k-shot prompts where it is asked. A level's
peak is the largest of them all. It does not count the allocator's caching or fragmentation or the CUDA context. ``fedmoe plan CONFIG`` prints it; ``fedmoe run`` checks it against the
device before loading anything.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("weights", "adapters", "gradients", "optimizer", "method state", "activations")


@dataclass
class LevelPlan:
    """The estimated peak of one budget level's training step, in bytes by kind, and of its evaluation passes
    (``passes``: what each creates beside the weights and adapters; ``evaluation``: the largest)."""

    k: int
    clients: list[int]
    peak: dict[str, int]
    passes: dict[str, int] = field(default_factory=dict)

    @property
    def evaluation(self) -> int:
        return max(self.passes.values(), default=0)

    @property
    def largest_pass(self) -> str | None:
        return max(self.passes, key=self.passes.__getitem__) if self.passes else None

    @property
    def training(self) -> int:
        return sum(self.peak.values())

    @property
    def evaluating(self) -> int:
        return self.peak["weights"] + self.peak["adapters"] + self.evaluation

    @property
    def total(self) -> int:
        return max(self.training, self.evaluating)


def _levels(cfg, method, default_k: int) -> dict[int, list[int]]:
    """k -> the clients that run at it (the method's own k per client), largest k first."""
    from .algorithms.base import client_profiles

    out: dict[int, list[int]] = {}
    for (k, _), clients in client_profiles(cfg, method, default_k).items():
        out.setdefault(k, []).extend(clients)
    return {k: sorted(out[k]) for k in sorted(out, reverse=True)}


class _LiveBytes(TorchDispatchMode):
    """A dispatch mode that counts the bytes of every tensor storage an op creates while they live (a
    storage shared by views counts once), and their peak."""

    def __init__(self):
        super().__init__()
        self.now, self.peak, self._refs = 0, 0, {}

    def exclude(self, tensors) -> None:
        """Storages that exist already (the model's weights and adapters): an op that returns one of
        them (``w.to(w.dtype)`` returns ``w``) does not count it again."""
        for t in tensors:
            st = t.untyped_storage()
            key = st._cdata
            if key not in self._refs:
                self._refs[key] = weakref.ref(st, lambda _, key=key: self._refs.pop(key, None))

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._refs:
            return
        n = st.nbytes()

        def gone(_, key=key, n=n):
            self._refs.pop(key, None)
            self.now -= n

        self._refs[key] = weakref.ref(st, gone)
        self.now += n
        self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def _planned_model(cfg, method, k: int):
    """The configured model with the method's adapters and quantization at ``k`` (in the caller's fake mode)."""
    from .moe.model import MoEModel, hf_from_config, load_model_config
    from .moe.quant import quantize_model
    from .seeds import Stream, derive_seed

    config = load_model_config(cfg.model.name)
    hf = hf_from_config(config, cfg.model.dtype, cfg.model.attn_implementation, cfg.seed)
    mm = MoEModel(hf)
    quantize_model(mm, cfg.model.quantization)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, Stream.ADAPTER_INIT))
        method.client.build(cfg, mm)
    mm.set_top_k(k)
    return mm, config


def _live(mm) -> _LiveBytes:
    """A count of what is created beside the model's own tensors."""
    live = _LiveBytes()
    live.exclude([*mm.model.parameters(), *mm.model.buffers()])
    return live


def _token_loss(model, ids: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, ...]:
    """(hidden states, float32 logits, loss) of every position but the first, as labelled_token_loss takes them
    (returned, not only the loss: a caller that keeps them alive counts them as the real step does)."""
    from .moe.loss import lm_logits

    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    logits = lm_logits(model, hidden.reshape(-1, hidden.shape[-1])).float()
    return hidden, logits, torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction=reduction)


def _measured(cfg, method, k: int, fake: bool = True, training: bool = True,
              evaluation: bool = True) -> tuple[dict[str, int] | None, dict[str, int] | None]:
    """(the training step's bytes by kind, each evaluation pass's bytes) of one level, from one model built
    (either None where not asked): see the module docstring, :func:`training_step_bytes`, :func:`evaluation_bytes`.
    ``fake``: on fake tensors (the plan); False: on real ones (what a test measures it against)."""
    from contextlib import nullcontext

    from torch._subclasses.fake_tensor import FakeTensorMode

    from .moe.model import resolve_device
    from .moe.quant import stored_bytes
    from .train import activation_checkpointing, use_bf16

    peak = evaluated = None
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext():
        mm, config = _planned_model(cfg, method, k)
        mm.tracker.planning = fake  # the experts take an even split of the routed slots (nothing read)
        named = mm.trainable_parameters()
        params = list(named.values())
        # the step in the precision the run trains in: bf16 autocast on CUDA unless `train.bf16: off`
        # (CPU autocast's op lists stand in for CUDA's: matmuls and linears in bf16, reductions in fp32)
        bf16 = use_bf16(cfg.train, resolve_device(cfg.model.device))
        # full batches (the longest sequences the run allows: no padding, no mask) labelled at every position but
        # the first: a one-token prompt leaves the response the rest (data.tokenize's truncation), and the LM head
        # runs on every labelled position, as labelled_token_loss does
        L = cfg.data.max_length
        if evaluation:  # each evaluation pass the run makes, without gradients
            mm.model.eval()
            evaluated = {name: _pass_bytes(mm, run) for name, run in _evaluation_passes(cfg, config).items()}
        if training:
            adamw = cfg.train.optimizer != "sgd"
            opt = (torch.optim.AdamW(params, lr=1e-3) if adamw
                   else torch.optim.SGD(params, lr=1e-3, momentum=cfg.train.momentum))
            ids = torch.randint(0, config.vocab_size, (cfg.train.batch_size, L), generator=torch.Generator().manual_seed(0))
            adapters = sum(p.numel() * p.element_size() for p in params)
            frozen = stored_bytes(mm.model) - adapters
            state = method.client.plan_state_bytes(cfg, named)
            mm.model.train()
            live = _live(mm)
            with live, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                    activation_checkpointing(mm.model, cfg.train.activation_checkpointing):
                for _ in range(2):  # the second step holds the optimizer state of the first
                    hidden, logits, loss = _token_loss(mm.model, ids)  # held into the next step, as the run holds them
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            grads = adapters
            optim = 2 * adapters if adamw else (adapters if cfg.train.momentum else 0)
            peak = {"weights": int(frozen), "adapters": int(adapters), "gradients": int(grads), "optimizer": int(optim),
                    "method state": int(state), "activations": max(0, int(live.peak) - grads - optim)}
    return peak, evaluated


def _evaluation_passes(cfg, config) -> dict:
    """{name: a function of the model running that pass at its largest shape} for each evaluation pass the run
    makes (:class:`fedmoe.federation.evaluation.Evaluator`): the test loss always (and the general text's, the
    same shape); greedy generation where ROUGE-L is scored; a choice task's option scoring; MMLU where it is
    asked."""
    from .moe.loss import lm_logits

    L, B = cfg.data.max_length, cfg.eval.batch_size

    def ids(n):
        return torch.randint(0, config.vocab_size, (B, n), generator=torch.Generator().manual_seed(0))

    def test_loss(model, live):
        with live:
            _token_loss(model, ids(L), reduction="sum")
        return live.peak

    def generation(model, live):
        # greedy decoding of N tokens: the prompt's forward (up to P tokens: L, fewer where P + N would pass the
        # model's positions) with its key/value cache and the logits of its last position only (generate's
        # logits_to_keep), then N - 1 steps of one token, each adding to the cache. The peak is the prompt's forward
        # or the last step, over a cache of P + N - 2
        from .eval.generate import generation_prompt_limit

        n = cfg.eval.max_new_tokens
        P = generation_prompt_limit(config, L, n)
        with live:
            out = model.model(input_ids=ids(P), use_cache=True)
            lm_logits(model, out.last_hidden_state[:, -1]).float()
            del out
        prompt = live.peak
        if n == 1:
            return prompt
        with live:
            cache = model.model(input_ids=ids(P + n - 2), use_cache=True).past_key_values
            live.peak = live.now  # the cache alone: the forward that built it is not a step generation takes
            # the step's logits are copied to float32 (generate's next-token scores) while the previous step's are
            # still held
            previous = torch.empty((B, config.vocab_size), dtype=torch.float32)
            out = model.model(input_ids=ids(1), past_key_values=cache, use_cache=True)
            lm_logits(model, out.last_hidden_state[:, -1]).to(torch.float32, copy=True)
            del out, cache, previous
        return max(prompt, live.peak)

    def mmlu(model, live):  # k-shot prompts of up to 4 L tokens (the Evaluator's limit), the letters' logits at the end
        from .eval.mmlu import run_prompt_limit

        with live:
            hidden = model.model(input_ids=ids(run_prompt_limit(config, L)), use_cache=False).last_hidden_state[:, -1]
            lm_logits(model, hidden).float()
        return live.peak

    def choice(model, live):
        # the evaluator's own scoring (eval.choice.option_logprobs) of one batch: eval.batch_size prompts of
        # data.max_length minus the longest option of their client (at most L minus the shortest of the examples'
        # longest options), each example with a label task's options as they are, else the most options, each the
        # longest (an upper bound). Its prompt-once path: one forward with the key/value cache, then a batch of
        # (prompt, option) rows at a time (every option ends with eos: each has a row), each over a copy of its
        # prompt's cache, the options' tokens with their logits; a hybrid model's (linear attention, short
        # convolutions), and a windowed attention's past its window: a batch of (prompt, option) pairs at a time as
        # sequences of their own, the logits where an option's tokens are predicted
        from .eval.choice import option_logprobs

        options = [[1] * n for n in shape.lengths] if shape.lengths else [[1] * shape.longest] * shape.options
        prompts = [[1] * max(1, L - shape.least)] * B
        with live:
            option_logprobs(model, prompts, [options] * B, B, next(model.parameters()).device, 0)
        return live.peak

    passes = {"test loss": test_loss}
    if cfg.eval.task == "generate" and cfg.eval.rouge:
        passes["generation"] = generation
    shape = choice_shape(cfg) if cfg.eval.task == "choice" else None
    if shape is not None:
        passes["choice"] = choice
    if cfg.eval.mmlu:
        passes["MMLU"] = mmlu
    return passes


_CHOICE_SHAPES: dict[str, ChoiceShape | None] = {}


class ChoiceShape(NamedTuple):
    """What a choice task's option scoring is planned at (:func:`choice_shape`)."""

    options: int  # the most options an example has
    longest: int  # the longest option in tokens, with its eos
    least: int  # the shortest of the examples' longest options (a client's prompts are cut to data.max_length minus
    # its longest)
    lengths: tuple[int, ...] | None  # each option's tokens where every example has the same options (a label set),
    # else None: the plan then takes each of ``options`` at ``longest``


def choice_shape(cfg) -> ChoiceShape | None:
    """The shape of a choice task's options (:class:`ChoiceShape`), from its label set or its examples' options
    (:func:`fedmoe.data.prepare.answer_options`) and the run's tokenizer; None without options. Once per data,
    tokenizer and seed."""
    import json

    d = cfg.data
    key = json.dumps([d.model_dump(mode="json"), cfg.model.tokenizer or cfg.model.name, cfg.seed], sort_keys=True)
    if key not in _CHOICE_SHAPES:
        from .data.prepare import answer_options
        from .data.tokenize import option_ids
        from .moe.model import load_tokenizer

        lists = answer_options(cfg)
        shape = None
        if lists:
            tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
            texts = list(dict.fromkeys(o for opts in lists for o in opts))
            size = {t: len(ids) for t, ids in zip(texts, option_ids(tok, texts))}
            tops = [max(size[o] for o in opts) for opts in lists]
            same = all(list(opts) == list(lists[0]) for opts in lists)
            shape = ChoiceShape(max(len(opts) for opts in lists), max(tops), min(tops),
                                tuple(size[o] for o in lists[0]) if same else None)
        _CHOICE_SHAPES[key] = shape
    return _CHOICE_SHAPES[key]


def _pass_bytes(mm, run) -> int:
    """The peak bytes one evaluation pass creates beside the model's own tensors. In the model's dtype, never under
    autocast: the run evaluates so (``train.bf16`` is training's; planned under it, an fp32 model's key/value cache
    counted in bf16 was 0.70 of the real generation's)."""
    live = _live(mm)
    with torch.no_grad():
        return int(run(mm.model, live))


def evaluation_bytes(cfg, method, k: int, fake: bool = True) -> dict[str, int]:
    """{pass: the bytes it creates at its peak} of each evaluation pass the run makes (no gradients; see
    :func:`_evaluation_passes`). The test loss's: ``eval.batch_size`` sequences of ``data.max_length`` tokens, the
    logits of every position but the first in float32, as the loss takes them
    (:func:`fedmoe.moe.loss.labelled_token_loss` on a sequence whose response is nearly all of it)."""
    return _measured(cfg, method, k, fake, training=False)[1]


def training_step_bytes(cfg, method, k: int, fake: bool = True) -> dict[str, int]:
    """The bytes of one client's training step at k (see the module docstring), by kind. ``fake``:
    on fake tensors (the plan); False: on real ones (what a test measures it against)."""
    return _measured(cfg, method, k, fake, evaluation=False)[0]


def level_plan(cfg, method, k: int, clients: list[int]) -> LevelPlan:
    """The plan of the level at ``k``: its training step and its evaluation, from one model built."""
    peak, evaluated = _measured(cfg, method, k)
    return LevelPlan(k, clients, peak, evaluated)


# the config sections a plan reads (with data.max_length and the budget levels the clients run at): sweep points
# that agree on them have one plan
PLAN_SECTIONS = ("model", "lora", "train", "algorithm")


def distinct_plans(points) -> list[tuple[object, list[str]]]:
    """[(config, the sweep points that share its plan)] for [(point, config)]: points whose memory-relevant
    settings agree — ``PLAN_SECTIONS``, ``data.max_length``, the evaluation's batch size and passes (``eval.task``,
    ``rouge``, ``mmlu``, ``max_new_tokens``) and the levels their clients run at (which a seed decides under
    ``algorithm.budgets.assign: distribution``) — share one."""
    import json

    from .algorithms import get_method
    from .moe.model import load_model_config

    groups: dict[str, tuple[object, list[str]]] = {}
    default_k: dict[str, int] = {}  # the model's own k, read once per model a sweep names
    for point, cfg in points:
        dump = cfg.model_dump(mode="json")
        if cfg.model.name not in default_k:
            default_k[cfg.model.name] = int(getattr(load_model_config(cfg.model.name), "num_experts_per_tok"))
        levels = _levels(cfg, get_method(cfg.algorithm.name), default_k[cfg.model.name])
        ev = cfg.eval  # what decides the evaluation passes planned (_evaluation_passes)
        key = json.dumps({**{s: dump[s] for s in PLAN_SECTIONS}, "max_length": cfg.data.max_length,
                          "eval": [ev.batch_size, ev.task, ev.rouge, ev.mmlu, ev.max_new_tokens],
                          "choice": choice_shape(cfg) if ev.task == "choice" else None,
                          "levels": {str(k): v for k, v in levels.items()}}, sort_keys=True)
        groups.setdefault(key, (cfg, []))[1].append(point)
    return list(groups.values())


def memory_plan(cfg) -> list[LevelPlan]:
    """One :class:`LevelPlan` per budget level (largest k first)."""
    from .algorithms import get_method
    from .moe.arch import check_supported
    from .moe.loss import load_balancing_loss, no_aux_loss
    from .moe.model import load_model_config

    method = get_method(cfg.algorithm.name)
    config = load_model_config(cfg.model.name)
    check_supported(config.model_type)  # a dense model has no experts to plan
    if cfg.train.aux_loss and load_balancing_loss(config) is None:  # nor a run that cannot start
        raise ValueError(no_aux_loss(config.model_type))
    default_k = int(getattr(config, "num_experts_per_tok"))
    return [level_plan(cfg, method, k, clients) for k, clients in _levels(cfg, method, default_k).items()]


def device_memory(device: str) -> tuple[str, int | None]:
    """(what, bytes) of the memory a run on ``device`` has: the GPU's free memory, or this machine's RAM."""
    import os

    if device.startswith("cuda"):
        if not torch.cuda.is_available():  # planning here for a GPU elsewhere: nothing to compare with
            return f"{device}: no CUDA device on this machine (compare the peak with the GPU's memory)", None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return f"free memory of {torch.cuda.get_device_name(torch.device(device))}", int(free)
    try:
        return "this machine's memory", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "this machine's memory", None


def client_memory(cfg, memory: tuple[str, int] | None = None) -> tuple[str, int | None]:
    """(what, bytes) of the memory one client of ``cfg`` has: :func:`device_memory` of its device (or ``memory``,
    (what, bytes) given in its place), and on Flower's simulation, which puts 1 / client_gpus clients (each with
    its model) on a GPU, a client's share of it."""
    from .moe.model import resolve_device

    dev = resolve_device(cfg.model.device)
    what, available = memory or device_memory(str(dev))
    share = cfg.federation.simulation.gpu_share(True) if cfg.federation.runtime == "flower-sim" else 1.0
    if dev.type == "cuda" and available is not None and 0 < share < 1:
        return (f"federation.simulation.client_gpus = {share:g} of the {what} (each simulated client's share; a "
                "larger one puts fewer clients on a GPU)"), int(available * share)
    return what, available


def fits(plans: list[LevelPlan], available: int | None) -> bool:
    return available is None or max(p.total for p in plans) <= available


HINTS = ("model.quantization=nf4 (the frozen base in 4 bits)",
         "train.activation_checkpointing=true (a decoder layer's activations are recomputed in the backward)",
         "train.batch_size (activations scale with it)",
         "data.max_length (activations scale with it)", "lora.rank (adapters, gradients, optimizer state)",
         "eval.batch_size (the evaluation's activations scale with it)")


def remedies(cfg, plans: list[LevelPlan], available: int, max_plans: int = 6) -> list[tuple[list[str], int]]:
    """What makes the largest level fit, planned rather than guessed: changes tried one after the other,
    each on top of the ones before, in the order of what they change — nothing (a smaller evaluation batch where
    the evaluation is over, activation checkpointing), the step's float rounding only (the batch divided by its
    smallest factor, the accumulation multiplied by it: the same examples and token mean per step, ``train._steps``;
    where ``train.aux_loss`` is on, the load-balancing loss is each micro-batch's, averaged, so it changes), the frozen
    base's numerics (NF4) — each planned again at the largest level's k, until one fits (at most ``max_plans``).
    Returns (the change, the peak with it and every change before it)."""
    from .algorithms import get_method
    from .config import apply_overrides, config_from_tree, config_to_dict

    worst = max(plans, key=lambda p: p.total)
    method = get_method(cfg.algorithm.name)
    sets: list[str] = []
    tried: list[tuple[list[str], int]] = []
    training, evaluating = worst.training, worst.evaluating

    def plan(step: list[str], parts: str) -> None:
        nonlocal training, evaluating
        sets.extend(step)  # a later value of a key replaces the earlier one
        changed = config_from_tree(apply_overrides(config_to_dict(cfg), sets), "the plan's remedies")
        peak, evaluated = _measured(changed, method, worst.k, training="training" in parts,
                                    evaluation="evaluation" in parts)
        if peak is not None:
            training = sum(peak.values())
        if evaluated is not None:  # beside the weights and adapters (the new ones where the step changed them)
            evaluating = LevelPlan(worst.k, worst.clients, peak or worst.peak, evaluated).evaluating
        tried.append((step, max(training, evaluating)))

    # the evaluation first where it is over (its batching changes no trained number), then the training step
    eval_batch = cfg.eval.batch_size
    while evaluating > available and eval_batch > 1 and len(tried) < max_plans:
        eval_batch //= 2
        plan([f"eval.batch_size={eval_batch}"], "evaluation")
    steps: list[list[str]] = []
    if not cfg.train.checkpoints_every_layer:  # (off, or every n-th layer: every layer saves more)
        steps.append(["train.activation_checkpointing=true"])
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    while batch > 1:  # by its smallest factor: the step keeps its examples (an odd batch too: 3 -> 1 x 3)
        f = next(d for d in range(2, batch + 1) if batch % d == 0)
        batch, accum = batch // f, accum * f
        steps.append([f"train.batch_size={batch}", f"train.grad_accum={accum}"])
    for step in steps:
        if training <= available or len(tried) >= max_plans:
            break
        plan(step, "training")
    if max(training, evaluating) > available and cfg.model.quantization == "none" and len(tried) < max_plans:
        plan(["model.quantization=nf4"], "training evaluation")  # the weights of both
    return tried


def format_plan(cfg, plans: list[LevelPlan], what: str | None = None, available: int | None = None) -> str:
    def gib(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"

    from .moe.model import resolve_device
    from .train import use_bf16

    dev = resolve_device(cfg.model.device)
    precision = f"{cfg.model.dtype} on {dev.type}" + (" with bf16 autocast" if use_bf16(cfg.train, dev) else "")
    ac = cfg.train.activation_checkpointing
    if ac:
        precision += ", activation checkpointing " + ("on" if ac is True else f"every {ac} layers")
    lines = [f"memory plan of one training step: {cfg.model.name}, {cfg.algorithm.name}, quantization "
             f"{cfg.model.quantization}, batch {cfg.train.batch_size} x {cfg.data.max_length} tokens, {precision}",
             "| k | clients | " + " | ".join(KINDS) + " | training | evaluation | peak |",
             "|---:|---|" + "---:|" * (len(KINDS) + 3)]
    for p in plans:
        who = ", ".join(map(str, p.clients)) if len(p.clients) <= 8 else f"{len(p.clients)} clients"
        lines.append(f"| {p.k} | {who} | " + " | ".join(gib(p.peak[kind]) for kind in KINDS)
                     + f" | {gib(p.training)} | {gib(p.evaluating)} | {gib(p.total)} |")
    L, N = cfg.data.max_length, cfg.eval.max_new_tokens
    shapes = {"test loss": f"the test loss's forward of {L} tokens",
              "generation": f"greedy generation of {N} tokens after {L} (its key/value cache)",
              "MMLU": "MMLU's prompts of up to {} tokens"}
    if "MMLU" in plans[0].passes:
        from .eval.mmlu import run_prompt_limit
        from .moe.model import load_model_config

        shapes["MMLU"] = shapes["MMLU"].format(run_prompt_limit(load_model_config(cfg.model.name), L))
    if "choice" in plans[0].passes:
        shape = choice_shape(cfg)
        shapes["choice"] = (f"the scoring of {shape.options} options of up to {shape.longest} tokens after prompts of "
                            f"up to {max(1, L - shape.least)} (a batch of (prompt, option) rows at a time)")
    passes = [shapes[name] for name in plans[0].passes]
    largest = {p.largest_pass for p in plans}
    lines.append(f"training: the columns before it summed; evaluation: weights, adapters and the largest of "
                 f"{', '.join(passes)}, at eval.batch_size {cfg.eval.batch_size}, without gradients"
                 + (f" (the largest: {', '.join(sorted(largest))})" if len(passes) > 1 else "") + "; peak: the larger")
    if available is None and what:
        lines.append(what)
    if available is not None:
        worst = max(p.total for p in plans)
        verdict = "fits" if worst <= available else "does NOT fit"
        lines.append(f"{what}: {gib(available)}; the largest level's peak {gib(worst)} {verdict}")
        if worst > available:
            tried = remedies(cfg, plans, available)
            if tried:
                lines.append("planned again with each change on top of the ones above it:")
                lines += [f"  {' '.join(step)}: {gib(peak)}" + (" fits" if peak <= available else "")
                          for step, peak in tried]
            if not tried or tried[-1][1] > available:
                lines.append("other keys that shrink it: " + "; ".join(HINTS))
    return "\n".join(lines)


# a planned peak above this share of the free memory is reported as tight (check_fits)
TIGHT = 0.9


def check_fits(cfg, log=print) -> None:
    """Before an in-process or simulated run on a GPU (where running out of memory ends a run mid-round):
    refuse a config whose largest level's planned peak exceeds the GPU's free memory (a simulated client's
    share of it, ``federation.simulation.client_gpus``), with the plan and the keys that shrink it. On the CPU
    nothing is checked (the system swaps before it fails; `fedmoe plan` shows the figures)."""
    from .config import ConfigError
    from .moe.model import resolve_device

    if resolve_device(cfg.model.device).type != "cuda" or cfg.federation.runtime == "flower":
        return  # (a deployment's clients train on their own machines)
    if cfg.federation.runtime == "flower-sim" and cfg.federation.simulation.gpu_share(True) == 0:
        return  # the simulated clients train on the CPU
    what, available = client_memory(cfg)
    if available is None:
        return  # no such device here: loading the model says so
    plans = memory_plan(cfg)
    if not fits(plans, available):
        raise ConfigError(format_plan(cfg, plans, what, available))
    peak = max(p.total for p in plans)
    line = f"memory plan: peak {peak / 2**30:.2f} GiB of {available / 2**30:.2f} GiB ({what})"
    if peak > TIGHT * available:  # the allocator's cache and fragmentation are not in the plan
        line += (f"; tight (over {TIGHT:.0%}): the allocator's cache is not counted"
                 + ("" if cfg.train.checkpoints_every_layer else
                    ", and train.activation_checkpointing=true would leave more room without changing a number"))
    log(line)


__all__ = ["KINDS", "LevelPlan", "check_fits", "client_memory", "device_memory", "evaluation_bytes", "fits", "format_plan",
           "level_plan", "memory_plan", "remedies", "training_step_bytes"]
