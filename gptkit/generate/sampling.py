"""Pure functions that turn next-token logits (B, V) into chosen tokens (B,)."""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the sequence less likely (Keskar et al., 2019; as in transformers).

    logits (B, V); seen (B, V) bool, True where the token occurred. A positive logit is divided by
    ``penalty`` and a negative one multiplied, so both move towards "less likely" for penalty > 1.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (B, V); set the rest to -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al., 2019): keep the smallest set of tokens whose
    probabilities sum to at least ``p``; the most likely token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach p.
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token of each row from logits (B, V) -> (B,). temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Shift so the largest logit is 0 before dividing: a tiny temperature then sends the others to
    # -inf (probability 0) instead of overflowing all of them to inf (a nan softmax). The largest
    # logits become 0 even when they are infinite (inf - inf would be nan): a repetition penalty
    # far below 1 can push a logit to inf, and then those tokens share all the probability.
    largest = logits.amax(dim=-1, keepdim=True)
    logits = torch.where(logits == largest, 0.0, logits - largest)
    # A temperature below float32's smallest normal number would round to 0 (or be flushed to
    # it) as a float32 divisor, and 0 / 0 is nan: divide by that number instead, as greedy.
    logits = logits / max(temperature, torch.finfo(logits.dtype).tiny)
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
