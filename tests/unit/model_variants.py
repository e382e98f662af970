"""The tiny model shape and the architecture variants the model tests run over (shared by
test_model.py and test_fused_decode.py; pytest puts this folder on sys.path)."""

from __future__ import annotations

from gptkit.config import ModelConfig

TINY = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=32)

# Every independent option, each switched on alone and all together.
VARIANTS = {
    "gpt2": {},
    "rope": {"position": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "gqa": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1},
    "no_bias": {"bias": False},
    "untied": {"tie_embeddings": False},
    "qk_norm": {"qk_norm": True},
    "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "bias": False,
              "tie_embeddings": False},
    "everything": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1, "bias": False,
                   "tie_embeddings": False, "qk_norm": True},
}
