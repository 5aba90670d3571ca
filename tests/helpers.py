"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from fedmoe.algorithms.base import N_TRAIN, ModelSpec
from fedmoe.messages import Message, Reply


def reply(client: int, tensors: dict, n: int, **scalars) -> Reply:
    """A client's reply as the server receives it."""
    return Reply(client, Message(tensors=dict(tensors), scalars={N_TRAIN: n, **scalars}))


def built(method, cfg, mm, seed: int = 0):
    """Build ``method``'s adapters on ``mm`` (seeded) and return (server half, client half, spec)."""
    torch.manual_seed(seed)
    method.client.build(cfg, mm)
    spec = ModelSpec.of(mm, method.client.private_roles)
    return method.server(cfg, spec), method.client(cfg), spec


def tiny_hf(arch: str, **kw):
    """A tiny Hugging Face model of ``arch`` (``fedmoe.moe.tiny``), seeded, in fp32."""
    from transformers import AutoModelForCausalLM

    from fedmoe.moe.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).float()
    if arch == "gpt_oss":
        random_expert_biases_(model)
    return model


def random_expert_biases_(model, std: float = 0.02) -> None:
    """gpt-oss's expert biases (gate_up_proj_bias, down_proj_bias) and attention biases (q/k/v/o), which
    transformers starts at zero, drawn from N(0, std²) (the global generator), so that every test of a tiny
    gpt-oss runs them (a LoRA wrapper, a quantized linear or an export that dropped one would show)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj_bias.normal_(0, std)
            layer.mlp.experts.down_proj_bias.normal_(0, std)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).bias.normal_(0, std)


def token_batch(seed: int = 1, batch: int = 3, seq: int = 11, vocab: int = 128, pad_last_row: bool = True):
    """(ids, mask): random token ids with right padding on row 1 (4 positions) and, with
    ``pad_last_row``, on row 2 (1 position)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    if pad_last_row:
        mask[2, -1:] = 0
    return ids, mask


def peft_wrappers(peft_model) -> dict:
    """(decoder layer index, parameter name) -> PEFT's ParamWrapper (``target_parameters`` LoRA)."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, ParamWrapper):
            out[(int(name.split(".layers.")[1].split(".")[0]), mod.parameter_name)] = mod
    return out
