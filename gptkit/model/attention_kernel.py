"""Fused causal self-attention for CPU training at short sequence lengths (``csrc/attention.c``).

It takes the qkv Linear's output as it is, (B, T, (H + 2 Hkv) D), and returns y (B, T, H D) for
the out Linear; its backward returns dqkv in qkv's layout. SDPA instead needs q, k and v as
(B, heads, T, D): the transposes of q, k, v and y and of their gradients are copies that cost,
at small widths, about half as much as the attention itself. For short sequences each head's
T x T scores fit in the cache, so the kernel handles one (batch row, head) pair at a time, whole.

``fused_causal_attention`` is used by ``CausalSelfAttention`` only when it computes exactly what
SDPA would (causal, no mask, no KV cache, no dropout, no RoPE or qk-norm between the projection and
the attention) and only for T up to ``MAX_T``, measured on the 2-core test machine; see
``covers``. Everywhere else SDPA runs.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch.autograd import forward_ad

from gptkit.model.cpu_kernels import (
    POINTER, SIZE, THREADS, _address, _eager, _plain_cpu_float, _readable, load_library,
)

# Longest sequence the kernel takes: each thread holds two T x T float32 matrices in the backward
# (2 MiB at T=512), which must stay near the core. Measured on the 2-core test machine, forward +
# backward of one layer against SDPA with its transposes: 1.8x faster at T=64, D=32 (the char
# shape, B=12, H=4), 1.4x at T=128 and T=256 (D=64, B=4, H=12), 1.2x at T=512, but 0.6x at
# T=1024 (B=1), where SDPA's tiling over keys wins.
MAX_T = 512

# Up to this length the forward also saves the softmax probabilities, (B, H, T, T rounded up to 8)
# floats (at T=64, H=4, D=32 two-thirds of the size of qkv), and the backward reads them instead of
# recomputing them from q, k and the log-sum-exp: one product fewer out of five, no exponentials.
# At the char shape (B=12, T=64, H=4, D=32, caches flushed before each call, as in a training
# step) the backward of a layer took 0.84x the time and the forward 1.08x; a whole training step of
# the char benchmark, 0.993x-0.996x (alternating steps with and without, in one process).
SAVE_PROBS_MAX_T = 128

# Both return 0, or 1 when a thread could not allocate its scratch memory.
_SIGNATURES = (
    ("attention_forward", (POINTER, POINTER, POINTER, POINTER, SIZE, SIZE, SIZE, SIZE, SIZE, THREADS), ctypes.c_int),
    ("attention_backward",
     (POINTER, POINTER, POINTER, POINTER, POINTER, POINTER, SIZE, SIZE, SIZE, SIZE, SIZE, THREADS), ctypes.c_int),
)


def probs_shape(B: int, T: int, n_head: int) -> tuple[int, int, int, int] | None:
    """The shape of the saved softmax probabilities for a batch of B sequences of length T, or
    None when T is longer than SAVE_PROBS_MAX_T (the backward then recomputes them)."""
    return (B, n_head, T, (T + 7) // 8 * 8) if T <= SAVE_PROBS_MAX_T else None


def _library() -> ctypes.CDLL | None:
    return load_library("attention", _SIGNATURES)


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("gptkit's attention kernel could not allocate its per-thread scratch memory")


def available() -> bool:
    return _library() is not None


def _forward_ad_active() -> bool:
    """Inside ``torch.autograd.forward_ad.dual_level()``: tangents need SDPA's forward-mode rules."""
    return getattr(forward_ad, "_current_level", -1) >= 0


def covers(qkv: torch.Tensor, n_head: int, n_kv_head: int) -> bool:
    """Whether the kernel can take this qkv activation (B, T, (H + 2 Hkv) D): a plain contiguous
    CPU float32 tensor, in eager mode, T <= MAX_T, and the kernels built. The caller checks the
    rest (causal, no mask, cache, dropout, RoPE or qk-norm)."""
    return (
        qkv.dim() == 3
        and 1 <= qkv.shape[1] <= MAX_T
        and n_head % n_kv_head == 0
        and _plain_cpu_float(qkv)
        and _eager()
        and not _forward_ad_active()
        and _library() is not None
    )


def reference_attention(qkv: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """The same function through ATen's differentiable ops (any dtype, any number of backward
    passes): causal softmax(q k^T / sqrt(D)) v. qkv (B, T, (H + 2 Hkv) D) -> (B, T, H D)."""
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    q, k, v = qkv.view(B, T, -1, D).transpose(1, 2).split([n_head, n_kv_head, n_kv_head], dim=1)
    if n_kv_head != n_head:
        k = k.repeat_interleave(n_head // n_kv_head, dim=1)
        v = v.repeat_interleave(n_head // n_kv_head, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return (weights @ v).transpose(1, 2).reshape(B, T, n_head * D)


class _FusedCausalAttention(torch.autograd.Function):
    """Saves qkv, y, the per-row log-sum-exp (B, H, T) and, for short sequences, the softmax
    probabilities; otherwise the backward recomputes them."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:  # type: ignore[override]
        library = _library()
        assert library is not None
        B, T, width = qkv.shape
        D = width // (n_head + 2 * n_kv_head)
        y = qkv.new_empty(B, T, n_head * D)
        lse = qkv.new_empty(B, n_head, T)
        shape = probs_shape(B, T, n_head)
        probs = None if shape is None else qkv.new_empty(shape)
        _check(library.attention_forward(qkv.data_ptr(), y.data_ptr(), lse.data_ptr(), _address(probs), B, T, n_head,
                                         n_kv_head, D, torch.get_num_threads()))
        ctx.save_for_backward(qkv, y, lse, probs)
        ctx.heads = (n_head, n_kv_head)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        qkv, y, lse, probs = ctx.saved_tensors
        n_head, n_kv_head = ctx.heads
        # With create_graph (double backward) the gradient must itself be differentiable in qkv
        # and grad, and a batched gradient (is_grads_batched) has no memory for the kernel to read:
        # recompute through ATen's ops and differentiate those.
        if not torch.is_grad_enabled() and grad.device.type == "cpu" and grad.dtype == torch.float32:
            grad = grad.contiguous()  # a no-op for the out Linear's gradient
        if torch.is_grad_enabled() or not _readable(grad):
            with torch.enable_grad():
                source = qkv if qkv.requires_grad else qkv.detach().requires_grad_()
                out = reference_attention(source, n_head, n_kv_head)
                (dqkv,) = torch.autograd.grad(out, source, grad, create_graph=torch.is_grad_enabled())
            return dqkv, None, None
        library = _library()
        assert library is not None
        B, T, width = qkv.shape
        D = width // (n_head + 2 * n_kv_head)
        dqkv = torch.empty_like(qkv)
        _check(library.attention_backward(qkv.data_ptr(), y.data_ptr(), lse.data_ptr(), _address(probs),
                                          grad.data_ptr(), dqkv.data_ptr(), B, T, n_head, n_kv_head, D,
                                          torch.get_num_threads()))
        return dqkv, None, None


def fused_causal_attention(qkv: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """Causal attention of the packed projection qkv (B, T, (H + 2 Hkv) D) -> y (B, T, H D),
    softmax scale 1/sqrt(D). The caller checks ``covers(qkv, n_head, n_kv_head)`` first.

    Equal to SDPA with is_causal=True on the split and transposed q, k, v within float32 rounding
    (tested against a float64 reference, forward and backward)."""
    if torch.is_grad_enabled() and qkv.requires_grad:
        return _FusedCausalAttention.apply(qkv, n_head, n_kv_head)
    library = _library()
    assert library is not None
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    y = qkv.new_empty(B, T, n_head * D)
    # No autograd node to feed (no_grad, inference_mode, or nothing needs a gradient): no lse either.
    _check(library.attention_forward(qkv.data_ptr(), y.data_ptr(), None, None, B, T, n_head, n_kv_head, D,
                                     torch.get_num_threads()))
    return y
