"""The transformer: shapes, GPT-2 parameter counts, initialisation and the KV cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gptkit.config import ModelConfig, model_config_from_dict
from gptkit.errors import ConfigError
from gptkit.generate import decode_tokens
from gptkit.model import GPT, PRESETS

from model_variants import TINY, VARIANTS  # noqa: E402  (tests/unit is on sys.path under pytest)


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(TINY, **overrides)).eval()


@pytest.mark.parametrize(
    "preset, expected",
    [
        # Hugging Face's GPT2LMHeadModel reports exactly these counts for the released shapes.
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_gpt2_parameter_counts(preset: str, expected: int) -> None:
    config = model_config_from_dict({"preset": preset})
    with torch.device("meta"):  # no memory needed to count
        model = GPT(config)
    assert model.num_parameters() == expected


def test_logits_shape_and_last_only() -> None:
    model = make_model()
    tokens = torch.randint(0, 97, (3, 10))
    logits = model(tokens)
    assert logits.shape == (3, 10, 97)
    torch.testing.assert_close(model(tokens, last_only=True)[:, 0], logits[:, -1])


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    model = make_model()
    tokens = torch.randint(0, 97, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])
    assert not torch.allclose(model(tokens)[:, 8:], model(changed)[:, 8:])


def test_tied_head_shares_the_token_embedding() -> None:
    model = make_model()
    assert model.lm_head.weight is model.token_embedding.weight
    untied = make_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.token_embedding.weight
    assert untied.num_parameters() == model.num_parameters() + 97 * 32


def test_gpt2_initialisation_scales_residual_projections() -> None:
    config = ModelConfig(vocab_size=500, block_size=64, n_layer=8, n_head=4, d_model=256)
    torch.manual_seed(0)
    model = GPT(config)
    std = config.init_std
    residual = std / math.sqrt(2 * config.n_layer)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.blocks[0].attn.out.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.token_embedding.weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.final_norm.weight == 1)


def test_dropout_is_active_only_in_training() -> None:
    model = make_model(dropout=0.5)
    tokens = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(model(tokens), model(tokens))  # eval: deterministic
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))


def _greedy_by_recomputation(model: GPT, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[:, prompt.shape[1]:]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_greedy_equals_full_recomputation(variant: str) -> None:
    model = make_model(seed=1, **VARIANTS[variant])
    prompt = torch.randint(0, 97, (2, 5))
    steps = TINY.block_size - 5  # fill the whole context
    expected = _greedy_by_recomputation(model, prompt, steps)
    cached = torch.stack(list(decode_tokens(model, prompt, max_new_tokens=steps, temperature=0.0)), dim=1)
    assert torch.equal(cached, expected)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_kv_cache_logits_match_chunked_prefill(variant: str) -> None:
    model = make_model(seed=2, **VARIANTS[variant])
    tokens = torch.randint(0, 97, (2, 20))
    full = model(tokens)
    cache = model.new_kv_cache(2)
    pieces = [model(tokens[:, :7], kv_cache=cache), model(tokens[:, 7:8], kv_cache=cache),
              model(tokens[:, 8:], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [20, 20]


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_kv_cache_rows_of_different_lengths_decode_together(variant: str) -> None:
    """Rows with their own lengths (the shape continuous batching needs) match each row alone."""
    model = make_model(seed=3, **VARIANTS[variant])
    tokens = torch.randint(0, 97, (3, 12))
    lengths = [12, 7, 10]
    cache = model.new_kv_cache(3)
    model(tokens, kv_cache=cache)  # prefill all 12, then declare the shorter rows shorter
    cache.set_lengths(lengths)
    assert cache.uniform_length is None
    next_tokens = torch.randint(0, 97, (3, 1))
    logits = model(next_tokens, kv_cache=cache)[:, -1]
    for row, length in enumerate(lengths):
        alone = torch.cat([tokens[row : row + 1, :length], next_tokens[row : row + 1]], dim=1)
        torch.testing.assert_close(logits[row], model(alone)[0, -1], atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [13, 8, 11]


def test_gqa_cache_holds_only_kv_heads() -> None:
    model = make_model(n_kv_head=1)
    cache = model.new_kv_cache(2)
    assert cache.keys.shape == (TINY.n_layer, 2, 1, TINY.block_size, TINY.head_dim)


def test_kv_cache_refuses_to_overflow() -> None:
    model = make_model()
    cache = model.new_kv_cache(1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_decoding_feeds_one_token_per_step_to_the_cache() -> None:
    """After the prompt's prefill each step runs the model on the new token alone (the KV cache
    holds the rest), not on the whole sequence again."""
    model = make_model()
    fed: list[tuple[int, ...]] = []
    handle = model.token_embedding.register_forward_hook(lambda module, args, out: fed.append(tuple(args[0].shape)))
    try:
        steps = list(decode_tokens(model, torch.randint(0, 97, (2, 5)), max_new_tokens=10, temperature=0.0))
    finally:
        handle.remove()
    assert len(steps) == 10
    assert fed == [(2, 5)] + [(2, 1)] * 9


def test_decode_slides_the_window_past_block_size() -> None:
    model = make_model()
    prompt = torch.randint(0, 97, (1, 4))
    out = list(decode_tokens(model, prompt, max_new_tokens=3 * TINY.block_size, temperature=0.0))
    assert len(out) == 3 * TINY.block_size
    # The same by recomputation: once the context is full it keeps its last three quarters.
    context, expected = prompt, []
    for _ in range(3 * TINY.block_size):
        next_token = model(context)[:, -1].argmax(-1, keepdim=True)
        expected.append(int(next_token))
        full = context.shape[1] == TINY.block_size
        context = torch.cat([context, next_token], dim=1)[:, -(3 * TINY.block_size) // 4 if full else 0 :]
    assert [int(t) for t in out] == expected


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_head": 3, "d_model": 32}, "model.d_model: must be divisible by model.n_head"),
        ({"n_head": 4, "n_kv_head": 3}, "model.n_head: must be divisible by model.n_kv_head"),
        ({"n_layer": 0}, "model.n_layer: must be > 0"),
        ({"dropout": 1.5}, "model.dropout: must be in [0, 1)"),
        ({"position": "alibi"}, "model.position: must be one of learned, rope"),
        ({"position": "rope", "n_head": 32, "d_model": 96}, "RoPE needs an even head dimension"),
    ],
)
def test_invalid_model_configs_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(TINY, **fields)
    assert message in str(info.value)


def test_presets_are_valid_configs() -> None:
    for name in PRESETS:
        assert isinstance(model_config_from_dict({"preset": name}), ModelConfig)
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        model_config_from_dict({"preset": "gpt5"})


def test_kv_cache_greedy_equals_recomputation_for_every_option_combination() -> None:
    """All 192 combinations of position x norm x mlp x kv heads x bias x tying x QK-norm."""
    import itertools

    options = itertools.product(
        ["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"], [None, 2, 1], [True, False],
        [True, False], [False, True],
    )
    prompt = torch.randint(0, 97, (2, 3), generator=torch.Generator().manual_seed(0))
    for position, norm, mlp, kv_heads, bias, tied, qk_norm in options:
        torch.manual_seed(0)
        config = dataclasses.replace(
            TINY, position=position, norm=norm, mlp=mlp, n_kv_head=kv_heads, bias=bias, tie_embeddings=tied,
            qk_norm=qk_norm, n_layer=1, block_size=12,
        )
        model = GPT(config).eval()
        expected = _greedy_by_recomputation(model, prompt, 9)
        cached = torch.stack(list(decode_tokens(model, prompt, max_new_tokens=9, temperature=0.0)), dim=1)
        assert torch.equal(cached, expected), config


@pytest.mark.parametrize("batch", [1, 3, 8])  # C kernels (when built): one-row at 1, blocked at 3 and 8
def test_prepacked_cpu_decoding_matches_the_plain_model(batch: int) -> None:
    from gptkit.model.packed import cpu_packing_available, packed_for_inference, should_pack

    if not cpu_packing_available():
        pytest.skip("this PyTorch build has no oneDNN linear ops")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, d_model=256)).eval()
    assert should_pack(model)
    packed = packed_for_inference(model, batch_hint=batch)
    assert packed is packed_for_inference(model, batch_hint=batch)  # cached
    assert packed.token_embedding.weight is model.token_embedding.weight  # shared, not copied
    from gptkit.model import cpu_kernels
    from gptkit.model.packed import PackedLinear

    linears = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 2 * 4 + 1  # qkv, out, up, down per block, and the head
    if cpu_kernels.available():
        # batch 1: decode steps read the model's own weights (no copy); 2..8: one blocked copy.
        assert all(m.packed_weight is None and m.one_row is not None for m in linears)
        assert all((m.few_rows is None) == (batch == 1) for m in linears)
    else:
        assert all(m.packed_weight is not None for m in linears)
    tokens = torch.randint(0, 300, (batch, 20))
    with torch.inference_mode():
        torch.testing.assert_close(packed(tokens), model(tokens), atol=1e-5, rtol=1e-5)
        one_token = tokens[:, -1:]
        torch.testing.assert_close(packed(one_token), model(one_token), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected = _greedy_by_recomputation(model, tokens[:, :5], 30)
    cached = torch.stack(list(decode_tokens(model, tokens[:, :5], max_new_tokens=30, temperature=0.0)), dim=1)
    assert torch.equal(cached, expected)
    # A changed weight invalidates the packed copy.
    with torch.no_grad():
        model.blocks[0].mlp.up.weight.mul_(2)
    fresh = packed_for_inference(model, batch_hint=batch)
    assert fresh is not packed
    # So does new memory under the same parameter object (p.data = ..., share_memory()).
    model.blocks[0].mlp.up.weight.data = model.blocks[0].mlp.up.weight.data.clone()
    assert packed_for_inference(model, batch_hint=batch) is not fresh


def test_input_and_cache_mistakes_are_clear_errors() -> None:
    model = GPT(dataclasses.replace(TINY, block_size=16)).eval()
    with pytest.raises(ValueError, match=r"tokens must be a \(batch, time\) tensor of token ids; got \(5,\)"):
        model(torch.arange(5))
    with pytest.raises(ValueError, match="tokens must be a .* got list"):
        model([[1, 2]])  # type: ignore[arg-type]
    for batch_size, max_len in ((0, 8), (-1, 8), (1, 0)):
        with pytest.raises(ValueError, match="KV cache (batch_size|max_len) must be a positive integer"):
            model.new_kv_cache(batch_size, max_len)
    cache = model.new_kv_cache(2, 8)
    with pytest.raises(ValueError, match="3 rows of tokens for a KV cache of 2 rows"):
        model(torch.zeros(3, 4, dtype=torch.long), kv_cache=cache)
    for lengths in ([-3, 2], [100, 2]):
        with pytest.raises(ValueError, match=r"lengths must be in \[0, max_len=8\]"):
            cache.set_lengths(lengths)
