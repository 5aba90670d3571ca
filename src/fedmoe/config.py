"""Run configuration: one validated tree, loaded from YAML, overridable with ``key=value``.

Every field has a default, so ``fedmoe run`` with no file is the built-in default run.
Unknown keys and bad values raise :class:`ConfigError` naming the key (and the file).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from .algorithms.budgets import BudgetConfig
from .algorithms.registry import INSTALLED, METHODS, unknown_method
from .algorithms.server_opt import ServerOptimizerConfig
from .algorithms.server_opt import unread as server_optimizer_unread
from .configbase import ConfigError, StrictModel, check_device_name, format_errors, load_yaml, yaml_problem

_Strict = StrictModel


class ModelConfig(_Strict):
    # "builtin:tiny-olmoe", a Hugging Face hub id, or a local folder with config.json.
    name: str = "builtin:tiny-moe"
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto = cuda if available else cpu
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"
    # route only the tokens the attention mask keeps through the experts (padding costs nothing;
    # real tokens' outputs are unchanged). false: every slot, padded or not (one host sync less per
    # forward, for torch.compile(fullgraph=True)).
    skip_padding: bool = True
    # the frozen base in 4 or 8 bits (fedmoe.moe.quant): the fused expert tensors and the decoder's
    # linears; LoRA on top in `dtype`. none | nf4 | fp4 | int8
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"

    @field_validator("device")
    @classmethod
    def _a_device(cls, value: str) -> str:
        return check_device_name(value)


class LoRAConfig(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # None = the architecture's default (q, k, v, o; DeepSeek-V3: q, kv_b, o); [] = no attention LoRA
    attention_targets: list[str] | None = None
    # Per-expert LoRA on the fused routed experts (applied only to routed tokens).
    experts: bool = True
    expert_targets: list[Literal["gate_up_proj", "down_proj"]] = ["gate_up_proj", "down_proj"]
    # fused: one pair on gate_up_proj (its A shared by gate and up) and one on down_proj; split: a pair
    # each for gate, up and down (PEFT on per-expert nn.Linear, the layout FLAME's Table 1 counts)
    expert_layout: Literal["fused", "split"] = "fused"
    # LoRA on each MoE layer's router weight (E, H), shared like attention LoRA (PEFT's "all-linear"
    # on pre-v5 checkpoints adapts the router mlp.gate too); no dropout on it
    router: bool = False
    # LoRA on this many randomly chosen experts per layer only (seeded, the same on every client):
    # 1 = the "MoE + X" baselines of FLEx. None = every expert.
    experts_per_layer: int | None = Field(None, ge=1)


class PartitionConfig(_Strict):
    scheme: Literal["iid", "dirichlet", "pathological", "shards", "source"] = "dirichlet"
    num_clients: int = Field(4, ge=1)
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration
    # dirichlet: "client", each client a category mixture p_i ~ Dir(alpha) and near-equal client sizes (FLAME,
    # FLEx); "category", each category split over the clients by q_c ~ Dir(alpha), client sizes vary too
    # (Hsu et al. 2019)
    dirichlet_mode: Literal["client", "category"] = "client"
    # pathological: explicit category per client (else the most frequent categories, in order)
    categories: list[str] | None = None
    # shards (McMahan et al. 2017): sorted by category, cut into num_clients x shards_per_client shards,
    # each client gets this many at random: 1-2 categories per client with 2
    shards_per_client: int = Field(2, ge=1)


class ConceptShiftConfig(_Strict):
    """Clients in groups see inputs from the same distribution, but every group other than group 0 maps
    a subset of the labels to other labels (a derangement of that subset, seeded): the same input has
    different right answers in different groups (a label task only)."""

    # the number of groups (clients dealt round-robin: client i is in group i mod G), or the group
    # sizes in client order (they sum to data.partition.num_clients)
    groups: int | list[int] = 2
    # the labels whose meaning differs between groups (None: num_labels of them, chosen by the seed)
    labels: list[str] | None = None
    num_labels: int = Field(2, ge=2)

    @field_validator("groups")
    @classmethod
    def _groups(cls, v):
        if isinstance(v, int) and v < 2:
            raise ValueError(f"concept shift needs at least 2 groups, got {v}")
        if isinstance(v, list) and (len(v) < 2 or min(v) < 1):
            raise ValueError(f"concept shift group sizes must be at least two sizes >= 1, got {v}")
        return v


class DataConfig(_Strict):
    # "dolly" (shipped), a path to a .json/.jsonl/.parquet file, a folder written by the datasets
    # library's save_to_disk (or of .parquet/.arrow files), or a Hugging Face hub dataset "hf:ORG/NAME"
    # (extra fedmoe[hf]); a list mixes several sources (the "source" partition gives one source per client).
    source: str | list[str] = "dolly"
    hf_split: str = "train"  # the split of a datasets folder or hub dataset
    revision: str | None = None  # a hub dataset's revision (a commit, tag or branch)
    field_map: dict[str, str] = Field(default_factory=dict)  # our field -> field in the file
    # one source's own entries on top of field_map, by the source as data.source lists it (sources whose files name
    # their fields differently: one hospital's "question" is another's "prompt")
    field_maps: dict[str, dict[str, str]] = Field(default_factory=dict)
    on_bad_row: Literal["error", "skip"] = "error"
    categories: list[str] | None = None  # keep only these categories
    max_examples: int | None = Field(None, ge=1)  # random subsample (seeded), after data.categories, before partitioning
    # drop every row whose instruction and input an earlier row has (its first occurrence kept, in source order),
    # before anything else: no test prompt then also sits in a training set (Dolly: 187 such rows, 26 of 1,500 test
    # prompts of a 4-client split in some client's training set). Off by default: the shipped results were measured
    # with every row
    dedupe: bool = False
    max_length: int = Field(256, ge=8)
    # a label task (data.field_map.label): its label set, fixed for the run. None: every label of the
    # data (after data.categories and data.max_examples), sorted, read when the run starts and written
    # into its config.yaml (required when clients bring their own data files)
    labels: list[str] | None = None
    # the instruction of a label task's prompt ({labels}, if present: the label set, comma-separated); the
    # example's text (its instruction and input, at most label_text_chars characters) is the prompt's input
    label_instruction: str = "Which of these labels fits the request below: {labels}? Answer with the label."
    label_text_chars: int | None = Field(600, ge=1)
    # examples held out before partitioning (stratified by category): a shared test set on which every
    # client's own model and the global model are evaluated at round 0 and at the end
    heldout: int = Field(0, ge=0)
    partition: PartitionConfig = PartitionConfig()
    concept_shift: ConceptShiftConfig | None = None
    # the centralised bound: every client trains on the union of all clients' training sets (run it
    # with one client per round, federation.fraction = 1/num_clients, and num_clients x the local steps)
    pool_train: bool = False
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # per-client train / val / test
    max_train_per_client: int | None = Field(None, ge=1)
    # The default run evaluates on 100 test examples per client so that it finishes in minutes on a
    # 2-core CPU; set null for the full test sets.
    max_test_per_client: int | None = Field(100, ge=1)
    # the validation examples per client whose loss eval.val_loss measures (the same cap as the test set's by default)
    max_val_per_client: int | None = Field(100, ge=1)

    @field_validator("label_instruction")
    @classmethod
    def _labels_placeholder_only(cls, v):
        # the instruction is str.format'ted with labels=...: any other field, an index or a stray brace would fail
        # (or read an attribute) when the data is prepared, mid-start
        import string

        try:
            bad = next((f"not {{{f}}}" for _, f, _, _ in string.Formatter().parse(v) if f not in (None, "labels")), "")
        except ValueError as e:
            bad = f"and a brace alone is none ({e})"
        if bad:
            raise ValueError(f"data.label_instruction = {v!r}: its one placeholder is {{labels}} (the label set), "
                             f"{bad}; write a literal brace as {{{{ or }}}}")
        return v

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v):
        if not all(math.isfinite(x) for x in v) or abs(sum(v) - 1.0) > 1e-6 or min(v) < 0:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _field_maps_name_sources(self):
        sources = [self.source] if isinstance(self.source, str) else list(self.source)
        for src, fm in self.field_maps.items():
            if src not in sources:  # it would apply to nothing
                raise ValueError(f"data.field_maps names {src!r}, which is not in data.source ({sources}): name a source "
                                 "exactly as data.source lists it")
            for kind in ("label", "options"):  # the task is the run's: a source may rename the field, not add it
                if (kind in fm) != (kind in self.field_map):
                    raise ValueError(f"data.field_maps[{src!r}] {'sets' if kind in fm else 'lacks'} {kind}, but "
                                     f"data.field_map {'lacks' if kind in fm else 'sets'} it: every source of a run is "
                                     f"the same task; give {kind} in data.field_map (and a source's own name for the "
                                     "field in data.field_maps)")
        return self

    @model_validator(mode="after")
    def _label_task_options(self):
        labelled = "label" in self.field_map
        if self.concept_shift is not None and not labelled:
            raise ValueError("data.concept_shift permutes labels: it needs a label task (data.field_map.label, e.g. "
                             "{label: category} on Dolly)")
        if self.labels is not None and not labelled:
            raise ValueError("data.labels is the label set of a label task: set data.field_map.label too, or remove "
                             "data.labels")
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise ValueError(f"data.labels must list at least two distinct labels, got {self.labels}")
        cs = self.concept_shift
        if cs is not None and isinstance(cs.groups, list) and sum(cs.groups) != self.partition.num_clients:
            raise ValueError(f"data.concept_shift.groups sizes {cs.groups} sum to {sum(cs.groups)}, but "
                             f"data.partition.num_clients is {self.partition.num_clients}")
        if cs is not None and isinstance(cs.groups, int) and cs.groups > self.partition.num_clients:
            raise ValueError(f"data.concept_shift.groups = {cs.groups} is more than the {self.partition.num_clients} "
                             "clients")
        return self


class TrainConfig(_Strict):
    lr: float = Field(2e-3, gt=0)
    min_lr: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays across rounds (FLEx)
    weight_decay: float = Field(0.0, ge=0)
    # the local optimizer: AdamW (the papers' choice), or plain SGD (with momentum) as SCAFFOLD's
    # option II control variates assume
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.0, ge=0, lt=1)  # SGD only
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(20, ge=1)  # optimizer steps per round; None = use epochs
    epochs: float = Field(1.0, gt=0)  # passes over the client's data per round, when max_steps is null
    grad_clip: float | None = Field(1.0, gt=0)
    aux_loss: bool = False  # add the model's MoE load-balancing loss
    aux_loss_coef: float | None = Field(None, ge=0)  # None = the model config's router_aux_loss_coef
    bf16: Literal["auto", "on", "off"] = "auto"  # autocast on CUDA when auto
    # batches of examples of similar length (less padding, as transformers' group_by_length): each pass's
    # shuffled order is sorted by length within chunks of 50 batches (fedmoe.train._batches)
    group_by_length: bool = False
    # activation (gradient) checkpointing: keep only each decoder layer's input in the forward and
    # recompute the layer in the backward (true: every layer; n: every n-th layer). Less activation
    # memory for about one more forward's compute; the numbers are the same (CPU: bit for bit)
    activation_checkpointing: bool | int = False

    @property
    def checkpoints_every_layer(self) -> bool:
        """Whether activation checkpointing is on at every decoder layer (true, or n = 1): the most it saves."""
        return self.activation_checkpointing is True or self.activation_checkpointing == 1

    @field_validator("activation_checkpointing")
    @classmethod
    def _every_n_layers(cls, v):
        if not isinstance(v, bool) and v < 1:
            raise ValueError(f"train.activation_checkpointing = {v}: use true (every decoder layer), false, or a "
                             "number n >= 1 (every n-th layer)")
        return v

    @field_validator("bf16", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        # YAML reads a bare on / off as a boolean: `bf16: on` and `--set train.bf16=on` mean "on"
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _no_value_that_would_be_ignored(self):
        # epochs other than the default while max_steps decides the round would be ignored without a word
        if self.max_steps is not None and self.epochs != 1.0:
            raise ValueError(f"train.epochs = {self.epochs:g}, but train.max_steps = {self.max_steps} decides how many "
                             "steps a round trains (epochs are used only without it): set train.max_steps: null to "
                             "train by epochs, or remove train.epochs")
        if self.schedule == "constant" and self.min_lr != 0:
            raise ValueError(f"train.min_lr = {self.min_lr:g} is the floor of schedule: cosine, but train.schedule is "
                             "constant (lr throughout): set train.schedule: cosine, or remove train.min_lr")
        return self

    @model_validator(mode="after")
    def _momentum_is_sgds(self):
        if self.optimizer != "sgd" and self.momentum != 0:
            raise ValueError(f"train.momentum = {self.momentum} applies to train.optimizer: sgd, but the optimizer is "
                             f"{self.optimizer!r} (AdamW has its own moments): remove train.momentum or use sgd")
        return self


def _algorithm_config():
    """The ``algorithm`` section: the method's name, the options several methods share, and one
    section per registered method (``algorithm.<name>``, defined beside the method's code)."""
    fields: dict[str, Any] = {
        "name": (Literal[tuple(METHODS)], "fedit"),
        # FedAvgM / FedAdam / FedYogi / FedAdagrad on the aggregated update (methods that allow one)
        "server_optimizer": (ServerOptimizerConfig, Field(default_factory=ServerOptimizerConfig)),
        # Per-client number of activated experts k_i (None = the model's k for every client; FLAME
        # derives it from the budgets).
        "client_top_k": (list[int] | None, None),
        "budgets": (BudgetConfig, Field(default_factory=BudgetConfig)),
    }
    for m in METHODS.values():
        if m.config is not None:
            fields[m.name] = (m.config, Field(default_factory=m.config))

    def known(cls, v):  # a name no method has: which are known, and how another package's method becomes one
        if isinstance(v, str) and v not in METHODS:
            raise ValueError(unknown_method(v))
        return v

    return create_model("AlgorithmConfig", __base__=StrictModel,
                        __validators__={"known": field_validator("name", mode="before")(known)}, **fields)


AlgorithmConfig = _algorithm_config()


class DPConfig(_Strict):
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018; ``federation.dp``): each
    client's update is clipped to L2 norm ``clip_norm`` C, the sum of the clipped updates gets
    Gaussian noise of std ``noise_multiplier``·C and is divided by the number of sampled clients m
    (uniform weights, a fixed denominator); (ε, δ) per round from an RDP accountant (dp-accounting)."""

    clip_norm: float = Field(gt=0)
    noise_multiplier: float | None = Field(None, ge=0)  # σ; 0 = clipping only, no privacy (ε = ∞)
    # instead of σ: the ε (at delta) the run may spend over federation.rounds rounds (local DP: each client);
    # σ is then the smallest that keeps ε at or below it, computed when the run starts and written into its
    # config.yaml (both given: σ must keep ε within the target)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)  # the δ at which ε is reported (take δ < 1/number of clients)
    # server: the server clips each update and noises their sum (central DP: it sees every raw update).
    # client: each client clips its own update and adds the noise N(0, σ²C²) itself before sending (local DP:
    # no raw update leaves a client; ε per client, over the updates it sent; the aggregation after that is
    # post-processing: the plain mean of the noised updates, or with reports: send the method's own)
    where: Literal["server", "client"] = "server"
    # where: client — the noise: drawn by the client from the operating system's cryptographic generator for each
    # release, no seed behind it, kept nowhere and never reused (secret), or from a generator seeded by the run's
    # seed (seeded: the numbers repeat, but whoever has the config can remove the noise: for simulations only)
    client_noise: Literal["secret", "seeded"] = "secret"
    # where: server — the noise the server adds to the sum, likewise: secret (the operating system's cryptographic
    # generator, every round's fresh) or seeded by the run's seed (the numbers repeat; every SuperNode gets the
    # config, so any of them could rebuild the noise and subtract it from the global model: simulations only)
    server_noise: Literal["secret", "seeded"] = "secret"
    # where: client — what else leaves a client. withhold: nothing its training data decides but the noised
    # update: its reply weighs 1 (n_train = 1, every client alike, as DP-FedAvg's estimator), the method's
    # own per-expert weights (FLAME's, from its activation counts) are applied on the client before the noise
    # and the counts stay there, and its training report (loss, steps, tokens, expert counts, the method's
    # metrics) and the size and categories of its training data are kept on the client. send: all of these
    # reach the server unnoised, as without DP (the method's own n-weighted aggregation; ε does not cover them)
    # (None: withhold under where: client; only where: client takes it)
    reports: Literal["withhold", "send"] | None = None

    @model_validator(mode="after")
    def _reports_only_local(self):
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("give federation.dp.noise_multiplier (σ, the noise std in units of clip_norm) or "
                             "federation.dp.target_epsilon (the ε to spend over federation.rounds rounds: σ is then "
                             "computed)")
        if self.where == "server" and self.reports is not None:
            raise ValueError("federation.dp.reports says what a client keeps to itself under local DP (where: "
                             "client); with where: server the server sees every raw update anyway: remove "
                             "federation.dp.reports or set federation.dp.where: client")
        if self.where == "client" and self.reports is None:
            self.__dict__["reports"] = "withhold"
        for key, side in (("client_noise", "client"), ("server_noise", "server")):  # the other side's: ignored
            if getattr(self, key) != "secret" and self.where != side:
                raise ValueError(f"federation.dp.{key} = {getattr(self, key)} is the noise of where: {side}, but "
                                 f"federation.dp.where is {self.where}: set federation.dp."
                                 f"{'server_noise' if side == 'client' else 'client_noise'} instead, or remove it")
        return self

    # C and σ beyond these are no DP setting anyone means (an update's L2 norm is far below 1e6; σ = 1e6
    # already reports ε ≈ 0) and overflow the noise (σ·C) or the accountant (σ² past ~1e154)
    @field_validator("clip_norm", "noise_multiplier", mode="wrap")
    @classmethod
    def _sane_dp_number(cls, v, handler, info):
        sane = {"clip_norm": "the L2 norm every client update is clipped to: give a finite number in (0, 1e6] "
                             "(typically 0.1 to 10, about the norm of one client's update)",
                "noise_multiplier": "σ, the noise std in units of clip_norm: give a finite number in [0, 1e6] "
                                    "(typically 0.5 to 5; 0 = clipping only, no privacy)"}[info.field_name]
        try:
            v = handler(v)
        except ValidationError as e:
            if all(x["type"] in ("finite_number", "greater_than", "greater_than_equal") for x in e.errors()):
                raise ValueError(sane) from None
            raise
        if v is not None and v > 1e6:
            raise ValueError(sane)
        return v


class RobustConfig(_Strict):
    """Byzantine-robust aggregation (``federation.robust``) for the methods whose aggregation is a weighted sum
    of client updates: each update's L2 norm bounded (``norm_bound``), then the method's own weighted mean
    (``rule: mean``) or, unweighted over the clients as Flower's FedMedian / FedTrimmedAvg / Krum, the
    coordinate-wise median, the coordinate-wise mean without the ``trim`` share of largest and smallest values,
    or (multi-)Krum."""

    rule: Literal["mean", "median", "trimmed_mean", "krum"] = "median"
    norm_bound: float | None = Field(None, gt=0)  # every update θ_i − θ scaled to at most this L2 norm
    trim: float = Field(0.2, ge=0, lt=0.5)  # trimmed_mean: the share cut from each end, per coordinate
    krum_malicious: int = Field(1, ge=0)  # krum: f, the clients assumed malicious (score: the n − f − 2 nearest)
    krum_keep: int = Field(0, ge=0)  # krum: 0 = the one best update (Krum); m > 0: the n-weighted mean of the m best

    def minimum_clients(self) -> int:
        """The fewest updates over which the rule bounds a poisoned one: the median 3, the trimmed mean the n with
        ⌊trim·n⌋ ≥ 1 (at least 3), Krum 2f + 3; the mean (a ``norm_bound`` alone) 1."""
        import math

        if self.rule == "median":
            return 3
        if self.rule == "trimmed_mean":
            return max(3, math.ceil(1 / self.trim - 1e-12)) if self.trim > 0 else 1
        if self.rule == "krum":
            return 2 * self.krum_malicious + 3
        return 1


class SecAggConfig(_Strict):
    """Secure aggregation with Flower's SecAgg+ (``federation.secagg``; Bell et al. 2020): on the Flower
    runtimes each client's update is quantised and masked, so the server learns only the weighted mean of
    the updates of the clients that took part, never one client's. Costs four extra message round trips per
    round and a quantisation error of about clipping_range / quantization_range per value."""

    clipping_range: float = Field(8.0, gt=0)  # a client refuses (drops out) when a weighted update value exceeds it
    quantization_range: int | None = Field(None, ge=2, le=2**30)  # None: the largest safe one for the client count
    share_fraction: float = Field(1.0, gt=0, le=1)  # the share of the clients each client shares its keys with
    threshold_fraction: float = Field(0.5, gt=0, le=1)  # the share of those shares needed to unmask a dropout


class SimulationConfig(_Strict):
    """What each simulated client reserves on Flower's simulation (``flower-sim``; Ray's ``client_resources``):
    Ray runs as many clients at once as fit the machine, each in a process that keeps the model."""

    # CPUs per client: clients at once = this machine's CPUs / client_cpus; also each client's torch threads
    # (Ray sets OMP_NUM_THREADS to it when the environment does not)
    client_cpus: int = Field(1, ge=1)
    # the share of a GPU per client: 1 = a GPU each, 0.5 = two clients (two models) per GPU, 0 = the clients train
    # on the CPU (Ray hides the GPUs from them); None = 1 when model.device is a GPU (auto on a machine with
    # one, cuda), else 0
    client_gpus: float | None = Field(None, ge=0, le=1)

    def gpu_share(self, on_gpu: bool) -> float:
        """The share of a GPU each simulated client takes: ``client_gpus``, resolved for a run whose
        ``model.device`` is (``on_gpu``) or is not a GPU."""
        if self.client_gpus is not None:
            return float(self.client_gpus)
        return 1.0 if on_gpu else 0.0


class FederationConfig(_Strict):
    rounds: int = Field(3, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)  # clients sampled per round
    # local: every client in this process (fastest); flower-sim: Flower's simulation engine;
    # flower: a Flower SuperLink and SuperNodes (`fedmoe run --runtime`, README "Running on Flower")
    runtime: Literal["local", "flower-sim", "flower"] = "local"
    # a round is aggregated when at least this many sampled clients replied (None: half of them,
    # rounded up); fewer stops the run with the last checkpoint intact
    min_replies: int | None = Field(None, ge=1)
    round_timeout_s: float | None = Field(None, gt=0)  # Flower: how long a round waits for replies (None: forever)
    node_wait_s: float = Field(300.0, gt=0)  # Flower: how long the server waits for every client to connect
    # Flower: at most this many messages out at once (None: every sampled client at once). Bounds the
    # memory of SuperNodes that share one machine (each message starts a process with the model)
    max_inflight: int | None = Field(None, ge=1)
    # in-process runtime: a client whose local training raises stops the run (stop: the exception
    # propagates) or is left out of the round like a client that did not reply (skip: the round is
    # aggregated when min_replies others succeeded; the failure is in metrics.jsonl and the report).
    # On Flower a client's error comes back as a failed reply and is always handled as skip.
    on_client_error: Literal["stop", "skip"] = "stop"
    # client-level differential privacy (null: off); only for methods whose aggregation is a sum of
    # client updates (the others refuse it)
    dp: DPConfig | None = None
    # robust aggregation against poisoned updates (null: the method's own aggregation); same methods as dp
    robust: RobustConfig | None = None
    # secure aggregation (Flower runtimes; null: every client's update reaches the server as it is)
    secagg: SecAggConfig | None = None
    # flower-sim: the CPUs and the share of a GPU each simulated client reserves
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)


class EvalConfig(_Strict):
    # generate: greedy answers scored by ROUGE-L; choice: the option with the highest log-likelihood
    # after the prompt (a label task's label set, or each example's own options), scored by accuracy
    task: Literal["generate", "choice"] = "generate"
    choice_normalize: Literal["mean", "sum"] = "mean"  # choice: per-token mean (default) or total log-likelihood
    rouge: bool = True
    # ROUGE-L's words: "latin" is rouge_score's own (a-z and 0-9 only, Porter stemming: the papers' ROUGE-L; text
    # in another script has no word and scores 0, which is refused when most references are such text); "unicode"
    # keeps the words of every script, each Han, kana or Hangul character a word (the same scores on a-z text)
    rouge_tokenizer: Literal["latin", "unicode"] = "latin"
    max_new_tokens: int = Field(32, ge=1)
    # Greedy decoding whose answer never repeats an n-gram of its own of this size (eval.generate.AnswerNoRepeat:
    # Hugging Face's no_repeat_ngram_size over the answer alone; HF's own option bans the prompt's n-grams too, so
    # an answer could not copy its context). 3 by default: small models otherwise loop ("8, 8, 8, 8, ...") and the
    # loops, not the content, decide ROUGE-L. 0 = plain greedy, the papers' protocol (the paper-layout configs set it).
    no_repeat_ngram_size: int = Field(3, ge=0)
    batch_size: int = Field(8, ge=1)
    max_examples: int | None = Field(50, ge=1)  # per-client cap on generated test answers (null = all)
    every_round: bool = False  # the answers (ROUGE-L or accuracy) each round, not only at round 0 and the end
    # the test loss of every client's model and of the global model after every round (False: only at round 0
    # and after the final round, which is what the summary reports; the learning curves then have two points)
    loss_every_round: bool = True
    zero_shot: bool = True  # evaluate the initial model first (round 0), on the same test examples
    # the loss on each client's validation split (data.split's middle share, at most data.max_val_per_client
    # examples) whenever the test loss is measured, of each client's model and of the global model on their union:
    # the number to choose hyperparameters, a sweep's point or a round by, leaving the test set to report
    val_loss: bool = False
    flops_seq_len: int = Field(128, ge=1)  # sequence length of the FLOPs/seq figure (FLAME uses 128)
    # every round, the agreement of the clients' updates: per expert (and for the shared tensors) the
    # fraction of client pairs whose updates have a negative cosine (server metric update_conflict)
    update_conflict: bool = False
    # Flower runtimes: the clients also send the server their sample answers with references, the category of
    # each scored example (the per-category scores), their category histograms and confusion matrices. Off by
    # default: these are the clients' data and stay with them (a SuperNode may also refuse with its node config
    # share-examples=false); the report says what it did not receive. In-process runs keep them (one process).
    share_examples: bool = False
    # knowledge retention: perplexity on this many blocks (data.max_length tokens) of held-out general
    # text (the built-in model's pretraining held-out split, not Dolly) at round 0 and at the end; 0 = off
    general_blocks: int = Field(0, ge=0)
    # MMLU 5-shot (shipped) at round 0 and at the end: a preset ("quick", "all") or a list of subjects
    mmlu: str | list[str] | None = None
    mmlu_max_per_subject: int | None = Field(None, ge=1)


class ReportConfig(_Strict):
    # every metrics row as TensorBoard scalars in <run>/tensorboard/ (extra: fedmoe[tensorboard])
    tensorboard: bool = False
    # report.md's figures (learning curve, expert activation, confusion matrices, per-layer metrics) as PNGs beside
    # it; false: the tables alone (a sweep of many short runs, ~0.5 s of drawing each)
    figures: bool = True


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
    report: ReportConfig = ReportConfig()

    @field_validator("name")
    @classmethod
    def _name_is_one_path_component(cls, v):
        """The run directory is output_dir/name: a name that is a path (a separator, '..', '.', absolute)
        would write, and on --overwrite delete, outside output_dir."""
        if v is None:
            return v
        if (not v.strip() or v in (".", "..") or "/" in v or "\\" in v or "\0" in v or v != v.strip()
                or Path(v).is_absolute()):
            raise ValueError(f"name = {v!r}: a run's name is one folder name under output_dir (no '/', '\\', "
                             "'..' or '.', not absolute, no leading or trailing spaces); to write elsewhere set "
                             "output_dir")
        return v

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

    @model_validator(mode="after")
    def _validation_needs_a_split(self):
        if self.eval.val_loss and self.data.split[1] == 0:
            raise ValueError(f"eval.val_loss measures the loss on each client's validation split, but data.split = "
                             f"{list(self.data.split)} holds none (its middle share): give it one, e.g. data.split: "
                             "[0.8, 0.1, 0.1], or set eval.val_loss: false")
        return self

    @model_validator(mode="after")
    def _label_is_scored_by_choice(self):
        # a label's name as the reference of a generated answer: ROUGE-L of free text against 'brainstorming'
        if "label" in self.data.field_map and self.eval.task != "choice":
            raise ValueError(f"data.field_map.label = {self.data.field_map['label']!r} makes each example's answer "
                             "its label, which eval.task: generate would score by ROUGE-L of free text against the "
                             "label's name: set eval.task: choice (accuracy over the labels), or map the answer "
                             "text instead (data.field_map.output)")
        return self

    @model_validator(mode="after")
    def _choice_needs_options(self):
        fm = self.data.field_map
        if self.eval.task == "choice" and "label" not in fm and "options" not in fm:
            raise ValueError("eval.task: choice scores answer options: give the data a label (data.field_map.label, "
                             "e.g. {label: category} for Dolly's category prediction) or per-example options "
                             "(data.field_map.options)")
        return self

    @model_validator(mode="after")
    def _method_options_apply(self):
        alg = self.algorithm
        method = METHODS[alg.name]
        if alg.server_optimizer.name != "none" and not method.server.supports_server_optimizer:
            raise ValueError(f"algorithm.server_optimizer.name = {alg.server_optimizer.name!r}, but {alg.name} "
                             f"{method.server.server_optimizer_note}; set algorithm.server_optimizer.name: none")
        for other in METHODS.values():
            if other.config is None or other.name in method.sections:
                continue
            changed = _changed_keys(getattr(alg, other.name), other.config())
            if changed:
                keys = ", ".join(f"algorithm.{other.name}.{k}" for k in changed)
                raise ValueError(f"{keys} configure the method '{other.name}', but algorithm.name is {alg.name!r}, "
                                 f"which reads only algorithm.{{{', '.join(method.sections)}}}: remove them (in a "
                                 "sweep, set them in that method's variant)")
        dp = self.federation.dp
        if dp is not None and dp.where == "client":
            why = method.server.local_dp_refusal(self)
            if why:
                raise ValueError(f"federation.dp with where: client (local differential privacy: each client clips and "
                                 f"noises its own update) does not suit {alg.name}, which {why}; "
                                 + ("otherwise remove federation.dp" if "; set " in why else "remove federation.dp"))
        elif dp is not None and not method.server.supports_dp:
            raise ValueError(f"federation.dp (client-level differential privacy) needs an aggregation that is a sum "
                             f"of clipped client updates, but {alg.name} {method.server.dp_note}; remove federation.dp")
        from .federation.sampling import clients_per_round

        sampled = clients_per_round(self.data.partition.num_clients, self.federation.fraction)
        robust = self.federation.robust
        if robust is not None:
            if not method.server.supports_dp:
                server = method.server  # the aggregation's own reason, not DP's noise
                why = server.robust_note or server.secagg_refusal(self) or server.dp_note
                raise ValueError(f"federation.robust replaces a weighted mean of client updates by a robust statistic, "
                                 f"but {alg.name} {why}; remove federation.robust")
            if self.federation.dp is not None and self.federation.dp.where == "server":
                raise ValueError("federation.robust and federation.dp together: DP already bounds each update "
                                 "(clip_norm) and its accounting assumes the sum of the clipped updates, which a "
                                 "median, trimmed mean or Krum is not; keep one of them, or let the clients add the "
                                 "noise (federation.dp.where: client), after which any aggregation is private")
            if robust.rule in ("median", "trimmed_mean"):
                need = robust.minimum_clients()
                if sampled < need:
                    raise ValueError(f"federation.robust.rule = {robust.rule}"
                                     + (f" with trim = {robust.trim}" if robust.rule == "trimmed_mean" else "")
                                     + f" bounds a poisoned update only over at least {need} clients (with fewer it is "
                                     f"the plain mean: ⌊trim·n⌋ = 0, or no middle value), the run samples {sampled}: "
                                     "sample more clients" + (", or raise trim" if robust.rule == "trimmed_mean" else ""))
            if robust.rule == "krum" and sampled < 2 * robust.krum_malicious + 3:
                raise ValueError(f"federation.robust.rule = krum with krum_malicious = {robust.krum_malicious} needs "
                                 f"at least 2f + 3 = {2 * robust.krum_malicious + 3} clients per round, the run "
                                 f"samples {sampled}: lower krum_malicious or sample more clients")
            if robust.krum_keep > sampled:
                raise ValueError(f"federation.robust.krum_keep = {robust.krum_keep} is more than the {sampled} "
                                 "clients sampled per round")
        if self.federation.secagg is not None:
            why = method.server.secagg_refusal(self)
            server_dp = self.federation.dp is not None and self.federation.dp.where == "server"
            clash = [k for k, on in (("federation.dp (where: server)", server_dp),
                                     ("federation.robust", robust is not None),
                                     ("eval.update_conflict", self.eval.update_conflict)) if on]
            if why:
                raise ValueError(f"federation.secagg gives the server only the weighted mean of the clients' updates, "
                                 f"but {alg.name} {why}; remove federation.secagg")
            if clash:
                raise ValueError(f"federation.secagg hides each client's update from the server, and {clash[0]} needs "
                                 "them one by one; keep one of the two")
            dp = self.federation.dp
            if dp is not None and dp.where == "client" and dp.noise_multiplier:
                # each coordinate of a client's noised update is up to C of the clipped update plus N(0, (σC)²): at
                # clipping_range below C·(1 + 4σ) a coordinate beyond it (p 6e-5 each) is all but sure in a LoRA's
                # millions, and every client would refuse its update every round
                floor = dp.clip_norm * (1 + 4 * dp.noise_multiplier)
                if self.federation.secagg.clipping_range < floor:
                    raise ValueError(f"federation.secagg.clipping_range = {self.federation.secagg.clipping_range:g} is "
                                     f"below what a client's noised update reaches (clip_norm {dp.clip_norm:g} plus "
                                     f"noise of std σ·C = {dp.noise_multiplier * dp.clip_norm:g} per value): every "
                                     "client would refuse its update; set clipping_range to at least "
                                     f"{dp.clip_norm * (1 + 6 * dp.noise_multiplier):g} (C·(1 + 6σ))")
            if self.federation.runtime == "local":
                raise ValueError("federation.secagg protects the clients' updates from the server over Flower; "
                                 "in-process the server is the clients' own process: run with --runtime flower-sim "
                                 "or flower, or remove federation.secagg")
        method.client.check_config(self)
        return self

    def run_name(self) -> str:
        return self.name or self.algorithm.name


def _changed_keys(section: StrictModel, default: StrictModel) -> list[str]:
    return [k for k in type(section).model_fields if getattr(section, k) != getattr(default, k)]


def _value(cfg: RunConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def unread_settings(cfg: RunConfig) -> list[tuple[str, str]]:
    """The settings of ``cfg`` set away from their defaults that its run would not read, each with why (key, why):
    a value that changes nothing, which its user believes changes something (a server optimizer's β2 under
    FedAvgM, robust aggregation's trim under the median, a budget key the method takes nothing from, a Flower
    setting in-process). A new single run refuses them (:func:`refuse_unread`); a sweep, whose base config may
    hold keys for only some of its points, refuses those no point reads."""
    out: list[tuple[str, str]] = []
    def changed(section, keys) -> list[str]:  # those of ``keys`` set away from the section's defaults
        return [k for k in _changed_keys(section, type(section)()) if k in keys]

    method = METHODS[cfg.algorithm.name]
    out += method.client.unread(cfg)
    out += server_optimizer_unread(cfg.algorithm.server_optimizer)
    if not cfg.train.aux_loss and cfg.train.aux_loss_coef is not None:
        out.append(("train.aux_loss_coef", "train.aux_loss is false (no load-balancing loss is added)"))
    robust = cfg.federation.robust
    if robust is not None:
        default = RobustConfig()
        if robust.rule != "trimmed_mean" and robust.trim != default.trim:
            out.append(("federation.robust.trim", f"federation.robust.rule is {robust.rule!r}, not trimmed_mean"))
        out += [(f"federation.robust.{k}", f"federation.robust.rule is {robust.rule!r}, not krum")
                for k in ("krum_malicious", "krum_keep") if robust.rule != "krum" and getattr(robust, k) != getattr(default, k)]
    fed = cfg.federation
    if fed.runtime == "local":
        out += [(f"federation.{k}", "federation.runtime is local (every client in this process): it is a Flower "
                                    "runtime's setting")
                for k in changed(fed, ("round_timeout_s", "node_wait_s", "max_inflight"))]
        if cfg.eval.share_examples:
            out.append(("eval.share_examples", "federation.runtime is local: in-process runs keep every client's "
                                               "examples already (it says what Flower clients send)"))
    if fed.runtime != "flower-sim":
        out += [(f"federation.simulation.{k}", f"federation.runtime is {fed.runtime}, not flower-sim")
                for k in changed(fed.simulation, tuple(SimulationConfig.model_fields))]
    ec = cfg.eval
    if ec.task == "choice":
        out += [(f"eval.{k}", "eval.task is choice (scored by accuracy, no ROUGE-L)")
                for k in changed(ec, ("rouge", "rouge_tokenizer"))]
    else:
        out += [(f"eval.{k}", "eval.task is generate (no answer options to score)") for k in changed(ec, ("choice_normalize",))]
        if not ec.rouge:
            out += [(f"eval.{k}", "eval.rouge is false") for k in changed(ec, ("rouge_tokenizer",))]
    if ec.mmlu is None and ec.mmlu_max_per_subject is not None:
        out.append(("eval.mmlu_max_per_subject", "eval.mmlu is null (no MMLU)"))
    if not ec.val_loss and cfg.data.max_val_per_client != DataConfig().max_val_per_client:
        out.append(("data.max_val_per_client", "eval.val_loss is false (no validation loss is measured)"))
    return out


def refuse_for_a_new_run(cfg: RunConfig) -> None:
    """What an older fedmoe took and quietly changed, refused for a run that starts now (a run directory of such a
    config still loads: to resume, export or compare it): ``federation.min_replies`` above the clients a round
    samples, which it lowered to them; seeded DP noise on a real Flower deployment, whose nodes hold the seed."""
    from .federation.sampling import clients_per_round

    dp = cfg.federation.dp
    seeded = [k for k in ("client_noise", "server_noise") if dp is not None and getattr(dp, k) == "seeded"]
    if seeded and cfg.federation.runtime == "flower":
        raise ConfigError(f"federation.dp.{seeded[0]} = seeded draws the noise from the run's seed, which the server "
                          "and every SuperNode hold in the run's config: on a real deployment they can subtract it, and "
                          "ε protects nothing. It is for simulations whose numbers must repeat (runtime local or "
                          f"flower-sim): remove federation.dp.{seeded[0]} (the default, secret, draws it from the "
                          "operating system's cryptographic generator)")
    sampled = clients_per_round(cfg.data.partition.num_clients, cfg.federation.fraction)
    if cfg.federation.min_replies is not None and cfg.federation.min_replies > sampled:
        raise ConfigError(f"federation.min_replies = {cfg.federation.min_replies} is more than the {sampled} clients "
                          f"a round samples (federation.fraction {cfg.federation.fraction} of "
                          f"{cfg.data.partition.num_clients}): no round could have that many replies; lower it or "
                          "sample more clients")


def refuse_unread(cfg: RunConfig, source: str = "config") -> None:
    """A :class:`ConfigError` naming every setting of ``cfg`` its run would not read (:func:`unread_settings`)."""
    unread = unread_settings(cfg)
    if unread:
        raise ConfigError(f"{source}: {'this setting' if len(unread) == 1 else 'these settings'} would change nothing "
                          "in this run: " + "; ".join(f"{k} = {_value(cfg, k)!r} ({why})" for k, why in unread)
                          + ": remove " + ("it" if len(unread) == 1 else "them") + " (or set what would read "
                          + ("it" if len(unread) == 1 else "them") + ")")


# ----------------------------------------------------------------------------------------------
# loading

# Keys that moved to the section of the method they configure. A config (or a run directory's
# config.yaml) written before the move still loads: the value is moved, with a warning.
MOVED_KEYS = {
    "algorithm.temperature": "algorithm.flame.temperature",
    "algorithm.rescaler": "algorithm.flame.rescaler",
    "algorithm.rescaler_init": "algorithm.flame.rescaler_init",
    "train.proximal_mu": "algorithm.fedit.proximal_mu",
}


def migrate_moved_keys(tree: dict, source: str) -> dict:
    for old, new in MOVED_KEYS.items():
        *path, last = old.split(".")
        node = tree
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        value = node.pop(last)
        *npath, nlast = new.split(".")
        dst = _section(tree, npath, f"{source}: {new}")
        if nlast in dst and dst[nlast] != value:
            raise ConfigError(f"{source}: sets both '{old}' (the old key) and '{new}'; keep only '{new}'")
        dst[nlast] = value
        warnings.warn(f"{source}: '{old}' is now '{new}' (moved to the section of the method it configures)",
                      stacklevel=3)
    return tree


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], parsed value); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r} (example: --set train.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = load_yaml(raw, f"--set {key}") if raw.strip() else None
    except yaml.YAMLError as e:
        where, why = yaml_problem(e)
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML (at{where}: {why}); a text value with YAML's "
                          f"signs in it goes in quotes: --set '{key}=\"...\"'") from None
    return key.split("."), value


def _section(tree: dict, path: list[str], what: str) -> dict:
    """The nested section at ``path`` (created where missing); ``what`` names the key in errors."""
    node = tree
    for part in path:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"{what}: '{part}' is a value, not a section")
        node = nxt
    return node


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        _section(tree, path[:-1], f"--set {'.'.join(path)}")[path[-1]] = value
    return tree


def shipped_configs() -> Path | None:
    """The ``configs/`` folder of the fedmoe source tree this package runs from (an editable install or a checkout
    on PYTHONPATH), None where it is not there (a wheel ships no configs)."""
    folder = Path(__file__).resolve().parents[2] / "configs"
    return folder if (folder / "default.yaml").is_file() else None


def _not_a_config_file(p: Path) -> str:
    """What ``p``, given as a config, is instead (nothing, a run directory, a sweep's folder, another folder), and
    what to give: never a pointer back to a path that is not there."""
    from .rundir import RunDir, resume_command, shell_quote, sweep_points_in

    q = shell_quote(p)
    if (p / RunDir.CONFIG).is_file():  # a run directory: continue it, or use what it trained
        if (p / RunDir.SUMMARY).is_file():
            return (f"{p} is the directory of a finished run, not a config file: use what it trained with `fedmoe export "
                    f"{q} OUT`, `fedmoe generate {q}` or `fedmoe compare {q} ...`; to start a new run with its "
                    f"settings give its config, {shell_quote(p / RunDir.CONFIG)}")
        return (f"{p} is a run directory, not a config file: continue that run with `{resume_command(p)}`; to start "
                f"it over give its config, `fedmoe run {shell_quote(p / RunDir.CONFIG)} --overwrite`")
    if sweep_points_in(p) is not None:
        return (f"{p} is a sweep's folder, not a config file: a sweep runs (and continues) from its config, the YAML "
                "file with the sweep: section")
    if p.is_dir():
        yamls = sorted(f.name for f in p.glob("*.y*ml") if f.suffix in (".yaml", ".yml"))
        return (f"{p} is a folder, not a config file: give the path of a YAML config"
                + (f" (it holds {', '.join(yamls[:8])}{', ...' if len(yamls) > 8 else ''})" if yamls else ""))
    shipped = shipped_configs()
    there = (f"the shipped configs are in {shipped}" if shipped is not None else
             "the shipped configs are in the configs/ folder of fedmoe's source repository (a pip install has none)")
    near = shipped / p.name if shipped is not None and p.suffix in (".yaml", ".yml") else None
    hint = f"; did you mean {shell_quote(near)}?" if near is not None and near.is_file() else ""
    where = "" if p.is_absolute() else f" (looked for from {Path.cwd()})"
    return (f"config file not found: {p}{where}: `fedmoe run` with no config runs the default run "
            f"(configs/default.yaml written out); {there}{hint}")


def read_config_file(path: str | Path, missing: str | None = None) -> dict:
    """The tree of the YAML config at ``path``; a path that is not a config file, a file that is not UTF-8 text or
    not YAML, or one whose top level is not a mapping, is a :class:`ConfigError` naming the file (and the line).
    ``missing``: what to say of a path where nothing is (default: a run config's hints)."""
    p = Path(path)
    if missing is not None and not p.exists():
        raise ConfigError(f"config file not found: {p}: {missing}")
    if not p.is_file():
        raise ConfigError(_not_a_config_file(p))
    try:
        loaded = load_yaml(p.read_text(encoding="utf-8"), str(p))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not a text (UTF-8) file (byte {e.start} is 0x{e.object[e.start]:02x}): give "
                          "the path of a YAML config") from None
    except yaml.YAMLError as e:
        where, why = yaml_problem(e)
        raise ConfigError(f"{p}:{where} is not valid YAML: {why}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, ...)")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(Path(path))
        tree = read_config_file(path)
    if overrides:
        if "sweep" not in tree and any(o.startswith("sweep.") for o in overrides):
            raise ConfigError(f"--set {next(o for o in overrides if o.startswith('sweep.'))}: changes an axis of a "
                              f"sweep, and {'the default config' if source == 'defaults' else source} has no "
                              "sweep: section; put one in the config to run a sweep "
                              "(sweep: {lora.rank: [4, 8]}), or set the key itself (--set lora.rank=4)")
        tree = apply_overrides(tree, overrides)
        source += " + --set " + " ".join(overrides)
    return config_from_tree(tree, source)


def config_from_tree(tree: dict, source: str = "config") -> RunConfig:
    """Validate a config tree; errors name the key and ``source``."""
    if "sweep" in tree:
        raise ConfigError(f"{source}: has a 'sweep' section; run it with `fedmoe run` (which expands sweeps) "
                          "or remove the section")
    tree = migrate_moved_keys(tree, source)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, RunConfig)) from None


def config_to_dict(cfg: RunConfig) -> dict:
    """The config as a tree (config.yaml, a checkpoint's fingerprint, the Flower run config). An installed
    package's method has its section there only in a run of that method: a run of another method reads, resumes and
    exports where that package is not installed."""
    tree = cfg.model_dump(mode="json")
    for name in INSTALLED:
        if name != cfg.algorithm.name:
            tree["algorithm"].pop(name, None)
    return tree

