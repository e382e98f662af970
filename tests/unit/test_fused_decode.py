"""The fused batch-1 decode step computes what the model computes, for every architecture option it
covers, shares the KV cache with the PyTorch path, and steps aside where it does not apply."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptkit.generate import decode_tokens
from gptkit.model import GPT, ModelConfig, cpu_kernels
from gptkit.model.fused_decode import FusedDecoder
from model_variants import TINY, VARIANTS  # noqa: E402  (tests/unit is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[2]
COVERED = {
    **{name: options for name, options in VARIANTS.items() if not options.get("qk_norm")},  # QK-norm: not fused
    # widths that are not multiples of the kernels' vector blocks (8 and 64 floats): scalar tails
    "odd_widths": {"d_model": 36, "n_head": 3, "d_ff": 100},
    "wide": {"d_model": 192, "n_head": 2, "n_layer": 1},
}

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="gptkit's C kernels cannot be built here")


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(TINY, **overrides)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped pointer shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        # Attention scores of order 1 (at GPT-2's init they are ~0.01 and every softmax is nearly
        # uniform, so a wrong score scale or a missing key would hardly show in the logits).
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10.0)
    return model


@pytest.mark.parametrize("variant", list(COVERED))
def test_fused_steps_match_the_model_and_share_its_cache(variant: str) -> None:
    model = make_model(**COVERED[variant])
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(tokens)  # (1, 24, V)
        cache = model.new_kv_cache(1)
        model(tokens[:, :6], kv_cache=cache)  # prefill in PyTorch
        fused = FusedDecoder.for_model(model, cache)
        assert fused is not None
        for t in range(6, 18):  # fused steps write the cache ...
            torch.testing.assert_close(fused.step(int(tokens[0, t])), full[:, t], atol=1e-5, rtol=1e-5)
        assert cache.uniform_length == 18 and int(cache.lengths[0]) == 18
        # ... which the PyTorch path then reads: the keys and values written there are the model's.
        rest = model(tokens[:, 18:], kv_cache=cache)
    torch.testing.assert_close(rest, full[:, 18:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama", "odd_widths"])
def test_batch_one_decoding_equals_the_pytorch_path_through_a_sliding_context(variant: str, monkeypatch) -> None:
    model = make_model(seed=3, **COVERED[variant])
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    steps = 3 * model.config.block_size  # the context fills and slides several times
    calls = []
    real_step = FusedDecoder.step
    monkeypatch.setattr(FusedDecoder, "step", lambda self, token: calls.append(token) or real_step(self, token))
    fused = torch.cat(list(decode_tokens(model, prompt, max_new_tokens=steps, temperature=0.0)))
    # Every step ran fused except the prefills after a slide (each keeps the last 3/4 of the window).
    block, keep, length, slides = model.config.block_size, (3 * model.config.block_size) // 4, 5, 0
    for _ in range(steps - 1):
        slides, length = (slides + 1, keep) if length == block else (slides, length + 1)
    assert slides >= 2 and len(calls) == steps - 1 - slides
    # Two identical rows take the PyTorch path (the fused step is for one row).
    plain = torch.stack(list(decode_tokens(model, prompt.repeat(2, 1), max_new_tokens=steps, temperature=0.0)), 1)
    assert torch.equal(plain[0], plain[1])
    assert torch.equal(fused, plain[0])


def test_sampling_with_every_option_is_reproducible_on_the_fused_path() -> None:
    model = make_model(seed=4)
    with torch.no_grad():  # the fused step takes this model (else the test checks the module path)
        assert FusedDecoder.for_model(model, model.new_kv_cache(1)) is not None
    prompt = torch.tensor([[1, 2, 3]])
    options = dict(max_new_tokens=40, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    runs = [
        torch.cat(list(decode_tokens(model, prompt, generator=torch.Generator().manual_seed(7), **options)))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    other = torch.cat(list(decode_tokens(model, prompt, generator=torch.Generator().manual_seed(8), **options)))
    assert not torch.equal(runs[0], other)


def test_where_the_fused_step_does_not_apply_it_returns_none() -> None:
    model = make_model()
    assert FusedDecoder.for_model(make_model(qk_norm=True), make_model(qk_norm=True).new_kv_cache(1)) is None
    assert FusedDecoder.for_model(model, model.new_kv_cache(2)) is None  # more than one row
    model.train()
    assert FusedDecoder.for_model(model, model.new_kv_cache(1)) is None
    model.eval()
    with torch.enable_grad():  # a step would not build the autograd graph the caller asked for
        assert FusedDecoder.for_model(model, model.new_kv_cache(1)) is None
    double = make_model().double()
    with torch.no_grad():
        assert FusedDecoder.for_model(double, double.new_kv_cache(1)) is None
        assert FusedDecoder.for_model(model, model.new_kv_cache(1)) is not None


def test_bad_steps_are_refused_before_touching_memory() -> None:
    model = make_model()
    with torch.inference_mode():
        cache = model.new_kv_cache(1, max_len=3)
        fused = FusedDecoder.for_model(model, cache)
        assert fused is not None
        with pytest.raises(ValueError, match="outside the vocabulary of 97"):
            fused.step(97)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            fused.step(-1)
        for token in (1, 2, 3):
            last = fused.step(token)
        # The last slot of the cache is used, and right.
        torch.testing.assert_close(last, model(torch.tensor([[1, 2, 3]]))[:, -1], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="position 3 of a cache of 3"):
            fused.step(4)
    assert cache.uniform_length == 3


def test_switched_off_kernels_decode_the_same_tokens_without_the_fused_step() -> None:
    code = (
        "import torch\n"
        "from gptkit.generate import decode_tokens\n"
        "from gptkit.model import GPT, ModelConfig\n"
        "from gptkit.model.fused_decode import FusedDecoder\n"
        "torch.manual_seed(0)\n"
        "m = GPT(ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=32)).eval()\n"
        "with torch.no_grad():\n"
        "    assert FusedDecoder.for_model(m, m.new_kv_cache(1)) is None\n"
        "print(torch.cat(list(decode_tokens(m, torch.tensor([[1, 2, 3]]), max_new_tokens=50))).tolist())\n"
    )
    env = {**os.environ, "GPTKIT_CPU_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    expected = torch.cat(list(decode_tokens(model, torch.tensor([[1, 2, 3]]), max_new_tokens=50))).tolist()
    assert result.stdout.strip() == str(expected)


def test_a_model_with_a_changed_module_or_a_hook_is_left_to_pytorch() -> None:
    model = make_model()
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        assert FusedDecoder.for_model(model, cache) is not None
        handle = model.blocks[0].mlp.register_forward_hook(lambda module, args, out: out * 0)
        assert FusedDecoder.for_model(model, cache) is None  # the hook would be skipped
        handle.remove()

        class Scaled(torch.nn.Linear):  # e.g. an adapter around a Linear
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return 2 * super().forward(x)

        up = model.blocks[1].mlp.up
        scaled = Scaled(up.in_features, up.out_features)
        scaled.load_state_dict(up.state_dict())
        model.blocks[1].mlp.up = scaled
        assert FusedDecoder.for_model(model, cache) is None


def test_moved_memory_is_refused_instead_of_read() -> None:
    model = make_model()
    with torch.inference_mode():
        cache = model.new_kv_cache(1)
        fused = FusedDecoder.for_model(model, cache)
        assert fused is not None
        fused.step(1)
        model.share_memory()  # every parameter gets new storage; the old is freed
        with pytest.raises(RuntimeError, match="memory moved"):
            fused.step(2)
        assert cache.uniform_length == 1


def test_a_cache_or_a_layer_of_another_shape_is_left_to_pytorch() -> None:
    from gptkit.model.kv_cache import KVCache

    model = make_model()  # head_dim 8, block_size 32
    with torch.no_grad():
        narrow = KVCache(n_layer=2, batch_size=1, n_kv_head=4, head_dim=4, max_len=20)
        assert FusedDecoder.for_model(model, narrow) is None
        too_long = KVCache(n_layer=2, batch_size=1, n_kv_head=4, head_dim=8, max_len=40)  # > block_size
        assert FusedDecoder.for_model(model, too_long) is None
        assert FusedDecoder.for_model(model, model.new_kv_cache(1)) is not None
        model.blocks[1].mlp.up = torch.nn.Linear(32, 64)  # a pruned MLP
        model.blocks[1].mlp.down = torch.nn.Linear(64, 32)
        assert FusedDecoder.for_model(model, model.new_kv_cache(1)) is None
        other = make_model()
        other.blocks[0].attn_norm = torch.nn.Identity()
        assert FusedDecoder.for_model(other, other.new_kv_cache(1)) is None


def test_thread_count_does_not_change_a_single_bit() -> None:
    model = make_model(**COVERED["wide"])
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.inference_mode():
                cache = model.new_kv_cache(1)
                fused = FusedDecoder.for_model(model, cache)
                assert fused is not None
                results.append(torch.stack([fused.step(t).clone() for t in tokens]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_a_nan_in_attention_makes_the_logits_nan_as_in_the_model() -> None:
    model = make_model()
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias[32] = float("nan")  # one key feature of head 0
        tokens = torch.tensor([[5, 6, 7]])
        expected = model(tokens)[:, -1]
        cache = model.new_kv_cache(1)
        model(tokens[:, :2], kv_cache=cache)
        fused = FusedDecoder.for_model(model, cache)
        assert fused is not None
        logits = fused.step(7)
    assert torch.isnan(expected).all()
    assert torch.isnan(logits).all()


@pytest.mark.parametrize("batch", [1, 4])
def test_a_default_device_other_than_the_cpu_changes_no_token(batch: int) -> None:
    """``torch.set_default_device`` / ``with torch.device(...)`` must not move the C kernels' own
    buffers off the CPU (they would write through a pointer that is not CPU memory): the fused
    batch-1 step and the few-rows linears (d_model 256 packs its weights) give the same tokens."""
    from gptkit.generate import decode_tokens

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, d_model=256, block_size=64, vocab_size=100)).eval()
    prompt = torch.randint(0, 100, (1, 5)).expand(batch, 5)
    expected = torch.stack(list(decode_tokens(model, prompt, max_new_tokens=6)))
    with torch.device("meta"):
        got = torch.stack(list(decode_tokens(model, prompt, max_new_tokens=6)))
    assert torch.equal(got, expected)
