"""The fused trunk's matrix products (``csrc/gemm.c``): a Linear's forward and its two gradients.

At the widths gptkit trains on CPU a training step is mostly matrix products, and MKL's sgemm
(what ``torch.mm`` calls) spends part of each of these small calls copying both inputs into its
own layout and clearing the output. ``csrc/gemm.c`` reads the activations in place and writes
each result element once; at the char benchmark's shapes it is 1.2x-1.5x as fast per call, and a
whole training step ~1.1x (benchmarks/README.md). It needs AVX-512; elsewhere (or with the C
kernels switched off) each function here runs the ``torch`` op instead, which computes the same
products (in another order of summation, so the last bits may differ).

Two more run the MLP's tanh-GELU on each tile of the product while it is in the cache
(``linear_gelu``, ``grad_input_gelu``), instead of a pass over the whole matrix after it; they
have no torch fallback: the caller checks ``fuses_gelu`` and otherwise runs ``linear`` /
``grad_input`` and its own GELU kernels.

All of them take plain contiguous CPU float32 tensors (the trunk's arena buffers and parameters);
the shapes are the caller's to get right, as for ``torch.mm(out=...)``.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from gptkit.model.cpu_kernels import POINTER, SIZE, THREADS, _address, load_library

# The kernel reads one operand of each gradient product in place with a large stride: the weight's
# rows for the input gradient, the output gradient's columns for the weight gradient. Up to this
# many rows (out_features) the strided reads stay in the cache and the kernel is faster than MKL;
# at GPT-2 124M's qkv and MLP widths (2304, 3072 rows) it was 0.6x-0.8x, so those take torch.mm.
# The forward product copies the weight into its own layout first and has no such limit (1.0x-1.2x
# at GPT-2 124M's shapes, 1,024 rows).
MAX_STRIDED_ROWS = 1024

_STATUS = ctypes.c_int
_SIGNATURES = (
    ("gemm_available", (), ctypes.c_int),
    ("gemm_pack_floats", (SIZE, SIZE), SIZE),
    ("gemm_nt", (SIZE, SIZE, SIZE, POINTER, SIZE, POINTER, SIZE, POINTER, POINTER, SIZE, POINTER, THREADS), _STATUS),
    ("gemm_nn", (SIZE, SIZE, SIZE, POINTER, SIZE, POINTER, SIZE, POINTER, SIZE, THREADS), _STATUS),
    ("gemm_tn", (SIZE, SIZE, SIZE, POINTER, SIZE, POINTER, SIZE, POINTER, SIZE, POINTER, SIZE, THREADS), _STATUS),
    ("gemm_nt_gelu", (SIZE, SIZE, SIZE, POINTER, SIZE, POINTER, SIZE, POINTER, POINTER, POINTER, POINTER, THREADS), _STATUS),
    ("gemm_nn_gelu_backward",
     (SIZE, SIZE, SIZE, POINTER, SIZE, POINTER, SIZE, POINTER, POINTER, POINTER, THREADS), _STATUS),
)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels when they are built and this CPU has AVX-512, else None."""
    library = load_library("gemm", _SIGNATURES)
    return library if library is not None and library.gemm_available() else None


def available() -> bool:
    return _library() is not None


def pack_floats(out_features: int, in_features: int) -> int:
    """Floats of scratch ``linear`` needs to lay out a (out_features, in_features) weight."""
    library = _library()
    return library.gemm_pack_floats(out_features, in_features) if library is not None else 0


def _check(status: int) -> None:
    if status != 0:  # without AVX-512 (then _library() is None and nothing calls in), or out of memory
        raise MemoryError("gptkit's gemm kernel could not run (no AVX-512, or no memory for its column sums)")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           pack: torch.Tensor | None) -> torch.Tensor:
    """out (M, N) = x (M, K) @ weight (N, K)^T + bias (N) (or none); ``pack`` holds
    ``pack_floats(N, K)`` floats of scratch (unused, and may be None, without the kernels)."""
    library = _library()
    if library is None or pack is None:
        return torch.addmm(bias, x, weight.t(), out=out) if bias is not None else torch.mm(x, weight.t(), out=out)
    M, K = x.shape
    N = weight.shape[0]
    _check(library.gemm_nt(M, N, K, x.data_ptr(), K, weight.data_ptr(), K, _address(bias),
                           out.data_ptr(), N, pack.data_ptr(), torch.get_num_threads()))
    return out


def grad_input(grad_out: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (M, K) = grad_out (M, N) @ weight (N, K): the gradient of a Linear's input."""
    library = _library()
    if library is None or weight.shape[0] > MAX_STRIDED_ROWS:
        return torch.mm(grad_out, weight, out=out)
    M, N = grad_out.shape
    K = weight.shape[1]
    _check(library.gemm_nn(M, K, N, grad_out.data_ptr(), N, weight.data_ptr(), K, out.data_ptr(), K,
                           torch.get_num_threads()))
    return out


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """grad_out (M, N)^T @ x (M, K), a new (N, K) tensor: the gradient of a Linear's weight. With
    ``scratch`` of at least ``weight_scratch_floats(N, K)`` floats each thread sums over its own
    share of the M rows first (see csrc/gemm.c's gemm_tn)."""
    library = _library()
    if library is None or grad_out.shape[1] > MAX_STRIDED_ROWS:
        return torch.mm(grad_out.t(), x)
    M, N = grad_out.shape
    K = x.shape[1]
    out = torch.empty(N, K, dtype=torch.float32)
    _check(library.gemm_tn(N, K, M, grad_out.data_ptr(), N, x.data_ptr(), K, out.data_ptr(), K,
                           _address(scratch), 0 if scratch is None else scratch.numel(),
                           torch.get_num_threads()))
    return out


def weight_scratch_floats(out_features: int, in_features: int, threads: int | None = None) -> int:
    """Floats of scratch ``grad_weight`` uses for a (out_features, in_features) weight with this many
    threads (default: torch's): one partial sum per thread but the first."""
    threads = torch.get_num_threads() if threads is None else threads
    return max(threads - 1, 0) * out_features * in_features


def fuses_gelu(down_weight: torch.Tensor) -> bool:
    """Whether ``linear_gelu`` and ``grad_input_gelu`` run for an MLP whose down projection has this
    (d_model, hidden) weight (its rows are the strided operand of the input gradient)."""
    return _library() is not None and down_weight.shape[0] <= MAX_STRIDED_ROWS


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, g: torch.Tensor,
                pack: torch.Tensor) -> None:
    """h = x (M, K) @ weight (N, K)^T + bias, then g (M, N) = tanh-GELU(h) and h replaced by GELU'(h)
    (what csrc/block.c's bias_gelu_forward does after a ``linear``). Needs ``fuses_gelu``."""
    library = _library()
    assert library is not None
    M, K = x.shape
    N = weight.shape[0]
    _check(library.gemm_nt_gelu(M, N, K, x.data_ptr(), K, weight.data_ptr(), K, _address(bias),
                                h.data_ptr(), g.data_ptr(), pack.data_ptr(), torch.get_num_threads()))


def grad_input_gelu(grad_out: torch.Tensor, down_weight: torch.Tensor, gelu_grad: torch.Tensor, out: torch.Tensor,
                    bias_grad: torch.Tensor | None) -> None:
    """out (M, H) = (grad_out (M, C) @ down_weight (C, H)) * gelu_grad (M, H, as ``linear_gelu`` left it),
    and bias_grad (H) = its column sums (or None): the gradient through the GELU to the up projection
    (what a ``grad_input`` and csrc/block.c's gelu_backward_colsum do). Needs ``fuses_gelu``."""
    library = _library()
    assert library is not None
    M, C = grad_out.shape
    H = down_weight.shape[1]
    _check(library.gemm_nn_gelu_backward(M, H, C, grad_out.data_ptr(), C, down_weight.data_ptr(), H,
                                         gelu_grad.data_ptr(), out.data_ptr(),
                                         _address(bias_grad), torch.get_num_threads()))
