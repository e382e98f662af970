"""FSDP2, tensor parallel and both on a 2-D mesh, under real torchrun launches on CPU (gloo):
each trains like one process (same losses within 1e-5), TP splits the weights 1/N per rank and
gives the same logits, and a bad layout is a one-line configuration error.

The runs go through ``no_checkpoint.py``, which turns the end-of-run checkpoint into a no-op:
saving sharded (DTensor) state is tested with the checkpoint code, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_distributed import TEXT, clean_env

NO_CHECKPOINT = """
import sys
from gptkit.train.trainer import Trainer
from gptkit.cli import main

Trainer.save_checkpoint = lambda self: None
sys.exit(main(sys.argv[1:]))
"""

# Grouped-query attention with biases and SwiGLU: the fused qkv and [gate, up] rows must be regrouped.
RECIPE = (
    "model: {n_layer: 2, n_head: 4, n_kv_head: 2, d_model: 32, block_size: 32, mlp: swiglu, position: rope}\n"
    "data: {source: corpus.txt, dir: prepared}\n"
    "train: {max_steps: 10, eval_interval: 0, eval_batches: 1, log_interval: 1, warmup_steps: 2,"
    " lr: 0.003, checkpoint_interval: 0, device: cpu}\n"
)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "no_checkpoint.py").write_text(NO_CHECKPOINT)
    return tmp_path


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(workdir: Path, *args: str, nproc: int = 1) -> None:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *launcher, "no_checkpoint.py", "train", "recipe.yaml", "--quiet", *args]
    result = subprocess.run(command, cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same(a: list[float], b: list[float], steps: int) -> None:
    assert len(a) == len(b) == steps
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= 1e-5 * abs(x), (step, x, y)
    assert a[-1] < a[0] - 0.3  # it trained, so the comparison means something


# ------------------------------------------------------------------ launch checks (fast)


def test_tp_without_torchrun_is_a_one_line_config_error(workdir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", "--train.strategy=tp"],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tp needs torchrun's environment" in errors[0], result.stderr


# ------------------------------------------------------------------ real launches (slow)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_on_two_processes_matches_one_process_with_the_combined_batch(workdir: Path) -> None:
    train(workdir, "--train.batch_size=8", "--train.out_dir=single")
    train(workdir, "--train.strategy=fsdp", "--train.batch_size=4", "--train.out_dir=fsdp", nproc=2)
    assert_same(losses(workdir / "single"), losses(workdir / "fsdp"), 10)


@pytest.mark.slow
@pytest.mark.distributed
def test_tp_on_two_processes_matches_one_process_with_the_same_batch(workdir: Path) -> None:
    # TP ranks read the same batches: the loader's rank/world are the dp rank/size (0/1 here).
    train(workdir, "--train.batch_size=4", "--train.out_dir=single")
    train(workdir, "--train.strategy=tp", "--train.batch_size=4", "--train.out_dir=tp", nproc=2)
    assert_same(losses(workdir / "single"), losses(workdir / "tp"), 10)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_tp_on_a_2x2_mesh_matches_one_process(workdir: Path) -> None:
    # dp=2 x tp=2: each dp group reads batch 2, so one process with batch 4 sees the same data.
    train(workdir, "--train.batch_size=4", "--train.max_steps=5", "--train.out_dir=single")
    train(workdir, "--train.strategy=fsdp+tp", "--train.tp_size=2", "--train.batch_size=2",
          "--train.max_steps=5", "--train.out_dir=both", nproc=4)
    assert_same(losses(workdir / "single"), losses(workdir / "both"), 5)


TP_LOGITS = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from gptkit.config import ModelConfig, TrainConfig
from gptkit.distributed.parallelize import clip_grad_norm, parallelize
from gptkit.model.gpt import GPT

dist.init_process_group("gloo")
config = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                     position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)
torch.manual_seed(0)
reference = GPT(config)
model = GPT(config)
model.load_state_dict(reference.state_dict())
forward_model = parallelize(model, TrainConfig(strategy="tp", device="cpu"), torch.device("cpu"))
tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
expected, logits = reference(tokens), forward_model(tokens)
expected.pow(2).mean().backward()
logits.pow(2).mean().backward()
local = {name: p.to_local().numel() for name, p in model.named_parameters() if isinstance(p, DTensor)}
full = dict(reference.named_parameters())
# One file per rank: two processes printing to one pipe can interleave their lines.
Path(f"tp_report_{dist.get_rank()}.json").write_text(json.dumps({
    "rank": dist.get_rank(),
    "max_logit_diff": (expected - logits).abs().max().item(),
    "grad_norms": [clip_grad_norm(reference.parameters(), 0), clip_grad_norm(model.parameters(), 0)],
    "sharded": {name: [n, full[name].numel()] for name, n in local.items()},
}))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_tp_splits_attention_and_mlp_weights_and_gives_the_same_logits(workdir: Path) -> None:
    (workdir / "tp_logits.py").write_text(TP_LOGITS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tp_logits.py"]
    result = subprocess.run(command, cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((workdir / f"tp_report_{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["max_logit_diff"] < 1e-5
        reference_norm, tp_norm = report["grad_norms"]
        assert abs(reference_norm - tp_norm) <= 1e-5 * reference_norm
        sharded = report["sharded"]
        for layer in (0, 1):
            for name in ("attn.qkv.weight", "attn.out.weight", "mlp.up.weight", "mlp.down.weight"):
                local, total = sharded[f"blocks.{layer}.{name}"]
                assert local * 2 == total, (name, local, total)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp", "tp"])
def test_one_sharded_rank_saves_resumes_and_samples(workdir: Path, strategy: str) -> None:
    """torchrun with one process (one GPU): its parameters are still DTensors, which the one-file
    checkpoint writer cannot save (it crashed at the first save); the sharded writer saves them and
    resume replays the straight run."""
    def run(*args: str) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                   "-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", f"--train.strategy={strategy}",
                   "--model.dropout=0.1", "--train.lr_decay_steps=10", *args]
        result = subprocess.run(command, cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    run("--train.out_dir=straight")
    run("--train.out_dir=split", "--train.max_steps=5")
    # FSDP wraps even one rank's parameters as DTensors; TP of one rank leaves them whole.
    assert (workdir / "split" / "checkpoint" / "sharded").is_dir() == (strategy == "fsdp")
    run("--train.out_dir=split", "--train.max_steps=10", "--resume")
    assert losses(workdir / "split") == losses(workdir / "straight")
    sample = subprocess.run([sys.executable, "-m", "gptkit.cli", "generate", "split", "--prompt", "ROMEO",
                             "--max-new-tokens", "5", "--temperature", "0"],
                            cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0 and sample.stdout.startswith("ROMEO"), sample.stderr[-2000:]
