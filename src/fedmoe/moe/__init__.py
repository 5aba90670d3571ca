"""fedmoe.moe — everything that touches the Hugging Face MoE model."""

from .arch import SUPPORTED_ARCHITECTURES, MoELayer, UnsupportedModelError, find_moe_layers
from .inventory import Inventory, Role, TensorInfo
from .lora import ActivationTracker, ExpertsWithLoRA, LoRALinear, RouterWithLoRA
from .model import BUILTIN_MODELS, MoEModel, TopKError, builtin_asset, load_tokenizer, resolve_device

__all__ = [
    "SUPPORTED_ARCHITECTURES", "MoELayer", "UnsupportedModelError", "find_moe_layers",
    "Inventory", "Role", "TensorInfo",
    "ActivationTracker", "ExpertsWithLoRA", "LoRALinear", "RouterWithLoRA",
    "BUILTIN_MODELS", "MoEModel", "TopKError", "builtin_asset", "load_tokenizer", "resolve_device",
]
