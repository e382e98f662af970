"""Training throughput and model FLOPs utilisation (MFU): gptkit's GPT vs transformers' GPT2LMHeadModel.

Both models get the same shape, the same starting weights (the HF model is ``to_hf`` of the gptkit
one), the same batches and the same step: forward, mean cross-entropy of the logits, backward,
grad-norm clipping at 1.0, fused AdamW (weight-decay groups from ``gptkit.train.optim.parameter_groups``),
``zero_grad(set_to_none=True)``. Rounds of steps alternate between the implementations so that load
from other processes hits all of them alike; each reports the median over rounds.

    python benchmarks/train_throughput.py            # both shapes, a few minutes on 2 CPU cores
    python benchmarks/train_throughput.py --quick    # smoke test, < 60 s
    python benchmarks/train_throughput.py --compile  # adds a torch.compile'd gptkit row
    python benchmarks/train_throughput.py --unfused  # adds gptkit run module by module (no fused trunk)
    python benchmarks/train_throughput.py --allocator warm  # the char shape in one allocator state only

glibc's allocator changes state once in a process: freeing a large block (16 MB here) raises its
mmap and trim thresholds, after which freed memory stays in the process. Before that, an HF step at
the char shape page-faults ~2,600-4,800 times (its intermediate tensors are fresh mappings, or heap the
allocator hands back to the OS at each step) and runs ~10% slower; after it, from ~40 to ~3,300 times
(it varies from run to run: the page-faults column, not the label, shows the state). A gptkit step
takes no page faults in either state (the fused trunk's arena). So the char shape runs twice on the
same models: "fresh" rounds first, as a process has it before it frees a large block, then the
matmul peak is measured (its 16 MB matrices are that large free), then "warm" rounds. Each row
shows its page faults per step. The GPT-2 124M shape runs once, after the peak measurement (warm);
at that size most of a step's page faults come from blocks above glibc's 32 MB mmap ceiling (the
logits), which are fresh mappings in either state.

A third row, "plain PyTorch GPT (nanoGPT-style)" (``_plain_gpt.py``: nn.Linear, nn.LayerNorm, F.gelu,
SDPA; the same weights), shows what the same model costs in straightforward PyTorch on this machine
(``--no-plain`` leaves it out).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py sits next to this script
from _common import (  # noqa: E402
    environment_lines, log, markdown_table, matmul_peak_flops, median, quiet_transformers,
    set_threads,
)

from _plain_gpt import PlainGPT  # noqa: E402

from gptkit.model import GPT, ModelConfig, fused_trunk, preset_values
from gptkit.model.hf import to_hf
from gptkit.train.optim import parameter_groups

PLAIN_NAME = "plain PyTorch GPT (nanoGPT-style)"
HF_NAME = "HF GPT2LMHeadModel (sdpa)"
CHAR_NAME = "char 0.8M"  # the small shape, the only one run in both allocator states
FRESH = "fresh"  # allocator state names (see the module docstring)
WARM = "warm"
TARGET = 1.5  # the issue's target for gptkit / HF at the char shape
LR = 1e-3
WEIGHT_DECAY = 0.1
CLIP = 1.0


@dataclass
class Shape:
    name: str
    config: ModelConfig
    batch: int
    warmup: int  # untimed steps per implementation before the rounds
    steps: int  # timed steps per implementation per round
    rounds: int


@dataclass
class Impl:
    name: str
    model: torch.nn.Module
    logits: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer = field(init=False)
    step_seconds: list[float] = field(default_factory=list)  # every timed step, in seconds
    round_medians: list[float] = field(default_factory=list)  # median step time of each round
    first_step_seconds: float = 0.0
    last_loss: float = float("nan")
    steps_done: int = 0
    page_faults: int = 0  # minor + major page faults of the process during this phase's timed steps

    def start_phase(self) -> None:
        self.step_seconds, self.round_medians, self.page_faults = [], [], 0

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, WEIGHT_DECAY), lr=LR, betas=(0.9, 0.95), fused=True
        )


def train_step(impl: Impl, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One full optimisation step: forward + loss + backward + clip + optimizer step."""
    logits = impl.logits(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(impl.model.parameters(), CLIP)
    impl.optimizer.step()
    impl.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def flops_per_token(config: ModelConfig, model: GPT) -> tuple[float, int]:
    """PaLM (Chowdhury et al. 2022, appendix B) model FLOPs per trained token, counting the LM head:

        6 * (N_nonembedding + vocab * d_model) + 12 * n_layer * d_model * seq_len

    N_nonembedding = parameters of the blocks and the final norm (no token / position tables); the
    vocab * d_model term is the LM-head matmul (tied to the token table, so not in N_nonembedding).
    Returns (FLOPs per token, N_nonembedding + vocab * d_model).
    """
    non_embedding = sum(p.numel() for p in model.blocks.parameters()) + sum(
        p.numel() for p in model.final_norm.parameters()
    )
    matmul_params = non_embedding + config.vocab_size * config.d_model
    attention = 12 * config.n_layer * config.d_model * config.block_size
    return 6.0 * matmul_params + attention, matmul_params


UNFUSED_NAME = "gptkit GPT, module by module"


def unfused_logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    with fused_trunk.unfused():  # the same kernels, without the fused trunk node
        return model(x)


def build_impls(config: ModelConfig, *, compile_gptkit: bool, plain: bool = True,
                unfused: bool = False) -> tuple[list[Impl], GPT]:
    torch.manual_seed(0)
    gk = GPT(config).train()
    hf = to_hf(gk)  # identical weights; eval mode and fp32 like the source
    hf.set_attn_implementation("sdpa")
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    hf.train()
    compiled_source = copy.deepcopy(gk) if compile_gptkit else None
    impls = [
        Impl("gptkit GPT", gk, lambda x: gk(x)),
        Impl(HF_NAME, hf, lambda x: hf(input_ids=x).logits),
    ]
    if unfused:
        separate = copy.deepcopy(gk)
        impls.append(Impl(UNFUSED_NAME, separate, lambda x: unfused_logits(separate, x)))
    if plain:
        reference = PlainGPT(config).train()
        reference.load_state_dict(gk.state_dict())  # the same names, so the same weights
        impls.append(Impl(PLAIN_NAME, reference, lambda x: reference(x)))
    if compiled_source is not None:
        compiled = torch.compile(compiled_source)
        impls.append(Impl("gptkit GPT + torch.compile", compiled_source, lambda x: compiled(x)))
    return impls, gk


def page_faults() -> int:
    """Minor + major page faults of this process so far (getrusage)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


@dataclass
class Phase:
    """One set of alternating rounds, in one allocator state; ``before`` runs first (e.g. the peak)."""

    name: str
    before: Callable[[], None] | None = None


def run_shape(shape: Shape, phases: list[Phase], *, compile_gptkit: bool, plain: bool, unfused: bool,
              ) -> tuple[list[dict[str, object]], list[str]]:
    """Warm-up, then the rounds of each phase on the same models. Returns one row (a dict) per
    implementation and phase, and notes for the report."""
    config = shape.config
    log(f"[{shape.name}] building models")
    impls, gk = build_impls(config, compile_gptkit=compile_gptkit, plain=plain, unfused=unfused)
    fpt, matmul_params = flops_per_token(config, gk)
    tokens_per_step = shape.batch * config.block_size

    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randint(0, config.vocab_size, (shape.batch, config.block_size), generator=gen),
            torch.randint(0, config.vocab_size, (shape.batch, config.block_size), generator=gen),
        )
        for _ in range(4)
    ]

    def run_steps(impl: Impl, n: int) -> list[float]:
        times = []
        loss = None
        faults_before = page_faults()
        for _ in range(n):
            x, y = batches[impl.steps_done % len(batches)]
            start = time.perf_counter()
            loss = train_step(impl, x, y)
            times.append(time.perf_counter() - start)
            impl.steps_done += 1
        impl.page_faults += page_faults() - faults_before
        if loss is not None:
            impl.last_loss = float(loss)
        return times

    # Warm-up: the first step of each implementation is timed on its own (it includes torch.compile,
    # and the first-touch page faults of gradients and optimizer state).
    for impl in impls:
        log(f"[{shape.name}] warm-up {impl.name}")
        impl.first_step_seconds = run_steps(impl, 1)[0]
        if shape.warmup > 1:
            run_steps(impl, shape.warmup - 1)

    rows: list[dict[str, object]] = []
    for phase in phases:
        if phase.before is not None:
            phase.before()
        for impl in impls:
            impl.start_phase()
        for r in range(shape.rounds):
            k = r % len(impls)
            order = impls[k:] + impls[:k]  # rotate who goes first each round
            for impl in order:
                times = run_steps(impl, shape.steps)
                impl.step_seconds.extend(times)
                impl.round_medians.append(median(times))
            log(
                f"[{shape.name}, {phase.name}] round {r + 1}/{shape.rounds}: "
                + ", ".join(f"{i.name} {i.round_medians[-1] * 1e3:.1f} ms/step" for i in impls)
            )
        hf = next(impl for impl in impls if impl.name == HF_NAME)
        hf_tps = tokens_per_step / median(hf.step_seconds)
        for impl in impls:
            step = median(impl.step_seconds)
            tps = tokens_per_step / step
            rows.append({
                "shape": shape.name,
                "allocator": phase.name,
                "implementation": impl.name,
                "step": step,
                "best": min(impl.step_seconds),
                "tokens/s": tps,
                "model FLOP/s": tps * fpt,
                "vs HF": tps / hf_tps,
                # Each round's HF time over this implementation's time in the same round: load that
                # lasts a round hits both, so the median of these ratios is steadier than a ratio of medians.
                "vs HF per round": median([h / g for h, g in zip(hf.round_medians, impl.round_medians)]),
                "page faults/step": impl.page_faults / len(impl.step_seconds),
                "loss": impl.last_loss,
            })

    notes = [
        f"{shape.name}: n_layer={config.n_layer}, n_head={config.n_head}, d_model={config.d_model}, "
        f"block_size={config.block_size}, vocab={config.vocab_size}, batch={shape.batch} "
        f"({tokens_per_step} tokens/step); unique params {gk.num_parameters() / 1e6:.2f}M; "
        f"N_nonembedding + vocab*d_model = {matmul_params / 1e6:.2f}M; "
        f"model FLOPs/token = {fpt / 1e6:.1f} MFLOP; {shape.warmup} warm-up + {shape.rounds} rounds x "
        f"{shape.steps} timed steps per implementation and allocator state (median over all "
        f"{shape.rounds * shape.steps} timed steps)",
    ]
    for impl in impls:
        if "compile" in impl.name:
            notes.append(
                f"{shape.name}: torch.compile first step took {impl.first_step_seconds:.1f} s (compile time "
                f"~ {impl.first_step_seconds - median(impl.step_seconds):.1f} s; less when inductor's on-disk "
                "cache is warm from an earlier run), not counted in the rows"
            )
    del impls, gk
    return rows, notes


def profile_step(config: ModelConfig, batch: int, rows: int) -> str:
    """torch.profiler tables of one training step of each implementation (after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    impls, _ = build_impls(config, compile_gptkit=False, plain=False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, config.vocab_size, (batch, config.block_size), generator=gen)
    y = torch.randint(0, config.vocab_size, (batch, config.block_size), generator=gen)
    out = []
    for impl in impls:
        for _ in range(3):
            train_step(impl, x, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                train_step(impl, x, y)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        out.append(f"#### {impl.name}: 3 steps, sorted by self CPU time\n\n```\n{table}\n```")
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, GPT-2 at batch 1: a smoke test (< 60 s)")
    parser.add_argument("--shapes", default="char,gpt2", help="comma-separated subset of: char, gpt2")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd gptkit row")
    parser.add_argument("--unfused", action="store_true",
                        help="add a row of gptkit's model run module by module (without the fused trunk node)")
    parser.add_argument("--no-plain", action="store_true",
                        help="leave out the plain PyTorch (nanoGPT-style) reference row")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--char-batch", type=int, default=12)
    parser.add_argument("--char-steps", type=int, default=5, help="timed steps per round (char shape)")
    parser.add_argument("--char-rounds", type=int, default=10)
    parser.add_argument("--gpt2-batch", type=int, default=4)
    parser.add_argument("--gpt2-block", type=int, default=256)
    parser.add_argument("--gpt2-steps", type=int, default=1, help="timed steps per round (GPT-2 124M)")
    parser.add_argument("--gpt2-rounds", type=int, default=6)
    parser.add_argument("--profile", action="store_true", help="also print profiler tables for the char shape")
    parser.add_argument("--allocator", choices=["both", FRESH, WARM], default="both",
                        help="the char shape's allocator states: fresh rounds, then warm ones (default), "
                        "or one of them (see the module docstring)")
    args = parser.parse_args()
    wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if args.allocator != "both" and "char" not in wanted:
        parser.error("--allocator applies to the char shape only (the GPT-2 shape always runs warm)")
    load_at_start = os.getloadavg()
    set_threads(args.threads)
    quiet_transformers()

    if args.quick:
        args.char_steps, args.char_rounds = 3, 4
        args.gpt2_batch, args.gpt2_steps, args.gpt2_rounds = 1, 1, 1

    shapes = []
    for name in wanted:
        if name == "char":
            config = ModelConfig(n_layer=4, n_head=4, d_model=128, block_size=64, vocab_size=341, dropout=0.0)
            shapes.append(Shape(CHAR_NAME, config, args.char_batch, 2 if args.quick else 3, args.char_steps,
                                args.char_rounds))
        elif name == "gpt2":
            values = preset_values("gpt2") | {"block_size": args.gpt2_block, "dropout": 0.0}
            shapes.append(Shape("GPT-2 124M", ModelConfig(**values), args.gpt2_batch, 1, args.gpt2_steps,
                                args.gpt2_rounds))
        else:
            parser.error(f"unknown shape {name!r}; choose from char, gpt2")
    shapes.sort(key=lambda shape: shape.name != CHAR_NAME)  # the char shape's fresh rounds come first

    peaks: list[tuple[str, float]] = []  # (when, FLOP/s)

    def measure_peak(when: str) -> None:
        log(f"measuring fp32 matmul peak ({when})")
        peaks.append((when, matmul_peak_flops()))

    if args.allocator == WARM or "char" not in wanted:
        measure_peak("before the rounds")
    results, notes = [], []
    for shape in shapes:
        if shape.name != CHAR_NAME:
            phases = [Phase(WARM, None if peaks else lambda: measure_peak(f"before the {shape.name} rounds"))]
        elif args.allocator == "both":
            phases = [Phase(FRESH), Phase(WARM, lambda: measure_peak("between the fresh and warm rounds"))]
        else:
            phases = [Phase(args.allocator)]
        rows, shape_notes = run_shape(shape, phases, compile_gptkit=args.compile, plain=not args.no_plain,
                                      unfused=args.unfused)
        results.extend(rows)
        notes.extend(shape_notes)
    measure_peak("after the rounds")
    peak = max(flops for _, flops in peaks)

    print("## Training throughput: gptkit vs Hugging Face transformers\n")
    print(
        markdown_table(
            ["shape", "allocator", "implementation", "ms/step (median)", "ms/step (best)", "tokens/s", "MFU",
             "tokens/s vs HF", "vs HF, median of per-round ratios", "page faults/step", "loss after last step"],
            [
                [row["shape"], row["allocator"], row["implementation"], f"{row['step'] * 1e3:.1f}",
                 f"{row['best'] * 1e3:.1f}", f"{row['tokens/s']:,.0f}", f"{row['model FLOP/s'] / peak * 100:.1f}%",
                 f"{row['vs HF']:.2f}x", f"{row['vs HF per round']:.2f}x", f"{row['page faults/step']:,.0f}",
                 f"{row['loss']:.4f}"]
                for row in results
            ],
        )
    )
    target_lines = [
        f"{row['allocator']}: {row['vs HF']:.2f}x (median of per-round ratios {row['vs HF per round']:.2f}x)"
        for row in results if row["shape"] == CHAR_NAME and row["implementation"] == "gptkit GPT"
    ]
    if target_lines:
        print(f"\nTarget: gptkit / HF tokens/s at the char shape >= {TARGET}x; "
              + "; ".join(target_lines) + "\n")
    print()
    print("How it was run:\n")
    for line in environment_lines(
        {
            "step": "forward + cross-entropy + backward + clip_grad_norm_(1.0) + AdamW(fused=True, lr=1e-3, "
            f"betas=(0.9, 0.95), weight_decay={WEIGHT_DECAY} on >=2-D params via parameter_groups) + "
            "zero_grad(set_to_none=True); same initial weights (to_hf) and same batches for every row",
            "allocator": "glibc malloc's state: fresh = before the process's first free of a 16 MB block (its "
            "mmap and trim thresholds only as high as smaller frees raised them); warm = after it (thresholds "
            "raised to 16 and 32 MB: freed memory stays in the process); page faults/step from getrusage over "
            "the timed steps",
            "MFU": "tokens/s * model FLOPs per token / fp32 matmul peak; model FLOPs per token = "
            "6 * (N_nonembedding + vocab * d_model) + 12 * n_layer * d_model * block_size (PaLM, with the "
            "LM-head matmul counted)",
            "fp32 matmul peak (torch.mm 2048x2048, best of 10)": ", ".join(
                f"{flops / 1e9:.1f} GFLOP/s {when}" for when, flops in peaks
            ) + f"; MFU uses the best, {peak / 1e9:.1f} GFLOP/s",
        },
        load_at_start,
    ):
        print(line)
    for note in notes:
        print(f"- {note}")

    if args.profile:
        print("\n### Profiles (char shape)\n")
        config = ModelConfig(n_layer=4, n_head=4, d_model=128, block_size=64, vocab_size=341, dropout=0.0)
        print(profile_step(config, args.char_batch, 25))


if __name__ == "__main__":
    main()
