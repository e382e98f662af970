"""gptkit's matrix products for the fused trunk (gptkit/model/gemm_kernel.py, csrc/gemm.c): a
Linear's forward and both of its gradients equal float64 products, at every edge of the tiling
(rows not a multiple of the tile's 6, columns not a multiple of 16 or 64); the fused trunk calls
them; the MLP's GELU done tile by tile equals the separate pass; and where the kernel cannot run,
the torch ops give the same results."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest
import torch

from gptkit.model import GPT, ModelConfig, fused_trunk, gemm_kernel

from call_counter import Calls  # noqa: E402  (tests/unit, on sys.path)

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine"
)


def _cpu_has_avx512() -> bool:
    try:
        return " avx512f " in f" {Path('/proc/cpuinfo').read_text().replace(chr(10), ' ')} "
    except OSError:
        return False


def test_available_exactly_where_the_cpu_has_avx512() -> None:
    """On this machine (AVX-512) the kernel must build: a test run here cannot skip past it."""
    switched_off = os.environ.get("GPTKIT_CPU_KERNELS", "1") == "0"
    assert gemm_kernel.available() is (_cpu_has_avx512() and not switched_off)


needs_kernel = pytest.mark.skipif(not gemm_kernel.available(), reason="the gemm kernel needs AVX-512")


def _close(got: torch.Tensor, want: torch.Tensor, K: int) -> None:
    # float32 sums of K products of unit normals: the error grows like sqrt(K) ulps of the terms
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * K + 1e-6)


ROWS = [1, 5, 6, 7, 13, 50]  # around the 6-row tile, and several tiles with a remainder
COLS = [1, 15, 16, 17, 63, 64, 65, 130]  # around a 16-float vector and the 64-column panel
DEPTHS = [1, 3, 128, 300]


@needs_kernel
@pytest.mark.parametrize("M, N, K", list(itertools.product(ROWS, COLS, DEPTHS)))
def test_each_product_equals_float64(M: int, N: int, K: int) -> None:
    gen = torch.Generator().manual_seed(M * 10_000 + N * 100 + K)
    x, weight, bias = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    grad_out = torch.randn(M, N, generator=gen)
    pack = torch.empty(gemm_kernel.pack_floats(N, K))
    for b in (None, bias):
        out = torch.full((M, N), float("nan"))  # every element must be written
        assert gemm_kernel.linear(x, weight, b, out, pack) is out
        want = x.double() @ weight.double().t() + (0 if b is None else b.double())
        _close(out, want, K)
    grad_input = torch.full((M, K), float("nan"))
    assert gemm_kernel.grad_input(grad_out, weight, grad_input) is grad_input
    _close(grad_input, grad_out.double() @ weight.double(), N)
    grad_weight = gemm_kernel.grad_weight(grad_out, x)
    assert grad_weight.shape == (N, K) and grad_weight.is_contiguous()
    _close(grad_weight, grad_out.double().t() @ x.double(), M)


@needs_kernel
def test_writes_only_inside_the_output() -> None:
    """A result that is a slice of a larger buffer (the trunk's arena) leaves its neighbours alone,
    including past a masked last vector."""
    M, N, K = 7, 20, 9
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    buffer = torch.full((M * N + 64,), 7.0)
    out = buffer[:M * N].view(M, N)
    gemm_kernel.linear(x, weight, None, out, torch.empty(gemm_kernel.pack_floats(N, K)))
    assert torch.equal(buffer[M * N:], torch.full((64,), 7.0))


@needs_kernel
def test_wide_weights_take_torch_and_agree() -> None:
    """Gradient products over more than MAX_STRIDED_ROWS weight rows go to torch.mm (the kernel
    is slower there); the forward keeps the kernel. All three agree with float64."""
    M, N, K = 12, gemm_kernel.MAX_STRIDED_ROWS + 8, 16
    gen = torch.Generator().manual_seed(1)
    x, weight, grad_out = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(M, N, generator=gen)
    out = torch.empty(M, N)
    gemm_kernel.linear(x, weight, None, out, torch.empty(gemm_kernel.pack_floats(N, K)))
    _close(out, x.double() @ weight.double().t(), K)
    grad_input = torch.empty(M, K)
    _close(gemm_kernel.grad_input(grad_out, weight, grad_input), grad_out.double() @ weight.double(), N)
    _close(gemm_kernel.grad_weight(grad_out, x), grad_out.double().t() @ x.double(), M)


def test_without_the_kernel_the_torch_ops_compute_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback branch (no AVX-512, or GPTKIT_CPU_KERNELS=0): torch.mm / addmm, same results."""
    monkeypatch.setattr(gemm_kernel, "_library", lambda: None)
    assert not gemm_kernel.available() and gemm_kernel.pack_floats(10, 10) == 0
    gen = torch.Generator().manual_seed(2)
    x, weight, bias, grad_out = (torch.randn(9, 5, generator=gen), torch.randn(4, 5, generator=gen),
                                 torch.randn(4, generator=gen), torch.randn(9, 4, generator=gen))
    out = torch.empty(9, 4)
    _close(gemm_kernel.linear(x, weight, bias, out, None), x.double() @ weight.double().t() + bias.double(), 5)
    _close(gemm_kernel.grad_input(grad_out, weight, torch.empty(9, 5)), grad_out.double() @ weight.double(), 4)
    _close(gemm_kernel.grad_weight(grad_out, x), grad_out.double().t() @ x.double(), 9)


@needs_kernel
def test_the_fused_trunk_runs_its_products_through_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training step of the fused trunk: per block 4 forward products (the MLP's up projection with
    its GELU), 4 input gradients (the down projection's through the GELU) and 4 weight gradients;
    then the LM head's forward and its two gradients."""
    library = gemm_kernel._library()
    names = ("gemm_nt", "gemm_nt_gelu", "gemm_nn", "gemm_nn_gelu_backward", "gemm_tn")
    counts = {name: Calls(monkeypatch, library, name, allowed=True, forbidden="") for name in names}
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=3, n_head=4, d_model=32, block_size=16, vocab_size=50, dropout=0.0)).train()
    tokens = torch.randint(0, 50, (2, 16))
    assert fused_trunk.applies(model, tokens)
    model(tokens).sum().backward()
    # per block: qkv, out and down forward, up with its GELU; the same backward; four weight
    # gradients; and the LM head's three products
    assert {name: calls.count for name, calls in counts.items()} == {
        "gemm_nt": 9 + 1, "gemm_nt_gelu": 3, "gemm_nn": 9 + 1, "gemm_nn_gelu_backward": 3, "gemm_tn": 12 + 1,
    }


def _gelu_and_derivative(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tanh-GELU and its derivative in float64, by autograd."""
    u = u.detach().double().requires_grad_(True)
    g = torch.nn.functional.gelu(u, approximate="tanh")
    (derivative,) = torch.autograd.grad(g.sum(), u)
    return g.detach(), derivative


@needs_kernel
@pytest.mark.parametrize("M, H, C", [(1, 1, 1), (7, 17, 5), (13, 64, 32), (50, 130, 24), (96, 512, 128)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_gelu_inside_the_products_equals_the_separate_pass(M: int, H: int, C: int, with_bias: bool) -> None:
    """Up projection + GELU (keeping GELU' for the backward), and the gradient through the GELU to
    the up projection with the bias gradient, against float64."""
    gen = torch.Generator().manual_seed(M + H + C)
    a2, w_up, b_up = torch.randn(M, C, generator=gen), torch.randn(H, C, generator=gen) * 0.3, torch.randn(H, generator=gen)
    w_down, grad_out = torch.randn(C, H, generator=gen), torch.randn(M, C, generator=gen)
    bias = b_up if with_bias else None
    assert gemm_kernel.fuses_gelu(w_down)
    h, g = torch.full((M, H), float("nan")), torch.full((M, H), float("nan"))
    gemm_kernel.linear_gelu(a2, w_up, bias, h, g, torch.empty(gemm_kernel.pack_floats(H, C)))
    u = a2.double() @ w_up.double().t() + (b_up.double() if with_bias else 0)
    want_g, want_derivative = _gelu_and_derivative(u)
    torch.testing.assert_close(g.double(), want_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), want_derivative, rtol=1e-5, atol=1e-5)

    dh, bias_grad = torch.full((M, H), float("nan")), torch.full((H,), float("nan"))
    gemm_kernel.grad_input_gelu(grad_out, w_down, h, dh, bias_grad)
    want_dh = (grad_out.double() @ w_down.double()) * h.double()
    torch.testing.assert_close(dh.double(), want_dh, rtol=0, atol=2e-6 * C + 1e-6)
    torch.testing.assert_close(bias_grad.double(), want_dh.sum(0), rtol=0, atol=2e-6 * C * M + 1e-5)
    dh_alone = torch.full((M, H), float("nan"))
    gemm_kernel.grad_input_gelu(grad_out, w_down, h, dh_alone, None)  # without the bias gradient
    assert torch.equal(dh_alone, dh)


@needs_kernel
def test_the_bias_gradient_does_not_depend_on_the_threads() -> None:
    """Its column sums are added over fixed runs of rows, whichever thread computed each."""
    gen = torch.Generator().manual_seed(5)
    grad_out, w_down, gelu_grad = torch.randn(300, 32, generator=gen), torch.randn(32, 96, generator=gen), torch.rand(300, 96, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            dh, bias_grad = torch.empty(300, 96), torch.empty(96)
            gemm_kernel.grad_input_gelu(grad_out, w_down, gelu_grad, dh, bias_grad)
            results.append((dh, bias_grad))
    finally:
        torch.set_num_threads(threads)
    for dh, bias_grad in results[1:]:
        assert torch.equal(dh, results[0][0]) and torch.equal(bias_grad, results[0][1])


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M, N, K", [(2, 5, 3), (7, 17, 9), (50, 130, 24), (768, 128, 64)])
def test_the_weight_gradient_split_over_rows_equals_float64(threads: int, M: int, N: int, K: int) -> None:
    """With scratch each thread sums its own rows (tokens) and the parts are added; with too little
    scratch (or fewer rows than 2 per thread) the product is split by output rows instead."""
    gen = torch.Generator().manual_seed(M + N + K)
    grad_out, x = torch.randn(M, N, generator=gen), torch.randn(M, K, generator=gen)
    want = grad_out.double().t() @ x.double()
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        enough = torch.full((max(1, gemm_kernel.weight_scratch_floats(N, K)),), float("nan"))
        results = [gemm_kernel.grad_weight(grad_out, x, scratch) for scratch in (enough, torch.empty(1), None)]
        for got in results:
            _close(got, want, M)
        if threads > 1 and M == 768:  # the split ran: its sums are added in another order
            assert not torch.equal(results[0], results[2])
        assert torch.equal(results[1], results[2])  # too little room: the unsplit product
    finally:
        torch.set_num_threads(saved)
    assert gemm_kernel.weight_scratch_floats(N, K, threads=3) == 2 * N * K


@needs_kernel
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("last_only", [False, True])
def test_the_lm_head_after_the_fused_trunk_matches_the_module(monkeypatch: pytest.MonkeyPatch, tie: bool,
                                                                 last_only: bool) -> None:
    """The head's logits and both gradients through the kernel equal nn.Linear's, tied to the token
    table or not, for the whole sequence or its last position (a strided slice of a batch)."""
    config = ModelConfig(n_layer=2, n_head=2, d_model=24, block_size=16, vocab_size=37, dropout=0.0,
                         tie_embeddings=tie)
    torch.manual_seed(1)
    model = GPT(config).train()
    reference = GPT(config).train()
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 37, (3, 16), generator=torch.Generator().manual_seed(2))
    calls = Calls(monkeypatch, fused_trunk._LMHead, "apply", allowed=True, forbidden="")
    logits = model(tokens, last_only=last_only)
    assert calls.count == 1
    with fused_trunk.unfused():
        want = reference(tokens, last_only=last_only)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    (logits * weights).sum().backward()
    (want * weights).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@needs_kernel
def test_a_frozen_lm_head_stays_with_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=20, dropout=0.0, tie_embeddings=False)
    model = GPT(config).train()
    model.lm_head.weight.requires_grad_(False)
    Calls(monkeypatch, fused_trunk._LMHead, "apply", allowed=False, forbidden="the kernel took a frozen head")
    tokens = torch.randint(0, 20, (2, 8))
    assert fused_trunk.applies(model, tokens)
    model(tokens).sum().backward()
    assert model.lm_head.weight.grad is None and model.token_embedding.weight.grad is not None


@pytest.mark.skipif(os.environ.get("GPTKIT_CPU_KERNELS", "1") == "0", reason="the fused trunk needs its C kernels")
def test_without_the_kernel_the_fused_trunk_still_matches_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without AVX-512: the trunk's products go to torch.mm and the GELU to block.c's kernels,
    the LM head to nn.Linear; losses and gradients as the modules give them."""
    monkeypatch.setattr(gemm_kernel, "_library", lambda: None)
    fused_trunk.release_arenas()  # arenas made with the kernel hold its scratch; start without
    config = ModelConfig(n_layer=2, n_head=2, d_model=24, block_size=16, vocab_size=37, dropout=0.0)
    torch.manual_seed(4)
    model, reference = GPT(config).train(), GPT(config).train()
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 37, (3, 16), generator=torch.Generator().manual_seed(5))
    Calls(monkeypatch, fused_trunk._LMHead, "apply", allowed=False, forbidden="the kernel's LM head ran without it")
    assert fused_trunk.applies(model, tokens)
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    with fused_trunk.unfused():
        want = torch.nn.functional.cross_entropy(reference(tokens).flatten(0, 1), tokens.flatten())
        want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    fused_trunk.release_arenas()


@needs_kernel
def test_a_large_vocabulary_head_stays_with_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above MAX_HEAD_PACK_FLOATS the kernel would copy the whole table every step: nn.Linear instead."""
    monkeypatch.setattr(fused_trunk, "MAX_HEAD_PACK_FLOATS", gemm_kernel.pack_floats(20, 16) - 1)
    Calls(monkeypatch, fused_trunk._LMHead, "apply", allowed=False, forbidden="the kernel took a head over the limit")
    config = ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=20, dropout=0.0)
    model = GPT(config).train()
    tokens = torch.randint(0, 20, (2, 8))
    assert fused_trunk.applies(model, tokens)
    model(tokens).sum().backward()
    assert model.token_embedding.weight.grad is not None


_TEAM_CHECK = """
import hashlib, torch
from gptkit.model import gemm_kernel
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
grad_out, x = torch.randn(300, 40, generator=g), torch.randn(300, 24, generator=g)
scratch = torch.empty(gemm_kernel.weight_scratch_floats(40, 24))
print(hashlib.sha256(gemm_kernel.grad_weight(grad_out, x, scratch).numpy().tobytes()).hexdigest())
"""


@needs_kernel
def test_the_weight_gradient_split_does_not_depend_on_the_team_openmp_gives() -> None:
    """Split over the tokens for 2 threads, the sums are the same bits when OpenMP runs fewer
    (OMP_DYNAMIC under load, OMP_THREAD_LIMIT): they may depend on the thread count, not on timing."""
    import subprocess
    import sys

    def digest(**env: str) -> str:
        return subprocess.run([sys.executable, "-c", _TEAM_CHECK], env={**os.environ, **env}, check=True,
                              capture_output=True, text=True).stdout.strip()

    assert digest(OMP_THREAD_LIMIT="1") == digest()


@needs_kernel
def test_the_weight_gradients_do_not_depend_on_the_threads_the_arena_was_made_with() -> None:
    """The pooled arena's room for partial sums, made at 1 thread, then a step at 2 threads: the same
    bits as a step at 2 threads with a fresh arena (exact resume)."""
    config = ModelConfig(n_layer=1, n_head=2, d_model=24, block_size=32, vocab_size=37, dropout=0.0)
    tokens = torch.randint(0, 37, (2, 32), generator=torch.Generator().manual_seed(6))

    def step() -> list[torch.Tensor]:
        torch.manual_seed(6)
        model = GPT(config).train()
        assert fused_trunk.applies(model, tokens)
        model(tokens).square().mean().backward()
        return [p.grad for p in model.parameters()]

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fused_trunk.release_arenas()
        fresh = step()
        torch.set_num_threads(1)
        fused_trunk.release_arenas()
        step()
        torch.set_num_threads(2)
        after = step()
    finally:
        torch.set_num_threads(saved)
        fused_trunk.release_arenas()
    assert all(torch.equal(a, b) for a, b in zip(fresh, after))
