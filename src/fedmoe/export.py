"""Take a trained model out of a run: a PEFT adapter, a merged Hugging Face model, or a fedmoe folder.

The model of a client is what the run evaluated as that client's: the server's final message to it
(:meth:`Server.downlink` on the final global and server state) loaded by the method's client half
with the client's private state (its rescaler, grafted experts, residual, ...). ``client=None`` is
the global model.

The forms (the one asked for, or a fedmoe folder when it cannot express the model):

* **PEFT** (default): ``adapter_config.json`` + ``adapter_model.safetensors`` for
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)``: attention LoRA as
  standard LoRA, fused expert LoRA through PEFT's ``target_parameters`` on ``experts.gate_up_proj``
  / ``experts.down_proj``. The base is named (its hub id or folder), not copied.
* **merged** (``merged=True``): a plain Hugging Face model folder with W + ΔW folded into every
  adapted weight (split expert LoRA and router LoRA too), a client's k_i written as the config's
  ``num_experts_per_tok`` and a rescaler folded into the experts' ``down_proj``: loadable by
  ``AutoModelForCausalLM.from_pretrained`` and so by serving engines. The tokenizer is included.
* **vllm** (``form="vllm"``): the same adapters as PEFT, but the expert LoRA written per expert as
  2-D LoRA on each expert's own projections (``…mlp.experts.{e}.gate_proj / up_proj / down_proj
  .lora_A/.lora_B.weight``; Mixtral: ``w1`` / ``w3`` / ``w2``), the key layout of the per-expert
  ``nn.Linear`` checkpoints that serving engines' LoRA loaders read (PEFT's ``target_parameters`` form
  is not one they read). Both of fedmoe's expert layouts map onto it: the fused gate_up pair gives
  gate and up the same A and the two halves of B. The base is named, not copied. gpt-oss is the
  exception: vLLM's ``GptOssForCausalLM`` takes its expert LoRA only in the fused 3-D form
  (``is_3d_moe_weight``), PEFT's ``target_parameters`` keys (``…mlp.experts.base_layer`` for
  ``gate_up_proj``, ``…mlp.experts`` for ``down_proj``), which is what is written for it (the split layout,
  two A's on gate_up, has no such form: refused there).
* **fedmoe**: what neither can express (FLEx's grafted experts and their gate; PEFT: FLAME's
  rescaler and k_i, split expert or router LoRA, a builtin base without weight files) is written as
  a folder that :func:`load_exported` (or :func:`load_model`, which takes any model too) restores exactly: the run config, the client's
  message tensors and private state; the base is named, not copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .algorithms import METHODS
from .algorithms.base import model_spec
from .config import ConfigError, config_from_tree, config_to_dict
from .messages import Message
from .rundir import load_tensor_file, ordinary_permissions, resume_command, shell_quote
from .moe import MoEModel
from .moe.arch import SPARSEMIXER_ARCHITECTURES, moe_block_attr
from .moe.lora import ExpertsWithLoRA, LoRALinear, RouterWithLoRA, expert_lora_pairs
from .moe.model import (BUILTIN_PREFIX, EXPORT_MARKER, builtin_model_path, legacy_values_in, load_model_config,
                        load_tokenizer, vision_language_type)

EXPORT_FILE = EXPORT_MARKER
_STATE = "state.safetensors"
_PRIVATE = "private.pt"
# beside a merged model or an adapter: which run, client and round it is, and that run's config (its
# prompt template and decoding: what `fedmoe generate OUT` answers with); Hugging Face, PEFT and serving
# engines ignore a file they do not know
SOURCE_FILE = "fedmoe-source.json"


class ExportError(ValueError):
    """The run, client or form asked for cannot be exported (the message says why and what to do)."""


@dataclass
class LoadedModel:
    """A client's (or the global) model of a run, ready to use."""

    cfg: object
    mm: MoEModel
    client: int | None
    message: Message
    private: dict
    source: str  # where it came from, for messages


def _private_from(path: Path, run_id: str | None, client: int, round_idx: int) -> tuple[dict, int]:
    """(a Flower client's private state after round ``round_idx``, the round it was saved at): from its
    SuperNode's ``state-dir`` (the run's folder ``<run id>/client-<N>`` is found in it), that folder itself, or one
    ``private-r*.pt`` file (refused where a newer one at or before the round lies beside it: the model would
    silently be an older one's). A store of another run or another client is refused (the folder names, and the
    ``identity.json`` a store keeps)."""
    import re

    path = Path(path)
    if path.is_file():
        folder, files = path.parent, [path]
    else:
        folder = next((f for f in ([path / run_id / f"client-{client}"] if run_id else []) + [path / f"client-{client}", path]
                       if f.is_dir() and any(f.glob("private-r*.pt"))), None)
        if folder is None:
            raise ExportError(f"{path}: no private store of client {client}" + (f" of run {run_id}" if run_id else "")
                              + " (a SuperNode's state-dir holds <run id>/client-<N>/private-r*.pt)")
        files = sorted(folder.glob("private-r*.pt"))
    ident_file = folder / "identity.json"
    if ident_file.is_file():
        try:
            ident = json.loads(ident_file.read_text())
        except (ValueError, UnicodeDecodeError):
            ident = None
        if not isinstance(ident, dict):
            raise ExportError(f"{ident_file} is not the identity a private store keeps ({{\"run_id\": ..., \"client\": "
                              "N}): this folder was not written by a fedmoe client, or was altered")
        who = (ident.get("run_id"), ident.get("client"))
    else:
        who = (folder.parent.name, int(folder.name[7:]) if re.fullmatch(r"client-\d+", folder.name) else None)
    if who != (run_id, client) and run_id is not None:
        raise ExportError(f"{folder} holds the private state of client {who[1]} of run {who[0]}, not of client {client} "
                          f"of run {run_id}: pass that run's and client's store (--private <its SuperNode's state-dir>)")
    def rounds_of(paths) -> dict[int, Path]:
        return {int(m.group(1)): f for f in paths if (m := re.fullmatch(r"private-r(\d+)\.pt", f.name))}

    rounds = rounds_of(files)
    upto = [r for r in rounds if r <= round_idx]
    if not upto:
        raise ExportError(f"{folder}: no private state of round {round_idx} or before ({sorted(rounds)})")
    if path.is_file():  # one file named: it must be the state the client had after the round exported
        beside = [r for r in rounds_of(folder.glob("private-r*.pt")) if max(upto) < r <= round_idx]
        if beside:
            raise ExportError(f"--private {path} is client {client}'s private state after round {max(upto)}, but "
                              f"{folder} holds a newer one of round {max(beside)}, which the model after round "
                              f"{round_idx} has: pass the folder (--private {shell_quote(folder)}: the newest at or before "
                              f"round {round_idx} is taken), or export round {max(upto)} on purpose with --round")
    return load_tensor_file(rounds[max(upto)], "private store"), max(upto)


# the command behind each verb, for what a path that is no run directory is told (rundir.run_dir_problem)
_USE = {"export": "export", "generate from": "generate", "evaluate": "mmlu"}


def _checkpoint_to_export(run_dir: str | Path, round_idx: int | None, verb: str = "export"):
    """(config, run dir, checkpoint state) of the round an export takes: the finished run's last round, or
    (``round_idx``) exactly that round, which must be one of the run's two checkpoints. Anything else is
    refused with what there is: a run that did not finish (no summary.json: it stopped, or a round failed,
    and its checkpoint may be its initial adapters), or a finished run whose newest checkpoint is unreadable
    (the readable one is an older round). ``verb`` is what the command does with a round, for its errors
    ("export", or "generate from" for ``fedmoe generate``)."""
    from .federation.checkpoint import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE
    from .federation.directories import open_run_dir

    notes: list[str] = []
    cfg, rd, loaded = open_run_dir(run_dir, log=notes.append, use=_USE.get(verb, "export"))
    finished = rd.summary_path.is_file()
    rounds = cfg.federation.rounds
    want = rounds if round_idx is None else round_idx
    have = {loaded.state["round"]: (loaded.path, loaded.state)}
    if want in have and (finished or round_idx is not None):
        return cfg, rd, have[want][1]
    # not the round wanted: the run's other checkpoint is read (for the round asked, or to name what is on offer)
    for f in (rd.checkpoint_dir / CHECKPOINT_FILE, rd.checkpoint_dir / PREVIOUS_CHECKPOINT_FILE):
        if f.is_file() and f not in (loaded.path, loaded.unreadable):
            try:
                state = load_tensor_file(f, "checkpoint")
                have.setdefault(state["round"], (f, state))
            except Exception:  # noqa: BLE001 - an unreadable older checkpoint is simply not on offer
                pass
    offer = ", ".join(f"--round {r} ({f.name})" for r, (f, _) in sorted(have.items(), reverse=True))
    if round_idx is not None:
        if round_idx not in have:
            raise ExportError(f"{rd.path} has no checkpoint of round {round_idx}; it has: {offer}")
        return cfg, rd, have[round_idx][1]
    if not finished:
        raise ExportError(f"{rd.path} did not finish (no summary.json; its newest readable checkpoint is round "
                          f"{max(have)} of {rounds}): continue it with `{resume_command(rd.path)}`, "
                          f"or {verb} a round it has on purpose with {offer}")
    if rounds not in have:
        bad = f" ({loaded.unreadable} is unreadable)" if loaded.unreadable is not None else ""
        raise ExportError(f"{rd.path} finished {rounds} rounds, but its checkpoint of round {rounds} cannot be read{bad}: "
                          f"the model it ended with is lost. {verb[0].upper()}{verb[1:]} an older round on purpose with {offer}, or "
                          "run it "
                          "again")
    return cfg, rd, have[rounds][1]


def load_run_model(run_dir: str | Path, client: int | None = None, private_path: str | Path | None = None,
                   round_idx: int | None = None, verb: str = "export", dtype: str | None = None,
                   device: str | None = None) -> LoadedModel:
    """The model client ``client`` (None: the global model) ended the run with, or had after round
    ``round_idx`` (one of the run's two checkpoints; :func:`_checkpoint_to_export`, whose errors say ``verb``).
    ``dtype``, ``device``: load it so rather than in the run's ``model.dtype`` / ``model.device``."""
    from .federation.local import load_client_model

    if client is None and private_path is not None:  # checked before anything is read: it would go unused
        raise ExportError(f"--private {private_path} is a client's private store, and the global model has none: add "
                          "--client N (the client whose store it is), or leave --private out for the global model")

    cfg, rd, ck = _checkpoint_to_export(run_dir, round_idx, verb)
    if device is None:  # the run's own device: one this machine may lack (a GPU run exported on a laptop)
        from .moe.model import check_device

        try:
            check_device(cfg.model.device)
        except ValueError as e:
            raise ExportError(f"{rd.path}: {e}; or pass --device cpu (or auto) to load the run's model here: where it "
                              "loads changes no trained tensor") from None
    n = cfg.data.partition.num_clients
    if client is not None and not 0 <= client < n:
        raise ExportError(f"--client {client}: the run {rd.path} has clients 0..{n - 1}")
    method = METHODS[cfg.algorithm.name]
    if client is None and not method.server.trains_global_model:
        raise ExportError(f"{rd.path} ran {cfg.algorithm.name}, which trains no global model (its global model is the "
                          f"initial one; each client trained alone): name a client's model with --client 0..{n - 1}")
    server = method.server(cfg, model_spec(cfg, method))
    for key, kind in (("global_state", dict), ("server_state", dict), ("transport", dict), ("round", int)):
        if not isinstance(ck.get(key), kind):
            raise ExportError(f"{rd.checkpoint_dir}: its checkpoint's {key!r} is missing or not a {kind.__name__}: it "
                              "was not written by fedmoe, or was altered")
    try:
        message = server.downlink(ck["global_state"], ck["server_state"], client, round_idx=ck["round"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ExportError(f"{rd.checkpoint_dir}: its checkpoint's server state does not fit {cfg.algorithm.name} "
                          f"({type(e).__name__}: {str(e)[:200]}): it was not written by fedmoe, or was altered") from None
    # what the client's model is built from: the global tensors and what the server adds for it (FC-MoE's residual)
    _check_tensors(message.tensors, f"{rd.checkpoint_dir}: the checkpoint of round {ck['round']}")
    private: dict = {}
    if client is not None:
        stores = ck["transport"].get("private")
        run_id = ck["transport"].get("run_id")
        if private_path is None and stores is None and cfg.federation.runtime == "flower-sim":
            private_path = rd.path / "clients"  # a simulation keeps its clients' stores in the run directory
        if private_path is not None and stores is not None:  # an in-process run's stores are in its checkpoint
            raise ExportError(f"--private {private_path}: {rd.path} ran in-process, and its checkpoint holds client "
                              f"{client}'s private state itself (no store it could be checked against: another "
                              "client's or run's would be taken without a word); leave --private out")
        if private_path is not None:
            private, saved = _private_from(Path(private_path), run_id, client, ck["round"])
            private_from = f"{private_path}, of round {saved}"
        else:
            if stores is None:
                raise ExportError(f"{rd.path} ran on Flower: client {client}'s private state is on its SuperNode; pass "
                                  f"--private <that node's state-dir> (it holds {run_id}/client-{client}/private-r*.pt)")
            if not isinstance(stores, (list, dict)) or (client not in stores if isinstance(stores, dict)
                                                        else client >= len(stores)):
                raise ExportError(f"{rd.checkpoint_dir}: its checkpoint holds no private state of client {client}: it "
                                  "was not written by fedmoe, or was altered")
            private, private_from = stores[client], None
        _check_tensors(private, f"client {client}'s private state" + (f" ({private_from})" if private_from else ""))
    if dtype is not None or device is not None:  # where and in what precision it runs changes no trained tensor
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
            **({"dtype": dtype} if dtype is not None else {}), **({"device": device} if device is not None else {})})})
    mm = load_client_model(cfg, method)
    half = method.client(cfg)
    missing = [n for n in half.private_names(mm) if n not in private] if client is not None else []
    if missing:  # the client's model would take the global model's values for them without a word
        where = f"--private {private_path}" if private_path is not None else f"{rd.checkpoint_dir}'s checkpoint"
        raise ExportError(f"{where}: client {client}'s private state lacks {len(missing)} of the tensors "
                          f"{cfg.algorithm.name} keeps on a client (e.g. {missing[0]}): it is not this run's store, or "
                          "was altered")
    try:
        half.load(mm, client, message, private)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        whose = "its checkpoint" if private_path is None else f"its checkpoint and --private {private_path}"
        raise ExportError(f"{rd.path}: the model could not be rebuilt from {whose} ({type(e).__name__}: "
                          f"{str(e)[:300]}): they were not written by this fedmoe for this run, or were altered") from None
    mm.model.eval()
    who = "the global model" if client is None else f"client {client}"
    mine = f", with its private state from {private_from}" if client is not None and private_from else ""
    return LoadedModel(cfg, mm, client, message, private, f"{who} of {rd.path} (after round {ck['round']}{mine})")


def _check_tensors(state, what: str) -> None:
    """Refuse a state (a checkpoint's global tensors, a client's private state) holding a non-finite value: its
    model computes NaN; an export of it would be a broken model written without a word."""
    if not isinstance(state, dict):
        raise ExportError(f"{what} is a {type(state).__name__}, not the tensors fedmoe writes: it was altered")
    for name, t in state.items():
        if isinstance(t, dict):
            _check_tensors(t, what)
        elif isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ExportError(f"{what}: its tensor {name} holds non-finite values (NaN or infinity): the run diverged "
                              "there (its metrics say from which round); export an earlier round with --round, or "
                              "train again with a lower train.lr")


# ---------------------------------------------------------------------------------- what fits where
def _adapted_modules(mm: MoEModel):
    """(name, module) of every module holding trainable tensors, and the names of those tensors no
    known adapter holds (a method's own structure). A module switched off (``enabled`` False: FLEx's grafts in
    its global model, which has none) computes nothing, and its tensors are not part of the model exported."""
    known, owned = [], set()
    for name, mod in mm.model.named_modules():
        if getattr(mod, "enabled", True) is False:
            owned |= {f"{name}.{p}" for p, _ in mod.named_parameters()}
        elif isinstance(mod, (LoRALinear, ExpertsWithLoRA, RouterWithLoRA)):
            known.append((name, mod))
            owned |= {f"{name}.{p}" for p, _ in mod.named_parameters() if not p.startswith("base.")}
    other = [n for n in mm.trainable_names() if n not in owned]
    return known, other


def _base_source(cfg) -> str | None:
    """What ``from_pretrained`` loads the base from: the hub id or folder; None for a builtin with no files."""
    name = cfg.model.name
    if name.startswith(BUILTIN_PREFIX):
        folder = builtin_model_path(name)
        return None if folder is None else str(folder)
    local = Path(name).expanduser()
    # a folder named relative to where the run started: absolute, so the adapter loads from anywhere (PEFT reads
    # base_model_name_or_path as it is written; a relative one is another folder, or a hub id, elsewhere)
    return str(local.resolve()) if not local.is_absolute() and local.exists() else name


# the families whose fused expert stacks PEFT's target_parameters misreads: PEFT (0.21) takes a 3-D parameter as
# (E, out, in) unless its module says is_transposed, and transformers 5.23's Llama4TextExperts holds (E, in, out)
# without saying so (tests/test_llama4.py: the adapter PEFT builds from fedmoe's tensors computes another model)
PEFT_UNMARKED_TRANSPOSED = {
    "llama4_text": "expert LoRA on Llama-4 has no PEFT form PEFT applies as trained: PEFT (0.21) reads a 3-D expert "
                   "stack as (E, out, in) unless its module is marked is_transposed, and transformers' "
                   "Llama4TextExperts holds (E, in, out) unmarked, so PEFT would add each expert's update transposed "
                   "(a shape error, or where hidden = 2·intermediate another model): export --merged"}


def merge_blockers(mm: MoEModel) -> list[str]:
    _, other = _adapted_modules(mm)
    why = [f"the method's own tensors ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in other}))}, e.g. FLEx's "
           "grafted experts and their gate) are not LoRA on a base weight"] if other else []
    if mm.model_type in SPARSEMIXER_ARCHITECTURES and mm.top_k < mm.default_top_k:
        why.append(f"this client activates k = {mm.top_k} (sparsemixer's first choice alone, as fedmoe runs it); a "
                   f"plain {mm.model_type} model routes every token to two experts whatever its num_experts_per_tok "
                   "(transformers' sparsemixer reads no top_k), so it has no merged form: the fedmoe form keeps it")
    return why


def peft_blockers(mm: MoEModel, cfg) -> list[str]:
    """Why PEFT cannot express this model (empty: it can)."""
    why = merge_blockers(mm)
    known, _ = _adapted_modules(mm)
    if any(isinstance(m, RouterWithLoRA) for _, m in known):
        why.append("router LoRA (lora.router) has no PEFT target on transformers v5 routers")
    if any(isinstance(m, ExpertsWithLoRA) and m.layout == "split" and m.targets for _, m in known):
        why.append("split expert LoRA (separate gate and up adapters) has no PEFT form on the fused gate_up_proj")
    if mm.model_type in PEFT_UNMARKED_TRANSPOSED and any(isinstance(m, ExpertsWithLoRA) and m.targets for _, m in known):
        why.append(PEFT_UNMARKED_TRANSPOSED[mm.model_type])
    scales = {round(float(m.output_scale.detach()), 7) for _, m in known if isinstance(m, ExpertsWithLoRA)
              and m.output_scale is not None}
    if scales - {1.0}:
        why.append("a rescaler of the routed output (FLAME's s_i)")
    if mm.top_k != mm.default_top_k:
        why.append(f"the client activates k = {mm.top_k} of the model's {mm.default_top_k} experts")
    lora = [m for _, m in known if getattr(m, "rank", None) and (not isinstance(m, ExpertsWithLoRA) or m.targets)]
    if len({(m.rank, round(m.scaling, 9)) for m in lora}) > 1:
        why.append("adapters of different ranks or scalings")
    if _base_source(cfg) is None:
        why.append(f"the base {cfg.model.name} has no weight files for from_pretrained (use --merged)")
    return why


# ---------------------------------------------------------------------------------------- writers
def _plain_base(cfg):
    """The frozen base as a plain Hugging Face model (the run's dtype, on the CPU)."""
    from transformers import AutoModelForCausalLM

    from .moe.model import forget_mxfp4_conversions, pretrained_kwargs

    source = _base_source(cfg)
    if source is None:  # a builtin built from its config: the run's seeded initial weights, as MoEModel builds them
        from .moe.model import BUILTIN_MODELS, hf_from_config

        return hf_from_config(BUILTIN_MODELS[cfg.model.name[len(BUILTIN_PREFIX):]](), cfg.model.dtype,
                              cfg.model.attn_implementation, cfg.seed)
    plain = AutoModelForCausalLM.from_pretrained(source, **pretrained_kwargs(source, cfg.model.dtype,
                                                                             cfg.model.attn_implementation))
    return forget_mxfp4_conversions(plain)


def write_merged(loaded: LoadedModel, out: Path) -> None:
    cfg, mm = loaded.cfg, loaded.mm
    plain = _plain_base(cfg)
    params = dict(plain.named_parameters())
    known, _ = _adapted_modules(mm)
    with torch.no_grad():
        for name, mod in known:
            if isinstance(mod, (LoRALinear, RouterWithLoRA)) and mod.rank:
                w = params[f"{name}.weight"]
                w.add_(mod.delta_weight().to(w.dtype))
            elif isinstance(mod, ExpertsWithLoRA):
                for pname, delta in mod.delta_weights().items():
                    w = params[f"{name}.{pname}"]
                    w.add_(mod.form.to_stored(delta).to(w.dtype))  # gpt-oss's stacks are stored (in, out)
                if mod.output_scale is not None:  # the routed output is linear in down_proj (and its bias)
                    scale = float(mod.output_scale.detach())
                    params[f"{name}.down_proj"].mul_(scale)
                    if mod.form.bias:
                        params[f"{name}.down_proj_bias"].mul_(scale)
    if mm.top_k != mm.default_top_k:
        plain.config.num_experts_per_tok = mm.top_k
    plain.save_pretrained(out)
    load_tokenizer(cfg.model.tokenizer or cfg.model.name).save_pretrained(out)


def _lora_pairs(known):
    """(A (..., r, in), B (..., out, r)) of every LoRA pair the adapted modules hold."""
    for _, m in known:
        if isinstance(m, (LoRALinear, RouterWithLoRA)) and m.rank:
            yield m.lora_A, m.lora_B
        elif isinstance(m, ExpertsWithLoRA) and m.targets:
            for prefix, _, _ in expert_lora_pairs(m.layout, m.targets, 0, 0):
                yield getattr(m, f"{prefix}_lora_A"), getattr(m, f"{prefix}_lora_B")


def client_rank(loaded: LoadedModel) -> int | None:
    """The rank a client trains at where it is below the rank its adapters are built at (HetLoRA's and FlexLoRA's
    r_i, a pruned HetLoRA client's: the components above it are zero), else None. An adapter written at that rank
    (with ``lora_alpha`` = scaling · r_i, the scaling it ran with) is the same model, and tells a serving engine its
    real rank (``max_lora_rank``, its memory)."""
    if loaded.client is None:
        return None
    rank = int(METHODS[loaded.cfg.algorithm.name].client(loaded.cfg).rank(loaded.client, loaded.private))
    known, _ = _adapted_modules(loaded.mm)
    built = {m.rank for _, m in known if getattr(m, "rank", 0)}
    if len(built) != 1 or rank >= next(iter(built)):
        return None
    for A, B in _lora_pairs(known):  # exact only if no component above the rank is in use
        if bool(((A[..., rank:, :] != 0).any(-1) & (B[..., rank:] != 0).any(-2)).any()):
            return None
    return rank


def write_peft(loaded: LoadedModel, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    cfg, mm = loaded.cfg, loaded.mm
    known, _ = _adapted_modules(mm)
    attention = [(n, m) for n, m in known if isinstance(m, LoRALinear)]
    experts = [(n, m) for n, m in known if isinstance(m, ExpertsWithLoRA) and m.targets]
    first = (attention or experts)[0][1]
    target_modules = sorted({n.rsplit(".", 1)[-1] for n, _ in attention})
    block = moe_block_attr(mm.model_type)  # mlp; Granite-MoE's block_sparse_moe, LFM2-MoE's feed_forward
    target_parameters = sorted({f"{block}.experts.{t}" for _, m in experts for t in m.targets})
    r = client_rank(loaded) or first.rank
    config = LoraConfig(r=r, lora_alpha=first.scaling * r, target_modules=target_modules,
                        target_parameters=target_parameters or None, lora_dropout=0.0)
    peft_model = get_peft_model(_plain_base(cfg), config)
    modules = dict(peft_model.named_modules())
    wrappers = {}
    for name, mod in modules.items():
        if isinstance(mod, ParamWrapper):
            wrappers[(name.split(".layers.")[1].split(".")[0], mod.parameter_name)] = mod
    with torch.no_grad():
        for name, mod in attention:
            pm = modules[f"base_model.model.{name}"]
            pm.lora_A["default"].weight.copy_(mod.lora_A[:r])
            pm.lora_B["default"].weight.copy_(mod.lora_B[:, :r])
        for name, mod in experts:
            layer = name.split(".layers.")[1].split(".")[0]
            for t in mod.targets:
                prefix = t.removesuffix("_proj")
                pa, pb = ExpertsWithLoRA.to_peft_layout(mod._full(getattr(mod, f"{prefix}_lora_A").detach())[:, :r],
                                                        mod._full(getattr(mod, f"{prefix}_lora_B").detach())[..., :r])
                w = wrappers[(layer, t)]
                w.lora_A["default"].weight.copy_(pa)
                w.lora_B["default"].weight.copy_(pb)
    peft_model.peft_config["default"].base_model_name_or_path = _base_source(cfg)
    # fedmoe trains no embedding: PEFT's "auto" check of them re-reads the base's config with transformers' strict
    # reader, which refuses the values of older configs fedmoe reads (Llama-4's attn_temperature_tuning: 4)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    load_tokenizer(cfg.model.tokenizer or cfg.model.name).save_pretrained(out)


# per-expert projection names of the per-expert checkpoints (gate, up, down): those of the experts' keys in the
# hub's checkpoints, which vLLM's expert mapping reads (FusedMoE.make_expert_params_mapping with w1 / w2 / w3 in
# MixtralForCausalLM, Lfm2MoeForCausalLM and PhiMoEForCausalLM.get_expert_mapping)
_EXPERT_PROJ = {"mixtral": ("w1", "w3", "w2"), "lfm2_moe": ("w1", "w3", "w2"), "phimoe": ("w1", "w3", "w2")}
# the MoE block's name in the per-expert checkpoints where transformers v5 renamed it to ``mlp`` (a serving
# engine names modules as the original checkpoint does: vLLM's Mixtral holds block_sparse_moe.experts, and an
# adapter under mlp.experts would pass its name check and never be applied)
_MOE_BLOCK = {"mixtral": "block_sparse_moe", "phimoe": "block_sparse_moe"}


# the families whose expert LoRA vLLM reads only in the fused 3-D form (its model class sets is_3d_moe_weight: it
# joins experts.base_layer (gate_up_proj) and experts (down_proj) of PEFT's target_parameters keys into its w13 and
# w2 LoRA, gate_up's rows in the checkpoint's own order; GptOssForCausalLM, vllm/model_executor/models/gpt_oss.py)
VLLM_3D_EXPERT_LORA = ("gpt_oss",)
# the families whose vLLM model class takes no LoRA adapter at all, and why (read in vLLM's source, not run): vLLM's
# LoRA manager asks a model with fused MoE layers for its expert mapping (process_packed_modules_mapping, vllm/lora/
# utils.py: get_expert_mapping on the model or its direct children, else AttributeError "To support LoRA for MoE
# model, 'get_expert_mapping' must be implemented"); GraniteMoeForCausalLM and GraniteMoeModel
# (vllm/model_executor/models/granitemoe.py) define none: its per-expert mapping lives inside its weight loader.
# (PhiMoEForCausalLM did the same in vLLM's phimoe.py at commit c18f8240; at 01524004 it defines get_expert_mapping,
# w1 / w2 / w3 under block_sparse_moe.experts, as Mixtral's: _EXPERT_PROJ. Its router asserts top-2, and transformers'
# sparsemixer ignores top_k, so a k = 1 client has no PEFT or vllm form: peft_blockers)
# Llama-4 (vllm/model_executor/models/llama4.py at 0303cbd8, mllama4.py at 60d375cb, lora/utils.py at 0fd15707; read,
# not run): the hub's checkpoints name Llama4ForConditionalGeneration, whose vLLM class is SupportsMultiModal and
# SupportsPP but not SupportsLoRA; the text Llama4ForCausalLM (a LlamaForCausalLM, SupportsLoRA) defines no
# get_expert_mapping (its per-expert mapping is built in Llama4Model.load_weights), so its LoRA manager refuses an
# adapter on it. Its FusedMoE takes the routing weight on the input (apply_router_weight_on_input, sigmoid scores, no
# renormalisation) as transformers does; its loader also permutes q_proj's and k_proj's rows into its rotary layout
# (permute_qk_weight_for_rotary), which a LoRA on them would have to follow. A merged export is a plain
# Llama4ForCausalLM, which its Llama4ForCausalLM loads (the permutation then applies to the merged weights)
VLLM_NO_LORA = {"granitemoe": "vLLM's GraniteMoeForCausalLM takes no LoRA adapter (its LoRA manager needs a "
                              "get_expert_mapping, which that class does not define: read in vLLM's source, not run): "
                              "export --merged, a plain Granite-MoE model vLLM serves",
                "llama4_text": "vLLM takes no LoRA adapter for Llama-4 (read in vLLM's source at commits 0303cbd8 and "
                               "60d375cb, not run: its Llama4ForConditionalGeneration, the class of the hub's "
                               "checkpoints, does not support LoRA, and its Llama4ForCausalLM defines no "
                               "get_expert_mapping, which its LoRA manager requires of a fused-MoE model): export "
                               "--merged, a plain Llama-4 language model (Llama4ForCausalLM) vLLM serves"}


def vllm_blockers(mm: MoEModel, cfg) -> list[str]:
    """Why the vllm form cannot express this model (empty: it can): the per-expert layout takes what PEFT
    takes and the split layout; the fused 3-D form of gpt-oss takes what PEFT takes."""
    why = peft_blockers(mm, cfg)
    if mm.model_type in VLLM_NO_LORA:
        return [*why, VLLM_NO_LORA[mm.model_type]]
    if mm.model_type in VLLM_3D_EXPERT_LORA:
        return [w.replace("no PEFT form on the fused gate_up_proj", "no form in the fused 3-D expert LoRA vLLM reads "
                          f"for {mm.model_type} (one A on gate_up_proj)") for w in why]
    return [w for w in why if not w.startswith("split expert LoRA")]


def vllm_tensors(mm: MoEModel, rank: int | None = None) -> tuple[dict[str, torch.Tensor], list[str], int, float]:
    """(tensors by key, target module names, rank, alpha) of the vllm form: attention LoRA as PEFT writes it, the
    expert LoRA per expert (2-D), or for gpt-oss in PEFT's fused 3-D form (:data:`VLLM_3D_EXPERT_LORA`). ``rank``: the
    client's own, below the adapters' (:func:`client_rank`): the pairs are written at it."""
    known, _ = _adapted_modules(mm)
    cut = slice(None) if rank is None else slice(0, rank)
    gate, up, down = _EXPERT_PROJ.get(mm.model_type, ("gate_proj", "up_proj", "down_proj"))
    out, targets, first = {}, set(), None
    for name, mod in known:
        if isinstance(mod, LoRALinear):
            out[f"base_model.model.{name}.lora_A.weight"] = mod.lora_A.detach()[cut].float().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = mod.lora_B.detach()[:, cut].float().contiguous()
            targets.add(name.rsplit(".", 1)[-1])
            first = first or mod
        elif isinstance(mod, ExpertsWithLoRA) and mod.targets and mm.model_type in VLLM_3D_EXPERT_LORA:
            # PEFT's target_parameters keys, both projections always (vLLM asserts both; zero where not adapted)
            first = first or mod
            E, r, H, I = mod.num_experts, rank or mod.rank, mod.hidden_size, mod.intermediate_size
            for prefix, key, fan_in, fan_out in (("gate_up", f"{name}.base_layer", H, 2 * I), ("down", name, I, H)):
                if mod._targets(prefix):
                    A = mod._full(getattr(mod, f"{prefix}_lora_A").detach().float())[:, cut]
                    B = mod._full(getattr(mod, f"{prefix}_lora_B").detach().float())[..., cut]
                else:
                    A, B = torch.zeros(E, r, fan_in), torch.zeros(E, fan_out, r)
                pa, pb = ExpertsWithLoRA.to_peft_layout(A, B)
                out[f"base_model.model.{key}.lora_A.weight"] = pa.contiguous()
                out[f"base_model.model.{key}.lora_B.weight"] = pb.contiguous()
        elif isinstance(mod, ExpertsWithLoRA) and mod.targets:
            first = first or mod
            inter = mod.intermediate_size
            pairs = {}  # projection -> (A (E, r, in), B (E, out, r))
            for prefix, _, _ in expert_lora_pairs(mod.layout, mod.targets, 0, 0):
                A = mod._full(getattr(mod, f"{prefix}_lora_A").detach().float())[:, cut]
                B = mod._full(getattr(mod, f"{prefix}_lora_B").detach().float())[..., cut]
                if prefix == "gate_up":  # ΔW_gate_up = s·B·A, its rows the gate's then the up's
                    gate_rows, up_rows = mod.form.gate_rows(inter)
                    pairs[gate], pairs[up] = (A, B[:, gate_rows]), (A, B[:, up_rows])
                else:
                    pairs[{"gate": gate, "up": up, "down": down}[prefix]] = (A, B)
            # every expert carries all three projections (vLLM packs gate, up and down together and refuses an
            # expert without one): a projection not adapted gets a zero pair, ΔW = 0
            E, r = mod.num_experts, rank or mod.rank
            hidden = mod.hidden_size
            for proj, fan_in, fan_out in ((gate, hidden, inter), (up, hidden, inter), (down, inter, hidden)):
                pairs.setdefault(proj, (torch.zeros(E, r, fan_in), torch.zeros(E, fan_out, r)))
            block = _MOE_BLOCK.get(mm.model_type)
            if block is not None:
                name = name.replace(".mlp.experts", f".{block}.experts")
            # target_modules names the roles (SGLang maps them onto its fused gate_up / down and refuses w1/w2/w3;
            # vLLM does not read them); the keys keep the checkpoint's own names (Mixtral's w1 / w3 / w2)
            role = {gate: "gate_proj", up: "up_proj", down: "down_proj"}
            for proj, (A, B) in pairs.items():
                targets.add(role[proj])
                for e in range(mod.num_experts):
                    key = f"base_model.model.{name}.{e}.{proj}"
                    out[f"{key}.lora_A.weight"] = A[e].clone()  # gate and up share A: a copy each
                    out[f"{key}.lora_B.weight"] = B[e].clone()
    r = rank or first.rank
    return out, sorted(targets), r, first.scaling * r


def write_vllm(loaded: LoadedModel, out: Path) -> None:
    from safetensors.torch import save_file

    from .rundir import atomic_write_text

    tensors, targets, rank, alpha = vllm_tensors(loaded.mm, client_rank(loaded))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": _base_source(loaded.cfg),
              "r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None}
    if any(k.endswith(".experts.base_layer.lora_A.weight") for k in tensors):  # the fused 3-D form (gpt-oss)
        config["target_parameters"] = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    load_tokenizer(loaded.cfg.model.tokenizer or loaded.cfg.model.name).save_pretrained(out)


def write_fedmoe(loaded: LoadedModel, out: Path) -> None:
    from safetensors.torch import save_file

    from .rundir import atomic_write_bytes, atomic_write_text

    tensors = {n: t.detach().contiguous().cpu() for n, t in loaded.message.tensors.items()}
    save_file(tensors, str(out / _STATE))
    import io

    buf = io.BytesIO()
    torch.save(loaded.private, buf)
    atomic_write_bytes(out / _PRIVATE, buf.getvalue())
    meta = {"format": 1, "base_model": loaded.cfg.model.name, "method": loaded.cfg.algorithm.name,
            "client": loaded.client, "scalars": dict(loaded.message.scalars), "source": loaded.source,
            "config": config_to_dict(loaded.cfg)}
    load_tokenizer(loaded.cfg.model.tokenizer or loaded.cfg.model.name).save_pretrained(out)
    atomic_write_text(out / EXPORT_FILE, json.dumps(meta, indent=2, default=str) + "\n")


def _check_out_folder(out: Path) -> None:
    """Refuse, before the model loads, an ``out`` that is not a new or empty folder this process may write."""
    import os

    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is a file, not a folder: give a new folder to export into as OUT "
                          "(nothing is overwritten)")
    if out.is_dir() and any(out.iterdir()):
        if (out / IN_PROGRESS).exists():
            raise ExportError(f"{out} holds an unfinished export ({IN_PROGRESS}): another export is writing it, or one "
                              "was stopped midway; choose a new folder, or remove that one once no export writes it")
        raise ExportError(f"{out} exists and is not empty: choose a new folder (nothing is overwritten)")
    # the folder itself, or the nearest part of its path that exists: where the files (or folders) are created
    where = out.absolute()
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise ExportError(f"cannot create the folder {out}: {where} is a file, not a folder; choose a new folder "
                          "(OUT)")
    if not os.access(where, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write into {where} (Permission denied): choose a folder you may write as OUT, "
                          f"or make it writable (chmod u+w {shell_quote(where)})")


IN_PROGRESS = ".fedmoe-export-in-progress"  # the file by which an export holds its OUT until it is written


def _claim(out: Path) -> Path | None:
    """Hold ``out`` (a new or empty folder) for this export: the folder made if needed and :data:`IN_PROGRESS`
    created in it exclusively, so that a second export into it — started at the same time, past the emptiness check
    before either wrote — is refused instead of writing its files over this one's. Returns the outermost folder made
    here (OUT, or a missing parent of it), or None."""
    import os

    made = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)  # the outermost folder made
    try:
        if out.is_symlink() and not out.exists():
            raise ExportError(f"{out} is a symbolic link to {os.readlink(out)}, which does not exist: give a new folder "
                              "(or the link's target) as OUT")
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / IN_PROGRESS, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise ExportError(f"{out} is being written by another export (it holds {IN_PROGRESS}): choose another folder "
                          "(nothing is overwritten)") from None
    except OSError as e:
        raise ExportError(f"cannot create the folder {out}: {e.strerror or e}; choose a new folder you may write "
                          "(OUT)") from None
    os.close(fd)
    if [p.name for p in out.iterdir()] != [IN_PROGRESS]:  # another export finished into it meanwhile
        (out / IN_PROGRESS).unlink()
        raise ExportError(f"{out} was written by another export meanwhile: choose a new folder (nothing is "
                          "overwritten)")
    return made


def _release(out: Path, made: Path | None, written: bool) -> None:
    """End the hold of :func:`_claim`: a finished export keeps its files; one that failed midway leaves nothing of
    itself (the folders it made, OUT's missing parents too; else the folder empty, as it was)."""
    import shutil

    (out / IN_PROGRESS).unlink(missing_ok=True)
    if written:
        return
    if made is not None:  # OUT, then each parent it made while empty (another export may be finishing beside it)
        shutil.rmtree(out, ignore_errors=True)
        for parent in out.parents:
            if parent == made.parent:
                break
            try:
                parent.rmdir()
            except OSError:
                break
        return
    for p in out.iterdir():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def export_model(run_dir: str | Path, out: str | Path, client: int | None = None, merged: bool = False,
                 private_path: str | Path | None = None, form: str | None = None,
                 round_idx: int | None = None, exported: dict | None = None,
                 device: str | None = None, strict: bool = False) -> tuple[str, list[str]]:
    """Write the model to ``out`` (a new or empty folder) in ``form`` (``peft``, ``merged``, ``vllm``;
    None: ``merged`` when ``merged`` else ``peft``), or as a fedmoe folder when that form cannot express
    it (``strict``: refused instead, nothing written); returns (the form written, why not the one asked for: empty
    when it is the one asked for). ``form`` ``fedmoe`` asks for that folder. ``merged`` with another ``form`` asks for
    two forms and is refused."""
    if merged and form not in (None, "merged"):
        raise ExportError(f"--merged and --format {form} ask for two forms: --merged is --format merged (a plain Hugging "
                          f"Face model with the LoRA folded in), --format {form} another; give one of them")
    form = form or ("merged" if merged else "peft")
    if form not in ("peft", "merged", "vllm", "fedmoe"):
        raise ExportError(f"--format {form!r}: use peft, merged, vllm or fedmoe")
    out = Path(out)
    _check_out_folder(out)
    made, written = _claim(out), False
    try:
        result = _export_into(out, run_dir, client, private_path, form, round_idx, exported, device, strict)
        # safetensors writes 0600 files: a server running as another user could not read the export
        ordinary_permissions(p for p in out.rglob("*") if p.name != IN_PROGRESS)
        written = True
        return result
    finally:
        _release(out, made, written)


def _blockers(loaded: LoadedModel) -> dict[str, list[str]]:
    """Why each plain form (``merged``, ``peft``, ``vllm``) cannot express ``loaded``'s model (empty: it can)."""
    return {"merged": merge_blockers(loaded.mm), "peft": peft_blockers(loaded.mm, loaded.cfg),
            "vllm": vllm_blockers(loaded.mm, loaded.cfg)}


def forms_that_fit(loaded: LoadedModel) -> list[str]:
    """The plain forms (``merged``, ``peft``, ``vllm``) that can express ``loaded``'s model."""
    return [f for f, why in _blockers(loaded).items() if not why]


def _export_into(out: Path, run_dir, client, private_path, form: str, round_idx,
                 exported: dict | None, device: str | None = None, strict: bool = False) -> tuple[str, list[str]]:
    loaded = load_run_model(run_dir, client, private_path, round_idx, device=device)
    if exported is not None:  # what was exported, for the caller's message: "client 1 of RUN (after round 3)"
        exported["source"] = loaded.source
        exported["notes"] = export_notes(loaded.cfg, form, loaded.mm)
    if form == "fedmoe":  # asked for: the model exactly as the run evaluated it (a quantized base included)
        write_fedmoe(loaded, out)
        return "fedmoe", []
    blockers = _blockers(loaded)
    fit = [f for f, why in blockers.items() if not why]
    if exported is not None:
        exported["fits"] = fit
    why = blockers[form]
    if not why:
        {"merged": write_merged, "peft": write_peft, "vllm": write_vllm}[form](loaded, out)
        _write_source(loaded, out, form)
        return form, []
    if strict:
        raise ExportError(f"--strict: {loaded.source} has no {form} form ({'; '.join(why)}); "
                          + (f"it has a {' and a '.join(fit)} form" if fit else "only a fedmoe folder holds it "
                             "(--format fedmoe)") + ". Nothing was written")
    write_fedmoe(loaded, out)
    return "fedmoe", why


def export_notes(cfg, form: str, mm: MoEModel | None = None) -> list[str]:
    """What a user of an export in ``form`` must know to get the run's own numbers back from it."""
    notes = []
    # the projections with attention LoRA (what the serving engines treat differently)
    adapted = [] if form != "vllm" or mm is None else [n for n, m in mm.model.named_modules()
                                                          if isinstance(m, LoRALinear)]
    if any(n.endswith(".kv_b_proj") for n in adapted):
        notes.append("vLLM (0.34) loads LoRA on kv_b_proj but does not apply it under multi-head latent attention "
                     "(its attention keeps its own reference to the base layer); SGLang applies it. For vLLM, "
                     "train with lora.attention_targets leaving kv_b_proj out, or export --merged")
    if any(".linear_attn." in n for n in adapted):
        notes.append("SGLang (0.5.23) refuses LoRA on linear-attention projections at start-up; vLLM applies it. "
                     "For SGLang, train with lora.attention_targets: [q_proj, k_proj, v_proj, o_proj], or export "
                     "--merged")
    if form == "vllm" and mm is not None and mm.model_type in VLLM_3D_EXPERT_LORA and any(
            isinstance(m, ExpertsWithLoRA) and m.targets for m in mm.model.modules()):
        notes.append(f"the expert LoRA of {mm.model_type} is written in the fused 3-D form vLLM reads for it (PEFT's "
                     "target_parameters keys: experts.base_layer = gate_up_proj, experts = down_proj), not per expert; "
                     "read in vLLM's source, not served here (a vLLM started with --enable-mixed-moe-lora-format takes "
                     "it as 3-D only when the request says is_3d_lora_weight); SGLang was not checked")
    if form == "vllm" and mm is not None and mm.model_type == "lfm2_moe":
        notes.append("LFM2-MoE's expert LoRA is written under vLLM's expert names (feed_forward.experts.{e}.w1 / w3 / "
                     "w2, its Lfm2MoeForCausalLM.get_expert_mapping) and the short convolutions' in_proj / out_proj "
                     "LoRA under theirs: read in vLLM's source, not served here (in_proj is vLLM's merged B, C, x "
                     "linear: its LoRA with tensor parallelism was not checked); SGLang was not checked")
    if form == "vllm" and mm is not None and mm.model_type == "phimoe":
        notes.append("Phi-3.5-MoE's expert LoRA is written under vLLM's expert names (block_sparse_moe.experts.{e}.w1 / "
                     "w3 / w2, the get_expert_mapping of PhiMoEForCausalLM in vLLM's phimoe.py at commit 01524004): "
                     "read in vLLM's source, not served here; an older vLLM whose PhiMoE defines no get_expert_mapping "
                     "(as at commit c18f8240) takes no LoRA adapter for it at all (export --merged); SGLang was not "
                     "checked")
    if form in ("peft", "vllm") and mm is not None and mm.model_type in VLLM_NO_LORA:
        notes.append(VLLM_NO_LORA[mm.model_type])
    vision_language = vision_language_type(cfg.model.name) if form in ("merged", "peft", "vllm") else None
    if vision_language:
        notes.append(f"the base {cfg.model.name} is a vision-language checkpoint ({vision_language}): fedmoe loaded and "
                     "trained its language model alone, the model AutoModelForCausalLM builds from it (no vision tower "
                     "or projector); " + ("this merged model is that language model: it reads text, not images"
                                          if form == "merged" else
                                          "this adapter applies to that language model, not to the checkpoint's "
                                          "vision-language class" if form == "peft" else
                                          "its keys name that language model's modules (vLLM serves them on the "
                                          "vision-language class when started with --enable-mixed-moe-lora-format)"))
    legacy = legacy_values_in(cfg.model.name) if form == "peft" else []
    if legacy:
        import transformers

        notes.append(f"transformers {transformers.__version__} refuses this base's config as stored (values an older "
                     "transformers wrote: " + ", ".join(legacy) + "): load the base with "
                     "config=fedmoe.moe.model.load_model_config(base), which reads them as that transformers did, "
                     "before applying this adapter")
    if any(n.endswith(("q_proj", "k_proj", "v_proj")) for n in adapted) and mm.model_type == "flex_olmo":
        notes.append("SGLang (0.5.23) serves FlexOlmo through its Transformers backend, which drops q/k/v LoRA "
                     "without a word; vLLM applies it. For SGLang, train with lora.attention_targets: [o_proj], or "
                     "export --merged")
    if form == "peft" and _mxfp4_base(cfg.model.name):
        notes.append("the base checkpoint stores its experts in MXFP4: load it with "
                     "quantization_config=Mxfp4Config(dequantize=True) before applying this adapter (as fedmoe did); "
                     "where transformers keeps MXFP4 experts (a GPU with its kernels package) the adapter's "
                     "gate_up_proj/down_proj LoRA does not fit them")
    if form == "merged" and mm is not None and mm.model_type == "gpt_oss":
        notes.append("a merged gpt-oss is a bf16/fp32 model, not MXFP4: transformers loads it; vLLM's serving of "
                     "gpt-oss in bf16 has open reports of wrong outputs (vLLM issue 22380), so check its answers "
                     "against transformers' before serving it there")
    q = cfg.model.quantization
    if q != "none" and form in ("peft", "merged", "vllm"):
        notes.append(f"the run trained and was evaluated on an {q.upper()} base; this export applies its adapters to the "
                     "full-precision base, so its outputs differ from the evaluated model's by the quantization "
                     "error (fedmoe generate RUN, or export --format fedmoe, uses the quantized base)")
    stored = _stored_dtype(cfg.model.name) if form == "peft" else None
    if form == "peft" and stored != cfg.model.dtype:
        notes.append(f"the run computed in {cfg.model.dtype}: load the base with dtype=torch.{cfg.model.dtype} "
                     + ("(it loads in the dtype it is stored in by default" + (f", {stored})" if stored else ")")))
    return notes


def _mxfp4_base(name: str) -> bool:
    """Whether a base model's checkpoint stores its experts in MXFP4 (gpt-oss on the hub), if its config says."""
    from .moe.model import is_mxfp4

    try:
        return is_mxfp4(load_model_config(name))
    except (OSError, ValueError):
        return False


def _stored_dtype(name: str) -> str | None:
    """The dtype a base model's checkpoint is stored in (what from_pretrained loads it in), if its config says."""
    try:
        dtype = getattr(load_model_config(name), "dtype", None)
    except (OSError, ValueError):
        return None
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _write_source(loaded: LoadedModel, out: Path, form: str) -> None:
    from .rundir import atomic_write_text

    meta = {"format": 1, "form": form, "source": loaded.source, "base_model": loaded.cfg.model.name,
            "method": loaded.cfg.algorithm.name, "client": loaded.client, "config": config_to_dict(loaded.cfg)}
    atomic_write_text(out / SOURCE_FILE, json.dumps(meta, indent=2, default=str) + "\n")


def load_exported(folder: str | Path, dtype: str | None = None, device: str | None = None) -> MoEModel:
    """A fedmoe export folder back as the model it was."""
    return _load_exported(folder, dtype, device)[0]


def _load_exported(folder: str | Path, dtype: str | None = None, device: str | None = None):
    """(model, its run's config, the folder's metadata) of a fedmoe export folder."""
    from safetensors.torch import load_file

    from .federation.local import load_client_model

    folder = Path(folder)
    _check_finished(folder)
    meta = json.loads((folder / EXPORT_FILE).read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ConfigError(f"{folder / EXPORT_FILE}: not the description a fedmoe export writes (it was altered)")
    if meta.get("format") != 1:
        raise ConfigError(f"{folder / EXPORT_FILE}: format {meta.get('format')!r} is not one this fedmoe reads (1)")
    tree = meta["config"]
    if dtype is not None:
        tree["model"]["dtype"] = dtype
    if device is not None:
        tree["model"]["device"] = device
    cfg = config_from_tree(tree, str(folder / EXPORT_FILE))
    private = load_tensor_file(folder / _PRIVATE, "export's private state")  # refused before any model loads
    method = METHODS[cfg.algorithm.name]
    mm = load_client_model(cfg, method)
    message = Message(tensors=load_file(str(folder / _STATE)), scalars=meta.get("scalars") or {})
    client = meta.get("client")
    n = cfg.data.partition.num_clients
    if client is not None and (isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < n):
        raise ConfigError(f"{folder / EXPORT_FILE}: client {str(client)[:40]!r} is not one of its run's clients "
                          f"0..{n - 1} (it was altered)")
    method.client(cfg).load(mm, client, message, private)
    mm.model.eval()
    return mm, cfg, meta


def _check_finished(folder: Path) -> None:
    """Refuse a folder an export is still writing, or one it left midway (killed outright): what is in it may be
    part of a model."""
    if (folder / IN_PROGRESS).exists():
        raise ExportError(f"{folder} holds an unfinished export ({IN_PROGRESS}): an export is writing it, or one was "
                          "killed midway; export again into a new folder")


def _read_source(folder: Path) -> dict:
    """An export's ``fedmoe-source.json``, checked: a JSON object whose ``config`` is one."""
    f = folder / SOURCE_FILE
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{f} cannot be read ({type(e).__name__}: {e}): remove it to use the model with "
                          "fedmoe's default template and decoding") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ExportError(f"{f} is not what fedmoe export writes (a JSON object with the run's config): remove it "
                          "to use the model with fedmoe's default template and decoding")
    return meta


def load_for_answers(path: str | Path, client: int | None = None, private_path: str | Path | None = None,
                     round_idx: int | None = None, device: str | None = None) -> LoadedModel:
    """What ``fedmoe generate PATH`` answers with: a run directory's model (the global one or
    ``client``'s), or an export of one — a fedmoe folder (restored exactly) or a merged model — in the
    prompt template and decoding of the run it came from (``fedmoe-source.json``; a Hugging Face model
    folder without one: fedmoe's defaults). An adapter (PEFT or vllm form) is refused, naming the run. ``device``:
    load it there rather than on the run's ``model.device``."""
    path = Path(path)
    _check_finished(path)
    is_export = (path / EXPORT_FILE).is_file() or (path / SOURCE_FILE).is_file()
    if is_export and (client is not None or private_path is not None or round_idx is not None):
        raise ExportError(f"{path} is an export of one model: --client, --private and --round choose a model of a run "
                          "directory; leave them out")
    if (path / EXPORT_FILE).is_file():
        mm, cfg, meta = _load_exported(path, device=device)
        return LoadedModel(cfg, mm, meta.get("client"), Message(), {}, f"{meta.get('source')}, exported to {path}")
    if (path / "adapter_config.json").is_file():
        origin = ""
        if (path / SOURCE_FILE).is_file():
            origin = f" of {_read_source(path).get('source')}"
        raise ExportError(f"{path} is a LoRA adapter{origin}, not a model: answer with the run directory it was "
                          "exported from, or export it with --merged")
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        if (path / SOURCE_FILE).is_file():
            meta = _read_source(path)
            tree = meta["config"]
            source = f"{meta.get('source')}, merged into {path}"
        else:
            tree, source = {}, f"the Hugging Face model in {path} (fedmoe's default prompt template and decoding)"
        tree.setdefault("model", {}).update({"name": str(path), "tokenizer": None, "quantization": "none",
                                             **({"device": device} if device is not None else {})})
        cfg = config_from_tree(tree, str(path / SOURCE_FILE))
        mm = MoEModel.from_pretrained(str(path), dtype=cfg.model.dtype, device=cfg.model.device,
                                      attn_implementation=cfg.model.attn_implementation)
        mm.model.eval()
        return LoadedModel(cfg, mm, None, Message(), {}, source)
    return load_run_model(path, client, private_path, round_idx, verb="generate from", device=device)


def load_model(name_or_path: str | Path, dtype: str | None = None, device: str = "cpu") -> MoEModel:
    """Any model fedmoe can run: a fedmoe export folder (restored exactly: in its run's ``model.dtype`` unless
    ``dtype`` says otherwise) or what :meth:`MoEModel.from_pretrained` loads (a hub id, a local Hugging Face folder,
    ``builtin:<name>``; float32 unless ``dtype``)."""
    _check_finished(Path(name_or_path))
    if (Path(name_or_path) / EXPORT_FILE).is_file():
        return load_exported(name_or_path, dtype=dtype, device=device)
    return MoEModel.from_pretrained(str(name_or_path), dtype=dtype or "float32", device=device)


def answer(loaded: LoadedModel, instruction: str, context: str = "", max_new_tokens: int | None = None) -> str:
    """The model's answer to an instruction, in the training prompt template, decoded as the run's
    evaluation decodes (greedy, ``eval.no_repeat_ngram_size``, ``eval.max_new_tokens``)."""
    from .data.sources import Example
    from .data.tokenize import _eos_id, pad_token_id, tokenize_prompt
    from .eval.generate import generation_prompt_limit, greedy_generate

    cfg = loaded.cfg
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    ex = Example(instruction=instruction, input=context, output="", category="", source="prompt")
    new = cfg.eval.max_new_tokens if max_new_tokens is None else max_new_tokens
    ids = tokenize_prompt(tok, ex, generation_prompt_limit(loaded.mm.model.config, cfg.data.max_length, new))
    out = greedy_generate(loaded.mm.model, [ids], pad_token_id(tok), _eos_id(tok), new, 1, loaded.mm.device,
                          no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size)[0]
    return tok.decode(out, skip_special_tokens=True).strip()


__all__ = ["EXPORT_FILE", "SOURCE_FILE", "answer", "ExportError", "LoadedModel", "export_model", "load_exported",
           "load_for_answers", "load_model", "load_run_model",
           "merge_blockers", "peft_blockers"]
