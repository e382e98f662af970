"""Distributed checkpoints (torch.distributed.checkpoint): a checkpoint written by several ranks
resumes at another world size exactly, consolidates into the single-file format, and a shape
mismatch is a one-line CheckpointError rather than a DCP traceback.

The data position maps across world sizes because BatchLoader counts *global* batches: global
batch i of 2 ranks with batch B holds permuted windows [(2i + r)B, +B) for r = 0, 1, i.e. windows
[2iB, 2iB + 2B), which is batch i of 1 process with batch 2B. So {"epoch", "batch_index"} is the
same number in both runs (asserted below), and the losses continue as one run.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gptkit
from gptkit.checkpoint import SHARDED_DIR, WEIGHTS_FILE, load_model_weights
from gptkit.config import ModelConfig, TrainConfig
from gptkit.errors import CheckpointError
from gptkit.model.gpt import GPT
from gptkit.train.checkpointing import load_sharded_training_state, save_sharded_training_checkpoint
from gptkit.train.optim import build_optimizer
from tests.integration.test_distributed import clean_env, cli_train, losses, torchrun_train, workdir  # noqa: F401

N, B = 6, 4


def train_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gptkit.cli", *args]
    return subprocess.run(command, cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)


def assert_same_losses(expected: list[float], actual: list[float]) -> None:
    assert len(expected) == len(actual) == 2 * N, (expected, actual)
    for step, (a, b) in enumerate(zip(expected, actual), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
    assert expected[-1] < expected[0] - 0.3  # it trained, so the comparison means something


# ------------------------------------------------------------------ in one process (fast)


def tiny(n_layer: int = 1) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=n_layer, n_head=2, d_model=16, block_size=8, vocab_size=40))


def trained_step(model: GPT, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randint(0, 40, (2, 8))
    model(x).float().logsumexp(-1).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.fixture()
def sharded_checkpoint(tmp_path: Path) -> tuple[Path, GPT, torch.optim.Optimizer]:
    """A sharded checkpoint written through a real (one-rank, gloo) process group."""
    model = tiny()
    optimizer = build_optimizer(model, TrainConfig())
    trained_step(model, optimizer)
    directory = tmp_path / "checkpoint"
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        save_sharded_training_checkpoint(
            directory, model=model, optimizer=optimizer, step=1, run_config={}, data_state={"epoch": 0, "batch_index": 1},
            tokenizer_json=None,
        )
    finally:
        dist.destroy_process_group()
    return directory, model, optimizer


def test_sharded_checkpoint_loads_without_a_process_group(sharded_checkpoint) -> None:
    directory, model, optimizer = sharded_checkpoint
    assert (directory / SHARDED_DIR / ".metadata").is_file()
    assert not list(directory.parent.glob(".checkpoint*"))  # the temporary directory was renamed away
    state = json.loads((directory / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["sharded"] == {"world_size": 1, "tp_row_order": 1}
    fresh = tiny()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh_optimizer = build_optimizer(fresh, TrainConfig())
    load_sharded_training_state(directory, fresh, fresh_optimizer)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(fresh_optimizer.state) == len(optimizer.state) > 0
    for p, q in zip(optimizer.state, fresh_optimizer.state):
        for key in optimizer.state[p]:
            assert torch.equal(optimizer.state[p][key], fresh_optimizer.state[q][key]), key


def test_sharded_only_checkpoint_consolidates_on_load_and_convert(sharded_checkpoint, tmp_path: Path) -> None:
    directory, model, _ = sharded_checkpoint
    (directory / WEIGHTS_FILE).unlink()  # as FSDP/TP leave it: shards only
    loaded = gptkit.load(directory)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    result = train_cli(tmp_path, "convert", str(directory), str(tmp_path / "single"), "--to", "gptkit")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "single" / WEIGHTS_FILE).is_file()
    again = tiny()
    load_model_weights(again, tmp_path / "single" / WEIGHTS_FILE)
    assert torch.equal(again.state_dict()["token_embedding.weight"], model.state_dict()["token_embedding.weight"])


def test_sharded_shape_mismatch_is_one_line(sharded_checkpoint, tmp_path: Path) -> None:
    directory, _, _ = sharded_checkpoint
    bigger = tiny(n_layer=2)
    with pytest.raises(CheckpointError, match=r"does not fit this model: no tensor model\.blocks\.1\.") as info:
        load_sharded_training_state(directory, bigger, build_optimizer(bigger, TrainConfig()))
    assert "\n" not in str(info.value)
    wider = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=8, vocab_size=40))
    with pytest.raises(CheckpointError, match=r"tensor model\.token_embedding\.weight has shape \(40, 16\), "
                                              r"this model needs \(40, 32\)"):
        load_sharded_training_state(directory, wider, build_optimizer(wider, TrainConfig()))
    # gptkit.load / generate on shards whose config.json lies about the shape: the same kind of line.
    (directory / WEIGHTS_FILE).unlink()
    config = json.loads((directory / "config.json").read_text())
    config["model"]["d_model"] = 32
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has shape \(40, 16\), this model config needs \(40, 32\)"):
        gptkit.load(directory)


def test_sharded_checkpoint_missing_a_shard_file_is_one_line(sharded_checkpoint, tmp_path: Path) -> None:
    # A partial copy, or a run whose ranks did not share train.out_dir: .metadata names a shard
    # file that is not there. DCP raises a CheckpointException, a BaseException, not an Exception.
    directory, _, _ = sharded_checkpoint
    (directory / WEIGHTS_FILE).unlink()
    for shard in (directory / SHARDED_DIR).glob("*.distcp"):
        shard.unlink()
    with pytest.raises(CheckpointError, match=r"cannot read sharded checkpoint .*No such file or directory") as info:
        gptkit.load(directory)
    assert "\n" not in str(info.value)
    fresh = tiny()
    with pytest.raises(CheckpointError, match=r"cannot read sharded checkpoint .*No such file or directory"):
        load_sharded_training_state(directory, fresh, build_optimizer(fresh, TrainConfig()))
    result = train_cli(tmp_path, "convert", str(directory), str(tmp_path / "single"), "--to", "gptkit")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: cannot read sharded checkpoint" in result.stderr and not (tmp_path / "single").exists()


def test_a_failed_shard_write_is_an_oserror_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    # Trainer.save_checkpoint turns an OSError into its one-line "cannot save the checkpoint" error;
    # DCP wraps a rank's write failure in a CheckpointException (a BaseException) instead.
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    model = tiny()
    optimizer = build_optimizer(model, TrainConfig())
    trained_step(model, optimizer)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        with pytest.raises(OSError, match="No space left on device"):
            save_sharded_training_checkpoint(
                tmp_path / "checkpoint", model=model, optimizer=optimizer, step=1, run_config={},
                data_state={"epoch": 0, "batch_index": 1}, tokenizer_json=None,
            )
    finally:
        dist.destroy_process_group()
    assert not list(tmp_path.glob("*checkpoint*"))  # neither the checkpoint nor its temporary


# ------------------------------------------------------------------ real torchrun launches (slow)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_ddp_checkpoint_resumes_on_one_process_exactly(workdir: Path) -> None:  # noqa: F811
    schedule = (f"--train.lr_decay_steps={2 * N}",)
    cli_train(workdir, f"--train.batch_size={2 * B}", f"--train.max_steps={2 * N}", *schedule, "--train.out_dir=straight")
    cli_train(workdir, f"--train.batch_size={2 * B}", f"--train.max_steps={N}", *schedule, "--train.out_dir=half")
    torchrun_train(workdir, "--train.strategy=ddp", f"--train.batch_size={B}", f"--train.max_steps={N}", *schedule,
                   "--train.out_dir=split")
    checkpoint = workdir / "split" / "checkpoint"
    assert (checkpoint / SHARDED_DIR / ".metadata").is_file() and (checkpoint / WEIGHTS_FILE).is_file()
    ddp_state = json.loads((checkpoint / "trainer_state.json").read_text())
    single_state = json.loads((workdir / "half" / "checkpoint" / "trainer_state.json").read_text())
    assert ddp_state["data"] == single_state["data"]  # global batch 2 x B == batch 2B
    assert ddp_state["sharded"] == {"world_size": 2, "tp_row_order": 1}
    result = train_cli(workdir, "train", "recipe.yaml", "--quiet", "--resume", "--train.out_dir=split",
                       "--train.strategy=single", f"--train.batch_size={2 * B}", f"--train.max_steps={2 * N}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(losses(workdir / "straight"), losses(workdir / "split"))
    # A changed model shape is refused in one line, not with a DCP traceback.
    result = train_cli(workdir, "train", "recipe.yaml", "--quiet", "--resume", "--train.out_dir=split",
                       f"--train.max_steps={3 * N}", "--model.d_model=64")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.d_model 32 -> 64" in errors[0], result.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_one_process_checkpoint_resumes_on_two_ddp_ranks_exactly(workdir: Path) -> None:  # noqa: F811
    schedule = (f"--train.lr_decay_steps={2 * N}",)
    cli_train(workdir, f"--train.batch_size={2 * B}", f"--train.max_steps={2 * N}", *schedule, "--train.out_dir=straight")
    cli_train(workdir, f"--train.batch_size={2 * B}", f"--train.max_steps={N}", *schedule, "--train.out_dir=split")
    torchrun_train(workdir, "--resume", "--train.out_dir=split", "--train.strategy=ddp", f"--train.batch_size={B}",
                   f"--train.max_steps={2 * N}")
    assert_same_losses(losses(workdir / "straight"), losses(workdir / "split"))
    # The 2-rank run saved a sharded checkpoint; it loads for generation as it is.
    checkpoint = workdir / "split" / "checkpoint"
    assert (checkpoint / SHARDED_DIR / ".metadata").is_file()
    from_file = gptkit.load(checkpoint)
    shutil.copytree(checkpoint, workdir / "shards_only")
    (workdir / "shards_only" / WEIGHTS_FILE).unlink()
    from_shards = gptkit.load(workdir / "shards_only")
    for (name, a), b in zip(from_file.state_dict().items(), from_shards.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_fsdp_checkpoint_resumes_on_one_process_exactly(workdir: Path) -> None:  # noqa: F811
    schedule = (f"--train.lr_decay_steps={2 * N}",)
    cli_train(workdir, f"--train.batch_size={2 * B}", f"--train.max_steps={2 * N}", *schedule, "--train.out_dir=straight")
    torchrun_train(workdir, "--train.strategy=fsdp", f"--train.batch_size={B}", f"--train.max_steps={N}", *schedule,
                   "--train.out_dir=split")
    checkpoint = workdir / "split" / "checkpoint"
    assert (checkpoint / SHARDED_DIR / ".metadata").is_file()
    assert not (checkpoint / WEIGHTS_FILE).exists()  # sharded parameters: no single file from rank 0
    result = train_cli(workdir, "train", "recipe.yaml", "--quiet", "--resume", "--train.out_dir=split",
                       "--train.strategy=single", f"--train.batch_size={2 * B}", f"--train.max_steps={2 * N}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(losses(workdir / "straight"), losses(workdir / "split"))
    # The 1-process resume wrote a single-file checkpoint again; generation works on it directly.
    assert (checkpoint / WEIGHTS_FILE).is_file() and not (checkpoint / SHARDED_DIR).exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_one_process_checkpoint_resumes_on_two_fsdp_ranks_exactly(workdir: Path) -> None:  # noqa: F811
    schedule = (f"--train.lr_decay_steps={2 * N}",)
    cli_train(workdir, f"--train.batch_size={2 * B}", f"--train.max_steps={2 * N}", *schedule, "--train.out_dir=straight")
    cli_train(workdir, f"--train.batch_size={2 * B}", f"--train.max_steps={N}", *schedule, "--train.out_dir=split")
    torchrun_train(workdir, "--resume", "--train.out_dir=split", "--train.strategy=fsdp", f"--train.batch_size={B}",
                   f"--train.max_steps={2 * N}")
    assert_same_losses(losses(workdir / "straight"), losses(workdir / "split"))
    checkpoint = workdir / "split" / "checkpoint"
    assert (checkpoint / SHARDED_DIR / ".metadata").is_file() and not (checkpoint / WEIGHTS_FILE).exists()
    assert gptkit.load(checkpoint).config.n_layer == 2  # shards only: consolidated on load


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_tp_checkpoint_resumes_on_one_process_exactly(workdir: Path) -> None:  # noqa: F811
    """Tensor parallelism splits the weights, not the batch: 2 TP ranks with batch B train like
    1 process with batch B, and the TP shards (DTensors) reassemble on 1 process."""
    schedule = (f"--train.lr_decay_steps={2 * N}",)
    cli_train(workdir, f"--train.batch_size={B}", f"--train.max_steps={2 * N}", *schedule, "--train.out_dir=straight")
    torchrun_train(workdir, "--train.strategy=tp", f"--train.batch_size={B}", f"--train.max_steps={N}", *schedule,
                   "--train.out_dir=split")
    checkpoint = workdir / "split" / "checkpoint"
    assert (checkpoint / SHARDED_DIR / ".metadata").is_file() and not (checkpoint / WEIGHTS_FILE).exists()
    # Consolidating TP shards restores the model's own row order of the fused qkv weights.
    cli_train(workdir, f"--train.batch_size={B}", f"--train.max_steps={N}", *schedule, "--train.out_dir=half")
    consolidated, reference = gptkit.load(checkpoint), gptkit.load(workdir / "half")
    for (name, a), b in zip(reference.state_dict().items(), consolidated.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    result = train_cli(workdir, "train", "recipe.yaml", "--quiet", "--resume", "--train.out_dir=split",
                       "--train.strategy=single", f"--train.max_steps={2 * N}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(losses(workdir / "straight"), losses(workdir / "split"))


@pytest.mark.slow
@pytest.mark.distributed
def test_one_process_checkpoint_resumes_on_two_tp_ranks_exactly(workdir: Path) -> None:  # noqa: F811
    schedule = (f"--train.lr_decay_steps={2 * N}",)
    cli_train(workdir, f"--train.batch_size={B}", f"--train.max_steps={2 * N}", *schedule, "--train.out_dir=straight")
    cli_train(workdir, f"--train.batch_size={B}", f"--train.max_steps={N}", *schedule, "--train.out_dir=split")
    torchrun_train(workdir, "--resume", "--train.out_dir=split", "--train.strategy=tp", f"--train.max_steps={2 * N}")
    assert_same_losses(losses(workdir / "straight"), losses(workdir / "split"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_fsdp_checkpoint_resumes_on_two_tp_ranks_exactly(workdir: Path) -> None:  # noqa: F811
    """FSDP's optimizer has 2 parameter groups, TP's 4 (split by device mesh): the resume reads
    the per-parameter state by name and keeps this run's groups."""
    schedule = (f"--train.lr_decay_steps={2 * N}",)
    cli_train(workdir, f"--train.batch_size={2 * B}", f"--train.max_steps={2 * N}", *schedule, "--train.out_dir=straight")
    torchrun_train(workdir, "--train.strategy=fsdp", f"--train.batch_size={B}", f"--train.max_steps={N}", *schedule,
                   "--train.out_dir=split")
    torchrun_train(workdir, "--resume", "--train.out_dir=split", "--train.strategy=tp", f"--train.batch_size={2 * B}",
                   f"--train.max_steps={2 * N}")
    assert_same_losses(losses(workdir / "straight"), losses(workdir / "split"))


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_tp_2x2_checkpoint_resumes_on_two_tp_ranks_exactly(workdir: Path) -> None:  # noqa: F811
    """dp=2 x tp=2 (4 ranks, batch 2 per dp group) -> tp=2 on 2 ranks with batch 4: the 2-D
    DTensors reshard onto a 1-D mesh and the data position (global batch 4) carries over."""
    n = 3
    schedule = (f"--train.lr_decay_steps={2 * n}",)
    cli_train(workdir, "--train.batch_size=4", f"--train.max_steps={2 * n}", *schedule, "--train.out_dir=straight")
    torchrun_train(workdir, "--train.strategy=fsdp+tp", "--train.tp_size=2", "--train.batch_size=2",
                   f"--train.max_steps={n}", *schedule, "--train.out_dir=split", nproc=4)
    assert json.loads((workdir / "split" / "checkpoint" / "trainer_state.json").read_text())["sharded"] == {
        "world_size": 4, "tp_row_order": 2}
    torchrun_train(workdir, "--resume", "--train.out_dir=split", "--train.strategy=tp", "--train.batch_size=4",
                   f"--train.max_steps={2 * n}")
    expected, actual = losses(workdir / "straight"), losses(workdir / "split")
    assert len(expected) == len(actual) == 2 * n
    for step, (a, b) in enumerate(zip(expected, actual), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
