"""Run configuration: one validated tree, loaded from YAML, overridable with ``key=value``.

Every field has a default, so ``fedmoe run`` with no file is the built-in default run.
Unknown keys and bad values raise :class:`ConfigError` naming the key (and the file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A user-fixable problem in a run configuration."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    # "builtin:tiny-olmoe", a Hugging Face hub id, or a local folder with config.json.
    name: str = "builtin:tiny-moe"
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto = cuda if available else cpu
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"


class LoRAConfig(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # None = the architecture's default (q, k, v, o; DeepSeek-V3: q, kv_b, o); [] = no attention LoRA
    attention_targets: list[str] | None = None
    # Per-expert LoRA on the fused routed experts (applied only to routed tokens).
    experts: bool = True
    expert_targets: list[Literal["gate_up_proj", "down_proj"]] = ["gate_up_proj", "down_proj"]
    # LoRA on this many randomly chosen experts per layer only (seeded, the same on every client):
    # 1 = the "MoE + X" baselines of FLEx. None = every expert.
    experts_per_layer: int | None = Field(None, ge=1)


class PartitionConfig(_Strict):
    scheme: Literal["iid", "dirichlet", "pathological", "source"] = "dirichlet"
    num_clients: int = Field(4, ge=1)
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration
    # pathological: explicit category per client (else the most frequent categories, in order)
    categories: list[str] | None = None


class DataConfig(_Strict):
    # "dolly" (shipped), or a path to a .json/.jsonl/.parquet file; a list mixes several sources
    # (the "source" partition gives one source per client).
    source: str | list[str] = "dolly"
    field_map: dict[str, str] = Field(default_factory=dict)  # our field -> field in the file
    on_bad_row: Literal["error", "skip"] = "error"
    categories: list[str] | None = None  # keep only these categories
    max_examples: int | None = Field(None, ge=1)  # random subsample (seeded) of the whole source
    max_length: int = Field(256, ge=8)
    partition: PartitionConfig = PartitionConfig()
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # per-client train / val / test
    max_train_per_client: int | None = Field(None, ge=1)
    # The default run evaluates on 100 test examples per client so that it finishes in minutes on a
    # 2-core CPU; set null for the full test sets.
    max_test_per_client: int | None = Field(100, ge=1)

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v):
        if abs(sum(v) - 1.0) > 1e-6 or min(v) < 0:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(v)}")
        return v


class TrainConfig(_Strict):
    lr: float = Field(2e-3, gt=0)
    min_lr: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays across rounds (FLEx)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(40, ge=1)  # optimizer steps per round; None = use epochs
    epochs: float = Field(1.0, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    aux_loss: bool = False  # add the model's MoE load-balancing loss
    aux_loss_coef: float | None = Field(None, ge=0)  # None = the model config's router_aux_loss_coef
    proximal_mu: float = Field(0.0, ge=0)  # FedProx: mu/2 * ||theta - theta_global||^2
    bf16: Literal["auto", "on", "off"] = "auto"  # autocast on CUDA when auto


class ServerOptimizerConfig(_Strict):
    name: Literal["none", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = "none"
    lr: float = Field(1.0, gt=0)  # server learning rate eta
    momentum: float = Field(0.9, ge=0, lt=1)  # FedAvgM
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # adaptivity


class BudgetConfig(_Strict):
    """Client compute budgets β1..βB (FLAME Table 1). Level b gives a client k_i = top_k[b] activated
    experts (FLAME) or LoRA rank ranks[b] (rank-compression baselines)."""

    top_k: list[int] | None = None  # None = k, k/2, k/4, k/8 of the model (>= 1), as in FLAME
    ranks: list[int] | None = None  # None = lora.rank x (1, 0.6, 0.4, 0.3), rounded up: 20 -> 20, 12, 8, 6
    assign: Literal["uniform", "map", "distribution"] = "uniform"  # uniform: client i gets level i mod B
    map: list[int] | None = None  # assign=map: level index per client
    probs: list[float] | None = None  # assign=distribution: probability of each level (seeded draw)


class HetLoRAConfig(_Strict):
    """HetLoRA's optional local rank self-pruning (Cho et al. 2024, §3.2; SPEC.md §2). Off when
    prune_lambda = 0. A client adds λ·Σ‖B[:, ⌊γr⌋:r] A[⌊γr⌋:r, :]‖_F (its trailing components) to its
    loss; when that tail norm is smaller after a round than after the client's previous round, the
    client drops the tail: r ← max(1, ⌊γr⌋)."""

    prune_lambda: float = Field(0.0, ge=0)
    prune_gamma: float = Field(0.9, gt=0, lt=1)


class FlexConfig(_Strict):
    """FLEx grafting options (SPEC.md §3)."""

    calibration_size: int = Field(64, ge=1)  # calibration sequences per client
    calibration: Literal["client", "general"] = "client"  # general = the built-in pretraining held-out text
    num_grafts: int = Field(1, ge=1)  # grafted experts per layer (greedy)
    gate: Literal["sigmoid", "none"] = "sigmoid"
    train_full: bool = False  # train the grafted expert in full instead of LoRA on it
    graft_rank: int | None = Field(None, ge=1)  # LoRA rank on the grafted expert (None = lora.rank)


class AlgorithmConfig(_Strict):
    name: Literal["fedit", "flame", "trivial", "hetlora", "flexlora", "flex", "scaffold"] = "fedit"
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    # Per-client number of activated experts k_i (None = the model's k for every client; FLAME
    # derives it from the budgets).
    client_top_k: list[int] | None = None
    budgets: BudgetConfig = BudgetConfig()
    temperature: float = Field(2.0, ge=0)  # FLAME activation-aware aggregation: γ = (a/S)^t · n
    rescaler: Literal["learned", "static", "none"] = "learned"  # FLAME's s_i
    rescaler_init: Literal["one", "ratio"] = "one"  # learned s_i starts at 1.0 or at k/k_i
    flex: FlexConfig = FlexConfig()
    hetlora: HetLoRAConfig = HetLoRAConfig()


class FederationConfig(_Strict):
    rounds: int = Field(3, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)  # clients sampled per round
    runtime: Literal["local"] = "local"


class EvalConfig(_Strict):
    rouge: bool = True
    max_new_tokens: int = Field(32, ge=1)
    # Greedy decoding that never repeats an n-gram of this size (Hugging Face's no_repeat_ngram_size).
    # 3 by default: small models otherwise loop ("8, 8, 8, 8, ...") and the loops, not the content,
    # decide ROUGE-L. 0 = plain greedy, the papers' protocol (the paper-layout configs set it).
    no_repeat_ngram_size: int = Field(3, ge=0)
    batch_size: int = Field(8, ge=1)
    max_examples: int | None = Field(50, ge=1)  # per-client cap on generated test answers (null = all)
    every_round: bool = False  # ROUGE-L each round (loss is always evaluated each round)
    zero_shot: bool = True  # evaluate the initial model first (round 0), on the same test examples
    flops_seq_len: int = Field(128, ge=1)  # sequence length of the FLOPs/seq figure (FLAME uses 128)
    # knowledge retention: perplexity on this many blocks (data.max_length tokens) of held-out general
    # text (the built-in model's pretraining held-out split, not Dolly) at round 0 and at the end; 0 = off
    general_blocks: int = Field(0, ge=0)
    # MMLU 5-shot (shipped) at round 0 and at the end: a preset ("quick", "all") or a list of subjects
    mmlu: str | list[str] | None = None
    mmlu_max_per_subject: int | None = Field(None, ge=1)


class RunConfig(_Strict):
    name: str | None = None  # run directory name under output_dir (default: algorithm name)
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    lora: LoRAConfig = LoRAConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    federation: FederationConfig = FederationConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _client_top_k_matches_clients(self):
        ks = self.algorithm.client_top_k
        n = self.data.partition.num_clients
        if ks is not None and len(ks) != n:
            raise ValueError(
                f"algorithm.client_top_k has {len(ks)} entries but data.partition.num_clients is {n}; "
                "give one k per client"
            )
        return self

    def run_name(self) -> str:
        return self.name or self.algorithm.name


# ----------------------------------------------------------------------------------------------
# loading


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}': remove it or check its spelling")
        elif e["type"] == "value_error":  # our own checks: the message names the keys
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  - {msg}" if key == "<root>" else f"  - {key}: {msg} (got {e.get('input')!r})")
        else:
            lines.append(f"  - {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], parsed value); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r} (example: --set train.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(path)}: '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    tree: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, ...)")
        tree = loaded
    if overrides:
        tree = apply_overrides(tree, overrides)
        source += " + --set " + " ".join(overrides)
    return config_from_tree(tree, source)


def config_from_tree(tree: dict, source: str = "config") -> RunConfig:
    """Validate a config tree; errors name the key and ``source``."""
    if "sweep" in tree:
        raise ConfigError(f"{source}: has a 'sweep' section; run it with `fedmoe run` (which expands sweeps) "
                          "or remove the section")
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def config_to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
