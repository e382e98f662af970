"""Fused CPU kernels, written in C and compiled on first use.

Only where ATen is slow for the shapes gptkit runs: GPT-2's tanh-GELU (ATen's vectorised tanh costs
about as much as the surrounding matmuls at small widths on CPUs like the 2-core test machine), and
the matrix-vector product of a batch-1 decode step, which must stream every weight from memory once
per token and should do so at the memory's speed.
The source is ``csrc/cpu_kernels.c``: plain C with OpenMP, no PyTorch headers, so it compiles in
well under a second. The shared library is cached under ``$GPTKIT_CACHE/kernels`` (default
``~/.cache/gptkit/kernels``), keyed by the source, the flags, the compiler and the CPU, and loaded
with ctypes; the kernels read and write the tensors' memory directly.

Everything here is optional: without a C compiler, with ``GPTKIT_CPU_KERNELS=0``, or for tensors
the kernels do not cover (not CPU float32, not contiguous, a DTensor, inside ``torch.compile``), the
callers use the ATen op instead, which computes the same function.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from gptkit.fileio import atomic_path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
# -fno-trapping-math and -ffinite-math-only let the compiler vectorise the clamps and selects; NaN and
# inf inputs still give NaN and inf outputs (tested).
FLAGS = (
    "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-ffinite-math-only",
)
# Below this many elements a kernel call (ctypes + OpenMP fork) costs more than ATen's op.
MIN_ELEMENTS = 2048


def _cache_dir() -> Path:
    env = os.environ.get("GPTKIT_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "gptkit") / "kernels"


def _cpu_fingerprint() -> str:
    """The CPU model and its feature flags: -march=native code must not run on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))  # once per distinct line, not once per core


def _compile(compiler: str, target: Path) -> None:
    with atomic_path(target) as tmp:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(tmp)],
            check=True, capture_output=True, text=True, timeout=120,
        )


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they are switched off or cannot be built here."""
    if os.environ.get("GPTKIT_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.debug("no C compiler found; using ATen kernels")
        return None
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(), _cpu_fingerprint().encode()])
    ).hexdigest()[:20]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("could not build gptkit's CPU kernels (%s); using ATen kernels", str(detail).strip()[:300])
        return None
    pointer, size, threads = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "gelu_tanh_forward": [pointer, pointer, size, threads],
        "gelu_tanh_backward": [pointer, pointer, pointer, size, threads],
        "linear_one_row": [pointer, pointer, pointer, pointer, size, size, threads],
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = None
    return library


def available() -> bool:
    return _library() is not None


def _covered(x: torch.Tensor) -> bool:
    """Whether the C kernels can take ``x``: a plain, contiguous CPU float32 tensor, in eager mode."""
    return (
        _plain_cpu_float(x)  # not a DTensor or another subclass, not a view with gaps
        and x.numel() >= MIN_ELEMENTS
        and not torch.compiler.is_compiling()  # inductor fuses F.gelu itself
    )


class _GeluTanh(torch.autograd.Function):
    """tanh-GELU through the C kernels; saves only the input (as ATen's gelu does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        library = _library()
        assert library is not None
        y = torch.empty_like(x)
        library.gelu_tanh_forward(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if not _covered(grad):
            return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
        library = _library()
        assert library is not None
        grad_input = torch.empty_like(x)
        library.gelu_tanh_backward(grad.data_ptr(), x.data_ptr(), grad_input.data_ptr(), x.numel(),
                                   torch.get_num_threads())
        return grad_input


class OneRowLinear:
    """``F.linear(x, weight, bias)`` for inputs with a single row (x.numel() == in_features), e.g.
    a batch-1 decode step: streams the row-major (out, in) weight once, at memory speed.

    Inference only (no autograd). The weight and bias are fixed at construction, so a call does no
    checks beyond the input's; ``for_linear`` returns None when the kernel cannot take the weights.
    x (..., in) with one row in all -> (..., out).
    """

    def __init__(self, library: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias  # kept alive: the kernel reads their memory
        self.out_features, self.in_features = weight.shape
        self._kernel = library.linear_one_row
        self._weight_ptr = weight.data_ptr()
        self._bias_ptr = None if bias is None else bias.data_ptr()

    @classmethod
    def for_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> OneRowLinear | None:
        library = _library()
        tensors = (weight,) if bias is None else (weight, bias)
        if library is None or weight.dim() != 2 or not all(_plain_cpu_float(t) for t in tensors):
            return None
        return cls(library, weight.detach(), None if bias is None else bias.detach())

    def covers(self, x: torch.Tensor) -> bool:
        return x.numel() == self.in_features and x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.float32)
        self._kernel(x.data_ptr(), self._weight_ptr, self._bias_ptr, y.data_ptr(), self.in_features,
                     self.out_features, torch.get_num_threads())
        return y


def _plain_cpu_float(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), of any shape.

    Equal to ``F.gelu(x, approximate="tanh")`` within float32 rounding (about 1e-7 relative, tested);
    the fused C kernel runs when it covers ``x``, ATen's otherwise.
    """
    library = _library()
    if library is None or not _covered(x):
        return F.gelu(x, approximate="tanh")
    if x.requires_grad and torch.is_grad_enabled():
        return _GeluTanh.apply(x)
    y = torch.empty_like(x)  # inference: no autograd node to build
    library.gelu_tanh_forward(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
    return y
