"""Local training of one client for one round.

Knows nothing about methods: it trains whatever tensors of the model require grad, on the
client's tokenised examples, with whatever a method's :class:`~fedmoe.algorithms.base.Objective`
adds (loss terms, a gradient correction), and reports loss, steps and the expert activation counts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from typing import TYPE_CHECKING

from .data.tokenize import collate_sft
from .moe import MoEModel
from .moe.loss import labelled_token_loss

if TYPE_CHECKING:
    from .algorithms.base import Objective
    from .config import TrainConfig


@dataclass
class LocalResult:
    # mean training loss over this round's optimizer steps: the language-model loss (the mean over the labelled
    # tokens), without the aux loss or the method's terms added to what is minimised (FedProx's proximal term...)
    loss: float
    steps: int
    tokens: int  # non-padding tokens processed
    activation_counts: torch.Tensor  # (L, E) tokens routed to each expert
    tokens_per_layer: torch.Tensor  # (L,)
    n_train: int  # the client's training examples
    lr: float  # the learning rate of this round
    # the mean over this round's steps of each trainable's gradient of the local loss (before any
    # correction and clipping); only when the objective asks for it (a method's gradient estimate)
    mean_gradient: dict[str, torch.Tensor] | None = None


@dataclass
class Parallel:
    """The ranks that train one client together (``fedmoe worker --nproc N``): data parallel, as DDP
    does it. Every rank holds the same model and draws the same batches; each runs its contiguous share
    of every micro-batch, and before each optimizer step the gradients (and the step's loss) are summed
    over the ranks in one all-reduce. The loss is normalised by the whole step's labelled tokens, so the
    summed gradient is the one-rank gradient up to float rounding. Only the aux loss (a function of a
    batch's routing, not a sum over tokens) is each rank's own, averaged over the ranks. What training draws at
    random for its rows (LoRA dropout, Phi-3.5-MoE's jitter) each rank draws from its own stream (:func:`rank_seed`):
    such a run is another draw of the same training, not the one-rank numbers."""

    rank: int
    world: int
    group: object = None  # the torch.distributed process group (None: the default one)

    def share(self, indices: list[int]) -> list[int]:
        n = len(indices)
        return indices[n * self.rank // self.world : n * (self.rank + 1) // self.world]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def sync_step(self, params: dict[str, torch.nn.Parameter], step_loss: float) -> float:
        """Sum every trainable's gradient over the ranks (a tensor no rank has a gradient for keeps none,
        as on one rank) and return the step's loss summed over the ranks."""
        ps = list(params.values())
        flat = torch.cat([torch.zeros(p.numel(), dtype=torch.float32, device=p.device) if p.grad is None
                          else p.grad.detach().reshape(-1).float() for p in ps]
                         + [torch.tensor([float(p.grad is not None) for p in ps] + [step_loss], device=ps[0].device)])
        self.all_reduce(flat)
        offset = 0
        for i, p in enumerate(ps):
            n = p.numel()
            has = flat[flat.numel() - len(ps) - 1 + i] > 0
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone() if has else None
            offset += n
        return float(flat[-1])


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's own random draws in training (dropout, Phi-3.5-MoE's jitter): rank 0 (and one rank
    alone) the client's ``seed``, every other rank one of its own, so that no two ranks draw the same numbers for
    their different rows. The batches every rank takes come from a generator seeded alike on all of them."""
    if rank == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def round_lr(cfg: TrainConfig, round_idx: int, total_rounds: int) -> float:
    """The learning rate of a round (1-based). ``cosine`` decays from lr toward min_lr across rounds
    (a schedule over the federation, not within a client's local steps), as transformers' cosine schedule over
    ``total_rounds`` steps: round r at progress (r − 1) / total_rounds, so that the last round still trains (it
    reached min_lr, 0 by default, at the last round: a round of compute that changed nothing, and SCAFFOLD's
    option II divided by its lr); ``constant`` keeps lr."""
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (round_idx - 1) / total_rounds
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def steps_for(cfg: TrainConfig, n_train: int) -> int:
    """``train.max_steps``, or the steps of ``train.epochs`` passes over ``n_train`` examples: a pass is
    ⌈n / (batch × accumulation)⌉ steps (its last one short, :func:`_steps`), a fraction of a pass that fraction of
    its examples, in whole steps."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    size = cfg.batch_size * cfg.grad_accum
    whole = math.floor(cfg.epochs)
    return max(1, whole * math.ceil(n_train / size) + math.ceil((cfg.epochs - whole) * n_train / size))


GROUP_MEGABATCH = 50  # train.group_by_length: batches are formed within chunks of this many batches' examples


def _steps(n: int, batch_size: int, grad_accum: int, generator: torch.Generator,
           lengths: Sequence[int] | None = None):
    """Endless seeded shuffled steps, each a list of index micro-batches: a new permutation each pass over the
    data, cut into steps of ``batch_size`` × ``grad_accum`` examples (the last of a pass shorter where they do not
    divide it: a pass, and ``train.epochs``, trains every example once), each step cut into micro-batches of
    ``batch_size``. So a step holds the same examples however its batch is split into micro-batches: halving
    ``train.batch_size`` and doubling ``train.grad_accum`` changes only the float rounding of the step's token mean
    (and, where ``train.aux_loss`` is on, the load-balancing loss, a function of each micro-batch's routing).

    ``lengths`` (``train.group_by_length``): each pass's permutation is cut into chunks of ``GROUP_MEGABATCH``
    steps, each chunk sorted by length (longest first, ties in shuffled order) and cut into steps, so a step (and
    its micro-batches) holds examples of similar length and pads little (as transformers' ``LengthGroupedSampler``
    does for batches); then the pass's steps are shuffled, so a round of ``max_steps`` shorter than a pass trains
    on steps drawn from every length alike, not on the longest examples of a chunk first."""
    size = batch_size * grad_accum
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        if lengths is None:
            steps = [perm[i : i + size] for i in range(0, n, size)]
        else:
            chunk = GROUP_MEGABATCH * size
            grouped = [i for c in range(0, n, chunk) for i in sorted(perm[c : c + chunk], key=lambda j: -lengths[j])]
            cut = [grouped[i : i + size] for i in range(0, n, size)]
            steps = [cut[b] for b in torch.randperm(len(cut), generator=generator).tolist()]
        for step in steps:
            yield [step[i : i + batch_size] for i in range(0, len(step), batch_size)]


def _rows(batch: dict, parallel: Parallel) -> dict | None:
    """A rank's contiguous share of a collated batch's rows, trimmed to its own longest row (None: none)."""
    rows = parallel.share(list(range(batch["input_ids"].shape[0])))
    if not rows:
        return None
    part = {k: v[rows[0] : rows[-1] + 1] for k, v in batch.items()}
    width = int(part["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in part.items()}


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")


@contextmanager
def activation_checkpointing(model, setting: bool | int) -> Iterator[None]:
    """``train.activation_checkpointing`` on the Hugging Face model while the block runs (true: every
    decoder layer; n: every n-th): each checkpointed layer keeps only its input and is run again in the
    backward (torch's non-reentrant checkpoint, RNG state restored: dropout draws the same mask). The
    recomputed MoE layers route the same rows as the forward did (the activation tracker keeps the
    forward's attention mask until the next forward) and count nothing twice (counting is on only inside
    the forward's ``tracking``)."""
    if not setting:
        yield
        return
    every = 1 if setting is True else int(setting)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                          every_n_layers=every)
    # transformers also hooks the input embeddings to make their output require grad (which the reentrant
    # checkpoint needs, not this one) and its disable does not remove the hook: one more per round, and
    # the gradient through layer 0's input computed for nothing. Removed at once.
    model.disable_input_require_grads()
    try:
        yield
    finally:
        model.activation_checkpointing_disable()


def _under_activation_checkpointing(train):
    """``train(mm, examples, cfg, ...)`` run under ``cfg.activation_checkpointing`` on ``mm.model``."""
    @functools.wraps(train)
    def run(mm, examples, cfg, *args, **kwargs):
        with activation_checkpointing(mm.model, cfg.activation_checkpointing):
            return train(mm, examples, cfg, *args, **kwargs)
    return run


def make_optimizer(cfg: TrainConfig, params: dict[str, torch.nn.Parameter], lr: float,
                   options: dict[str, dict] | None = None) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainables: one parameter group for the plain ones and one per
    distinct option (``{"lr_scale": x, "weight_decay": y}`` for a name, e.g. a scalar with its own lr)."""
    options = options or {}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"parameter options for tensors the model does not train: {unknown[:3]}")
    groups: dict[tuple[float, float], list] = {}
    for n, p in params.items():
        o = options.get(n, {})
        key = (float(o.get("lr_scale", 1.0)), float(o.get("weight_decay", cfg.weight_decay)))
        groups.setdefault(key, []).append(p)
    spec = [{"params": ps, "lr": lr * scale, "weight_decay": wd} for (scale, wd), ps in groups.items()]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(spec, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(spec, lr=lr)


@_under_activation_checkpointing
def train_local(
    mm: MoEModel,
    examples: Sequence[dict],
    cfg: TrainConfig,
    pad_id: int,
    lr: float,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
    objective: Objective | None = None,
    parallel: Parallel | None = None,
) -> LocalResult:
    """Train the model's trainable tensors on ``examples`` (dicts with input_ids and labels).

    ``seed`` fixes data order and dropout, so the same call gives the same result. ``objective``:
    each of its ``loss_terms(params)`` is added to every micro-batch's loss, its ``grad_correction``
    (a tensor per trainable) to the gradient before clipping and the optimizer step; its
    ``param_options`` give some trainables their own learning rate (a multiple of ``lr``) and weight
    decay; with ``mean_gradient`` the result carries the mean over the steps of the raw gradients.
    ``parallel``: this rank's share of the data-parallel ranks that train together (:class:`Parallel`);
    every rank returns the same result.
    """
    if len(examples) == 0:
        raise ValueError("a client with no training examples cannot train; check the partition")
    device = mm.device
    params = mm.trainable_parameters()
    if not params:
        raise ValueError("the model has no trainable tensors: the algorithm added no adapters")
    opt = make_optimizer(cfg, params, lr, None if objective is None else objective.param_options)
    terms = [] if objective is None else list(objective.loss_terms)
    grad_sum = None
    if objective is not None and objective.mean_gradient:
        grad_sum = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    correction = None
    if objective is not None and objective.grad_correction is not None:
        correction = {n: t.to(device) for n, t in objective.grad_correction.items()}
    model = mm.model
    aux_coef = cfg.aux_loss_coef if cfg.aux_loss_coef is not None else getattr(model.config, "router_aux_loss_coef", 0.0)
    bf16 = use_bf16(cfg, device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(rank_seed(seed, 0 if parallel is None else parallel.rank))  # dropout, jitter: the rank's own
    lengths = [len(ex["input_ids"]) for ex in examples] if cfg.group_by_length else None
    steps = _steps(len(examples), cfg.batch_size, cfg.grad_accum, gen, lengths)
    n_steps = steps_for(cfg, len(examples))

    mm.reset_activation_counts()
    model.train()
    losses: list[float] = []
    tokens = 0
    for step in range(n_steps):
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        # the step's micro-batches first: its loss is the mean over every labelled token of the step (each
        # token weighs the same, however the micro-batches split them), not a mean of micro-batch means,
        # which would weigh the tokens of a micro-batch with short answers up. The aux loss and the method's
        # terms are averaged over the micro-batches. With grad_accum = 1 both are the plain token mean.
        micro = [collate_sft([examples[i] for i in batch], pad_id) for batch in next(steps)]
        parts = len(micro)  # cfg.grad_accum, fewer in a pass's last step where the batches do not divide it
        labelled = max(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro), 1)
        if parallel is not None:  # this rank's rows of each micro-batch (the labelled count is the whole step's)
            micro = [_rows(b, parallel) for b in micro]
        ranks = 1 if parallel is None else parallel.world
        for batch in micro:
            if batch is None:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), mm.tracking(batch["attention_mask"]):
                loss_sum, _, aux = labelled_token_loss(model, batch["input_ids"], batch["attention_mask"],
                                                       batch["labels"], output_router_logits=cfg.aux_loss)
            loss = loss_sum / labelled  # this micro-batch's share of the step's token mean
            step_loss += loss.item()  # the reported loss: the language model's alone
            if aux is not None:
                loss = loss + aux_coef * aux.float() / (parts * ranks)
            for term in terms:  # once in the sum over the ranks
                loss = loss + term(params) / (parts * ranks)
            loss.backward()
            tokens += int(batch["attention_mask"].sum())
        if parallel is not None:
            step_loss = parallel.sync_step(params, step_loss)
        if grad_sum is not None:
            for n, p in params.items():
                if p.grad is not None:
                    grad_sum[n] += p.grad.to(torch.float64)
        if correction is not None:
            for n, corr in correction.items():
                if params[n].grad is not None:
                    params[n].grad.add_(corr)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
        opt.step()
        losses.append(step_loss)
        if progress is not None:
            progress(step + 1, step_loss)
    model.eval()
    counts, per_layer = mm.activation_counts()
    if parallel is not None:  # every rank's routed tokens and processed tokens, summed
        both = parallel.all_reduce(torch.cat([counts.reshape(-1), per_layer, torch.tensor([tokens])]).to(device))
        both = both.cpu()
        counts, per_layer = both[: counts.numel()].view_as(counts), both[counts.numel() : -1]
        tokens = int(both[-1])
    mean_gradient = None
    if grad_sum is not None:
        mean_gradient = {n: (g / n_steps).to(params[n].dtype).cpu() for n, g in grad_sum.items()}
    return LocalResult(loss=sum(losses) / len(losses), steps=n_steps, tokens=tokens,
                       activation_counts=counts, tokens_per_layer=per_layer, n_train=len(examples), lr=lr,
                       mean_gradient=mean_gradient)
