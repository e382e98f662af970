"""GPU throughput in one command: GPT-2 124M training steps in bf16 autocast, fp16 (GradScaler)
and torch.compile + bf16, with tokens/s and MFU against the card's bf16 matmul peak measured in
the same run; then KV-cache greedy decoding tokens/s at batch 1 and 8 (bf16 weights).

    python benchmarks/gpu.py                 # about 3-5 minutes on one recent GPU
    python benchmarks/gpu.py --steps 5       # quicker, noisier

Without CUDA it prints one "skipped" line and exits 0, so CI on CPU machines can run it.

MFU = model FLOPs per token (PaLM appendix B: 6 * (N_nonembedding + vocab * d_model) +
12 * n_layer * d_model * seq_len) * tokens/s / peak, where peak is the best of several
8192 x 8192 bf16 matmuls timed here (a measured ceiling, usually below the datasheet's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

SKIP_MESSAGE = "skipped: no CUDA device; benchmarks/gpu.py measures GPU training and decoding"


def bf16_matmul_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Best bf16 FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs), over ``repeats`` timings."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):  # warm-up: cuBLAS heuristics, clocks
        a @ b
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del a, b
    return 2.0 * n**3 / best


def flops_per_token(model, seq_len: int) -> float:
    config = model.config
    non_embedding = sum(p.numel() for p in model.blocks.parameters()) + sum(
        p.numel() for p in model.final_norm.parameters()
    )
    return 6.0 * (non_embedding + config.vocab_size * config.d_model) + 12 * config.n_layer * config.d_model * seq_len


def train_tokens_per_second(mode: str, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(tokens/s, FLOPs per token) of GPT-2 124M training steps; mode is bf16, fp16 or compile-bf16."""
    from gptkit.config import ModelConfig
    from gptkit.distributed.precision import PrecisionPolicy
    from gptkit.model.gpt import GPT
    from gptkit.model.presets import preset_values

    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**preset_values("gpt2"), "block_size": args.seq})).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    policy = PrecisionPolicy("fp16" if mode == "fp16" else "bf16", device)
    forward = torch.compile(model) if mode.startswith("compile") else model
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    y = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)

    def step() -> None:
        with policy.autocast():
            logits = forward(x)  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        policy.backward(loss)
        policy.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        policy.step(optimizer)
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # includes compilation for compile-bf16
        step()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    fpt = flops_per_token(model, args.seq)
    del model, optimizer, forward
    torch.cuda.empty_cache()
    return args.batch * args.seq * args.steps / seconds, fpt


def decode_tokens_per_second(batch_size: int, args: argparse.Namespace, device: torch.device) -> float:
    """Greedy KV-cache decoding of ``args.new_tokens`` tokens per row, bf16 weights."""
    from gptkit.config import ModelConfig
    from gptkit.generate.generator import decode_tokens
    from gptkit.model.gpt import GPT
    from gptkit.model.presets import preset_values

    torch.manual_seed(0)
    model = GPT(ModelConfig(**preset_values("gpt2"))).to(device=device, dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, 16), device=device)
    for _ in decode_tokens(model, prompt, max_new_tokens=8):  # warm-up
        pass
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    produced = 0
    for tokens in decode_tokens(model, prompt, max_new_tokens=args.new_tokens):  # (B,) per step
        produced += tokens.shape[0]
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return produced / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="training micro-batch (sequences)")
    parser.add_argument("--seq", type=int, default=1024, help="training sequence length")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles in compile mode)")
    parser.add_argument("--new-tokens", type=int, default=256, help="decoded tokens per row")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    print(f"# GPU benchmark: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    peak = bf16_matmul_peak(device)
    print(f"- measured bf16 matmul peak (8192^3, best of 10): {peak / 1e12:.1f} TFLOP/s")
    print(f"- training: GPT-2 124M, batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after "
          f"{args.warmup} warm-up, AdamW (fused), grad clip 1.0\n")
    print("| training mode | tokens/s | MFU |")
    print("|---|---:|---:|")
    for mode in ("bf16", "fp16", "compile-bf16"):
        tokens_per_second, fpt = train_tokens_per_second(mode, args, device)
        print(f"| {mode} | {tokens_per_second:,.0f} | {100 * fpt * tokens_per_second / peak:.1f}% |", flush=True)
    print(f"\n- decoding: GPT-2 124M, bf16 weights, KV cache, greedy, prompt 16, {args.new_tokens} new tokens\n")
    print("| decode batch | tokens/s |")
    print("|---:|---:|")
    for batch_size in (1, 8):
        print(f"| {batch_size} | {decode_tokens_per_second(batch_size, args, device):,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
