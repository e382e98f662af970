"""Autoregressive generation: prefill the prompt once, then decode one token per step with the KV cache.

Two layers:
- ``decode_tokens`` works on token ids for a batch and yields the next token of every row each step;
- ``stream_text`` / ``generate_text`` work on strings for one prompt: they decode bytes incrementally
  (so a multi-byte character split over tokens is never printed half), honour stop strings and
  report why generation ended. This is the one place where text leaves the model.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gptkit.config import SampleConfig
from gptkit.errors import ConfigError, RequestError
from gptkit.generate.sampling import apply_repetition_penalty, sample_next
from gptkit.model.fused_decode import FusedDecoder
from gptkit.model.gpt import GPT
from gptkit.model.packed import packed_for_inference, should_pack
from gptkit.tokenizer import Tokenizer


def decode_tokens(
    model: GPT,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of each row, (B,), for ``max_new_tokens`` steps.

    ``prompt`` is (B, T) token ids with T >= 1 and T <= block_size. When the sequence reaches
    block_size the context slides: the cache is rebuilt from the most recent three quarters of the
    window (a recomputation, as nanoGPT's crop does on every step, but only once per quarter window).

    The arguments are checked here, when called (RequestError); the model runs in eval mode (no
    dropout) while the steps are drawn and gets its training mode back when they are done.
    """
    # Token ids are int64 or int32: the dtypes the embedding (and the repetition penalty's
    # scatter) take; anything else would fail inside the first step instead of here.
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype not in (torch.int64, torch.int32):
        shown = f"{tuple(prompt.shape)} {prompt.dtype}" if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise RequestError(
            f"prompt must be a (batch, tokens) tensor of token ids; got {shown} (ids are int64 or int32)"
        )
    try:
        SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     repetition_penalty=repetition_penalty)
    except ConfigError as exc:
        raise RequestError(str(exc)) from None
    block_size = model.config.block_size
    prompt_len = prompt.shape[1]
    if prompt_len == 0:
        raise RequestError("prompt must contain at least one token")
    if prompt_len > block_size:
        raise RequestError(f"prompt is {prompt_len} tokens, longer than the model's context of {block_size} tokens")
    if prompt.shape[0] == 0:
        raise RequestError("prompt must contain at least one row")
    vocab_size = model.config.vocab_size
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise RequestError(
            f"prompt holds token id {bad}, outside the model's vocabulary of {vocab_size} (ids 0..{vocab_size - 1})"
        )
    steps = _decode_steps(
        model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, generator=generator,
    )
    return _in_eval_mode(model, steps)


def _in_eval_mode(model: GPT, steps: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``steps`` drawn with ``model`` in eval mode (no dropout); its mode comes back at the end."""
    was_training = model.training
    model.eval()
    try:
        yield from steps
    finally:
        model.train(was_training)


@torch.inference_mode()
def _decode_steps(
    model: GPT,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    """The steps of ``decode_tokens``, its arguments checked."""
    block_size = model.config.block_size
    batch_size, prompt_len = prompt.shape
    if max_new_tokens <= 0:
        return
    device = model.token_embedding.weight.device
    tokens = prompt.to(device)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch_size, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, tokens, True)

    # On CPU, big models decode through kernels tuned for a few rows (gptkit's C kernels, or oneDNN's
    # prepacked weights above 8 rows): same numbers, faster steps. See gptkit/model/packed.py.
    net = packed_for_inference(model, batch_size) if should_pack(model) else model
    # Room for exactly this request (the last new token is never fed back), up to the context.
    cache = model.new_kv_cache(batch_size, max_len=min(block_size, prompt_len + max_new_tokens - 1))
    # At batch 1 each step is one C call over the model's weights and this cache (see
    # gptkit/model/fused_decode.py); the prompt's prefill stays in PyTorch.
    fused = FusedDecoder.for_model(model, cache)
    context = tokens  # what the cache must hold before the next step; kept only for sliding
    logits = net(tokens, kv_cache=cache, last_only=True)[:, -1]  # (B, V)
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        next_token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield next_token
        if step == max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, next_token[:, None], True)
        context = torch.cat([context, next_token[:, None]], dim=1)
        if cache.uniform_length == cache.max_len:  # only reached when the context is full
            keep = max(1, (3 * block_size) // 4)
            context = context[:, -keep:]
            cache.reset()
            logits = net(context, kv_cache=cache, last_only=True)[:, -1]
        elif fused is not None:
            logits = fused.step(int(next_token[0]))
        else:
            logits = net(next_token[:, None], kv_cache=cache, last_only=True)[:, -1]


@dataclass(frozen=True)
class Completion:
    """A finished generation: the new text, its token ids, and why it ended."""

    text: str
    # The tokens drawn that carry text, also those that formed a stop string (which ``text`` leaves
    # out: a stop string can end inside a token, so the ids cannot always be cut to match the
    # text); not the end-of-text token that ended a completion, nor a padded vocabulary's unused ids.
    token_ids: list[int]
    finish_reason: str  # "length" (max_new_tokens), "stop" (a stop string) or "eot" (end-of-text token)


class _TextStream:
    """Turns token ids into text pieces: incremental UTF-8 decoding and stop-string hold-back."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded but not yet emitted: it might be the start of a stop string
        self.emitted: list[str] = []
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show (possibly empty)."""
        self.pending += self.decoder.decode(self.tokenizer.token_bytes(token_id))
        cut = self._earliest_stop()
        if cut is not None:
            return self._emit(self.pending[:cut])
        # Hold back the longest tail that is a prefix of some stop string.
        hold = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return self._emit(self.pending[: len(self.pending) - hold], keep=self.pending[len(self.pending) - hold :])

    def finish(self) -> str:
        """Flush what is left at the end (an incomplete UTF-8 tail becomes U+FFFD)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        # The flush can complete a stop string (one that ends in U+FFFD, the flushed tail's text).
        cut = self._earliest_stop()
        return self._emit(self.pending if cut is None else self.pending[:cut])

    def _earliest_stop(self) -> int | None:
        """Where the earliest stop string in ``pending`` starts (and ``stopped`` is set), or None.
        The earliest match wins, whatever the order of the stop strings: one token can complete two."""
        found = [index for index in (self.pending.find(stop) for stop in self.stop) if index >= 0]
        if not found:
            return None
        self.stopped = True
        return min(found)

    def _emit(self, text: str, keep: str = "") -> str:
        self.pending = keep
        if text:
            self.emitted.append(text)
        return text


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> list[int]:
    """Token ids of ``prompt``; an empty prompt starts from the end-of-text token, as GPT-2 does."""
    if not isinstance(prompt, str):
        raise RequestError(f"prompt must be a string; got {type(prompt).__name__}")
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    if len(ids) > block_size:
        raise RequestError(
            f"prompt is {len(ids)} tokens, longer than the model's context of {block_size} tokens"
        )
    return ids


def check_vocabularies(model: GPT, tokenizer: Tokenizer) -> None:
    """RequestError unless every token of ``tokenizer`` has a row in ``model``'s embedding."""
    if model.config.vocab_size < tokenizer.vocab_size:
        raise RequestError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )


def stream_text(
    model: GPT, tokenizer: Tokenizer, prompt: str, sample: SampleConfig | None = None
) -> Iterator[str]:
    """Yield pieces of generated text as they become final. Its ``Completion`` is the return value
    of the generator (``StopIteration.value``); ``generate_text`` collects it for you."""
    sample = sample or SampleConfig()
    check_vocabularies(model, tokenizer)
    ids = encode_prompt(tokenizer, prompt, model.config.block_size)
    generator = None
    if sample.seed is not None:
        generator = torch.Generator(device=model.token_embedding.weight.device).manual_seed(sample.seed)
    text = _TextStream(tokenizer, sample.stop)
    new_ids: list[int] = []
    finish_reason = "length"
    steps = decode_tokens(
        model,
        torch.tensor([ids], dtype=torch.long),
        max_new_tokens=sample.max_new_tokens,
        temperature=sample.temperature,
        top_k=sample.top_k,
        top_p=sample.top_p,
        repetition_penalty=sample.repetition_penalty,
        generator=generator,
    )
    for next_token in steps:
        token_id = int(next_token[0])
        if token_id == tokenizer.eot_id:
            finish_reason = "eot"
            break
        if token_id >= tokenizer.vocab_size:
            continue  # a padded vocabulary's unused ids carry no text
        new_ids.append(token_id)
        piece = text.push(token_id)
        if piece:
            yield piece
        if text.stopped:
            finish_reason = "stop"
            break
    steps.close()
    tail = text.finish()
    if text.stopped:
        finish_reason = "stop"
    if tail:
        yield tail
    return Completion(text="".join(text.emitted), token_ids=new_ids, finish_reason=finish_reason)


def generate_text(
    model: GPT, tokenizer: Tokenizer, prompt: str, sample: SampleConfig | None = None
) -> Completion:
    """Generate a completion of ``prompt`` in one call (see ``stream_text`` for streaming)."""
    stream = stream_text(model, tokenizer, prompt, sample)
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value
