"""The network: `ModelConfig` (shape, parameters, FLOPs) and `LLaMA` (the decoder)."""

from nanoforge.model.config import ModelConfig, depth_config
from nanoforge.model.llama import KVCache, LLaMA

__all__ = ["ModelConfig", "LLaMA", "KVCache", "depth_config"]
