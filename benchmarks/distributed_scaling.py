"""Data-parallel scaling on CPU: training tokens/s of one process vs two DDP or FSDP2 processes (gloo).

Every configuration is a real ``gptkit train`` run (the second under torchrun) on the same small
corpus and model shape, with the same per-process batch (weak scaling: two processes train on
twice the tokens per step). Each process gets one intra-op thread, so one process uses one core
and two use two; a one-process row with two threads shows what the same two cores give without
DDP. Throughput is the median of the per-step global tokens/s that the trainer logs
(metrics.jsonl, log_interval=1), skipping the first steps (allocation, warm-up).

    python benchmarks/distributed_scaling.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/distributed_scaling.py --quick    # smoke test

efficiency = tokens/s(2 processes) / (2 * tokens/s(1 process, 1 thread)); 1.0 is perfect scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py sits next to this script
from _common import environment_lines, log, markdown_table, median  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, and the cat sat on the mat.\n" for i in range(3000))


def run(workdir: Path, name: str, *, nproc: int, threads: int, args: list[str], strategy: str = "ddp") -> list[float]:
    """Per-step global tokens/s of one training run."""
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    train = ["-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", f"--train.out_dir={name}", *args]
    if nproc == 1:
        command = [sys.executable, *train]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *train, f"--train.strategy={strategy}",
        ]
    log(f"{name}: {' '.join(command[1:])}")
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, for a smoke test")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process per step")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the configurations")
    args = parser.parse_args()
    steps = 12 if args.quick else args.steps
    repeats = 1 if args.quick else args.repeats
    skip = min(5, steps // 2)
    shape = {"n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 128}
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "corpus.txt").write_text(TEXT, encoding="utf-8")
        (workdir / "recipe.yaml").write_text(
            "model: {" + ", ".join(f"{k}: {v}" for k, v in shape.items()) + "}\n"
            "data: {source: corpus.txt, dir: prepared}\n"
            f"train: {{max_steps: {steps}, batch_size: {args.batch_size}, eval_interval: 0, eval_batches: 1,"
            " log_interval: 1, checkpoint_interval: 0, warmup_steps: 5, device: cpu}\n"
        )
        configs = {
            "1 process, 1 thread": dict(nproc=1, threads=1),
            "1 process, 2 threads": dict(nproc=1, threads=2),
            "2 processes (DDP, gloo), 1 thread each": dict(nproc=2, threads=1),
            "2 processes (FSDP2, gloo), 1 thread each": dict(nproc=2, threads=1, strategy="fsdp"),
        }
        samples: dict[str, list[float]] = {name: [] for name in configs}
        for round_ in range(repeats):  # alternate, so background load hits every configuration alike
            for i, (name, kw) in enumerate(configs.items()):
                per_step = run(workdir, f"r{round_}c{i}", args=[], **kw)
                samples[name].extend(per_step[skip:-1])  # the last step's record includes the final eval
    speed = {name: median(values) for name, values in samples.items()}
    base = speed["1 process, 1 thread"]
    rows = []
    for name, value in speed.items():
        cores = int(configs[name]["nproc"]) * int(configs[name]["threads"])
        rows.append([name, cores, f"{value:,.0f}", f"{value / base:.2f}x", f"{value / (cores * base):.2f}"])
    print("## Data-parallel scaling on CPU\n")
    tokens = args.batch_size * shape["block_size"]
    print(f"Model {shape}, {tokens} tokens per process per step, {steps} steps, median of per-step tokens/s.\n")
    print(markdown_table(["configuration", "cores", "tokens/s", "speed-up", "efficiency"], rows))
    efficiency = speed["2 processes (DDP, gloo), 1 thread each"] / (2 * base)
    fsdp_efficiency = speed["2 processes (FSDP2, gloo), 1 thread each"] / (2 * base)
    print(f"\nefficiency (2-process tokens/s / (2 x 1-process tokens/s)): DDP {efficiency:.2f}, "
          f"FSDP2 {fsdp_efficiency:.2f}\n")
    print("\n".join(environment_lines({"benchmark": "distributed_scaling"}, load_at_start)))


if __name__ == "__main__":
    main()
