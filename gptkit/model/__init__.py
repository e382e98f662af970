"""The transformer: config-driven layers, the GPT model, its KV cache and named presets."""

from gptkit.config import ModelConfig
from gptkit.model.gpt import GPT
from gptkit.model.kv_cache import KVCache
from gptkit.model.presets import PRESETS, preset_values

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS", "preset_values"]
