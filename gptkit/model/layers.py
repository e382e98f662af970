"""Building blocks of the transformer: norms, rotary embeddings, attention, MLP and the block.

Shapes use B = batch, T = new tokens, S = keys attended over (T, or the cache length),
H = query heads, Hkv = key/value heads, D = head dimension, C = d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gptkit.config import ModelConfig
from gptkit.model import attention_kernel
from gptkit.model.cpu_kernels import gelu_tanh
from gptkit.model.kv_cache import KVCache


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (GPT-2 has one; many newer models do not)."""

    def __init__(self, dim: int, *, bias: bool, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / rms(x) * weight, no centring and no bias."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so that low-precision activations keep their accuracy.
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype) * self.weight


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = config.d_model if dim is None else dim
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps)
    return LayerNorm(dim, bias=config.bias, eps=config.norm_eps)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (Su et al., 2021), in the "rotate half" layout Llama uses.

    The angle of pair i at position p is p * base^(-2i/D); cos/sin tables are (block_size, D).
    """

    def __init__(self, head_dim: int, max_len: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (max_len, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (max_len, D)
        # Not saved in checkpoints: they follow from the config.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, positions: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``positions`` (B, T) -> (B, 1, T, D); or for 0..length-1 -> (T, D)."""
        if positions is None:
            return self.cos[:length], self.sin[:length]
        return self.cos[positions][:, None], self.sin[positions][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, D) by the angles in cos/sin (broadcastable to it)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


@dataclass
class AttentionContext:
    """What every layer's attention needs for one forward pass, computed once by the model."""

    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin
    mask: torch.Tensor | None  # (B, 1, T, S) boolean, True = may attend
    is_causal: bool  # use SDPA's built-in causal mask (keys are exactly the new tokens)
    cache: KVCache | None


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-/multi-query) causal self-attention: through SDPA, or on CPU for
    full sequences up to 512 tokens through gptkit's fused C kernel (``attention_kernel``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        qkv_width = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        # One matmul for queries, keys and values together.
        self.qkv = nn.Linear(config.d_model, qkv_width, bias=config.bias)
        self.out = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout

    def _fused_kernel_applies(self, ctx: AttentionContext, T: int) -> bool:
        """Whether the attention is plain causal softmax attention of the raw projections, as the
        fused CPU kernel computes it: full sequence (no cache, no mask), no dropout, no RoPE or
        qk-norm. (``attention_kernel.covers`` checks the tensor: CPU float32, eager mode, short T.)"""
        return (
            (ctx.is_causal or T == 1)  # one token attends to itself alone, causal or not
            and ctx.cache is None
            and ctx.mask is None
            and ctx.rope is None
            and self.q_norm is None
            and (self.dropout == 0.0 or not self.training)
        )

    def forward(self, x: torch.Tensor, layer: int, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)  # (B, T, (H + 2 Hkv) D)
        if self._fused_kernel_applies(ctx, T) and attention_kernel.covers(qkv, self.n_head, self.n_kv_head):
            # Training and full-sequence forwards on CPU at short T: one C kernel reads q, k, v from
            # the packed projection and writes y in the out Linear's layout (no transposes).
            return self.out(attention_kernel.fused_causal_attention(qkv, self.n_head, self.n_kv_head))
        # One view and one transpose for all heads, then a split: fewer ops per decoded token.
        qkv = qkv.view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # (B, H|Hkv, T, D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            cos, sin = ctx.rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer, k, v)  # (B, Hkv, S, D)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=ctx.mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=ctx.is_causal,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.out(y)


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Shazeer, 2020); ``up`` holds gate and up together for SwiGLU."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.mlp == "swiglu"
        hidden = config.mlp_hidden
        self.up = nn.Linear(config.d_model, 2 * hidden if self.gated else hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        # GPT-2 uses the tanh approximation of GELU; on CPU a fused C kernel computes it (ATen's is
        # slow there), elsewhere F.gelu does.
        return self.down(gelu_tanh(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        # Identity when dropout is off: no kernel launched in the hot path.
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, layer: int, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), layer, ctx))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))
