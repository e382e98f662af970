"""Muon and fp16 loss scaling under the sharded strategies (FSDP2, tensor parallel).

In one process through a real one-rank gloo process group (fast): Muon on DTensor parameters
trains like Muon on plain ones, and an overflowing fp16 step is skipped on the sharded path.
Under real torchrun launches (slow): with Muon, 2 FSDP ranks with batch B match 1 process with 2B
and 2 TP ranks match 1 process with the same batch; fp16 under FSDP (and Muon + fp16 on a 2x2
fsdp+tp mesh) tracks the 1-process run; an overflow in one rank's shard skips the step on every
rank; a sharded Muon + fp16 run resumes exactly (momentum buffers and loss scale in the checkpoint).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from gptkit.config import ModelConfig, TrainConfig
from gptkit.distributed import mesh
from gptkit.distributed.precision import PrecisionPolicy, ShardedGradScaler
from gptkit.model.gpt import GPT
from gptkit.train.trainer import Trainer, causal_lm_loss
from tests.integration.test_distributed import clean_env, cli_train, losses, torchrun_train, workdir  # noqa: F401

TINY = ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=32)


class FixedBatches:
    """The same (x, y) batch every step, (4, 16) token ids each."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, TINY.vocab_size, (4, TINY.block_size + 1), generator=g)
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        self.calls = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.x, self.y

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


@pytest.fixture()
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A real gloo process group of one rank: fsdp then makes DTensors, as it does on many."""
    mesh._device_mesh.cache_clear()  # a mesh cached from another group would outlive it
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
        mesh._device_mesh.cache_clear()


def make_trainer(model: GPT, loss_fn=causal_lm_loss, **train) -> Trainer:
    config = TrainConfig(max_steps=4, warmup_steps=0, lr=3e-3, min_lr=3e-3, batch_size=4, **train)
    return Trainer(model, config, train_batches=FixedBatches(), loss_fn=loss_fn)


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# ------------------------------------------------------------------ one rank, in process (fast)


def test_muon_on_fsdp_dtensors_trains_like_plain_muon(one_rank_group) -> None:
    torch.manual_seed(0)
    model = GPT(TINY)
    plain = make_trainer(copy.deepcopy(model), optimizer="muon")
    sharded = make_trainer(model, optimizer="muon", strategy="fsdp")
    muon_group = next(g for g in sharded.optimizer.param_groups if g["use_muon"])
    assert muon_group["params"] and all(isinstance(p, DTensor) for p in muon_group["params"])
    for step in range(3):
        expected, _ = plain.train_step()
        actual, _ = sharded.train_step()
        assert abs(actual - expected) <= 1e-6 * expected, (step, actual, expected)
    # Momentum stays sharded like its parameter (elementwise), the AdamW moments too.
    p = muon_group["params"][0]
    buffer = sharded.optimizer.state[p]["momentum_buffer"]
    assert isinstance(buffer, DTensor) and buffer.placements == p.placements
    # (Adam divides near-zero gradients by their own size: rounding noise there is ~1e-6 absolute.)
    for a, b in zip(plain.model.parameters(), sharded.model.parameters()):
        torch.testing.assert_close(local(b), a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_fp16_overflow_is_skipped_on_the_sharded_path(one_rank_group, optimizer: str) -> None:
    overflow_on = {2}

    def loss_fn(model, batch):
        loss = causal_lm_loss(model, batch)
        # Finite in float32, but times the 2**16 loss scale the gradients overflow: a real fp16 overflow.
        return loss * 1e36 if trainer.step + 1 in overflow_on else loss

    torch.manual_seed(0)
    trainer = make_trainer(GPT(TINY), loss_fn, optimizer=optimizer, precision="fp16", strategy="fsdp")
    assert isinstance(trainer.precision.scaler, ShardedGradScaler)
    trainer.train_step()
    scale = trainer.precision.loss_scale
    before = [local(p).detach().clone() for p in trainer.model.parameters()]
    trainer.train_step()  # step 2 overflows
    assert trainer.skipped_steps == 1 and trainer.precision.loss_scale == scale / 2
    assert all(torch.equal(a, local(p)) for a, p in zip(before, trainer.model.parameters()))
    loss, grad_norm = trainer.train_step()
    assert trainer.skipped_steps == 1 and trainer.precision.loss_scale == scale / 2
    assert math.isfinite(loss) and 0 < grad_norm < 100  # unscaled in place (scaled it would be ~1e4 x)
    assert all(torch.isfinite(local(p)).all() for p in trainer.model.parameters())
    assert not all(torch.equal(a, local(p)) for a, p in zip(before, trainer.model.parameters()))
    # The scaler state is GradScaler's: a sharded run's checkpoint resumes in one process and back.
    state = trainer.precision.state_dict()
    assert json.loads(json.dumps(state)) == state and state["scale"] == scale / 2
    plain = PrecisionPolicy("fp16", "cpu")
    plain.load_state_dict(state)
    assert plain.state_dict() == state


# ------------------------------------------------------------------ real torchrun launches (slow)


def assert_close_losses(expected: list[float], actual: list[float], steps: int, rtol: float) -> None:
    assert len(expected) == len(actual) == steps, (expected, actual)
    for step, (a, b) in enumerate(zip(expected, actual), start=1):
        assert abs(a - b) <= rtol * abs(a), (step, a, b)
    assert expected[-1] < expected[0] - 0.3  # it trained, so the comparison means something


def trainer_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())


@pytest.mark.slow
@pytest.mark.distributed
def test_muon_on_two_fsdp_ranks_matches_one_process_with_the_combined_batch(workdir: Path) -> None:  # noqa: F811
    B, common = 4, ("--train.optimizer=muon", "--train.max_steps=10")
    cli_train(workdir, *common, f"--train.batch_size={2 * B}", "--train.out_dir=single")
    torchrun_train(workdir, *common, "--train.strategy=fsdp", f"--train.batch_size={B}", "--train.out_dir=fsdp")
    assert_close_losses(losses(workdir / "single"), losses(workdir / "fsdp"), 10, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_muon_on_two_tp_ranks_matches_one_process_with_the_same_batch(workdir: Path) -> None:  # noqa: F811
    common = ("--train.optimizer=muon", "--train.max_steps=10", "--train.batch_size=4")
    cli_train(workdir, *common, "--train.out_dir=single")
    torchrun_train(workdir, *common, "--train.strategy=tp", "--train.out_dir=tp")
    assert_close_losses(losses(workdir / "single"), losses(workdir / "tp"), 10, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_fp16_on_two_fsdp_ranks_tracks_one_process_fp16(workdir: Path) -> None:  # noqa: F811
    B, common = 4, ("--train.precision=fp16", "--train.max_steps=10")
    cli_train(workdir, *common, f"--train.batch_size={2 * B}", "--train.out_dir=single")
    torchrun_train(workdir, *common, "--train.strategy=fsdp", f"--train.batch_size={B}", "--train.out_dir=fsdp")
    # Half-precision matmuls over half the batch may round differently from the whole batch
    # (observed: 2e-6 relative at most), hence a looser bound than fp32's 1e-5.
    assert_close_losses(losses(workdir / "single"), losses(workdir / "fsdp"), 10, rtol=1e-4)
    # The same steps were taken (none skipped) and the loss scale went the same way.
    assert trainer_state(workdir / "fsdp")["grad_scaler"] == trainer_state(workdir / "single")["grad_scaler"]


@pytest.mark.slow
@pytest.mark.distributed
def test_muon_fp16_on_a_2x2_fsdp_tp_mesh_tracks_one_process(workdir: Path) -> None:  # noqa: F811
    # FSDP over TP-sharded weights makes (_StridedShard, Shard) placements: the full Muon update
    # must be cut back into exactly those shards. dp=2 x batch 2 = one process with batch 4.
    common = ("--train.optimizer=muon", "--train.precision=fp16", "--train.max_steps=8")
    cli_train(workdir, *common, "--train.batch_size=4", "--train.out_dir=single")
    torchrun_train(workdir, *common, "--train.strategy=fsdp+tp", "--train.tp_size=2", "--train.batch_size=2",
                   "--train.out_dir=both", nproc=4)
    assert_close_losses(losses(workdir / "single"), losses(workdir / "both"), 8, rtol=1e-4)


OVERFLOW_ON_RANK_1 = """
import os, sys
from pathlib import Path
from torch.distributed.tensor import DTensor
from gptkit.cli import main
from gptkit.distributed.precision import PrecisionPolicy
from gptkit.train.trainer import Trainer

unscale, train_step = PrecisionPolicy.unscale_, Trainer.train_step
calls = 0

def unscale_(self, optimizer):
    # Step 3: an inf in one gradient shard that only rank 1 holds (after FSDP's reduce-scatter).
    global calls
    calls += 1
    if calls == 3 and os.environ["RANK"] == "1":
        grad = next(p.grad for g in optimizer.param_groups for p in g["params"] if isinstance(p.grad, DTensor))
        grad.to_local().view(-1)[0] = float("inf")
    unscale(self, optimizer)

def step_and_report(self):
    result = train_step(self)
    Path(f"skipped.{os.environ['RANK']}").write_text(str(self.skipped_steps))
    return result

PrecisionPolicy.unscale_, Trainer.train_step = unscale_, step_and_report
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_an_overflow_on_one_fsdp_rank_skips_the_step_on_all(workdir: Path) -> None:  # noqa: F811
    (workdir / "overflow.py").write_text(OVERFLOW_ON_RANK_1)
    cli_train(workdir, "--train.max_steps=1", "--train.out_dir=warmup")  # prepare the data up front
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "overflow.py",
        "train", "recipe.yaml", "--quiet", "--train.strategy=fsdp", "--train.precision=fp16",
        "--train.optimizer=muon", "--train.batch_size=4", "--train.max_steps=5", "--train.out_dir=overflow",
    ]
    result = subprocess.run(command, cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 saw no inf itself, yet skipped too: the found-inf flag was all-reduced.
    assert [(workdir / f"skipped.{rank}").read_text() for rank in (0, 1)] == ["1", "1"]
    state = trainer_state(workdir / "overflow")["grad_scaler"]
    assert state["scale"] == 2.0**15 and state["_growth_tracker"] == 2  # halved at step 3, 2 clean steps since
    assert all(math.isfinite(loss) for loss in losses(workdir / "overflow"))


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_muon_fp16_resume_is_exact(workdir: Path) -> None:  # noqa: F811
    """Muon's sharded momentum buffers and the loss scale go through the sharded checkpoint."""
    common = ("--train.strategy=fsdp", "--train.batch_size=4", "--train.optimizer=muon", "--train.precision=fp16")
    torchrun_train(workdir, *common, "--train.max_steps=10", "--train.out_dir=straight")
    torchrun_train(workdir, *common, "--train.max_steps=6", "--train.lr_decay_steps=10", "--train.out_dir=split")
    torchrun_train(workdir, "--resume", "--train.out_dir=split", "--train.max_steps=10")
    assert losses(workdir / "split") == losses(workdir / "straight")
    assert trainer_state(workdir / "split")["grad_scaler"] == trainer_state(workdir / "straight")["grad_scaler"]
