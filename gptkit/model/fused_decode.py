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

from gptkit.config import ModelConfig
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

    Reads ``model``'s weights and writes ``cache`` in place. Each step checks that no tensor's
    memory has moved since the last (``share_memory()``, ``.to()``, ``p.data = ...``) and refuses
    to run over memory that is no longer the model's.
    """

    def __init__(self, library: ctypes.CDLL, model: GPT, cache: KVCache) -> None:
        config = model.config
        self.model, self.cache = model, cache
        self._kernel = library.gpt_decode_step
        C, H, G, D = config.d_model, config.n_head, config.kv_heads, config.head_dim
        hidden = config.mlp_hidden
        qkv_width, up_width = (H + 2 * G) * D, _up_width(config)
        dims = [
            config.n_layer, H, G, D, C, hidden, config.vocab_size, cache.max_len,
            int(config.norm == "rmsnorm"), int(config.mlp == "swiglu"), int(config.position == "rope"),
        ]
        self._dims = torch.tensor(dims, dtype=torch.int64, device="cpu")
        self._eps = config.norm_eps
        # The tensors whose memory the kernel reads or writes, in the order csrc/decode_step.c
        # expects them (None: absent, passed as NULL).
        self._layer_tensors: list[torch.Tensor | None] = []
        for layer, block in enumerate(model.blocks):
            attn, mlp = block.attn, block.mlp
            self._layer_tensors += [
                block.attn_norm.weight, getattr(block.attn_norm, "bias", None),
                attn.qkv.weight, attn.qkv.bias, attn.out.weight, attn.out.bias,
                block.mlp_norm.weight, getattr(block.mlp_norm, "bias", None),
                mlp.up.weight, mlp.up.bias, mlp.down.weight, mlp.down.bias,
                cache.keys[layer, 0], cache.values[layer, 0],
            ]
        rotary = model.rotary
        self._model_tensors: list[torch.Tensor | None] = [
            model.token_embedding.weight,
            None if model.position_embedding is None else model.position_embedding.weight,
            model.final_norm.weight, getattr(model.final_norm, "bias", None),
            model.lm_head.weight,
            None if rotary is None else rotary.cos, None if rotary is None else rotary.sin,
        ]
        self._addresses = self._current_addresses()
        self._layer_pointers = torch.tensor(self._addresses[0], dtype=torch.int64, device="cpu")
        self._model_pointers = torch.tensor(self._addresses[1], dtype=torch.int64, device="cpu")
        # x, its normalised copy, attention output, qkv, MLP hidden, scores: as decode_step.c lays them out
        workspace = 2 * C + H * D + qkv_width + up_width + H * cache.max_len
        self._workspace = torch.empty(workspace, dtype=torch.float32, device="cpu")
        self._logits = torch.empty(1, config.vocab_size, dtype=torch.float32, device="cpu")

    def _current_addresses(self) -> tuple[list[int], list[int]]:
        def address(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.data_ptr()

        return [address(t) for t in self._layer_tensors], [address(t) for t in self._model_tensors]

    @classmethod
    def for_model(cls, model: GPT, cache: KVCache) -> FusedDecoder | None:
        """A decoder for ``model`` writing into ``cache``, or None where the fused step does not apply."""
        config = model.config
        if config.qk_norm or model.training or cache.batch_size != 1 or not _eager() or not _is_plain(model):
            return None
        if not _shapes_match(model, cache):
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
        # About 15 data_ptr() reads per layer (tens of microseconds): far cheaper than reading freed memory.
        if self._current_addresses() != self._addresses:
            raise RuntimeError("the model's or the cache's memory moved during decoding; start a new FusedDecoder")
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


def _up_width(config: ModelConfig) -> int:
    """Rows of the MLP's up projection: the hidden width, twice over for SwiGLU (gate and up)."""
    return 2 * config.mlp_hidden if config.mlp == "swiglu" else config.mlp_hidden


def _shapes_match(model: GPT, cache: KVCache) -> bool:
    """Every tensor the kernel reads has exactly the shape it assumes from the config, every norm
    is the config's kind with the config's epsilon, and the cache fits the model: otherwise the C
    code would read or write outside them."""
    config = model.config
    C, H, G, D, V = config.d_model, config.n_head, config.kv_heads, config.head_dim, config.vocab_size
    hidden, up_width = config.mlp_hidden, _up_width(config)
    norm_type = RMSNorm if config.norm == "rmsnorm" else LayerNorm

    def linear_is(linear: nn.Module, out_features: int, in_features: int) -> bool:
        if type(linear) is not nn.Linear:
            return False
        bias = linear.bias
        return tuple(linear.weight.shape) == (out_features, in_features) and (
            bias is None if not config.bias else bias is not None and tuple(bias.shape) == (out_features,)
        )

    def norm_is(norm: nn.Module) -> bool:
        bias = getattr(norm, "bias", None)
        return (
            type(norm) is norm_type
            and norm.eps == config.norm_eps
            and tuple(norm.weight.shape) == (C,)
            and (bias is None or tuple(bias.shape) == (C,))
        )

    for block in model.blocks:
        if not (
            norm_is(block.attn_norm) and norm_is(block.mlp_norm)
            and linear_is(block.attn.qkv, (H + 2 * G) * D, C) and linear_is(block.attn.out, C, H * D)
            and linear_is(block.mlp.up, up_width, C) and linear_is(block.mlp.down, C, hidden)
            and block.mlp.gated == (config.mlp == "swiglu")
        ):
            return False
    position_ok = (
        tuple(model.position_embedding.weight.shape) == (config.block_size, C)
        if config.position == "learned"
        else model.rotary is not None and tuple(model.rotary.cos.shape) == tuple(model.rotary.sin.shape)
        == (config.block_size, D)
    )
    cache_shape = (config.n_layer, 1, G, cache.max_len, D)
    return (
        len(model.blocks) == config.n_layer
        and position_ok
        and norm_is(model.final_norm)
        and tuple(model.token_embedding.weight.shape) == (V, C)
        and tuple(model.lm_head.weight.shape) == (V, C) and model.lm_head.bias is None
        and tuple(cache.keys.shape) == tuple(cache.values.shape) == cache_shape
        and cache.max_len <= config.block_size
    )
