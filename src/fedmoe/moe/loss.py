"""Causal-LM loss computed only where it is needed.

With instruction data most positions are prompt (label -100) and the LM head is the costliest
matmul of a small MoE with a 50k vocabulary. So the decoder runs once, and only the hidden states
that predict a labelled token go through ``lm_head`` and the softmax. The value equals Hugging
Face's shifted token-mean cross-entropy.
"""

from __future__ import annotations

import torch.nn.functional as F


def lm_logits(model, hidden):
    """The logits of decoder outputs ``hidden`` as the model's own forward makes them: its ``lm_head``, and for
    Granite-MoE divided by the config's ``logits_scaling`` (6 in granite-3.1-1b-a400m: the softmax, the loss and
    every score are of the scaled logits). Whoever runs ``model.model`` and the head apart takes them here."""
    logits = model.lm_head(hidden)
    scaling = getattr(model.config, "logits_scaling", None)  # Granite's forward: lm_head(h) / logits_scaling
    return logits if scaling is None else logits / scaling


def load_balancing_loss(config):
    """The family's own load-balancing loss function in transformers (``load_balancing_loss_func`` of the module
    that defines its causal LM), or None where it ships none (DeepSeek-V2, -V3, GLM, LFM2-MoE, Llama-4)."""
    from importlib import import_module

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return None if cls is None else getattr(import_module(cls.__module__), "load_balancing_loss_func", None)


def no_aux_loss(model_type: str) -> str:
    """Why ``train.aux_loss`` cannot be on for this family."""
    return (f"train.aux_loss: true, but {model_type} has no load-balancing loss in transformers (DeepSeek-V2, -V3, "
            "GLM, Llama-4 and LFM2-MoE ship none): set train.aux_loss: false")


def labelled_token_loss(model, input_ids, attention_mask, labels, output_router_logits: bool = False):
    """Returns (sum of token losses in float32, number of labelled tokens, aux loss or None).

    The aux loss is the model family's own load-balancing loss (its ``load_balancing_loss_func``,
    with the model's current top-k), unscaled."""
    outputs = model.model(input_ids=input_ids, attention_mask=attention_mask,
                          output_router_logits=output_router_logits, use_cache=False)
    hidden = outputs.last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = lm_logits(model, hidden[keep]).float()
    loss_sum = F.cross_entropy(logits, target[keep], reduction="sum")
    aux = None
    if output_router_logits:
        fn = load_balancing_loss(model.config)
        if fn is None:
            raise ValueError(no_aux_loss(model.config.model_type))
        aux = fn(outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)
    return loss_sum, int(keep.sum()), aux
