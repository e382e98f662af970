"""The fused C kernels compute the same function as ATen, forward and backward, and every case
they do not cover (or a machine that cannot build them) falls back to ATen without an error."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptkit.model import cpu_kernels

REPO = Path(__file__).resolve().parents[2]
needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine"
)


def reference(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tanh-GELU and its input gradient in float64, through ATen."""
    x64 = x.detach().double().requires_grad_()
    y = F.gelu(x64, approximate="tanh")
    y.backward(grad.double())
    return y.detach(), x64.grad


@needs_compiler
def test_kernels_build_on_this_machine() -> None:
    # The test machine has a compiler: the fast path must really be taken, or the tests below
    # would only be comparing ATen with itself.
    assert cpu_kernels.available()
    x = torch.randn(4096)
    assert cpu_kernels._covered(x)


@needs_compiler
@pytest.mark.parametrize("shape", [(12, 64, 512), (4097, 3), (1, 1, 3072), (2048,)])
def test_gelu_tanh_matches_aten_forward_and_backward(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = (torch.randn(shape) * 4).requires_grad_()  # past the range where tanh saturates
    grad = torch.randn(shape)
    y = cpu_kernels.gelu_tanh(x)
    y.backward(grad)
    expected_y, expected_grad = reference(x, grad)
    # As close to the float64 truth as ATen's own float32 kernel is (a few ulps).
    aten_y = F.gelu(x.detach(), approximate="tanh").double()
    assert (y.double() - expected_y).abs().max() <= 2 * (aten_y - expected_y).abs().max() + 1e-6
    assert torch.allclose(y.double(), expected_y, rtol=1e-6, atol=1e-6)
    assert torch.allclose(x.grad.double(), expected_grad, rtol=1e-5, atol=1e-5)


def exact_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(2u) in float64: the same function as 0.5 x (1 + tanh(u)), without its cancellation
    for negative x."""
    x = x.double()
    return x * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))


@needs_compiler
def test_gelu_tanh_over_the_whole_float_range() -> None:
    finite = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-3e38, 3e38, 1e-30, -1e-30, 0.0])])
    spread = torch.randn(100_000) * torch.logspace(-20, 20, 100_000)
    for x in (finite, spread):
        with torch.no_grad():  # the inference path; the autograd path is compared above
            y = cpu_kernels.gelu_tanh(x)
        assert (y.double() - exact_gelu_tanh(x)).abs().max() <= 6e-7
    special = torch.tensor([float("nan"), float("inf"), 1.0] + [0.0] * 4096)
    with torch.no_grad():
        out = cpu_kernels.gelu_tanh(special)
    assert out[0].isnan() and out[1] == float("inf")


@needs_compiler
def test_double_backward_is_differentiable() -> None:
    """A gradient penalty differentiates the GELU's backward: that must go through autograd."""
    torch.manual_seed(0)
    x0 = torch.randn(64, 128)
    results = []
    for gelu in (cpu_kernels.gelu_tanh, lambda t: F.gelu(t, approximate="tanh")):
        x = x0.clone().requires_grad_()
        y = gelu(x)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (y.sum() + g.square().sum()).backward()
        results.append(x.grad)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


@needs_compiler
def test_torch_compile_traces_the_mlp_without_graph_breaks() -> None:
    from gptkit.model import GPT, ModelConfig

    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=64, block_size=16, vocab_size=50))
    tokens = torch.randint(0, 50, (2, 16))
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # raises on a graph break
    torch.testing.assert_close(compiled(tokens), model(tokens))


def test_uncovered_inputs_fall_back_to_aten() -> None:
    x = torch.randn(64, 128)
    for tensor in (x.t(), x.double(), x[:4, :4]):  # non-contiguous, float64, below the size threshold
        assert not cpu_kernels._covered(tensor)
        assert torch.equal(cpu_kernels.gelu_tanh(tensor), F.gelu(tensor, approximate="tanh"))


@needs_compiler
def test_non_contiguous_gradient_falls_back_in_backward() -> None:
    x = torch.randn(64, 128, requires_grad=True)
    grad = torch.randn(128, 64).t()  # same shape, transposed storage
    cpu_kernels.gelu_tanh(x).backward(grad)
    _, expected = reference(x, grad)
    assert torch.allclose(x.grad.double(), expected, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("out_features, in_features", [(2304, 768), (50, 77), (3, 8), (7, 3072), (1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_one_row_matches_f_linear(out_features: int, in_features: int, with_bias: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    bias = torch.randn(out_features) if with_bias else None
    x = torch.randn(1, 1, in_features)
    linear = cpu_kernels.OneRowLinear.for_linear(weight, bias)
    assert linear is not None and linear.covers(x)
    y = linear(x)
    assert y.shape == (1, 1, out_features)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    # Summation order differs from BLAS: compare with the float64 result at float32's resolution.
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * in_features**0.5)


@needs_compiler
def test_linear_one_row_declines_what_it_does_not_cover() -> None:
    weight = torch.randn(16, 32)
    assert cpu_kernels.OneRowLinear.for_linear(weight.t().contiguous().t(), None) is None  # not row-major
    assert cpu_kernels.OneRowLinear.for_linear(weight.double(), None) is None
    linear = cpu_kernels.OneRowLinear.for_linear(weight, None)
    assert linear is not None
    assert not linear.covers(torch.randn(2, 32))  # two rows: the caller takes another path
    assert not linear.covers(torch.randn(32, 2).t()[:1])  # one row, but strided
    assert not linear.covers(torch.randn(2, 16))  # 32 numbers, but not one row of 32
    assert linear.covers(torch.randn(1, 1, 32))


@needs_compiler
def test_linear_one_row_follows_the_weight_when_its_memory_moves() -> None:
    # share_memory_() moves a tensor's storage and keeps the object: the kernel must not read freed memory.
    weight, bias, x = torch.randn(64, 96), torch.randn(64), torch.randn(1, 96)
    linear = cpu_kernels.OneRowLinear.for_linear(weight, bias)
    assert linear is not None
    before = linear(x)
    weight.share_memory_()
    bias.share_memory_()
    torch.testing.assert_close(linear(x), before)
    torch.testing.assert_close(linear(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("rows", [2, 3, 7, 8])
@pytest.mark.parametrize("out_features, in_features", [(2304, 768), (50, 77), (3, 8), (9, 3072), (1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_few_rows_linear_matches_f_linear(rows: int, out_features: int, in_features: int, with_bias: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    bias = torch.randn(out_features) if with_bias else None
    x = torch.randn(rows, 1, in_features)
    linear = cpu_kernels.FewRowsLinear.for_linear(weight, bias)
    assert linear is not None and linear.covers(x)
    y = linear(x)
    assert y.shape == (rows, 1, out_features)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * in_features**0.5)


@needs_compiler
def test_few_rows_linear_blocks_by_the_cpus_vector_width() -> None:
    """16 output columns per block (one AVX-512 register) where the CPU has AVX-512, else 8: the
    8-wide kernel was bound by its loads there (batch-8 GPT-2 decode 2.1x-2.3x HF against 3.0x)."""
    cpuinfo = Path("/proc/cpuinfo")
    avx512 = cpuinfo.exists() and " avx512f " in cpuinfo.read_text().replace("\n", " ")
    linear = cpu_kernels.FewRowsLinear.for_linear(torch.randn(50, 77), None)
    assert linear is not None
    width = 16 if avx512 else 8
    assert linear.blocked_weight.shape == (-(-50 // width), 77, width)


@needs_compiler
def test_few_rows_linear_declines_what_it_does_not_cover() -> None:
    linear = cpu_kernels.FewRowsLinear.for_linear(torch.randn(16, 32), None)
    assert linear is not None
    assert not linear.covers(torch.randn(1, 32))  # one row: OneRowLinear's
    assert not linear.covers(torch.randn(9, 32))  # more than 8 rows
    assert not linear.covers(torch.randn(32, 4).t())  # strided
    assert not linear.covers(torch.randn(4, 16))  # wrong width
    assert linear.covers(torch.randn(2, 4, 32))


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


CHECK = (
    "import torch, torch.nn.functional as F\n"
    "from gptkit.model import cpu_kernels\n"
    "x = torch.randn(8, 4096)\n"
    "assert torch.equal(cpu_kernels.gelu_tanh(x), F.gelu(x, approximate='tanh'))\n"
    "print(cpu_kernels.available())\n"
)


def test_switched_off_or_unbuildable_kernels_fall_back_without_error(tmp_path: Path) -> None:
    off = _python(CHECK, GPTKIT_CPU_KERNELS="0", GPTKIT_CACHE=str(tmp_path))
    assert off.returncode == 0 and off.stdout.strip() == "False", off.stderr
    broken = _python(CHECK, CC="false", GPTKIT_CACHE=str(tmp_path))  # a "compiler" that always fails
    assert broken.returncode == 0 and broken.stdout.strip() == "False", broken.stderr
    assert "could not build gptkit's CPU kernels" in broken.stderr
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind
