"""Speedrun: nanoGPT's CPU recipe against gptkit's fast recipe, for the same wall-clock budget.

Both train on the built-in Shakespeare corpus (character tokenizer) for ``--budget`` seconds and
are then scored on the same held-out split. Prints a Markdown table with both validation losses,
the difference, tokens/s and steps.

    python benchmarks/speedrun.py                  # 180 s each (about 7 minutes in all)
    python benchmarks/speedrun.py --budget 60      # quicker look
    python benchmarks/speedrun.py --only fast --set train.lr=0.01   # tune the fast recipe

(a) baseline: GPT-2 architecture, n_layer=4, n_head=4, d_model=128, block_size=64, batch 12,
    AdamW lr 1e-3, betas (0.9, 0.99), 100 warm-up steps, cosine to 1e-4 over 2000 steps, dropout 0
    (nanoGPT's documented CPU run of shakespeare_char); after step 2000 it continues at 1e-4.
(b) fast: configs/shakespeare-char-fast.yaml, whose schedule follows the clock.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptkit.config import load_run_config  # noqa: E402
from gptkit.data.loader import eval_batches  # noqa: E402
from gptkit.train.run import start_run  # noqa: E402

BASELINE = [
    "--model.n_layer=4", "--model.n_head=4", "--model.d_model=128", "--model.block_size=64",
    "--model.dropout=0.0", "--model.bias=true", "--model.position=learned", "--model.norm=layernorm",
    "--model.mlp=gelu",
    "--train.batch_size=12", "--train.optimizer=adamw", "--train.lr=0.001", "--train.min_lr=0.0001",
    "--train.beta1=0.9", "--train.beta2=0.99", "--train.warmup_steps=100", "--train.lr_decay_steps=2000",
    "--train.schedule=cosine", "--train.weight_decay=0.1", "--train.grad_clip=1.0",
]


def held_out_loss(model: torch.nn.Module, data_dir: Path, block_size: int, batches: int) -> float:
    """Mean next-token loss over ``batches`` x 12 windows spread evenly over the validation split."""
    from gptkit.train.trainer import causal_lm_loss

    model.eval()
    with torch.no_grad():
        losses = [float(causal_lm_loss(model, batch)) for batch in eval_batches(data_dir, "val", 12, block_size, batches)]
    return sum(losses) / len(losses)


def run_recipe(name: str, recipe: Path | None, overrides: list[str], budget: float, eval_batches_n: int,
               workdir: Path) -> dict:
    common = [
        f"--train.max_seconds={budget}", "--train.max_steps=1000000000", f"--train.out_dir={workdir / name}",
        "--train.checkpoint_interval=0", "--train.eval_interval=0", "--train.log_interval=500",
        "--train.eval_batches=1", "--data.source=shakespeare", "--data.tokenizer=char",
        "--data.dir=data/shakespeare-char",
    ]
    config = load_run_config(recipe, [*overrides, *common])
    trainer = start_run(config)
    started = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - started
    loss = held_out_loss(trainer.model, Path(config.data.dir), config.model.block_size, eval_batches_n)
    return {
        "name": name,
        "val_loss": loss,
        "steps": summary.steps,
        "tokens_per_s": summary.tokens_per_second,
        "seconds": wall,
        "params": trainer.model.num_parameters(),
        "shape": f"{config.model.n_layer}x{config.model.d_model}, T={config.model.block_size}, "
                 f"B={config.train.batch_size}x{config.train.grad_accum_steps}",
        "recipe": (f"{config.model.position}/{config.model.norm}/{config.model.mlp}, {config.train.optimizer} "
                   f"lr {config.train.lr:g}, {config.train.schedule}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=180.0, help="wall-clock seconds of training per recipe")
    parser.add_argument("--fast", type=Path, default=ROOT / "configs" / "shakespeare-char-fast.yaml")
    parser.add_argument("--only", choices=["both", "baseline", "fast"], default="both")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the fast recipe (repeatable)")
    parser.add_argument("--eval-batches", type=int, default=100, help="x 12 windows of the held-out split")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"budget {args.budget:.0f} s per recipe")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in ("both", "baseline"):
            results.append(run_recipe("baseline (nanoGPT CPU)", None, BASELINE, args.budget, args.eval_batches,
                                      Path(tmp)))
        if args.only in ("both", "fast"):
            fast_overrides = [f"--{item}" for item in args.set]
            results.append(run_recipe("fast", args.fast, fast_overrides, args.budget, args.eval_batches, Path(tmp)))
    print()
    print("| recipe | val loss | steps | tokens/s | train s | params | shape | parts |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['val_loss']:.4f} | {r['steps']:,} | {r['tokens_per_s']:,.0f} | {r['seconds']:.0f} "
              f"| {r['params'] / 1e6:.2f}M | {r['shape']} | {r['recipe']} |")
    if len(results) == 2:
        diff = results[0]["val_loss"] - results[1]["val_loss"]
        print(f"\nfast recipe is {diff:.3f} nats below the baseline at equal wall-clock (target: >= 0.2)")


if __name__ == "__main__":
    main()
