"""fedmoe.moe — everything that touches the Hugging Face MoE model."""

from .arch import SUPPORTED_ARCHITECTURES, MoELayer, UnsupportedModelError, find_moe_layers
from .lora import ActivationTracker, ExpertsWithLoRA, LoRALinear, RouterWithLoRA
from .model import BUILTIN_MODELS, MoEModel, TopKError, builtin_asset, load_tokenizer, resolve_device

__all__ = [
    "SUPPORTED_ARCHITECTURES", "MoELayer", "UnsupportedModelError", "find_moe_layers",
    "ActivationTracker", "ExpertsWithLoRA", "LoRALinear", "RouterWithLoRA",
    "BUILTIN_MODELS", "MoEModel", "TopKError", "builtin_asset", "load_tokenizer", "resolve_device",
]
