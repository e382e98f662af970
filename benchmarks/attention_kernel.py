"""One attention layer, forward + backward (and forward alone): gptkit's fused CPU kernel against
SDPA with the transposes CausalSelfAttention needs around it, on the packed qkv activation.

Rounds alternate between the two (who goes first alternates too); the table shows medians.

    python benchmarks/attention_kernel.py                          # the char shape, T=128, T=256
    python benchmarks/attention_kernel.py --shapes 4,512,12,64     # B,T,H,D (multi-head)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py sits next to this script
from _common import environment_lines, log, markdown_table, median, set_threads  # noqa: E402

from gptkit.model import attention_kernel

DEFAULT_SHAPES = ["12,64,4,32", "4,128,12,64", "4,256,12,64"]


def sdpa_path(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """What CausalSelfAttention does without the kernel: split, transpose, SDPA, transpose back."""
    B, T, width = qkv.shape
    D = width // (3 * n_head)
    q, k, v = qkv.view(B, T, 3 * n_head, D).transpose(1, 2).split([n_head, n_head, n_head], dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, n_head * D)


def fused_path(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    return attention_kernel.fused_causal_attention(qkv, n_head, n_head)


def time_rounds(fns: dict[str, Callable[[], None]], rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each function, over rounds that alternate between them."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="B,T,H,D (n_kv_head = H)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=5, help="calls per round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    set_threads(args.threads)
    if not attention_kernel.available():
        sys.exit("gptkit's attention kernel is not available here (no C compiler, or GPTKIT_CPU_KERNELS=0)")

    rows = []
    for shape in args.shapes:
        B, T, H, D = (int(n) for n in shape.split(","))
        log(f"B={B} T={T} H={H} D={D}")
        qkv = torch.randn(B, T, 3 * H * D, requires_grad=True)
        grad = torch.randn(B, T, H * D)

        def train(path: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                path(qkv, H).backward(grad)
                qkv.grad = None
            return run

        def forward(path: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad():
                    path(qkv, H)
            return run

        for mode, wrap in (("forward + backward", train), ("forward (no_grad)", forward)):
            medians = time_rounds({"sdpa": wrap(sdpa_path), "fused": wrap(fused_path)}, args.rounds, args.calls)
            rows.append([f"B={B} T={T} H={H} D={D}", mode, f"{medians['sdpa'] * 1e3:.3f}",
                         f"{medians['fused'] * 1e3:.3f}", f"{medians['sdpa'] / medians['fused']:.2f}x"])

    print("## Causal attention, one layer: SDPA (with its transposes) vs gptkit's fused CPU kernel\n")
    print(markdown_table(["shape", "pass", "SDPA ms", "fused ms", "speed-up"], rows))
    print()
    for line in environment_lines({"rounds": f"{args.rounds} alternating rounds of {args.calls} calls; medians"},
                                  load_at_start):
        print(line)


if __name__ == "__main__":
    main()
