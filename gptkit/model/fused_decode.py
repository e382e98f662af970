"""Batch-1 decode steps of the whole model in one C call (``csrc/decode_step.c``).

At batch 1 a decode step streams every weight once and does little else, so its floor is the
memory's bandwidth. Run op by op, the little else costs milliseconds: ~15 PyTorch ops per layer,
each with dispatch, an OpenMP fork and cache-cold data (the previous matrix has just pushed tens of
megabytes through the caches). ``FusedDecoder`` runs the step as one OpenMP region over the model's
own weights and KV cache, so a step costs about one pass over the weights.

It computes the same function as ``GPT.forward`` on one new token with the cache (float32
rounding aside; tested against it for every architecture option it covers) and writes the token's
keys and values into the same ``KVCache``, so the two paths can alternate (prefill in PyTorch, steps
here). ``FusedDecoder.for_model`` returns None where it does not apply — not CPU float32, QK-norm,
a model in training mode, a cache of more than one row, no C compiler, ``GPTKIT_CPU_KERNELS=0``,
torch.compile — and callers then use the model.
"""

from __future__ import annotations

import ctypes

import torch

from torch import nn

from gptkit.model.cpu_kernels import POINTER, SIZE, THREADS, _eager, _plain_cpu_float, load_library
from gptkit.model.gpt import GPT
from gptkit.model.kv_cache import KVCache
from gptkit.model.layers import MLP, Block, CausalSelfAttention, LayerNorm, RMSNorm, RotaryEmbedding

_SIGNATURES = (
    ("gpt_decode_step", (POINTER, ctypes.c_float, POINTER, POINTER, SIZE, SIZE, POINTER, POINTER, THREADS)),
)


def _library() -> ctypes.CDLL | None:
    return load_library("decode_step", _SIGNATURES)


class FusedDecoder:
    """Decode steps for one sequence: ``step(token)`` -> logits (1, vocab) of the next token.

    Holds the pointers of ``model``'s weights and ``cache``'s storage as they are now: build one per
    generation (it is cheap), not across weight updates.
    """

    def __init__(self, library: ctypes.CDLL, model: GPT, cache: KVCache) -> None:
        config = model.config
        self.model, self.cache = model, cache  # keep the memory alive while pointers to it exist
        self._kernel = library.gpt_decode_step
        hidden = model.blocks[0].mlp.down.in_features
        dims = [
            config.n_layer, config.n_head, config.kv_heads, config.head_dim, config.d_model, hidden,
            config.vocab_size, cache.max_len,
            int(config.norm == "rmsnorm"), int(config.mlp == "swiglu"), int(config.position == "rope"),
        ]
        self._dims = torch.tensor(dims, dtype=torch.int64)
        self._eps = config.norm_eps

        def address(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.data_ptr()

        layers = []
        for layer, block in enumerate(model.blocks):
            attn, mlp = block.attn, block.mlp
            layers += [
                address(block.attn_norm.weight), address(getattr(block.attn_norm, "bias", None)),
                address(attn.qkv.weight), address(attn.qkv.bias), address(attn.out.weight), address(attn.out.bias),
                address(block.mlp_norm.weight), address(getattr(block.mlp_norm, "bias", None)),
                address(mlp.up.weight), address(mlp.up.bias), address(mlp.down.weight), address(mlp.down.bias),
                address(cache.keys[layer, 0]), address(cache.values[layer, 0]),
            ]
        rotary = model.rotary
        pointers = [
            address(model.token_embedding.weight),
            address(None if model.position_embedding is None else model.position_embedding.weight),
            address(model.final_norm.weight), address(getattr(model.final_norm, "bias", None)),
            address(model.lm_head.weight),
            address(None if rotary is None else rotary.cos), address(None if rotary is None else rotary.sin),
        ]
        self._layer_pointers = torch.tensor(layers, dtype=torch.int64)
        self._model_pointers = torch.tensor(pointers, dtype=torch.int64)
        up_width = mlp.up.out_features
        workspace = (
            3 * config.d_model + (config.n_head + 2 * config.kv_heads) * config.head_dim + up_width
            + config.n_head * cache.max_len
        )
        self._workspace = torch.empty(workspace, dtype=torch.float32)
        self._logits = torch.empty(1, config.vocab_size, dtype=torch.float32)

    @classmethod
    def for_model(cls, model: GPT, cache: KVCache) -> FusedDecoder | None:
        """A decoder for ``model`` writing into ``cache``, or None where the fused step does not apply."""
        config = model.config
        if config.qk_norm or model.training or cache.batch_size != 1 or not _eager() or not _is_plain(model):
            return None
        tensors = [*model.parameters(), *model.buffers(), cache.keys, cache.values]
        if not all(_plain_cpu_float(t.detach()) for t in tensors if t.is_floating_point()):
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            return None  # a step here builds no autograd graph
        library = _library()
        return None if library is None else cls(library, model, cache)

    def step(self, token: int) -> torch.Tensor:
        """Logits (1, vocab) after feeding ``token`` at the cache's current length, which grows by one.

        The returned tensor is reused by the next step: read (or copy) it before calling again.
        """
        position = self.cache.uniform_length
        if position is None or position >= self.cache.max_len:
            raise ValueError(f"cannot decode at position {position} of a cache of {self.cache.max_len}")
        if not 0 <= token < self.model.config.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary of {self.model.config.vocab_size}")
        self._kernel(
            self._dims.data_ptr(), self._eps, self._model_pointers.data_ptr(), self._layer_pointers.data_ptr(),
            token, position, self._workspace.data_ptr(), self._logits.data_ptr(), torch.get_num_threads(),
        )
        self.cache.advance(1)
        return self._logits


# Exactly these module types make up a model the fused step can stand in for.
_PLAIN_TYPES = (GPT, Block, CausalSelfAttention, MLP, LayerNorm, RMSNorm, RotaryEmbedding, nn.Linear, nn.Embedding,
                nn.Identity, nn.Dropout, nn.ModuleList)


def _is_plain(model: GPT) -> bool:
    """True when every module is one of gptkit's own (not a subclass that overrides forward, nor a
    wrapped or adapted Linear) and no forward hook is registered: the fused step would skip them."""
    global_hooks = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)
    if any(global_hooks):
        return False
    for module in model.modules():
        if type(module) not in _PLAIN_TYPES or module._forward_hooks or module._forward_pre_hooks:
            return False
    return True
