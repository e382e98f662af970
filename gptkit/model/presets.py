"""Named model shapes, as data. ``preset_values(name)`` returns the ModelConfig fields for a name."""

from __future__ import annotations

from typing import Any

from gptkit.errors import ConfigError

_GPT2 = {"vocab_size": 50257, "block_size": 1024, "bias": True}
# The Llama architecture's options (RoPE, RMSNorm, SwiGLU, no biases, untied); also gptkit.plan's.
LLAMA_ARCHITECTURE: dict[str, Any] = {
    "position": "rope",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "bias": False,
    "tie_embeddings": False,
    "norm_eps": 1e-5,
}

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 family (Radford et al., 2019), shapes as released.
    "gpt2": {**_GPT2, "n_layer": 12, "n_head": 12, "d_model": 768},
    "gpt2-medium": {**_GPT2, "n_layer": 24, "n_head": 16, "d_model": 1024},
    "gpt2-large": {**_GPT2, "n_layer": 36, "n_head": 20, "d_model": 1280},
    "gpt2-xl": {**_GPT2, "n_layer": 48, "n_head": 25, "d_model": 1600},
    # Small shapes that train on a laptop CPU.
    "gpt-micro": {"n_layer": 2, "n_head": 2, "d_model": 64, "block_size": 64, "vocab_size": 512},
    "gpt-mini": {"n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 64, "vocab_size": 512},
    "gpt-small-cpu": {"n_layer": 6, "n_head": 6, "d_model": 192, "block_size": 128, "vocab_size": 512},
    # Llama-style shapes: RoPE, RMSNorm, SwiGLU, no biases, untied embeddings.
    "llama-tiny": {**LLAMA_ARCHITECTURE, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_model": 128,
                   "block_size": 256, "vocab_size": 512},
    "llama-125m": {**LLAMA_ARCHITECTURE, "n_layer": 12, "n_head": 12, "n_kv_head": 4, "d_model": 768,
                   "d_ff": 2048, "block_size": 2048, "vocab_size": 32000},
}


def preset_values(name: str) -> dict[str, Any]:
    """The ModelConfig fields of a named preset; ConfigError lists the known names otherwise."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])
