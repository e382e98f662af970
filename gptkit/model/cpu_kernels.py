"""Fused CPU kernels, written in C and compiled on first use.

Only where ATen is slow for the shapes gptkit runs: GPT-2's tanh-GELU (ATen's vectorised tanh costs
about as much as the surrounding matmuls at small widths on CPUs like the 2-core test machine), and
the linears of a decode step at batch 1 to 8, which must stream every weight from memory once per
token and should do so at the memory's speed (this module); the fused causal attention for training
(``attention_kernel``) and the whole batch-1 decode step (``fused_decode``) load theirs through
``load_library`` here.
The sources are ``csrc/*.c`` (one shared library each): plain C with OpenMP, no PyTorch headers, so
each compiles in about a second. A shared library is cached under ``$GPTKIT_CACHE/kernels`` (default
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
import shlex
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from gptkit.fileio import atomic_path

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
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
    """The CPU model and its feature flags: -march=native code must not run on another CPU.

    x86 lists "model name" and "flags"; ARM lists "CPU implementer", "CPU part" and "Features".
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    prefixes = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")
    keep = [line for line in lines if line.startswith(prefixes)]
    # Once per distinct line, not once per core; the platform strings cover a missing /proc.
    return "\n".join([*dict.fromkeys(keep), platform.machine(), platform.processor()])


def _compiler_identity(compiler: list[str]) -> str:
    """The compiler's command and version (another version may compile differently)."""
    result = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30)
    return " ".join(compiler) + "\n" + result.stdout.split("\n", 1)[0]


def _compile(compiler: list[str], source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        subprocess.run(
            [*compiler, *FLAGS, f"-I{CSRC}", str(source), "-o", str(tmp)],
            check=True, capture_output=True, text=True, timeout=120,
        )
        tmp.chmod(0o755)  # mkstemp made it private; a shared cache must be loadable by everyone


def _load(name: str, signatures: tuple[tuple, ...]) -> ctypes.CDLL | None:
    command = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not command:
        logger.debug("no C compiler found; using ATen kernels")
        return None
    compiler = shlex.split(command)  # CC may carry arguments ("ccache gcc")
    source = CSRC / f"{name}.c"
    headers = [header.read_bytes() for header in sorted(CSRC.glob("*.h"))]
    key = hashlib.sha256(
        b"\0".join(
            [source.read_bytes(), *headers, " ".join(FLAGS).encode(), _compiler_identity(compiler).encode(),
             _cpu_fingerprint().encode()]
        )
    ).hexdigest()[:20]
    target = _cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        _compile(compiler, source, target)
    library = ctypes.CDLL(str(target))
    for function_name, argtypes, *restype in signatures:
        function = getattr(library, function_name)
        function.argtypes = list(argtypes)
        function.restype = restype[0] if restype else None
    return library


POINTER, SIZE, THREADS = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def load_library(name: str, signatures: tuple[tuple, ...]) -> ctypes.CDLL | None:
    """The shared library built from ``csrc/<name>.c`` with the given (function, argtypes) or
    (function, argtypes, restype) signatures (no restype: void), or None when the kernels are switched off or cannot be built here. Each source is
    its own library, so one that fails to build does not take the others with it."""
    if os.environ.get("GPTKIT_CPU_KERNELS", "1") == "0":
        return None
    try:
        return _load(name, signatures)
    except Exception as exc:  # noqa: BLE001 - any failure here only means: use ATen
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("could not build gptkit's CPU kernels %s.c (%s); using ATen kernels", name,
                       str(detail).strip()[:300])
        return None


_SIGNATURES = (
    ("gelu_tanh_forward", (POINTER, POINTER, SIZE, THREADS)),
    ("gelu_tanh_backward", (POINTER, POINTER, POINTER, SIZE, THREADS)),
    ("linear_one_row", (POINTER, POINTER, POINTER, POINTER, SIZE, SIZE, THREADS)),
    ("linear_blocked", (POINTER, POINTER, POINTER, POINTER, SIZE, SIZE, SIZE, THREADS)),
    ("linear_blocked_width", (), ctypes.c_int),
)


def _library() -> ctypes.CDLL | None:
    """The kernels of ``csrc/cpu_kernels.c``, or None when they are switched off or cannot be built."""
    return load_library("cpu_kernels", _SIGNATURES)


def available() -> bool:
    return _library() is not None


def _eager() -> bool:
    """True in plain eager execution: not under torch.compile, torch.jit tracing or functorch
    transforms (vmap, grad), none of which can see into a ctypes call."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return not (functorch_active is not None and functorch_active())


def _covered(x: torch.Tensor) -> bool:
    """Whether the C kernels can take ``x``: a plain, contiguous CPU float32 tensor, in eager mode."""
    return (
        _plain_cpu_float(x)  # not a DTensor or another subclass, not a view with gaps
        and x.numel() >= MIN_ELEMENTS
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
        # With create_graph (double backward) the gradient must itself be differentiable, and a batched
        # gradient (is_grads_batched) has no memory for the kernel to read: ATen's op takes both.
        if torch.is_grad_enabled() or not (_readable(grad) and _covered(x) and grad.shape == x.shape):
            return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
        library = _library()
        assert library is not None
        grad_input = torch.empty_like(x)
        library.gelu_tanh_backward(grad.data_ptr(), x.data_ptr(), grad_input.data_ptr(), x.numel(),
                                   torch.get_num_threads())
        return grad_input


def _library_for_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> ctypes.CDLL | None:
    """The kernels, if they are built and can read this Linear's weight (out, in) and bias in place."""
    tensors = (weight,) if bias is None else (weight, bias)
    if weight.dim() != 2 or not all(_plain_cpu_float(t) for t in tensors):
        return None
    return _library()


class OneRowLinear:
    """``F.linear(x, weight, bias)`` for inputs with a single row (x.numel() == in_features), e.g.
    a batch-1 decode step: streams the row-major (out, in) weight once, at memory speed.

    Inference only (no autograd). ``for_linear`` returns None when the kernel cannot take the
    weights; ``covers(x)`` says whether it can take an input.
    x (..., in) with one row in all -> (..., out).
    """

    def __init__(self, library: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self._kernel = library.linear_one_row

    @classmethod
    def for_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> OneRowLinear | None:
        library = _library_for_weights(weight, bias)
        return None if library is None else cls(library, weight.detach(), None if bias is None else bias.detach())

    def covers(self, x: torch.Tensor) -> bool:
        return (
            x.numel() == self.in_features
            and x.shape[-1] == self.in_features
            and _plain_cpu_float(x)
            and _plain_cpu_float(self.weight)  # still true unless someone moved the weight's memory
            and _eager()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.float32, device="cpu")
        # Pointers are read on every call: the weight's memory can move (share_memory(), .to()).
        self._kernel(
            x.data_ptr(), self.weight.data_ptr(), _address(self.bias), y.data_ptr(),
            self.in_features, self.out_features, torch.get_num_threads(),
        )
        return y


class FewRowsLinear:
    """``F.linear(x, weight, bias)`` for inputs of 2 to 8 rows (a decode step at a small batch),
    on a copy of the weight in a blocked layout, (ceil(out / w), in, w) with w = 16 floats on CPUs
    with AVX-512, else 8 (the kernel's vector width), made once: every weight is read from memory
    once per call, for all rows together. Inference only (no autograd).

    x (..., in) with 2..8 rows in all -> (..., out).
    """

    MAX_ROWS = 8

    def __init__(self, library: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = weight.shape
        width = library.linear_blocked_width()
        blocks = -(-self.out_features // width)
        padded = torch.zeros(blocks * width, self.in_features, dtype=torch.float32, device="cpu")
        padded[: self.out_features] = weight
        # (blocks, w, in) -> (blocks, in, w): block b holds output columns wb..wb+w-1 per input feature.
        self.blocked_weight = padded.view(blocks, width, self.in_features).transpose(1, 2).contiguous()
        self.bias = bias
        self._kernel = library.linear_blocked

    @classmethod
    def for_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> FewRowsLinear | None:
        library = _library_for_weights(weight, bias)
        if library is None:
            return None
        with torch.no_grad():
            return cls(library, weight.detach(), None if bias is None else bias.detach())

    def covers(self, x: torch.Tensor) -> bool:
        return (
            x.shape[-1] == self.in_features
            and 2 <= x.numel() // self.in_features <= self.MAX_ROWS
            and _plain_cpu_float(x)
            and _eager()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.float32, device="cpu")
        self._kernel(
            x.data_ptr(), self.blocked_weight.data_ptr(), _address(self.bias),
            y.data_ptr(), rows, self.in_features, self.out_features, torch.get_num_threads(),
        )
        return y


def _address(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for a kernel argument, or None (NULL) for an absent optional one."""
    return None if t is None else t.data_ptr()


def _plain_cpu_float(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _readable(t: torch.Tensor) -> bool:
    """A plain CPU float32 tensor with memory a kernel can read, for the backwards: a gradient may
    be a batched tensor of vmap (``autograd.grad(..., is_grads_batched=True)``), whose type is
    torch.Tensor but which has no storage. (Not in _plain_cpu_float: torch.compile traces that,
    and _has_storage would break its graph.)"""
    return _plain_cpu_float(t) and torch._C._has_storage(t)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), of any shape.

    Equal to ``F.gelu(x, approximate="tanh")`` within float32 rounding (absolute error below 6e-7
    over the whole float range, as ATen's; tested); the fused C kernel runs when it covers ``x``
    in eager mode, ATen's otherwise (torch.compile, jit tracing, functorch, forward-mode AD).
    """
    # Cheap checks first: under torch.compile nothing below may be traced into (inductor fuses
    # F.gelu itself).
    if not _covered(x) or not _eager():
        return F.gelu(x, approximate="tanh")
    library = _library()
    if library is None:
        return F.gelu(x, approximate="tanh")
    if torch.is_grad_enabled():
        # Training: our autograd node when x needs a gradient; otherwise (e.g. forward-mode AD on a
        # dual tensor, which does not set requires_grad) ATen, which handles every AD mode.
        return _GeluTanh.apply(x) if x.requires_grad else F.gelu(x, approximate="tanh")
    y = torch.empty_like(x)  # no_grad / inference_mode: no autograd node to build
    library.gelu_tanh_forward(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
    return y
