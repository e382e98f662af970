"""Sampling functions and the KV-cache generator (prefill once, then one token per step)."""

from gptkit.generate.generator import Completion, decode_tokens, generate_text, stream_text
from gptkit.generate.sampling import apply_repetition_penalty, filter_top_k, filter_top_p, sample_next

__all__ = [
    "Completion",
    "apply_repetition_penalty",
    "decode_tokens",
    "filter_top_k",
    "filter_top_p",
    "generate_text",
    "sample_next",
    "stream_text",
]
