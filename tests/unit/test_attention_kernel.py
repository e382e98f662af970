"""The fused causal attention kernel computes what SDPA computes, forward and backward; the model
uses it only where it is exactly that computation, and every other case (or a machine without the
kernels) takes SDPA without an error."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptkit.model import GPT, ModelConfig, attention_kernel, fused_trunk
from gptkit.model.layers import AttentionContext, CausalSelfAttention

from call_counter import Calls  # noqa: E402  (tests/unit, on sys.path)

REPO = Path(__file__).resolve().parents[2]
needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine"
)


def sdpa_attention(qkv: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """What CausalSelfAttention computes without the kernel: (B, T, (H + 2 Hkv) D) -> (B, T, H D)."""
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    q, k, v = qkv.view(B, T, -1, D).transpose(1, 2).split([n_head, n_kv_head, n_kv_head], dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_head != n_head)
    return y.transpose(1, 2).reshape(B, T, n_head * D)


def float64_reference(qkv: torch.Tensor, grad: torch.Tensor, n_head: int, n_kv_head: int):
    """Output and dqkv in float64 through ATen's differentiable ops."""
    qkv64 = qkv.detach().double().requires_grad_()
    y = attention_kernel.reference_attention(qkv64, n_head, n_kv_head)
    y.backward(grad.double())
    return y.detach(), qkv64.grad


def kernel_forward_backward(qkv: torch.Tensor, grad: torch.Tensor, n_head: int, n_kv_head: int):
    x = qkv.detach().clone().requires_grad_()
    y = attention_kernel.fused_causal_attention(x, n_head, n_kv_head)
    y.backward(grad)
    return y.detach(), x.grad


@needs_compiler
def test_kernel_builds_on_this_machine() -> None:
    # Without it the comparisons below would only compare ATen with itself.
    assert attention_kernel.available()
    assert attention_kernel.covers(torch.randn(2, 16, 3 * 64), 4, 4)


@needs_compiler
@pytest.mark.parametrize(
    "B, T, H, Hkv, D",
    [
        (3, 64, 4, 4, 32),  # the char training shape, smaller batch
        (2, 37, 2, 2, 16),  # T not a multiple of 4 or 8
        (2, 1, 3, 3, 8),  # a single token
        (1, 9, 2, 2, 12),  # D not a multiple of 8
        (2, 20, 4, 2, 8),  # grouped-query
        (1, 24, 4, 1, 5),  # multi-query, odd D
        (1, 130, 2, 2, 64),  # past the 4-row blocks and 8-column padding
        (1, 512, 1, 1, 8),  # MAX_T: the largest per-thread scratch
    ],
)
def test_matches_float64_reference_forward_and_backward(B: int, T: int, H: int, Hkv: int, D: int) -> None:
    torch.manual_seed(0)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D) * 2  # scores of several units: a peaked softmax
    grad = torch.randn(B, T, H * D)
    y, dqkv = kernel_forward_backward(qkv, grad, H, Hkv)
    expected_y, expected_dqkv = float64_reference(qkv, grad, H, Hkv)
    assert y.shape == (B, T, H * D) and dqkv.shape == qkv.shape
    torch.testing.assert_close(y.double(), expected_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dqkv.double(), expected_dqkv, rtol=1e-5, atol=2e-5)
    # And no further from the float64 truth than SDPA's own float32 result (a few ulps more at most).
    x = qkv.clone().requires_grad_()
    sdpa_y = sdpa_attention(x, H, Hkv)
    sdpa_y.backward(grad)
    assert (y.double() - expected_y).abs().max() <= 2 * (sdpa_y.double() - expected_y).abs().max() + 2e-6
    assert (dqkv.double() - expected_dqkv).abs().max() <= 2 * (x.grad.double() - expected_dqkv).abs().max() + 5e-6


@needs_compiler
@pytest.mark.parametrize("B, T, H, Hkv, D", [(3, 64, 4, 4, 32), (2, 37, 4, 2, 12), (1, 128, 2, 1, 8)])
def test_saved_probabilities_give_the_gradients_of_recomputed_ones(monkeypatch, B, T, H, Hkv, D) -> None:
    """Up to SAVE_PROBS_MAX_T the backward reads the forward's softmax; past it, it recomputes it."""
    torch.manual_seed(3)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D) * 2
    grad = torch.randn(B, T, H * D)
    assert attention_kernel.probs_shape(B, T, H) == (B, H, T, (T + 7) // 8 * 8)
    y_saved, dqkv_saved = kernel_forward_backward(qkv, grad, H, Hkv)
    monkeypatch.setattr(attention_kernel, "SAVE_PROBS_MAX_T", T - 1)
    assert attention_kernel.probs_shape(B, T, H) is None
    y_recomputed, dqkv_recomputed = kernel_forward_backward(qkv, grad, H, Hkv)
    assert torch.equal(y_saved, y_recomputed)
    torch.testing.assert_close(dqkv_saved, dqkv_recomputed, rtol=1e-5, atol=1e-5)
    assert not torch.equal(dqkv_saved, dqkv_recomputed)  # two paths indeed (rounding differs)


@needs_compiler
def test_large_scores_stay_finite_and_as_exact_as_sdpa() -> None:
    """Scores of hundreds: the softmax must subtract each row's maximum. At that size float32
    rounding of the scores alone moves the result by ~1e-4; SDPA's error is the yardstick."""
    torch.manual_seed(1)
    qkv = torch.randn(2, 33, 3 * 2 * 16) * 12
    grad = torch.randn(2, 33, 2 * 16)
    y, dqkv = kernel_forward_backward(qkv, grad, 2, 2)
    expected_y, expected_dqkv = float64_reference(qkv, grad, 2, 2)
    assert torch.isfinite(y).all() and torch.isfinite(dqkv).all()
    x = qkv.clone().requires_grad_()
    sdpa_y = sdpa_attention(x, 2, 2)
    sdpa_y.backward(grad)
    assert (y.double() - expected_y).abs().max() <= 2 * (sdpa_y.double() - expected_y).abs().max() + 1e-5
    assert (dqkv.double() - expected_dqkv).abs().max() <= 2 * (x.grad.double() - expected_dqkv).abs().max() + 1e-4
    assert (dqkv.double() - expected_dqkv).abs().max() < 0.05  # and not far off in absolute terms


@needs_compiler
def test_nan_and_inf_inputs_give_what_sdpa_gives() -> None:
    torch.manual_seed(8)
    for value in (float("nan"), float("inf"), -float("inf")):
        for column in (3, 16 + 3):  # a query element, a key element (head 0, D = 8)
            qkv = torch.randn(1, 16, 3 * 2 * 8)
            qkv[0, 5, column] = value
            with torch.no_grad():
                y, expected = attention_kernel.fused_causal_attention(qkv, 2, 2), sdpa_attention(qkv, 2, 2)
            assert torch.equal(y.isnan(), expected.isnan())
            finite = ~expected.isnan()
            torch.testing.assert_close(y[finite], expected[finite], rtol=1e-5, atol=1e-5)


@needs_compiler
def test_inference_path_and_thread_counts_give_identical_results() -> None:
    torch.manual_seed(2)
    qkv = torch.randn(3, 40, 3 * 4 * 8, requires_grad=True)
    grad = torch.randn(3, 40, 4 * 8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y = attention_kernel.fused_causal_attention(qkv, 4, 4)
            (dqkv,) = torch.autograd.grad(y, qkv, grad)
            with torch.no_grad():  # no autograd node, no log-sum-exp saved
                y_inference = attention_kernel.fused_causal_attention(qkv, 4, 4)
            results.append((y, dqkv, y_inference))
    finally:
        torch.set_num_threads(threads)
    for y, dqkv, y_inference in results:
        # Each (batch row, head) is one thread's work in a fixed order: bit-identical.
        assert torch.equal(y, results[0][0]) and torch.equal(dqkv, results[0][1])
        assert torch.equal(y_inference, y)


@needs_compiler
def test_strided_gradient_is_accepted() -> None:
    torch.manual_seed(3)
    qkv = torch.randn(2, 16, 3 * 2 * 8, requires_grad=True)
    grad = torch.randn(16, 2, 16).transpose(0, 1)  # (2, 16, 16), not contiguous
    attention_kernel.fused_causal_attention(qkv, 2, 2).backward(grad)
    _, expected = float64_reference(qkv, grad, 2, 2)
    torch.testing.assert_close(qkv.grad.double(), expected, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_double_backward_is_differentiable() -> None:
    """A gradient penalty differentiates the attention's backward: that goes through ATen's ops."""
    torch.manual_seed(4)
    qkv0 = torch.randn(2, 12, 3 * 2 * 8)
    grads = []
    for attention, dtype in ((attention_kernel.fused_causal_attention, torch.float32),
                             (attention_kernel.reference_attention, torch.float64)):
        qkv = qkv0.to(dtype).clone().requires_grad_()
        y = attention(qkv, 2, 2)
        (g,) = torch.autograd.grad(y.square().sum(), qkv, create_graph=True)
        (y.sum() + g.square().sum()).backward()
        grads.append(qkv.grad)
    torch.testing.assert_close(grads[0].double(), grads[1], rtol=1e-4, atol=1e-4)


def test_covers_only_plain_short_cpu_float32() -> None:
    qkv = torch.randn(2, 16, 3 * 32)
    assert not attention_kernel.covers(qkv.double(), 2, 2)
    assert not attention_kernel.covers(torch.randn(2, 3 * 32, 16).transpose(1, 2), 2, 2)  # strided
    assert not attention_kernel.covers(torch.randn(1, attention_kernel.MAX_T + 1, 3 * 32), 2, 2)
    assert not attention_kernel.covers(torch.randn(2, 0, 3 * 32), 2, 2)  # an empty sequence
    with torch.autograd.forward_ad.dual_level():
        assert not attention_kernel.covers(qkv, 2, 2)  # SDPA carries the tangents


# --- the model: where the kernel is used, and where it must not be ----------------------------

SMALL = ModelConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, d_model=32)


def KernelCalls(monkeypatch: pytest.MonkeyPatch, *, allowed: bool = True) -> Calls:
    """Counts the model's calls of the fused kernel (or forbids them)."""
    return Calls(monkeypatch, attention_kernel, "fused_causal_attention", allowed=allowed,
                 forbidden="the fused kernel ran where SDPA must")


def make_pair(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(SMALL, **overrides))


def without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_kernel, "covers", lambda *args: False)


@needs_compiler
@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}, {"bias": False, "norm": "rmsnorm", "mlp": "swiglu"}])
def test_model_training_steps_match_sdpa(monkeypatch: pytest.MonkeyPatch, overrides: dict) -> None:
    """A few AdamW steps with the kernel and with SDPA: the same losses."""
    # One batch, six times: the loss falls quickly as the model memorises it.
    tokens = torch.randint(0, 61, (7, 25), generator=torch.Generator().manual_seed(5)).expand(6, 7, 25)

    def train(use_kernel: bool) -> list[float]:
        # Module by module: the fused training node (test_fused_trunk.py) would call the kernel itself.
        with monkeypatch.context() as patch, fused_trunk.unfused():
            calls = KernelCalls(patch)
            if not use_kernel:
                without_kernel(patch)
            model = make_pair(**overrides).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            losses = []
            for batch in tokens:
                logits = model(batch[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, 61), batch[:, 1:].reshape(-1))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
            assert calls.count == (2 * len(tokens) if use_kernel else 0)
            return losses

    with_kernel, with_sdpa = train(True), train(False)
    assert with_kernel[-1] < with_kernel[0] - 0.5  # it trains
    assert with_kernel == pytest.approx(with_sdpa, abs=1e-5, rel=0)


@needs_compiler
@pytest.mark.parametrize(
    "overrides", [{"position": "rope"}, {"qk_norm": True}, {"dropout": 0.1}],
    ids=["rope", "qk_norm", "dropout_in_training"],
)
def test_model_options_the_kernel_does_not_cover_take_sdpa(monkeypatch: pytest.MonkeyPatch, overrides: dict) -> None:
    model = make_pair(**overrides).train()
    tokens = torch.randint(0, 61, (2, 24))
    KernelCalls(monkeypatch, allowed=False)
    # Module by module: in training the fused trunk (test_fused_trunk.py) takes RoPE itself and
    # calls the kernel's library directly, so the attention layer's choice would go unchecked.
    with fused_trunk.unfused():
        torch.manual_seed(6)  # the same dropout masks for both runs
        logits = model(tokens)
        logits.sum().backward()
        without_kernel(monkeypatch)
        torch.manual_seed(6)
        torch.testing.assert_close(model(tokens), logits, rtol=0, atol=0)


@needs_compiler
def test_dropout_model_in_eval_uses_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_pair(dropout=0.1).eval()
    tokens = torch.randint(0, 61, (2, 24))
    calls = KernelCalls(monkeypatch)
    with torch.no_grad():
        logits = model(tokens)
    assert calls.count == 2
    without_kernel(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), logits, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_cache_and_mask_take_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill into a KV cache, then continue with a mask: never the kernel; same logits as the
    full forward (which uses the kernel)."""
    model = make_pair().eval()
    tokens = torch.randint(0, 61, (2, 20))
    full = model(tokens)
    KernelCalls(monkeypatch, allowed=False)
    cache = model.new_kv_cache(2)
    first = model(tokens[:, :12], kv_cache=cache)  # no mask, is_causal, but a cache
    rest = model(tokens[:, 12:], kv_cache=cache)  # continuing: a mask over the cached prefix
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_attention_layer_directly_with_mask_or_non_causal_context(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(7)
    layer = CausalSelfAttention(SMALL)
    x = torch.randn(2, 10, 32)
    KernelCalls(monkeypatch, allowed=False)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    masked = layer(x, 0, AttentionContext(rope=None, mask=mask, is_causal=False, cache=None))
    full = layer(x, 0, AttentionContext(rope=None, mask=None, is_causal=False, cache=None))
    assert not torch.allclose(masked, full)  # is_causal=False with T > 1 attends to every key
    monkeypatch.undo()
    calls = KernelCalls(monkeypatch)
    causal = layer(x, 0, AttentionContext(rope=None, mask=None, is_causal=True, cache=None))
    assert calls.count == 1
    torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_torch_compile_takes_sdpa_without_graph_breaks() -> None:
    model = make_pair().eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # raises on a graph break
    # Two lengths: the second compile traces T as a symbol (dynamic shapes), is_causal included.
    for length in (24, 16):
        tokens = torch.randint(0, 61, (2, length))
        torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-5)


TRAINING_STEP = (
    "import torch, torch.nn.functional as F\n"
    "from gptkit.model import GPT, ModelConfig, attention_kernel\n"
    "torch.manual_seed(0)\n"
    "model = GPT(ModelConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, d_model=32)).train()\n"
    "tokens = torch.randint(0, 61, (2, 25))\n"
    "loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 61), tokens[:, 1:].reshape(-1))\n"
    "loss.backward()\n"
    "result = (attention_kernel.available(), loss.item(), model.blocks[0].attn.qkv.weight.grad.norm().item())\n"
)


@needs_compiler
def test_switched_off_kernels_give_the_same_training_step(tmp_path: Path) -> None:
    namespace: dict = {}
    exec(TRAINING_STEP, namespace)  # here, with the kernel
    available, loss, grad_norm = namespace["result"]
    off = subprocess.run(
        [sys.executable, "-c", TRAINING_STEP + "print(repr(result))"],
        env={**os.environ, "PYTHONPATH": str(REPO), "GPTKIT_CPU_KERNELS": "0", "GPTKIT_CACHE": str(tmp_path)},
        capture_output=True, text=True, timeout=120,
    )
    assert off.returncode == 0, off.stderr
    off_available, off_loss, off_grad_norm = eval(off.stdout)  # noqa: S307 - our own repr of a tuple
    assert available and not off_available
    assert math.isclose(loss, off_loss, rel_tol=1e-6)
    assert math.isclose(grad_norm, off_grad_norm, rel_tol=1e-5)
