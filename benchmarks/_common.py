"""Shared helpers for the benchmark scripts: environment report, hardware ceilings measured in the
same process (fp32 matmul peak, memory bandwidth), Markdown tables and small statistics.

These are scripts, not part of the package: they print to stdout and are not imported by gptkit.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# Make ``import gptkit`` work when a script is run from a checkout without installing the package.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from gptkit.model.cpu_kernels import OneRowLinear  # noqa: E402


def quiet_transformers() -> None:
    """Silence transformers' advisory warnings so that stdout holds only the report."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", module="transformers")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_lines(extra: dict[str, object] | None = None, load_at_start: tuple[float, ...] | None = None) -> list[str]:
    """How the benchmark was run, as Markdown bullet lines (``load_at_start``: os.getloadavg() then)."""
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    lines = [
        f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        f"- python {platform.python_version()}, torch {torch.__version__}, transformers {hf_version}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible), "
        f"torch threads: {torch.get_num_threads()}, interop threads: {torch.get_num_interop_threads()}",
        f"- CPU capability: {torch.backends.cpu.get_cpu_capability()}, MKL: {torch.backends.mkl.is_available()}, "
        f"oneDNN: {torch.backends.mkldnn.is_available()}",
        "- dtype fp32, seeded random weights, dropout 0",
        f"- load average (1/5/15 min) at start: {_fmt_load(load_at_start or os.getloadavg())}, at end: "
        f"{_fmt_load(os.getloadavg())} (other processes share the machine: timings are medians over "
        "alternating rounds)",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    return lines


def _fmt_load(load: tuple[float, ...]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Ceilings measured in the same run
# --------------------------------------------------------------------------------------------


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Fastest of ``repeats`` calls, in seconds (noise from other processes only adds time)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 FLOP/s of torch.mm on two n x n matrices, best of ``repeats`` (2 n^3 FLOPs each)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    seconds = best_time(lambda: torch.mm(a, b, out=out), repeats, warmup=2)
    return 2.0 * n**3 / seconds


WEIGHT_STREAM_METHODS = {
    "mv_out_in": "torch.mv over a (n/768, 768) matrix: y = W x, nn.Linear's (out, in) layout",
    "vm_in_out": "vector @ (768, n/768) matrix: y = x W, HF Conv1D's (in, out) layout",
    "gptkit_one_row": "gptkit's one-row C kernel over the (n/768, 768) matrix: y = W x (when it builds here)",
    "sum": "plain read: sum of all the elements",
}


class WeightReader:
    """A buffer of ``n_bytes`` of fp32, as many bytes as a model's weights, and the ways to read it
    once (the keys of WEIGHT_STREAM_METHODS; the gptkit kernel only where it builds).

    A decode step at small batch has to read every weight once, so none of these can be beaten by
    it: the matrix-vector products are what a decode step does, the plain read (a sum) is the
    least work that still touches every byte.
    """

    def __init__(self, n_bytes: int, width: int = 768) -> None:
        rows = max(1, n_bytes // 4 // width)
        gen = torch.Generator().manual_seed(0)
        buffer = torch.randn(rows * width, generator=gen)
        out_in = buffer.view(rows, width)
        in_out = buffer.view(width, rows)
        vector = torch.randn(width, generator=gen)
        out = torch.empty(rows)
        row_vector = vector[None]
        self.reads: dict[str, Callable[[], object]] = {
            "mv_out_in": lambda: torch.mv(out_in, vector, out=out),
            "vm_in_out": lambda: torch.mm(row_vector, in_out),
        }
        one_row = OneRowLinear.for_linear(out_in, None)
        if one_row is not None:
            self.reads["gptkit_one_row"] = lambda: one_row(vector)
        self.reads["sum"] = lambda: buffer.sum()

    def best(self, method: str, repeats: int, warmup: int = 2) -> float:
        """The fastest of ``repeats`` reads by ``method``, in seconds."""
        return best_time(self.reads[method], repeats, warmup=warmup)

    def once(self, method: str) -> float:
        """One read by ``method``, in seconds."""
        start = time.perf_counter()
        self.reads[method]()
        return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), separator, *(line(r) for r in cells[1:])])


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """min-max of ``values`` (times ``scale``) as text."""
    return f"{min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f}"


def log(message: str) -> None:
    """Progress messages go to stderr so that stdout holds only the Markdown report."""
    print(message, file=sys.stderr, flush=True)
