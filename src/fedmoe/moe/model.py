"""MoEModel: one frozen Hugging Face MoE model plus the small trainable state fedmoe adds to it.

A single base model in memory serves every client: a client's state (LoRA, rescaler, ...) is a
``dict[str, Tensor]`` swapped in with :meth:`MoEModel.load_state` and read with :meth:`get_state`.
"""

from __future__ import annotations

import json
import types
import warnings
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .arch import (SPARSEMIXER_ARCHITECTURES, SUPPORTED_ARCHITECTURES, MoELayer, UnsupportedModelError,
                   find_moe_layers, model_type_of)
from .inventory import Inventory, Role, TensorInfo
from .lora import ActivationTracker, ExpertsWithLoRA, LoRALinear, RouterWithLoRA, adapter_device

BUILTIN_PREFIX = "builtin:"
EXPORT_MARKER = "fedmoe_model.json"  # the file that makes a folder a fedmoe export (fedmoe.export)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TopKError(ValueError):
    pass


class ModelLoadError(ValueError):
    """A model that cannot be loaded: the message names it, the cause and what to do."""


def check_context(config, max_length: int, name: str) -> None:
    """Refuse ``data.max_length`` above the model's context (``max_position_embeddings``): positions
    beyond it were never trained, and some models cannot even embed them."""
    ctx = getattr(config, "max_position_embeddings", None)
    if isinstance(ctx, int) and max_length > ctx:
        raise ModelLoadError(f"data.max_length = {max_length} is above the context of the model {name} "
                             f"(max_position_embeddings = {ctx}): set data.max_length to at most {ctx}")


def _bad_safetensors(folder: Path) -> list[str]:
    """The safetensors files in ``folder`` whose header cannot be read (truncated or not safetensors)."""
    from safetensors import safe_open

    bad = []
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
            bad.append(f"{f} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return bad


def load_error(name_or_path: str, e: Exception) -> ModelLoadError:
    """A one-line cause and what to do, for an exception of transformers' ``from_pretrained``."""
    import os

    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    folder = Path(name_or_path)
    if folder.is_dir():
        bad = _bad_safetensors(folder)
        if bad:
            return ModelLoadError(f"model folder {folder}: corrupt or truncated weights file {'; '.join(bad)}: "
                                  "download or export the model again")
        return ModelLoadError(f"model folder {folder} cannot be loaded ({type(e).__name__}: {first}): check that it "
                              "holds a complete Hugging Face model (config.json and its weights)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    return ModelLoadError(f"model '{name_or_path}' cannot be loaded ({type(e).__name__}: {first}): "
                          + ("HF_HUB_OFFLINE is set, so only models in the local Hugging Face cache load: download it "
                             "while online, or give a local model folder" if offline else
                             "check the hub id (and your access to it), or give a local model folder"))


def builtin_asset(path: str) -> Path:
    return Path(str(resources.files("fedmoe") / "assets" / path))


def builtin_tiny_olmoe_config():
    """The built-in tiny OLMoE-architecture config (random init; real OLMoE tokenizer)."""
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=50304,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        max_position_embeddings=1024,
        pad_token_id=1,
        eos_token_id=50279,
        bos_token_id=None,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
    )


# builtin:<name> -> a config factory (random init) or a folder inside the package (pretrained)
BUILTIN_MODELS = {"tiny-olmoe": builtin_tiny_olmoe_config, "tiny-moe": "models/tiny-moe"}


def builtin_model_path(name_or_path: str) -> Path | None:
    """The shipped folder of a pretrained built-in model, or None."""
    key = name_or_path[len(BUILTIN_PREFIX):] if name_or_path.startswith(BUILTIN_PREFIX) else None
    entry = BUILTIN_MODELS.get(key) if key else None
    return builtin_asset(entry) if isinstance(entry, str) else None


# ------------------------------------------------------------------ a model's config alone
# the configs fedmoe reads without a model: the supported MoE families and DeepSeekMoE v1 (FLOPs accounting)
CONFIG_ARCHITECTURES = SUPPORTED_ARCHITECTURES + ("deepseek",)


def _number_as_flag(v):
    """A number where a flag is now expected, read as a number-valued flag was (its truth: 0 false, any other true);
    anything else unchanged."""
    return bool(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


# config values that older transformers wrote and transformers 5.23's typed configs refuse, by model_type: key -> how
# the old value reads. Llama-4's attn_temperature_tuning was a number in configs transformers 4.51 saved (some Llama-4
# configs in use hold 4: a 4.51 dump of Scout's, fine-tuned Scouts'; 4.51 tested its truth, `if
# self.attn_temperature_tuning and not self.use_rope`), a bool since: 5.23 refuses the int ("Field
# 'attn_temperature_tuning' expected bool, got int"), in AutoConfig, from_pretrained and AutoTokenizer alike
LEGACY_CONFIG_VALUES = {"llama4_text": {"attn_temperature_tuning": _number_as_flag}}


def legacy_values_in(model_or_config: str) -> list[str]:
    """The keys of a model's stored config that hold a value of :data:`LEGACY_CONFIG_VALUES` transformers now refuses
    (read as the transformers that wrote them did); [] also where the config cannot be read."""
    try:
        d, _ = _read_config(model_or_config)
    except Exception:  # noqa: BLE001 - not readable here: nothing to say about it
        return []
    subs = [d, d.get("text_config")] if isinstance(d, dict) else []
    return sorted(k for sub in subs if isinstance(sub, dict)
                  for k, rule in LEGACY_CONFIG_VALUES.get(sub.get("model_type"), {}).items()
                  if k in sub and rule(sub[k]) is not sub[k])


def _legacy_values(d: dict) -> dict:
    """``d`` (a config.json's dict) with the old values of :data:`LEGACY_CONFIG_VALUES` read as the transformers that wrote
    them read them, in a vision-language checkpoint's ``text_config`` too; ``d`` itself is left as it is."""
    def fixed(sub: dict) -> dict:
        rules = LEGACY_CONFIG_VALUES.get(sub.get("model_type"), {})
        return {k: rules[k](v) if k in rules else v for k, v in sub.items()}

    d = fixed(d)
    if isinstance(d.get("text_config"), dict):
        d["text_config"] = fixed(d["text_config"])
    return d


def _config_from_dict(d: dict, source: str):
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    d = _legacy_values(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise UnsupportedModelError(f"{source}: the config has no 'model_type'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated-key warnings of old config files (rope_scaling, ...)
        if model_type in CONFIG_MAPPING:
            config = AutoConfig.for_model(model_type, **d)
            text = config.get_text_config(decoder=True)
            if model_type not in CONFIG_ARCHITECTURES and getattr(text, "model_type", None) in CONFIG_ARCHITECTURES:
                # a vision-language checkpoint (Qwen3.5, Llama-4's llama4): its language model, as AutoModelForCausalLM
                # loads it, with the checkpoint's quantization_config (as AutoModelForCausalLM carries it over: a
                # Llama-4 given to from_pretrained as this config must load its weights as stored)
                quantization = getattr(config, "quantization_config", None)
                if quantization is not None and getattr(text, "quantization_config", None) is None:
                    text.quantization_config = quantization
                return text
            return config
        if model_type == "deepseek":  # DeepSeekMoE v1: remote code only; a generic config carries its keys
            return PretrainedConfig(model_type=model_type, **d)
    raise UnsupportedModelError(
        f"{source}: model type '{model_type}' is unknown to transformers; FLOPs accounting supports "
        f"{', '.join(CONFIG_ARCHITECTURES)}"
    )


def _read_config(model_or_config: str):
    """(the config.json's dict, where it was read), or (a built-in's config object, its name) for a built-in built
    from its config: :func:`load_model_config`'s reading."""
    s = str(model_or_config)
    if s.startswith(BUILTIN_PREFIX):
        key = s[len(BUILTIN_PREFIX):]
        if key not in BUILTIN_MODELS:
            raise UnsupportedModelError(f"unknown built-in model '{s}'; available: "
                                        + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS))
        folder = builtin_model_path(s)
        if folder is None:
            return BUILTIN_MODELS[key](), s
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"the built-in model '{s}' has no config.json in {folder}; rebuild it with "
                                    "`fedmoe pretrain configs/pretrain-tiny-moe.yaml`")
        s = str(folder)
    p = Path(s)
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p.parent} is a folder without a config.json")
    if p.is_file():
        try:
            return json.loads(p.read_text()), str(p)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not a JSON config ({e})") from None
    # a hub id: the raw dict (works for remote-code configs too, e.g. DeepSeekMoE v1)
    from transformers import PretrainedConfig

    try:
        d, _ = PretrainedConfig.get_config_dict(s)
    except Exception as e:  # noqa: BLE001 - OSError, EnvironmentError, HF hub errors
        raise FileNotFoundError(
            f"'{s}' is not a config.json, a folder with one, or builtin:<name>; as a hub id its config could "
            f"not be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline "
            "(HF_HUB_OFFLINE=1) only models in the local Hugging Face cache load: download it while online, or give a "
            "local model folder (or its config.json) instead"
        ) from None
    return d, s


def load_model_config(model_or_config: str):
    """A transformers config from a config.json path, a folder holding config.json,
    ``builtin:<name>``, or a hub id (read from the local cache when offline). Of a vision-language checkpoint
    (Llama-4's, Qwen3.5's) the config of its language model, the model fedmoe loads."""
    d, source = _read_config(model_or_config)
    return _config_from_dict(d, source) if isinstance(d, dict) else d


def vision_language_type(model_or_config: str) -> str | None:
    """The ``model_type`` of a vision-language checkpoint of which fedmoe loads the language model alone (Llama-4's
    ``llama4``, Qwen3.5's ``qwen3_5_moe``: AutoModelForCausalLM's text model, no vision tower), else None (also where
    the config cannot be read)."""
    try:
        d, _ = _read_config(model_or_config)
    except Exception:  # noqa: BLE001 - not readable here: nothing to say about it
        return None
    if not isinstance(d, dict) or not isinstance(d.get("text_config"), dict):
        return None
    model_type = d.get("model_type")
    return model_type if model_type not in CONFIG_ARCHITECTURES else None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str, what: str = "model.device") -> None:
    """Refuse a device that is not one, or a CUDA device this machine does not have, before anything is
    loaded or written."""
    try:
        d = resolve_device(device)
    except RuntimeError:
        raise ModelLoadError(f"{device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"{what} = {device}, but this machine has no CUDA device (torch "
                                 f"{torch.__version__}, {'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}):"
                                 " use auto or cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ModelLoadError(f"{what} = {device}, but this machine has {torch.cuda.device_count()} CUDA "
                                 f"device(s): use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def load_tokenizer(name_or_path: str):
    """The tokenizer of ``name_or_path`` (``model.tokenizer`` or else ``model.name``). One that cannot be built
    there (a model folder without tokenizer files: transformers' "Couldn't instantiate the backend tokenizer"),
    or that is built empty (transformers builds some families' tokenizers from nothing, and they encode text to
    no ids), is a :class:`ModelLoadError` naming the folder or id and ``model.tokenizer``."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoTokenizer

    def unusable(cause: str) -> ModelLoadError:
        return ModelLoadError(
            f"no usable tokenizer in {name_or_path!r} ({cause}): put the model's tokenizer files (tokenizer.json, "
            "tokenizer_config.json, ...) there, or name a folder or hub id that has them with model.tokenizer "
            "(--set model.tokenizer=PATH_OR_ID)")

    folder = builtin_model_path(name_or_path)
    if folder is not None:
        tok = AutoTokenizer.from_pretrained(str(folder))
    elif name_or_path.startswith(BUILTIN_PREFIX):
        tok = AutoTokenizer.from_pretrained(str(builtin_asset("tokenizers/olmoe")))
    else:
        try:
            try:
                tok = AutoTokenizer.from_pretrained(name_or_path)
            except StrictDataclassError:  # AutoTokenizer reads the model's config too: a value transformers now refuses
                tok = AutoTokenizer.from_pretrained(name_or_path, config=load_model_config(name_or_path))
        except (ValueError, OSError) as e:
            said = " ".join(str(e).split())
            raise unusable("transformers could not build its tokenizer from the files there" if "backend tokenizer" in said
                           else f"{type(e).__name__}: {said[:300]}") from None
        if not tok("a", add_special_tokens=False)["input_ids"]:
            raise unusable(f"transformers built a {type(tok).__name__} of {len(tok)} token(s) that encodes text to "
                           "nothing")
    # fedmoe truncates token ids itself (data.max_length); without this every long Dolly context
    # prints a "longer than the maximum sequence length" warning that does not apply
    tok.model_max_length = int(1e12)
    return tok


def attention_for(model_type: str | None, requested: str) -> str:
    """The attention implementation a model of ``model_type`` runs for ``model.attn_implementation``:
    the one asked for, but eager where transformers has no SDPA path for the family (gpt-oss, whose
    attention sinks SDPA cannot take: its from_pretrained refuses ``sdpa``)."""
    from .arch import EAGER_ONLY_ARCHITECTURES

    return "eager" if requested == "sdpa" and model_type in EAGER_ONLY_ARCHITECTURES else requested


def _quant_method(config) -> str | None:
    """The ``quant_method`` of a config's ``quantization_config`` (a checkpoint stored quantized), or None."""
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def is_mxfp4(config) -> bool:
    """Whether a config is of a checkpoint whose experts are stored in MXFP4 (gpt-oss on the hub)."""
    return _quant_method(config) == "mxfp4"


def check_not_prequantized(config, name_or_path: str) -> None:
    """Refuse a checkpoint stored quantized (FP8, GPTQ, AWQ, compressed-tensors, bitsandbytes...) other than gpt-oss's
    MXFP4 (dequantized as it loads): transformers then builds its experts as another module (Llama-4's FP8 experts are
    FbgemmFp8Llama4TextExperts, transposed, which fedmoe could not tell from the stacks it reads) or leaves them in
    bf16 beside quantized linears; fedmoe trains on a full-precision base and quantizes that itself."""
    method = _quant_method(config)
    if method is not None and method != "mxfp4":
        raise UnsupportedModelError(
            f"{name_or_path} is stored quantized (quantization_config quant_method: {method}); fedmoe trains on a "
            "full-precision base and quantizes it itself, fused experts included: give the model's bf16 checkpoint "
            "and set model.quantization: nf4, fp4 or int8")


def pretrained_kwargs(name_or_path: str, dtype: str = "float32", attn_implementation: str = "sdpa") -> dict:
    """The keyword arguments of ``AutoModelForCausalLM.from_pretrained`` for a model fedmoe loads: its
    dtype, its attention (:func:`attention_for`), and for a checkpoint stored in MXFP4 (gpt-oss on the
    hub) ``Mxfp4Config(dequantize=True)``: its experts dequantized into ``dtype`` while loading, the fused
    tensors fedmoe's expert path (and its own ``model.quantization``) works on. Without it transformers
    keeps them in MXFP4 where the ``kernels`` package and Triton are installed on a GPU (packed uint8 stacks
    of another module, for inference only) and dequantizes them elsewhere. A family whose hub configs hold values
    transformers now refuses (Llama-4's, :data:`LEGACY_CONFIG_VALUES`) gets ``config``: fedmoe's reading of it, its
    language model's config for a vision-language checkpoint, which is what AutoModelForCausalLM builds from it
    (transformers' own reading refuses it)."""
    kw = {"dtype": _DTYPES[dtype], "attn_implementation": attn_implementation}
    try:
        config = load_model_config(name_or_path)
    except Exception:  # noqa: BLE001 - from_pretrained then says what is wrong with the name or folder
        return kw
    check_not_prequantized(config, name_or_path)
    kw["attn_implementation"] = attention_for(getattr(config, "model_type", None), attn_implementation)
    if getattr(config, "model_type", None) in LEGACY_CONFIG_VALUES:
        kw["config"] = config
    if is_mxfp4(config):
        from transformers import Mxfp4Config

        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    return kw


def forget_mxfp4_conversions(model):
    """``model`` (loaded by ``from_pretrained`` with :func:`pretrained_kwargs`) without the record that its experts
    came from MXFP4 blocks and scales: ``save_pretrained`` reverses the conversions it loaded with, and would write
    the dequantized stacks back under the ``*_blocks`` names, with no scales and no quantization_config, which a
    reload ignores (its experts then random, with a warning only). A merged export is a plain model."""
    kept = [c for c in (getattr(model, "_weight_conversions", None) or [])
            if not any(str(p).endswith(("_blocks", "_scales")) for p in getattr(c, "source_patterns", ()))]
    if getattr(model, "_weight_conversions", None) is not None:
        model._weight_conversions = kept or None
    return model


def hf_from_config(config, dtype: str = "float32", attn_implementation: str = "sdpa", seed: int = 0):
    """The plain Hugging Face model of ``config`` with the seeded random initialisation fedmoe uses
    (a ``builtin:`` model built from its config; the base that ``fedmoe export`` merges into)."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = attention_for(getattr(config, "model_type", None), attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])


def _first_selections(router, args, output):
    """Forward hook of a sparsemixer router (Phi-3.5-MoE): its (logits, weights, experts) with the first
    ``router.top_k`` of its two selections kept. transformers' sparsemixer reads no top_k and always chooses two, one
    after the other (:data:`fedmoe.moe.arch.SPARSEMIXER_ARCHITECTURES`); at k = 1 this keeps the first, with the
    weight and the gradient estimator of sparsemixer's first step, as it computes them (the second step's random
    draws are still made, so a run's random stream is the same at either k)."""
    k = int(router.top_k)
    logits, weights, experts = output
    return (logits, weights[..., :k], experts[..., :k]) if k < weights.shape[-1] else output


def _routed_llama4_forward(block, hidden_states):
    """``Llama4TextMoe.forward`` (transformers 5.23) with its experts on the routed tokens only (fedmoe's expert path,
    ExpertsWithLoRA: LoRA, counting, padding skipped, FLAME's k_i and rescaler). transformers' block scatters the
    router's top-k scores — each the sigmoid of its logit, not renormalised — into an (T, E) table (0 elsewhere:
    sigmoid(-inf)), multiplies every token by each expert's score and runs all E experts on all T tokens
    (``routed_in = x.repeat(E, 1) * scores``); an expert given 0 returns 0 (no biases, silu(0) = 0), so that equals
    Σ_{e ∈ top-k} expert_e(s_e · x), which the routed path computes (its ``scale_input``). The top-k experts are the
    router's own: the same ``torch.topk`` of the logits it returns (through router LoRA too), their weights its
    scores there. Returns (shared expert + routed, router logits) as the block does (the logits feed transformers'
    router-logit outputs)."""
    x = hidden_states.reshape(-1, block.hidden_dim)
    router = block.router
    scores, logits = router(x)
    index = torch.topk(logits, router.top_k, dim=1).indices
    routed = block.experts(x, index, scores.gather(1, index))
    return block.shared_expert(x) + routed, logits


# the families whose transformers MoE block does not hand its experts the routing (experts(hidden, index, weights)):
# its forward is replaced by one that does, on each block (a bound method: the block's hooks still fire)
_ROUTED_BLOCK_FORWARDS = {"llama4_text": _routed_llama4_forward}


class MoEModel:
    """A Hugging Face MoE causal LM with fedmoe's adapters, top-k control and activation counting."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.model_type = model_type_of(model)
        self.layers: list[MoELayer] = find_moe_layers(model)
        self.num_experts = self.layers[0].num_experts
        self.default_top_k = int(self.layers[0].router.top_k)
        self.top_k = self.default_top_k
        if self.model_type in SPARSEMIXER_ARCHITECTURES:
            if self.default_top_k != 2:
                raise UnsupportedModelError(
                    f"this {self.model_type} config routes to num_experts_per_tok = {self.default_top_k} experts, but "
                    "its sparsemixer router (transformers) always chooses two: fedmoe takes a phimoe model with "
                    "num_experts_per_tok: 2 (Phi-3.5-MoE's)")
            for layer in self.layers:  # k = 1 keeps sparsemixer's first selection (its own router ignores top_k)
                layer.router.register_forward_hook(_first_selections)
        self.tracker = ActivationTracker(len(self.layers), self.num_experts)
        for p in self.model.parameters():
            p.requires_grad_(False)
        # Wrap every experts module once, so counting works with or without expert LoRA.
        for layer in self.layers:
            if not isinstance(layer.block.experts, ExpertsWithLoRA):
                layer.block.experts = ExpertsWithLoRA(layer.experts, layer.index, self.tracker,
                                                      scale_input=layer.scales_input)
        routed_forward = _ROUTED_BLOCK_FORWARDS.get(self.model_type)
        if routed_forward is not None:  # Llama-4: its block runs every expert on every token; fedmoe routes them
            for layer in self.layers:
                layer.block.forward = types.MethodType(routed_forward, layer.block)
        # the experts see the attention mask of every forward (they route only the real tokens)
        decoder = getattr(model, "model", model)
        tracker = self.tracker

        def capture_mask(module, args, kwargs):
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            tracker.set_forward_mask(mask)

        decoder.register_forward_pre_hook(capture_mask, with_kwargs=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", device: str = "cpu",
                        attn_implementation: str = "sdpa", seed: int = 0) -> "MoEModel":
        """A hub id, a local folder or ``builtin:<name>`` (a folder written by ``fedmoe export`` in its
        fedmoe form: :func:`fedmoe.export.load_model`). An MXFP4 checkpoint (gpt-oss) is dequantized
        into ``dtype`` as it loads (:func:`pretrained_kwargs`)."""
        from transformers import AutoModelForCausalLM

        if (Path(name_or_path) / EXPORT_MARKER).is_file():  # a client's model from `fedmoe export`
            raise ModelLoadError(f"{name_or_path} is a fedmoe export folder (a client's model: a base model named in "
                                 "it, plus adapters): load it with fedmoe.export.load_model(folder) (which also "
                                 "loads any Hugging Face model) or fedmoe.export.load_exported(folder)")
        if name_or_path.startswith(BUILTIN_PREFIX):
            key = name_or_path[len(BUILTIN_PREFIX):]
            if key not in BUILTIN_MODELS:
                raise UnsupportedModelError(
                    f"unknown built-in model '{name_or_path}'; available: "
                    + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
                )
            entry = BUILTIN_MODELS[key]
            if isinstance(entry, str):
                folder = builtin_asset(entry)
                if not (folder / "config.json").is_file():
                    raise UnsupportedModelError(f"the built-in model '{name_or_path}' is missing from {folder}; "
                                                "rebuild it with `fedmoe pretrain configs/pretrain-tiny-moe.yaml`")
                name_or_path = str(folder)
            else:
                return cls.from_config(entry(), dtype=dtype, device=device,
                                       attn_implementation=attn_implementation, seed=seed)
        kwargs = pretrained_kwargs(name_or_path, dtype, attn_implementation)  # a checkpoint stored quantized: refused
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:  # missing/corrupt files, unknown ids
            raise load_error(name_or_path, e) from None
        except Exception as e:  # noqa: BLE001 - safetensors' own SafetensorError is a bare Exception
            if type(e).__name__ != "SafetensorError":
                raise
            raise load_error(name_or_path, e) from None
        return cls(model.to(resolve_device(device)))

    @classmethod
    def from_config(cls, config, dtype: str = "float32", device: str = "cpu",
                    attn_implementation: str = "sdpa", seed: int = 0) -> "MoEModel":
        return cls(hf_from_config(config, dtype, attn_implementation, seed).to(resolve_device(device)))

    @classmethod
    def skeleton(cls, name_or_path: str, dtype: str = "float32") -> "MoEModel":
        """The model's structure without its weights: built from its config alone on PyTorch's meta
        device (nothing is loaded or allocated). Adapters added to it live on the CPU
        (:func:`fedmoe.moe.lora.adapter_device`), so the names, shapes and seeded initial values of a
        method's trainable tensors are known without a live model."""
        from transformers import AutoModelForCausalLM

        config = load_model_config(name_or_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
        return cls(model)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def experts_module(self, layer: int) -> ExpertsWithLoRA:
        return self.layers[layer].block.experts

    # ------------------------------------------------------------------ adapters
    def add_expert_lora(self, rank: int, alpha: float, targets=("gate_up_proj", "down_proj"),
                        dropout: float = 0.0, layers: list[int] | None = None,
                        experts: dict[int, list[int]] | None = None, layout: str = "fused") -> None:
        """Per-expert LoRA on the fused routed experts of the given MoE layers (default all);
        ``experts`` restricts it to some experts per MoE layer ({layer index: [expert ids]}).
        ``layout``: ``fused`` (one pair on gate_up_proj) or ``split`` (a pair each for gate, up and
        down; :func:`fedmoe.moe.lora.expert_lora_pairs`)."""
        for layer in self.layers:
            if layers is not None and layer.index not in layers:
                continue
            layer.block.experts = ExpertsWithLoRA(layer.experts, layer.index, self.tracker,
                                                  rank=rank, alpha=alpha, targets=tuple(targets),
                                                  dropout=dropout,
                                                  lora_experts=None if experts is None else experts[layer.index],
                                                  layout=layout, scale_input=layer.scales_input)

    def add_router_lora(self, rank: int, alpha: float) -> None:
        """LoRA on every MoE layer's router weight (E, H) (:class:`RouterWithLoRA`; parameters
        ``...mlp.gate.lora_A`` (r, H), ``...mlp.gate.lora_B`` (E, r); gpt-oss: ``...mlp.router.lora_A/B``; under the
        family's block, ``moe_block_attr``: Granite-MoE ``...block_sparse_moe.router.lora_A/B``, LFM2-MoE
        ``...feed_forward.gate.lora_A/B``).
        Adding it again replaces it."""
        for layer in self.layers:
            setattr(layer.block, layer.router_attr, RouterWithLoRA(layer.router, rank, alpha))

    def add_attention_lora(self, rank: int, alpha: float, targets=None, dropout: float = 0.0) -> None:
        """LoRA on the attention projections ``targets`` (None = the architecture's default set)."""
        from .arch import TOKEN_MIXERS, decoder_layers, default_attention_targets, token_mixers

        if targets is None:
            targets = default_attention_targets(self.model_type, self.config)

        from .quant import QuantizedLinear

        # every layer's token mixers and their projections; a hybrid model's layers differ, so a target must be
        # a projection of every layer whose kind of mixer has it (each layer takes the targets it has)
        plan, kinds = [], {}
        for i, layer in enumerate(decoder_layers(self.model)):
            mixers = token_mixers(layer)
            if not mixers:
                raise UnsupportedModelError(f"decoder layer {i} has no attention module ({' or '.join(TOKEN_MIXERS)})")
            for mixer in mixers:
                present = {n for n, m in mixer.named_children()
                           if isinstance(m, (nn.Linear, LoRALinear, QuantizedLinear))}
                kinds.setdefault(type(mixer).__name__, present)
                plan.append((mixer, [t for t in targets if t in present]))
        every = set().union(*kinds.values())
        missing = [t for t in targets if t not in every]
        if missing:
            have = "; ".join(f"{kind}: {sorted(p)}" for kind, p in kinds.items())
            raise UnsupportedModelError(f"attention LoRA targets {missing} are not projections of {self.model_type}; "
                                        f"its projections are {have} (set lora.attention_targets)")
        for mixer, names in plan:
            for t in names:
                mod = getattr(mixer, t)
                if isinstance(mod, LoRALinear):
                    mod = mod.base
                setattr(mixer, t, LoRALinear(mod, rank, alpha, dropout))

    def add_output_scale(self, init: float = 1.0, trainable: bool = True) -> list[str]:
        """One scalar per MoE layer multiplying the routed experts' output (FLAME's rescaler).
        Returns the parameter names (trainable ones appear in the trainable state)."""
        for layer in self.layers:
            ex = layer.block.experts
            ex.output_scale = nn.Parameter(torch.full((), float(init), device=adapter_device(ex.gate_up_proj),
                                                      dtype=torch.float32), requires_grad=trainable)
        return [n for n, _ in self.model.named_parameters() if n.endswith(".experts.output_scale")]

    def set_output_scale(self, values: float | list[float]) -> None:
        """Set every layer's output scale (one value, or one per MoE layer) outside the trainable state."""
        vals = values if isinstance(values, list) else [values] * len(self.layers)
        with torch.no_grad():
            for layer, v in zip(self.layers, vals):
                layer.block.experts.output_scale.fill_(float(v))

    def attach_to_blocks(self, name: str, make) -> list[nn.Module]:
        """Add an extra module beside every MoE block (``make(layer)`` builds it; it is registered as
        ``block.<name>``, so its parameters are named ``...mlp.<name>.*``, under the family's block name:
        ``moe_block_attr``) whose output on the block's
        input is added to the block's output whenever its ``enabled`` attribute is true. Shared experts
        stay where they are. Returns the modules, one per MoE layer (FLEx's grafted experts)."""
        modules = []
        for layer in self.layers:
            module = make(layer)
            module.enabled = True
            setattr(layer.block, name, module)

            def add_output(block, args, output, module=module):
                if not module.enabled:
                    return output
                # gpt-oss's block returns (hidden states, router scores): the module adds to the first
                hidden, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
                x = args[0].reshape(-1, args[0].shape[-1])
                rows = self.tracker.real_rows(x.shape[0])  # padding skipped, as in the routed experts
                if rows is None:
                    y = module(x)
                else:
                    y = x.new_zeros(x.shape).index_copy(0, rows, module(x.index_select(0, rows)))
                hidden = hidden + y.reshape(hidden.shape)
                return hidden if rest is None else (hidden, *rest)

            layer.block.register_forward_hook(add_output)
            modules.append(module)
        return modules

    def set_lora_scaling(self, scaling: float) -> None:
        """Set alpha/r of every LoRA module (rank-heterogeneous clients train the first r_i components
        of r_max-sized adapters, with their own alpha/r_i)."""
        for m in self.model.modules():
            if isinstance(m, (LoRALinear, ExpertsWithLoRA, RouterWithLoRA)) and getattr(m, "rank", None):
                m.scaling = scaling

    # ------------------------------------------------------------------ top-k control
    def set_top_k(self, k: int) -> None:
        """Activate k experts per token on every router (k <= the model's k), without reloading. Phi-3.5-MoE's
        sparsemixer router chooses its two experts one after the other whatever its top_k: at k = 1 fedmoe keeps the
        first choice and its weight (:func:`_first_selections`)."""
        k = int(k)
        if k < 1 or k > self.default_top_k:
            raise TopKError(
                f"top-k {k} is out of range for this {self.model_type} model: it routes each token to "
                f"{self.default_top_k} experts, so a client may use 1..{self.default_top_k}"
            )
        for layer in self.layers:
            router = layer.router
            router.top_k = k
            if hasattr(layer.block, "top_k"):
                layer.block.top_k = k
        # the load-balancing loss recomputes top-k with this attribute
        if hasattr(self.model, "num_experts_per_tok"):
            self.model.num_experts_per_tok = k
        self.top_k = k

    # ------------------------------------------------------------------ activation counting
    def tracking(self, attention_mask: torch.Tensor | None):
        return self.tracker.tracking(attention_mask)

    def reset_activation_counts(self) -> None:
        self.tracker.reset()

    def activation_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts (L, E), tokens per layer (L,)) accumulated since the last reset."""
        return self.tracker.counts.clone(), self.tracker.tokens.clone()

    # ------------------------------------------------------------------ trainable state
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable_names(self) -> list[str]:
        return list(self.trainable_parameters())

    def inventory(self, private_roles=()) -> Inventory:
        """The typed inventory of the trainable tensors, in parameter order: each tensor as the module
        that created it describes it (``describe()``), with its decoder and MoE layer; a trainable no
        module describes is :attr:`Role.OTHER`. ``private_roles``: the roles the method keeps private.
        Built once per set of trainables and private roles (a client's model is loaded twice a round)."""
        from dataclasses import replace

        params = self.trainable_parameters()
        key = (frozenset(private_roles), tuple((n, tuple(p.shape)) for n, p in params.items()))
        cached = getattr(self, "_inventory", None)
        if cached is not None and cached[0] == key:
            return cached[1]

        from .arch import decoder_layers

        decoder_of, moe_of = {}, {}
        for i, layer in enumerate(decoder_layers(self.model)):
            for m in layer.modules():
                decoder_of[id(m)] = i
        for layer in self.layers:
            for m in layer.block.modules():
                moe_of[id(m)] = layer.index
        described: dict[str, TensorInfo] = {}
        for mname, mod in self.model.named_modules():
            describe = getattr(mod, "describe", None)
            if describe is None:
                continue
            prefix = f"{mname}." if mname else ""
            for info in describe():
                described[prefix + info.name] = replace(
                    info, name=prefix + info.name, partner=None if info.partner is None else prefix + info.partner,
                    decoder_layer=decoder_of.get(id(mod)), moe_layer=moe_of.get(id(mod)))
        roles = frozenset(private_roles)
        out = {}
        for n, p in params.items():
            info = described.get(n) or TensorInfo(n, tuple(p.shape), Role.OTHER)
            out[n] = replace(info, private=info.role in roles)
        self._inventory = (key, Inventory(out))
        return self._inventory[1]

    def get_state(self, names=None) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the trainable tensors (or of the named ones)."""
        params = self.trainable_parameters()
        keys = params.keys() if names is None else names
        return {n: params[n].detach().to("cpu", copy=True) for n in keys}

    def load_state(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        params = self.trainable_parameters()
        if strict:
            unknown = sorted(set(state) - set(params))
            missing = sorted(set(params) - set(state))
            if unknown or missing:
                raise KeyError(f"state does not match the model's trainables: unknown {unknown[:5]}, missing {missing[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                if n not in params:
                    raise KeyError(f"'{n}' is not a trainable tensor of this model")
                if params[n].shape != t.shape:
                    raise ValueError(f"'{n}': shape {tuple(t.shape)} does not match {tuple(params[n].shape)}")
                params[n].copy_(t)
