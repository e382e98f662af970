"""The GPT model: token (and optionally learned position) embeddings, a stack of pre-norm blocks,
a final norm and a language-model head (tied to the token embedding by default).

With the default ModelConfig this is exactly GPT-2; other configs switch on RoPE, RMSNorm, SwiGLU,
grouped-query attention or QK-norm. The model holds no training code: no optimizer, no loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gptkit.config import ModelConfig
from gptkit.model import fused_trunk
from gptkit.model.kv_cache import KVCache
from gptkit.model.layers import AttentionContext, Block, RotaryEmbedding, make_norm


class GPT(nn.Module):
    """Decoder-only transformer. ``model(tokens)`` maps (B, T) token ids to (B, T, vocab) logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (
            nn.Embedding(config.block_size, config.d_model) if config.position == "learned" else None
        )
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.block_size, config.rope_base)
            if config.position == "rope"
            else None
        )
        self.embedding_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.reset_parameters()

    # ------------------------------------------------------------------ initialisation

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit norms, and the projections
        that write into the residual stream scaled by 1/sqrt(2 * n_layer) so that its variance
        does not grow with depth."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 1:
                nn.init.ones_(module.weight)  # LayerNorm / RMSNorm scale
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=residual_std)

    # ------------------------------------------------------------------ counting

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once). ``exclude_embeddings`` drops the position
        table, as in the usual "non-embedding" count; the token table stays since the head uses it."""
        total = sum(p.numel() for p in self.parameters())  # parameters() already deduplicates ties
        if exclude_embeddings and self.position_embedding is not None:
            total -= self.position_embedding.weight.numel()
        return total

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for ``tokens`` (B, T) -> (B, T, vocab), or (B, 1, vocab) with ``last_only``.

        With ``kv_cache`` the tokens continue each row's cached sequence: their keys and values are
        appended to the cache and they attend over everything cached before them.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            shown = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (batch, time) tensor of token ids; got {shown}")
        B, T = tokens.shape
        # positions: absolute position of each new token, (B, T); None means 0..T-1 for every row.
        positions: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        # A branch, not `T > 1`: when torch.compile traces T as a symbol the comparison is a SymBool,
        # which SDPA's is_causal does not take; the branch makes it a constant (guarded on).
        is_causal = True if T > 1 else False  # noqa: SIM210
        if kv_cache is not None:
            start = kv_cache.uniform_length
            cache_positions = kv_cache.begin_step(T, B)  # (B, T); raises if the cache would overflow
            if start != 0:  # continuing: the new tokens also see the cached prefix
                positions = cache_positions
                mask = kv_cache.attention_mask(positions)
                is_causal = False
        elif T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        else:
            fused = fused_trunk.plan(self, tokens)
            if fused is not None:
                # CPU float32 training: embeddings, blocks and final norm as one autograd
                # node with fused kernels (the same numbers, faster steps); see fused_trunk.py.
                x = fused_trunk.run(self, tokens, fused)
                return fused_trunk.lm_head(self, x[:, -1:, :] if last_only else x)

        x = self.token_embedding(tokens)  # (B, T, C)
        if self.position_embedding is not None:
            if positions is None:
                x = x + self.position_embedding.weight[:T]
            else:
                x = x + self.position_embedding(positions)
        x = self.embedding_dropout(x)

        rope = self.rotary.tables(positions, T) if self.rotary is not None else None
        ctx = AttentionContext(rope=rope, mask=mask, is_causal=is_causal, cache=kv_cache)
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, ctx)
        if kv_cache is not None:
            kv_cache.end_step()

        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.final_norm(x))

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache for ``batch_size`` rows of at most ``max_len`` tokens (default: block_size)."""
        max_len = self.config.block_size if max_len is None else max_len
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {self.config.block_size}")
        weight = self.token_embedding.weight
        return KVCache(
            n_layer=self.config.n_layer,
            batch_size=batch_size,
            n_kv_head=self.config.kv_heads,
            head_dim=self.config.head_dim,
            max_len=max_len,
            dtype=weight.dtype,
            device=weight.device,
        )
