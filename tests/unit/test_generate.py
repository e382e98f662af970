"""Sampling functions and text generation: top-k/top-p, repetition penalty, seeds, stop strings,
streaming of multi-byte characters, and errors for bad requests."""

from __future__ import annotations

import pytest
import torch

from gptkit.config import ModelConfig, SampleConfig
from gptkit.errors import ConfigError, RequestError
from gptkit.generate.generator import _TextStream
from gptkit.generate import (
    apply_repetition_penalty,
    decode_tokens,
    filter_top_k,
    filter_top_p,
    generate_text,
    sample_next,
    stream_text,
)
from gptkit.model import GPT
from gptkit.tokenizer import train_char_tokenizer

CORPUS = "To be, or not to be, that is the question. Ünïcödé 日本語 🙂\n"


@pytest.fixture(scope="module")
def tokenizer():
    return train_char_tokenizer([CORPUS])


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=32)
    return GPT(config).eval()


def test_top_k_keeps_exactly_k_largest() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_top_p(probs.log(), 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    kept = torch.isfinite(filter_top_p(probs.log(), 0.1))
    assert kept.tolist() == [[True, False, False, False]]  # the top token always stays


def test_repetition_penalty_lowers_seen_tokens_both_signs() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_is_argmax_and_sampling_is_seeded() -> None:
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    a = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(sample_next(logits, temperature=5.0, top_k=1), logits.argmax(-1))


def test_generate_is_reproducible_with_a_seed(model, tokenizer) -> None:
    sample = SampleConfig(max_new_tokens=30, temperature=1.0, seed=7)
    first = generate_text(model, tokenizer, "To be", sample)
    second = generate_text(model, tokenizer, "To be", sample)
    assert first == second
    assert len(first.token_ids) == 30 or first.finish_reason != "length"
    other = generate_text(model, tokenizer, "To be", SampleConfig(max_new_tokens=30, temperature=1.0, seed=8))
    assert other.token_ids != first.token_ids


def test_streamed_pieces_join_to_the_completion(model, tokenizer) -> None:
    sample = SampleConfig(max_new_tokens=40, temperature=1.0, seed=1)
    pieces = list(stream_text(model, tokenizer, "日本", sample))
    assert "".join(pieces) == generate_text(model, tokenizer, "日本", sample).text


class _ScriptedModel(GPT):
    """A real GPT whose logits are overridden to emit a fixed token script (tests text handling)."""

    def __init__(self, config: ModelConfig, script: list[int]) -> None:
        super().__init__(config)
        self.script = script

    def forward(self, tokens, *, kv_cache=None, last_only=False):
        logits = super().forward(tokens, kv_cache=kv_cache, last_only=last_only)
        produced = int(kv_cache.lengths[0]) - self._prompt_len if kv_cache is not None else 0
        target = self.script[min(produced, len(self.script) - 1)]
        forced = torch.full_like(logits, -1e9)
        forced[..., target] = 0.0
        return forced


def _scripted(tokenizer, text: str, prompt_len: int) -> _ScriptedModel:
    ids = tokenizer.encode(text)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=1, d_model=8)
    model = _ScriptedModel(config, ids).eval()
    model._prompt_len = prompt_len
    return model


def test_stop_string_ends_generation_and_is_not_emitted(tokenizer) -> None:
    prompt = "To"
    model = _scripted(tokenizer, " be, or not to be", len(tokenizer.encode(prompt)))
    sample = SampleConfig(max_new_tokens=40, temperature=0.0, stop=("not",))
    pieces = list(stream_text(model, tokenizer, prompt, sample))
    result = generate_text(model, tokenizer, prompt, sample)
    assert result.text == " be, or "
    assert "".join(pieces) == " be, or "
    assert result.finish_reason == "stop"


def test_unseen_multibyte_character_is_never_split_in_the_stream(tokenizer) -> None:
    # "😀" is not in the training text: it becomes 4 byte-fallback tokens.
    prompt = "To"
    ids = tokenizer.encode("a😀b")
    assert len(ids) == 6
    model = _scripted(tokenizer, "a😀b", len(tokenizer.encode(prompt)))
    pieces = list(stream_text(model, tokenizer, prompt, SampleConfig(max_new_tokens=6, temperature=0.0)))
    assert "".join(pieces) == "a😀b"
    assert all("\ufffd" not in p for p in pieces)


def test_end_of_text_token_finishes(tokenizer) -> None:
    model = _scripted(tokenizer, "ab", 1)
    model.script = [tokenizer.encode("a")[0], tokenizer.eot_id]
    result = generate_text(model, tokenizer, "T", SampleConfig(max_new_tokens=10, temperature=0.0))
    assert result.text == "a"
    assert result.finish_reason == "eot"


def test_prompt_longer_than_context_is_a_request_error(model, tokenizer) -> None:
    with pytest.raises(RequestError, match="prompt is 60 tokens, longer than the model's context of 48"):
        generate_text(model, tokenizer, "x" * 60, SampleConfig(max_new_tokens=1))


def test_empty_prompt_starts_a_new_document(model, tokenizer) -> None:
    """An empty prompt means: continue from <|endoftext|>, as after the end of a document."""
    sample = SampleConfig(max_new_tokens=12, temperature=1.0, seed=3)
    result = generate_text(model, tokenizer, "", sample)
    eot = tokenizer.eot_id
    steps = decode_tokens(model, torch.tensor([[eot]]), max_new_tokens=12, temperature=1.0,
                          generator=torch.Generator().manual_seed(3))
    from_eot = [int(t) for t in steps]
    from_eot = from_eot[: from_eot.index(eot)] if eot in from_eot else from_eot
    assert len(from_eot) >= 3  # enough tokens for the comparison to mean something
    assert result.token_ids[: len(from_eot)] == from_eot


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": -1.0}, "temperature: must be >= 0"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1]"),
        ({"top_k": 0}, "top_k: must be > 0"),
        ({"stop": ("",)}, "stop: must be a list of non-empty strings"),
    ],
)
def test_bad_sampling_settings(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SampleConfig(**fields)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "prompt, options, message",
    [
        ([[1, 2]], {"temperature": -1.0}, "temperature: must be >= 0"),
        ([[1, 2]], {"top_k": 0}, "top_k: must be > 0"),
        ([[1, 2]], {"top_p": 0.0}, r"top_p: must be in \(0, 1\]"),
        ([[1, 2]], {"repetition_penalty": 0.0}, "repetition_penalty: must be > 0"),
        ([[1, 2]], {"max_new_tokens": -3}, "max_new_tokens: must be >= 0"),
        ([[1, 2]], {"top_k": 2.5}, "top_k: must be an integer or null"),
        ([1, 2], {}, r"prompt must be a \(batch, tokens\) tensor of token ids; got \(2,\)"),
        ([[1.0, 2.0]], {}, r"prompt must be a \(batch, tokens\) tensor of token ids; got \(1, 2\)"),
    ],
)
def test_decode_tokens_checks_its_arguments_when_called(model, prompt, options, message) -> None:
    arguments = {"max_new_tokens": 4, **options}
    with pytest.raises(RequestError, match=message):
        decode_tokens(model, torch.tensor(prompt), **arguments)  # raised by the call, not the first step


def test_a_tiny_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    for temperature in (1e-40, 1e-30):
        assert sample_next(logits, temperature=temperature).tolist() == [1, 0]


def test_a_temperature_below_float32s_range_is_greedy_not_nan() -> None:
    """1e-300 and 5e-324 are positive floats that SampleConfig accepts; as a float32 divisor they
    are 0, and (largest - largest) / 0 was nan: multinomial's RuntimeError, a traceback."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    for temperature in (1e-46, 1e-300, 5e-324):
        generator = torch.Generator().manual_seed(0)
        assert sample_next(logits, temperature=temperature, generator=generator).tolist() == [1, 0]


def test_infinite_logits_share_the_probability_instead_of_a_nan() -> None:
    """A repetition penalty far below 1 divides a positive logit by ~0: inf, and inf - inf was nan."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    seen = torch.tensor([[False, True, True, False]])
    penalised = apply_repetition_penalty(logits, seen, 1e-300)
    assert penalised[0, 1] == penalised[0, 2] == float("inf")
    generator = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(penalised, temperature=0.8, top_p=0.9, generator=generator)) for _ in range(50)}
    assert drawn == {1, 2}
    everything_impossible = torch.full((1, 4), float("-inf"))
    assert 0 <= int(sample_next(everything_impossible, temperature=1.0, generator=generator)) < 4


def test_an_extreme_repetition_penalty_generates_text(model, tokenizer) -> None:
    for penalty in (1e-300, 1e300):
        completion = generate_text(
            model, tokenizer, "To be", SampleConfig(max_new_tokens=8, repetition_penalty=penalty, seed=0)
        )
        assert completion.finish_reason in ("length", "eot")


def test_decoding_uses_eval_mode_and_gives_the_mode_back(tokenizer) -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=32,
                         dropout=0.5)
    model = GPT(config).train()
    prompt = torch.tensor([tokenizer.encode("To be")])
    runs = [[int(t) for t in decode_tokens(model, prompt, max_new_tokens=10)] for _ in range(2)]
    assert model.training  # restored
    model.eval()
    assert runs[0] == runs[1] == [int(t) for t in decode_tokens(model, prompt, max_new_tokens=10)]
    assert not model.training


def test_a_prompt_that_is_not_text_is_a_request_error(model, tokenizer) -> None:
    for prompt in (None, b"To be", 42):
        with pytest.raises(RequestError, match="prompt must be a string; got"):
            generate_text(model, tokenizer, prompt, SampleConfig(max_new_tokens=2))  # type: ignore[arg-type]


def test_the_earliest_stop_string_in_the_text_wins_whatever_their_order() -> None:
    """One token can complete two stop strings at once: the text stops at the earlier match."""
    from gptkit.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["xabcx xabcx xabcx abc abc abc"] * 50, 300)
    token = tok.encode("xabcx")
    assert len(token) == 1  # the whole word is one token, so both stops complete in one push
    for stops, expected in ((("c", "ab"), "x"), (("ab", "c"), "x"), (("cx", "xa"), "")):
        stream = _TextStream(tok, stops)
        assert stream.push(token[0]) == expected and stream.stopped, stops


@pytest.mark.parametrize(
    "prompt, message",
    [
        (torch.tensor([[1, 2]], dtype=torch.uint8),
         r"tensor of token ids; got \(1, 2\) torch.uint8 \(ids are int64 or int32\)"),
        (torch.tensor([[1, 2]], dtype=torch.int16),
         r"tensor of token ids; got \(1, 2\) torch.int16 \(ids are int64 or int32\)"),
        (torch.tensor([[1, -1]]), "prompt holds token id -1, outside the model's vocabulary"),
        (torch.tensor([[1, 10**6]]), "prompt holds token id 1000000, outside the model's vocabulary"),
        (torch.zeros(0, 3, dtype=torch.long), "prompt must contain at least one row"),
    ],
)
def test_decode_tokens_refuses_token_ids_the_model_cannot_embed(model, prompt, message) -> None:
    """Checked by the call (RequestError), not an IndexError/RuntimeError from inside the first step."""
    for penalty in (1.0, 1.3):  # the penalty's scatter would fail first with another error
        with pytest.raises(RequestError, match=message):
            decode_tokens(model, prompt, max_new_tokens=2, repetition_penalty=penalty)


def test_a_stop_string_completed_by_the_final_flush_still_stops(model, tokenizer) -> None:
    """An incomplete UTF-8 tail becomes U+FFFD only when the stream is flushed; a stop string
    ending in it must still be found there (and not be printed)."""
    a, lead_byte = tokenizer.encode("a")[0], tokenizer.encode("\u0800")[0]  # \u0800: 3 UTF-8 bytes, unseen
    stream = _TextStream(tokenizer, ("a\ufffd",))
    assert stream.push(a) == "" and stream.push(lead_byte) == ""
    assert stream.finish() == "" and stream.stopped
    without = _TextStream(tokenizer, ())
    assert without.push(a) + without.push(lead_byte) + without.finish() == "a\ufffd"


def test_sample_next_applies_top_p() -> None:
    """top_p reaches the draw: with p = 0.5 only the top token (probability 0.5) may be drawn."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    drawn = sample_next(logits, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert drawn.tolist() == [0] * 2000
    unfiltered = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert set(unfiltered.tolist()) == {0, 1, 2, 3}  # without it every token turns up


def test_decode_tokens_applies_top_p_and_top_k(model, tokenizer) -> None:
    """A nucleus of one token (or top_k=1) is greedy decoding, whatever the temperature."""
    prompt = torch.tensor([tokenizer.encode("To be")] * 2)
    greedy = torch.stack(list(decode_tokens(model, prompt, max_new_tokens=20, temperature=0.0)), 1)
    for options in ({"top_p": 1e-6}, {"top_k": 1}):
        drawn = decode_tokens(model, prompt, max_new_tokens=20, temperature=2.0,
                              generator=torch.Generator().manual_seed(0), **options)
        assert torch.equal(torch.stack(list(drawn), 1), greedy), options
    free = decode_tokens(model, prompt, max_new_tokens=20, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(torch.stack(list(free), 1), greedy)  # the filters are what made it greedy


def test_decode_tokens_applies_the_repetition_penalty_to_every_token_seen(model, tokenizer) -> None:
    """Greedy decoding with a penalty equals the same loop written by hand: full recomputation,
    the penalty on every token of the prompt and of the output so far."""
    prompt = torch.tensor([tokenizer.encode("To be, or")])
    penalty, steps = 1.5, 25
    tokens = prompt
    for _ in range(steps):
        logits = model(tokens)[:, -1]
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, tokens, True)
        next_token = apply_repetition_penalty(logits, seen, penalty).argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    expected = tokens[0, prompt.shape[1]:].tolist()
    for rows in (1, 2):  # the fused batch-1 step and the batched PyTorch path
        out = decode_tokens(model, prompt.repeat(rows, 1), max_new_tokens=steps, temperature=0.0,
                            repetition_penalty=penalty)
        assert torch.stack(list(out), 1)[0].tolist() == expected, rows
    plain = [int(t) for t in decode_tokens(model, prompt, max_new_tokens=steps, temperature=0.0)]
    assert plain != expected  # the penalty changes this model's greedy output
