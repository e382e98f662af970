"""A plain PyTorch GPT-2, written the way nanoGPT writes one: nn.Linear, nn.LayerNorm, F.gelu,
scaled_dot_product_attention, nothing else. The training benchmark runs it next to gptkit and HF as
the reference for "what the same model costs in straightforward PyTorch" on this machine.

Its parameter names are gptkit's, so ``PlainGPT(config).load_state_dict(gptkit_model.state_dict())``
gives the same weights, and a step computes the same function as gptkit's GPT-2 (same losses).
Only the GPT-2 architecture (learned positions, LayerNorm, GELU MLP, tied head) is covered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptkit.model import ModelConfig


class _Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.out = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).contiguous().view(B, T, C))


class _MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.down = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.attn = _Attention(config)
        self.mlp_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.mlp = _MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class PlainGPT(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab); GPT-2 with dropout 0."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if (config.position, config.norm, config.mlp, config.kv_heads, config.qk_norm) != (
            "learned", "layernorm", "gelu", config.n_head, False
        ) or config.mlp_hidden != 4 * config.d_model:
            raise ValueError("PlainGPT covers the GPT-2 architecture only")
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.block_size, config.d_model)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layer))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))
