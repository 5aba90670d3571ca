"""The recipe of fedmoe's built-in pretrained MoE: a byte-level BPE tokenizer and a small
OLMoE-architecture model trained from scratch on general instruction text (not Dolly).

    fedmoe pretrain configs/pretrain-tiny-moe.yaml      # or: python -m fedmoe.pretrain CONFIG

Deterministic for a seed; checkpoints every ``checkpoint_every`` steps into ``work_dir`` and
continues from there when started again; at the end exports with ``save_pretrained`` (safetensors,
bf16) plus tokenizer files and a model card into ``export_dir``.
"""

from __future__ import annotations

from typing import Literal

import io
import json
import math
import os
import platform
import random
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from .configbase import ConfigError, StrictModel, check_device_name, format_errors as _format_errors
from .data.general import DEFAULT_CORPUS, corpus_split, pack
from .data.template import format_prompt
from .rundir import atomic_write_bytes, atomic_write_text

EOS, PAD = "<|endoftext|>", "<|padding|>"
TEMPLATE_MARKERS = ["### Instruction:", "### Input:", "### Response:"]
CARD_PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Explain what a computer is to a child.",
    "What are the symptoms of the flu?",
    "Write a short sentence about the ocean.",
]


class _Strict(StrictModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class TokenizerSpec(_Strict):
    vocab_size: int = Field(8192, ge=512)
    min_frequency: int = Field(2, ge=1)


class ModelSpec(_Strict):
    hidden_size: int = Field(256, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_experts: int = Field(16, ge=1)
    top_k: int = Field(4, ge=1)
    intermediate_size: int = Field(128, ge=1)
    max_position_embeddings: int = Field(1024, ge=1)
    router_aux_loss_coef: float = Field(0.1, ge=0)
    # per_layer: the load-balancing loss is computed in every MoE layer and averaged; global: Hugging
    # Face's, on the router outputs of all layers concatenated, which lets one layer leave an expert
    # unused as long as other layers use it (the first recipe shipped such a model)
    balance: Literal["per_layer", "global"] = "per_layer"

    @model_validator(mode="after")
    def _shapes(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"model.top_k = {self.top_k} routes each token to more experts than model.num_experts = "
                             f"{self.num_experts}: use top_k <= num_experts")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size = {self.hidden_size} does not split into model.num_heads = "
                             f"{self.num_heads} heads: use a hidden_size that num_heads divides")
        return self


class TrainSpec(_Strict):
    seq_len: int = Field(256, ge=16)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(1200, ge=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(200, ge=1)
    eval_blocks: int = Field(64, ge=1)  # held-out blocks used for the periodic and final evaluation
    checkpoint_every: int = Field(100, ge=1)
    threads: int | None = Field(1, ge=1)
    # fraction of each batch's blocks whose second half repeats the first half (a span of corpus text
    # seen twice): copying is a skill natural text of this size does not teach (see copy_test)
    repeat_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    # where to train: cpu, cuda, cuda:N or auto (cuda when there is one); bf16 = bf16 autocast on cuda.
    # Neither is part of the recipe's identity: a checkpoint resumes on another device.
    device: str = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"

    @field_validator("device")
    @classmethod
    def _a_device(cls, v):
        return check_device_name(v)


class PretrainConfig(_Strict):
    seed: int = 0
    name: str = "tiny-moe"
    corpus: list[str] = Field(default_factory=lambda: list(DEFAULT_CORPUS))  # shipped names or paths
    heldout_fraction: float = Field(0.02, gt=0, lt=0.5)
    work_dir: str = "runs/pretrain-tiny-moe"
    export_dir: str = "src/fedmoe/assets/models/tiny-moe"
    tokenizer: TokenizerSpec = TokenizerSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()


def load_pretrain_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    from .config import apply_overrides, read_config_file

    tree = read_config_file(path, missing="give the path of a pretraining YAML config (configs/pretrain-tiny-moe.yaml "
                                          "in fedmoe's source repository), or none for the built-in model's recipe"
                            ) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    if overrides:
        tree = apply_overrides(tree, overrides)
        source += " + --set " + " ".join(overrides)
    try:
        return PretrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, PretrainConfig)) from None


# ------------------------------------------------------------------------------ corpus
def load_corpus(cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts) of the recipe's corpus (``fedmoe.data.general.corpus_split``)."""
    return corpus_split(cfg.corpus, cfg.seed, cfg.heldout_fraction)


def train_tokenizer(texts: list[str], spec: TokenizerSpec):
    """Byte-level BPE; the Alpaca markers are added tokens so they always encode the same way."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size - len(TEMPLATE_MARKERS), min_frequency=spec.min_frequency,
                                  special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(TEMPLATE_MARKERS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False, model_max_length=1024)


def repeat_spans(batch: torch.Tensor, fraction: float) -> torch.Tensor:
    """The first ``round(fraction * rows)`` rows with their second half replaced by their first half
    (batches are drawn in a seeded random order, so which blocks repeat is random and reproducible)."""
    n = round(fraction * batch.shape[0])
    if n == 0:
        return batch
    half = batch.shape[1] // 2
    out = batch.clone()
    out[:n, half : 2 * half] = batch[:n, :half]
    return out


def copy_test(model, blocks: torch.Tensor, rows: int = 32) -> dict:
    """Mean loss on the first half of ``rows`` held-out blocks and on the same half repeated after it.

    A model that copies from its context (induction) predicts the repetition almost perfectly; one
    that cannot scores it like fresh text (the second recipe's model: 3.00 and 3.05).
    """
    x = repeat_spans(blocks[:rows], 1.0)
    half = x.shape[1] // 2
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
    return {"first": float(nll[:, : half - 1].mean()), "second": float(nll[:, half : 2 * half - 1].mean())}


def model_config(cfg: PretrainConfig, tokenizer):
    from transformers import OlmoeConfig

    m = cfg.model
    return OlmoeConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
        num_experts=m.num_experts, num_experts_per_tok=m.top_k, norm_topk_prob=False,
        max_position_embeddings=m.max_position_embeddings, router_aux_loss_coef=m.router_aux_loss_coef,
        output_router_logits=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )


def per_layer_balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch/OLMoE load-balancing loss in each MoE layer, averaged over layers: per layer
    E · Σ_e f_e · P_e with f_e the share of the layer's top-k slots given to expert e (per slot, as in
    Hugging Face) and P_e the mean router probability of e. Uniform routing gives k."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (tokens, E)
        E = probs.shape[-1]
        idx = probs.topk(top_k, dim=-1).indices
        f = torch.nn.functional.one_hot(idx, E).float().mean(dim=0)  # (k, E)
        losses.append(E * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, t: TrainSpec) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def heldout_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(blocks), batch_size):
        b = blocks[i : i + batch_size].to(device)
        out = model(input_ids=b, labels=b)
        k = b.shape[0] * (b.shape[1] - 1)
        total += out.loss.item() * k
        n += k
    model.train(was)
    return total / n


# ------------------------------------------------------------------------------ training
def _recipe(cfg: PretrainConfig) -> dict:
    """The settings a checkpoint depends on (not where it is written or how often; max_steps may grow
    to train on)."""
    d = cfg.model_dump()
    d.pop("work_dir"), d.pop("export_dir")
    for k in ("eval_every", "checkpoint_every", "threads", "max_steps", "device", "precision"):
        d["train"].pop(k)
    return d


def _check_same_recipe(saved: dict | None, now: dict, ck_path: Path) -> None:
    if saved is None or saved == now:
        return

    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    a, b = flat(saved), flat(now)
    diff = [f"{k}: checkpoint {a.get(k)!r}, config {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    raise ConfigError(f"{ck_path} was written by a different recipe ({'; '.join(diff)}). Resume with the "
                     f"config that wrote it, or set work_dir to a new folder (or delete {ck_path.parent}) "
                     f"to start again.")


TOKENIZER_RECIPE = "fedmoe-recipe.json"  # beside work_dir's tokenizer: the settings it was trained with


def _tokenizer_recipe(cfg: PretrainConfig) -> dict:
    """What the tokenizer depends on: the corpus and its split (seed, held-out fraction) and its own settings."""
    r = _recipe(cfg)
    return {k: r[k] for k in ("seed", "corpus", "heldout_fraction", "tokenizer")}


def _reusable_tokenizer(tok_dir: Path, cfg: PretrainConfig, checkpointed: bool) -> bool:
    """Whether work_dir's tokenizer is this recipe's: it names the recipe it was trained with (or, from before it
    did, a checkpoint of the same recipe stands beside it). A run stopped before its first checkpoint and started
    again with other settings trained on the old tokenizer, and its model card named the new vocabulary."""
    if not (tok_dir / "tokenizer.json").is_file():
        return False
    mark = tok_dir / TOKENIZER_RECIPE
    if not mark.is_file():
        return checkpointed
    try:
        return json.loads(mark.read_text()) == json.loads(json.dumps(_tokenizer_recipe(cfg)))
    except (ValueError, OSError):
        return False


EXPORT_MARK = ".fedmoe-pretrain"  # in an export folder: the token of the work_dir whose run wrote it


def _export_token(work: Path) -> str:
    """The token that marks the exports of the run in ``work`` (made at its first start, kept with its
    checkpoints): a resumed run replaces its own export, never another model."""
    path = work / "export_token"
    if not path.is_file():
        atomic_write_text(path, os.urandom(16).hex())
    return path.read_text().strip()


def check_export_dir(cfg: PretrainConfig, overwrite: bool) -> None:
    """Refuse, before any training, an ``export_dir`` that the export would overwrite: a file, or a folder
    that holds something not written by this work_dir's run (the shipped built-in model, another run's export,
    anything else), unless ``overwrite``."""
    out, token_file = Path(cfg.export_dir), Path(cfg.work_dir) / "export_token"
    token = token_file.read_text().strip() if token_file.is_file() else None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export_dir {out} is a file, not a folder: give --set export_dir=NEW_FOLDER")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    mark = out / EXPORT_MARK
    if token is not None and mark.is_file() and mark.read_text().strip() == token:
        return  # this run's own earlier export (it resumed)
    from .moe.model import BUILTIN_MODELS, builtin_model_path

    shipped = [f"builtin:{name}" for name in BUILTIN_MODELS
               if (path := builtin_model_path(f"builtin:{name}")) is not None and path.resolve() == out.resolve()]
    what = f"the shipped model {shipped[0]}" if shipped else "files this run did not write"
    raise ConfigError(f"export_dir {out} holds {what}: pretraining would replace them; give --set "
                      f"export_dir=NEW_FOLDER, or pass --overwrite to replace them")


def run_pretrain(cfg: PretrainConfig, show_progress: bool = True, log=print, overwrite: bool = False) -> dict:
    """Pretrain (resuming from ``work_dir``'s checkpoint) and export into ``export_dir``, which must be new,
    empty, or this run's own export unless ``overwrite`` (:func:`check_export_dir`, before any training)."""
    from transformers import AutoModelForCausalLM

    from .moe.model import resolve_device

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    if t.precision == "bf16" and device.type != "cuda":
        raise ConfigError(f"train.precision: bf16 autocast is for cuda, but train.device is {t.device!r} "
                          f"(resolved to {device}); use precision fp32 on cpu")
    work = Path(cfg.work_dir)
    check_export_dir(cfg, overwrite)
    work.mkdir(parents=True, exist_ok=True)
    token = _export_token(work)
    ck_path = work / "checkpoint.pt"
    # read (and a file that is not tensors and plain values refused) before any work is done
    from .rundir import load_tensor_file

    ck = load_tensor_file(ck_path, "pretraining checkpoint") if ck_path.is_file() else None
    if ck is not None:  # a checkpoint of another recipe is refused before the corpus is read
        _check_same_recipe(ck.get("recipe"), _recipe(cfg), ck_path)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    train_texts, held_texts = load_corpus(cfg)
    tok_dir = work / "tokenizer"
    if _reusable_tokenizer(tok_dir, cfg, ck is not None):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        if (tok_dir / "tokenizer.json").is_file():
            log(f"{tok_dir} holds a tokenizer trained with other settings (a run stopped before its first checkpoint): "
                "training it again for this recipe")
        tokenizer = train_tokenizer(train_texts, cfg.tokenizer)
        tokenizer.save_pretrained(str(tok_dir))
        atomic_write_text(tok_dir / TOKENIZER_RECIPE, json.dumps(_tokenizer_recipe(cfg), indent=1))
    train_blocks = pack(tokenizer, train_texts, t.seq_len)
    held_blocks = pack(tokenizer, held_texts, t.seq_len)
    if len(train_blocks) < t.batch_size:
        raise ConfigError(f"train.batch_size = {t.batch_size} is more than the {len(train_blocks)} blocks of "
                          f"train.seq_len = {t.seq_len} tokens the corpus makes: use a batch of at most "
                          f"{len(train_blocks)}, shorter blocks, or a larger corpus")
    log(f"corpus: {len(train_texts)} train / {len(held_texts)} held-out examples; "
        f"{train_blocks.numel():,} train tokens in {len(train_blocks)} blocks, {len(held_blocks)} held-out blocks")

    config = model_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95))

    step, history, wall_before = 0, [], 0.0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, history, wall_before = ck["step"], ck["history"], ck["wall_s"]
        torch.set_rng_state(ck["torch_rng"])
        log(f"resuming from {ck_path} at step {step}")

    def batch_indices(s: int) -> torch.Tensor:
        # epoch-wise seeded permutation: the batch of step s depends only on (seed, s)
        per_epoch = len(train_blocks) // t.batch_size
        epoch, pos = divmod(s, per_epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(len(train_blocks), generator=g)
        return perm[pos * t.batch_size : (pos + 1) * t.batch_size]

    eval_blocks = held_blocks[: t.eval_blocks]
    t0 = time.time()
    model.train()
    progress = None
    if show_progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        progress = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), TimeRemainingColumn())
        progress.start()
        task = progress.add_task("pretrain", total=t.max_steps, completed=step, info="")
    try:
        while step < t.max_steps:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, t)
            b = repeat_spans(train_blocks[batch_indices(step)], t.repeat_fraction).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=t.precision == "bf16"):
                out = model(input_ids=b, labels=b, output_router_logits=True)
                loss, aux = out.loss, out.aux_loss
                if cfg.model.balance == "per_layer":  # swap HF's global balance term for the per-layer one
                    aux = per_layer_balance_loss(out.router_logits, cfg.model.top_k)
                    loss = out.loss - cfg.model.router_aux_loss_coef * out.aux_loss + cfg.model.router_aux_loss_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            step += 1
            rec = {"step": step, "loss": loss.item(), "aux": aux.item(), "lr": lr_at(step - 1, t)}
            if step % t.eval_every == 0 or step == t.max_steps:
                rec["heldout_loss"] = heldout_loss(model, eval_blocks)
                log(f"step {step}: train {rec['loss']:.3f}, held-out {rec['heldout_loss']:.3f}")
            history.append(rec)
            if progress is not None:
                progress.update(task, completed=step, info=f"loss {rec['loss']:.3f}")
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "recipe": _recipe(cfg),
                            "history": history, "wall_s": wall_before + time.time() - t0,
                            "torch_rng": torch.get_rng_state()}, buf)
                atomic_write_bytes(ck_path, buf.getvalue())
    finally:
        if progress is not None:
            progress.stop()
    wall = wall_before + time.time() - t0
    tokens_seen = step * t.batch_size * t.seq_len
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, cpu" if device.type != "cuda" else
               f"cuda {torch.cuda.get_device_name(device)} ({t.precision})")
    model.to("cpu")
    return export(cfg, model, tokenizer, held_blocks, history, n_params, tokens_seen, wall, log, machine, token)


# ------------------------------------------------------------------------------ export + card
def activation_table(model, blocks: torch.Tensor) -> list[list[float]]:
    """Per layer, the fraction of held-out tokens routed to each expert (a token counts once per
    expert it reaches, so a row sums to k)."""
    from .moe import MoEModel

    mm = MoEModel(model)
    mm.reset_activation_counts()
    with torch.inference_mode(), mm.tracking(None):
        for i in range(0, len(blocks), 16):
            model(input_ids=blocks[i : i + 16])
    counts, tokens = mm.activation_counts()
    return (counts.double() / tokens.double()[:, None]).tolist()


def _continuations(model, tokenizer, max_new_tokens: int = 48) -> list[tuple[str, str]]:
    from .data.sources import Example
    from .eval import greedy_generate

    prompts = [tokenizer(format_prompt(Example(p, "", "", "", "card")), add_special_tokens=False)["input_ids"]
               for p in CARD_PROMPTS]
    gen = greedy_generate(model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, max_new_tokens, 8, "cpu")
    return list(zip(CARD_PROMPTS, tokenizer.batch_decode(gen, skip_special_tokens=True)))


def fixed_batch(held_blocks: torch.Tensor) -> torch.Tensor:
    """The small fixed batch whose loss the model card records (and a test re-checks)."""
    return held_blocks[:4, :128]


def export(cfg, model, tokenizer, held_blocks, history, n_params, tokens_seen, wall, log, machine: str,
           token: str | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    from .rundir import ordinary_permissions

    out = Path(cfg.export_dir)
    out.mkdir(parents=True, exist_ok=True)
    if token is not None:
        atomic_write_text(out / EXPORT_MARK, token)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    ordinary_permissions(out.glob("*.safetensors"))  # safetensors writes 0600; the tokenizer's files are 0644
    # every number below is measured on the exported (bf16) weights loaded back in fp32
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    model.eval()
    held = heldout_loss(model, held_blocks)
    fixed = heldout_loss(model, fixed_batch(held_blocks))
    freqs = activation_table(model, held_blocks)
    samples = _continuations(model, tokenizer)
    copy = copy_test(model, held_blocks)
    k = cfg.model.top_k
    share = [[f / k for f in row] for row in freqs]  # share of routed assignments
    stats = {
        "name": cfg.name, "params": n_params, "steps": len(history), "tokens_seen": tokens_seen,
        "wall_s": round(wall, 1), "machine": machine,
        "date": date.today().isoformat(), "heldout_loss": held, "heldout_perplexity": math.exp(held),
        "heldout_tokens": int(held_blocks.numel()), "fixed_batch_loss": fixed,
        "final_train_loss": history[-1]["loss"] if history else None,
        "expert_token_fraction": freqs, "min_share": min(min(r) for r in share), "max_share": max(max(r) for r in share),
        "min_token_fraction": min(min(r) for r in freqs), "max_token_fraction": max(max(r) for r in freqs),
        "samples": samples, "seed": cfg.seed, "copy_test": copy,
    }
    atomic_write_text(out / "pretrain_stats.json", json.dumps(stats, indent=1))
    atomic_write_text(out / "README.md", model_card(cfg, stats, history))
    log(f"exported to {out}: held-out loss {held:.4f} (ppl {math.exp(held):.1f})")
    return stats


def model_card(cfg: PretrainConfig, s: dict, history: list[dict]) -> str:
    m, t = cfg.model, cfg.train
    lines = [
        f"# {cfg.name}: fedmoe's built-in pretrained MoE", "",
        "A small **OLMoE-architecture** Mixture-of-Experts causal LM trained from scratch by fedmoe's own",
        "recipe, so that federated fine-tuning in fedmoe starts from a model that already writes English.",
        "It is a research toy (~{:.1f}M parameters), not a useful assistant.".format(s["params"] / 1e6), "",
        "## Recipe", "",
        "```bash", "fedmoe pretrain configs/pretrain-tiny-moe.yaml --overwrite   # replaces this folder", "```", "",
        f"* architecture: `OlmoeForCausalLM`, {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, "
        f"{m.num_experts} experts of intermediate size {m.intermediate_size}, top-{m.top_k}, `norm_topk_prob=false` "
        f"(like OLMoE), load-balancing loss coefficient {m.router_aux_loss_coef} "
        f"({'in every layer, averaged' if m.balance == 'per_layer' else 'over all layers at once'})",
        f"* tokenizer: byte-level BPE trained on the training split, vocabulary {cfg.tokenizer.vocab_size} "
        f"(eos `{EOS}`, pad `{PAD}`; the Alpaca markers {', '.join('`' + x + '`' for x in TEMPLATE_MARKERS)} are single tokens)",
        "* data: Alpaca subsets, an Alpaca-GPT4 sample, AlpaGasus Claude-filtered and helpfulness sets, MedAlpaca",
        "  Wikidoc patient information (`src/fedmoe/assets/data/pretrain/SOURCE.md`); **no Dolly**. Each example is",
        f"  the Alpaca prompt + response + eos, packed into {t.seq_len}-token blocks; "
        f"{cfg.heldout_fraction:.0%} of the examples are held out.",
        f"* training: {s['steps']} steps × {t.batch_size} blocks × {t.seq_len} tokens = {s['tokens_seen']:,} tokens seen; "
        f"AdamW (β=0.9, 0.95, weight decay {t.weight_decay}), lr {t.lr} with {t.warmup_steps} warm-up steps and cosine "
        f"decay to {t.min_lr}, gradient clipping {t.grad_clip}, seed {cfg.seed}",
        (f"* copy curriculum: in every batch {t.repeat_fraction:.0%} of the blocks repeat their first half as their second "
         f"half (a span of corpus text seen twice), so that the model learns to copy from its context"
         if t.repeat_fraction else "* no copy curriculum (`train.repeat_fraction` 0)"),
        f"* wall time: {s['wall_s'] / 60:.1f} min on {s['machine']} ({s['date']})",
        "* weights stored in bf16 (safetensors); load with `AutoModelForCausalLM.from_pretrained(path)`.", "",
        "## Held-out evaluation (exported weights, fp32)", "",
        f"* loss {s['heldout_loss']:.4f}, perplexity {s['heldout_perplexity']:.2f}, over {s['heldout_tokens']:,} held-out tokens",
        f"* loss on the fixed test batch (first 4 held-out blocks, 128 tokens): {s['fixed_batch_loss']:.6f}",
        f"* copy test (`fedmoe.pretrain.copy_test`: the first 32 held-out blocks with their first half repeated as their "
        f"second half): loss {s['copy_test']['first']:.3f} on the first half, {s['copy_test']['second']:.3f} on its repetition", "",
        "## Expert activation (held-out text)", "",
        f"Percentage of held-out tokens that each layer routes to each expert (a token reaches {m.top_k} experts, "
        f"so uniform routing gives {100 * m.top_k / m.num_experts:.1f}%). Lowest {100 * s['min_token_fraction']:.2f}%, "
        f"highest {100 * s['max_token_fraction']:.2f}% (as a share of routed assignments: "
        f"{100 * s['min_share']:.2f}% to {100 * s['max_share']:.2f}%, uniform {100 / m.num_experts:.2f}%).", "",
        "| layer | " + " | ".join(f"e{j}" for j in range(m.num_experts)) + " |",
        "|---|" + "---:|" * m.num_experts,
    ]
    for i, row in enumerate(s["expert_token_fraction"]):
        lines.append(f"| {i} | " + " | ".join(f"{100 * f:.1f}" for f in row) + " |")
    lines += ["", "## Greedy continuations of five fixed prompts", ""]
    for prompt, answer in s["samples"]:
        lines += [f"**{prompt}**", "", "> " + answer.strip().replace("\n", "\n> "), ""]
    curve = [h for h in history if "heldout_loss" in h]
    if curve:
        lines += ["## Learning curve", "", "| step | train loss | held-out loss |", "|---:|---:|---:|"]
        lines += [f"| {h['step']} | {h['loss']:.3f} | {h['heldout_loss']:.3f} |" for h in curve]
    lines += ["", "## Licenses", "",
              "Trained on CC BY-NC 4.0 (Alpaca family) and CC BY-SA 3.0 (Wikidoc) data: non-commercial research use."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="fedmoe pretrain", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args(argv)
    run_pretrain(load_pretrain_config(a.config, a.set))


if __name__ == "__main__":
    main()
