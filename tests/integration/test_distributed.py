"""Several processes: DDP under a real torchrun launch trains exactly like one process with the
combined batch, a rank that dies takes the run down within a bounded time, and a bad launch is a
one-line configuration error."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptkit.distributed.setup import init_distributed
from gptkit.errors import ConfigError

TEXT = "".join(f"ROMEO {i}: But soft, what light through yonder window breaks? It is the east.\n" for i in range(300))
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
REPO = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "recipe.yaml").write_text(
        "model: {n_layer: 2, n_head: 2, d_model: 32, block_size: 32}\n"
        "data: {source: corpus.txt, dir: prepared}\n"
        "train: {max_steps: 20, eval_interval: 0, eval_batches: 1, log_interval: 1, warmup_steps: 5,"
        " lr: 0.003, checkpoint_interval: 0, device: cpu}\n"
    )
    return tmp_path


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_last(path: Path) -> str:
    return path.read_text().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ launch checks (fast)


def test_ddp_without_torchrun_is_a_config_error(monkeypatch) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"train.strategy: ddp needs torchrun's environment \(missing RANK"):
        init_distributed("ddp", torch.device("cpu"))


def test_single_strategy_refuses_several_processes(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.strategy: single runs one process but 2 were launched"):
        init_distributed("single", torch.device("cpu"))


def test_cli_reports_ddp_without_torchrun_in_one_line(workdir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", "--train.strategy=ddp"],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ddp needs torchrun's environment" in errors[0], result.stderr
    assert not (workdir / "prepared").exists()  # failed before any work


# ------------------------------------------------------------------ real launches (slow)


def torchrun_train(workdir: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", *args,
    ]
    result = subprocess.run(command, cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def cli_train(workdir: Path, *args: str) -> None:
    command = [sys.executable, "-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", *args]
    result = subprocess.run(command, cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def launch_ranks_by_hand(ranks: list[tuple[Path, list[str]]]) -> list[subprocess.Popen]:
    """One process per (working directory, arguments after the interpreter), each with torchrun's
    environment for its rank, but without torchrun: its agent would stop the other ranks as soon as
    one fails, and these tests look at what each rank does by itself."""
    port = str(free_port())
    procs = []
    for rank, (cwd, arguments) in enumerate(ranks):
        env = clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(ranks)),
                        LOCAL_WORLD_SIZE=str(len(ranks)), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, *arguments], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def stderr_of_ranks(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    """Each rank's stderr once all have ended (any still running after ``timeout`` is killed)."""
    try:
        return [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_on_two_processes_matches_one_process_with_the_combined_batch(workdir: Path) -> None:
    B = 4
    # Prepare once, so both runs read the very same shards.
    cli_train(workdir, f"--train.batch_size={2 * B}", "--train.out_dir=single")
    torchrun_train(workdir, "--train.strategy=ddp", f"--train.batch_size={B}", "--train.out_dir=ddp")
    single, ddp = losses(workdir / "single"), losses(workdir / "ddp")
    assert len(single) == len(ddp) == 20
    for step, (a, b) in enumerate(zip(single, ddp), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
    assert single[-1] < single[0] - 0.5  # it trained, so the comparison means something
    # The val loss too: between them the ranks evaluate the set of the combined batch, not B each.
    single_val, ddp_val = (
        json.loads(read_last(workdir / run / "metrics.jsonl"))["val_loss"] for run in ("single", "ddp")
    )
    assert abs(single_val - ddp_val) <= 1e-5 * abs(single_val), (single_val, ddp_val)
    # Only rank 0 wrote: one record per step, and one checkpoint with the global data position.
    state = json.loads((workdir / "ddp" / "checkpoint" / "trainer_state.json").read_text())
    single_state = json.loads((workdir / "single" / "checkpoint" / "trainer_state.json").read_text())
    assert state["data"] == single_state["data"]
    assert json.loads((workdir / "ddp" / "checkpoint" / "config.json").read_text())["run"]["train"]["strategy"] == "ddp"


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_resume_is_exact(workdir: Path) -> None:
    # Dropout draws a different stream on each rank; resume must restore every rank's.
    common = ("--train.strategy=ddp", "--train.batch_size=4", "--model.dropout=0.1")
    torchrun_train(workdir, *common, "--train.out_dir=straight")
    torchrun_train(workdir, *common, "--train.out_dir=split", "--train.max_steps=10", "--train.lr_decay_steps=20")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", "--resume",
        "--train.out_dir=split", "--train.max_steps=20",
    ]
    result = subprocess.run(command, cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(workdir / "split") == losses(workdir / "straight")
    state = json.loads((workdir / "split" / "checkpoint" / "trainer_state.json").read_text())
    assert len(state["rank_rng"]) == 2 and state["rank_rng"][0] != state["rank_rng"][1]


CRASH_ON_RANK_1 = """
import os, sys
from gptkit.train.trainer import Trainer
from gptkit.cli import main

original = Trainer.train_step

def train_step(self):
    if self.step == 3 and os.environ["RANK"] == "1":
        os._exit(3)  # a hard death (OOM kill, segfault): no clean-up, no goodbye to the group
    return original(self)

Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_dead_rank_makes_the_other_fail_within_the_timeout(workdir: Path) -> None:
    """Launched by hand (not torchrun, whose agent would kill the survivor for us): rank 0 must
    notice on its own, through the collective failing or the process-group timeout."""
    (workdir / "crash.py").write_text(CRASH_ON_RANK_1)
    cli_train(workdir, "--train.max_steps=1", "--train.out_dir=warmup")  # prepare the data up front
    arguments = ["crash.py", "train", "recipe.yaml", "--quiet", "--train.strategy=ddp", "--train.batch_size=4",
                 "--train.max_steps=1000", "--train.dist_timeout_s=15", "--train.out_dir=crash"]
    procs = launch_ranks_by_hand([(workdir, arguments), (workdir, arguments)])
    try:
        survivor_rc = procs[0].wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[1].returncode == 3
    assert survivor_rc != 0  # and within the wait's 120 s, or the wait above raised


LATE_RANK_1 = """
import json, os, sys, time
from gptkit.train.trainer import Trainer
from gptkit.cli import main

original_fit, original_step = Trainer._fit, Trainer.train_step

def _fit(self, on_step):
    if os.environ["RANK"] == "1":
        time.sleep(1.0)  # reaches the loop later (slow storage, a busier node): its clock starts later
    return original_fit(self, on_step)

def train_step(self):
    result = original_step(self)
    with open(f"lr_rank{os.environ['RANK']}.jsonl", "a") as f:
        f.write(json.dumps([self.step, self.current_lr]) + "\\n")
    return result

Trainer._fit, Trainer.train_step = _fit, train_step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_under_a_wall_clock_budget_keeps_the_ranks_in_step(workdir: Path) -> None:
    """train.max_seconds: the learning rate follows the time used and the run stops when it is
    spent; every rank must agree on both, or replicas drift apart and one rank stops while the
    other waits in a collective."""
    (workdir / "late.py").write_text(LATE_RANK_1)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "late.py", "train", "recipe.yaml", "--quiet", "--train.strategy=ddp", "--train.batch_size=4",
        "--train.max_steps=100000", "--train.max_seconds=2", "--train.dist_timeout_s=30", "--train.out_dir=budget",
    ]
    result = subprocess.run(command, cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = (workdir / "lr_rank0.jsonl").read_text().splitlines()
    rank1 = (workdir / "lr_rank1.jsonl").read_text().splitlines()
    assert len(rank0) > 1 and rank0 == rank1  # same steps, same learning rate at each
    state = json.loads((workdir / "budget" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == len(rank0) == len(losses(workdir / "budget"))


@pytest.mark.slow
@pytest.mark.distributed
def test_a_data_error_on_rank_0_stops_every_rank_with_one_line(workdir: Path) -> None:
    """Only rank 0 prepares the data; the others wait for it and must learn of its failure from
    it, not from their connections closing (a traceback) or from dist_timeout_s."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", "--train.strategy=ddp",
        "--data.source=missing.txt", "--data.dir=missing", "--train.out_dir=run",
    ]
    result = subprocess.run(command, cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "[rank1]: Traceback" not in result.stderr and "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]
    # One line per rank that got to print it: torchrun's agent may stop the other rank first.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("missing.txt does not exist" in line for line in errors), result.stderr[-3000:]
    assert not (workdir / "run").exists() and not (workdir / "missing").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_train_tensorboard_without_the_package_stops_every_rank_with_one_line(workdir: Path) -> None:
    """Only rank 0 writes TensorBoard events, but every rank must refuse the run: a rank 0 that
    stopped alone left rank 1 to die with a traceback in its first collective."""
    blocked = workdir / "blocked" / "tensorboard"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(workdir / "blocked"), env["PYTHONPATH"]])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", "--train.strategy=ddp", "--train.tensorboard=true",
        "--train.dist_timeout_s=60", "--train.out_dir=run",
    ]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "[rank1]: Traceback" not in result.stderr and "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("train.tensorboard needs the tensorboard package" in line for line in errors), result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_an_out_dir_the_ranks_do_not_share_is_a_config_error(workdir: Path, tmp_path_factory) -> None:
    """Two "nodes" (working directories) each with its own copy of the data and a relative
    train.out_dir: each rank's checkpoint shards would land in its own directory, and the run used
    to end with exit 0 and a checkpoint that cannot be read."""
    cli_train(workdir, "--train.max_steps=1", "--train.out_dir=warmup")  # prepare the data up front
    other = tmp_path_factory.mktemp("node1")
    shutil.copytree(workdir / "prepared", other / "prepared")
    shutil.copy(workdir / "recipe.yaml", other / "recipe.yaml")
    arguments = ["-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", "--train.strategy=fsdp", "--train.batch_size=4",
                 "--train.max_steps=4", "--train.dist_timeout_s=10", "--train.out_dir=run"]
    procs = launch_ranks_by_hand([(workdir, arguments), (other, arguments)])
    for p, stderr in zip(procs, stderr_of_ranks(procs)):
        assert p.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "train.out_dir run is not shared: rank 1 does not see" in errors[0], stderr
    assert not (workdir / "run").exists() and not (other / "run").exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_launched_with_different_overrides_stop_with_one_line(workdir: Path) -> None:
    """Two "nodes" launched by hand, one with another learning rate: DDP would train replicas that
    drift apart without a word. Every rank names the field instead; node-local data paths may differ."""
    cli_train(workdir, "--train.max_steps=1", "--train.out_dir=warmup")  # prepare the data up front
    shutil.copytree(workdir / "prepared", workdir / "prepared-node1")
    arguments = ["-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", "--train.strategy=ddp", "--train.batch_size=4",
                 "--train.max_steps=4", "--train.dist_timeout_s=60", "--train.out_dir=run"]
    procs = launch_ranks_by_hand(
        [(workdir, arguments), (workdir, [*arguments, "--train.lr=0.01", "--data.dir=prepared-node1"])]
    )
    for p, stderr in zip(procs, stderr_of_ranks(procs)):
        assert p.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            "error: rank 1 was launched with another recipe than rank 0: train.lr is 0.01 there, 0.003 on rank 0; "
            "launch every rank with the same recipe and overrides"
        ], stderr
    assert not (workdir / "run" / "checkpoint").exists()
