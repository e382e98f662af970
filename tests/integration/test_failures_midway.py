"""Failures part-way through a command: a full disk (a file size limit), SIGTERM, a run directory
used by two runs, data prepared anew under a running trainer, an --overwrite run that stopped
early, a save that died between its two renames. Each ends in one line and loses nothing."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gptkit.config import load_run_config
from gptkit.errors import CheckpointError, ConfigError
from gptkit.train import run_training
from gptkit.train.run import start_run
from tests.integration.test_cli import assert_one_line_error, finished_tiny_run, gptkit


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A recipe and a finished 4-step run in ``run`` (trained in this process: quicker than the CLI)."""
    return finished_tiny_run(tmp_path_factory.mktemp("midway"), max_steps=4, train_extra=", log_interval: 1")


def copy_run(workdir: Path, tmp_path: Path) -> Path:
    shutil.copytree(workdir / "run", tmp_path / "run")
    return tmp_path / "run"


def limited(kib: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``gptkit *args`` with writes past ``kib`` KiB per file failing (EFBIG), as on a full disk."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "gptkit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


def test_a_checkpoint_save_that_fails_on_a_full_disk_is_one_line(workdir: Path, tmp_path: Path) -> None:
    run = copy_run(workdir, tmp_path)
    weights = (run / "checkpoint" / "model.safetensors").read_bytes()
    size = max(p.stat().st_size for p in (run / "checkpoint").iterdir())
    result = limited(size // 1024 - 1, "train", "recipe.yaml", "--quiet", "--resume", "--train.max_steps=6",
                     f"--train.out_dir={run}", cwd=workdir)
    assert_one_line_error(result, "cannot save the checkpoint of step 6", "File too large",
                          "the checkpoint of step 4 there is kept")
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == weights
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_a_metrics_log_that_cannot_grow_is_one_line(workdir: Path, tmp_path: Path) -> None:
    run = copy_run(workdir, tmp_path)
    kib = (run / "metrics.jsonl").stat().st_size // 1024 + 1
    result = limited(kib, "train", "recipe.yaml", "--quiet", "--resume", "--train.max_steps=40",
                     f"--train.out_dir={run}", cwd=workdir)
    assert_one_line_error(result, f"cannot write the metrics log {run / 'metrics.jsonl'}", "File too large")


def test_a_conversion_that_fails_on_a_full_disk_is_one_line(workdir: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    for target in ("hf", "gptkit"):
        result = limited(4, "convert", str(workdir / "run"), str(tmp_path / target), "--to", target, cwd=tmp_path)
        assert_one_line_error(result, f"cannot write {tmp_path / target}", "File too large")
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_stops_training_in_one_line_and_resume_goes_on(workdir: Path, tmp_path: Path) -> None:
    run = copy_run(workdir, tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gptkit.cli", "train", "recipe.yaml", "--quiet", "--resume",
         "--train.max_steps=100000", "--train.checkpoint_interval=1", f"--train.out_dir={run}"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen = []
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if "saved checkpoint at step 8" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert stderr.rstrip("\n").splitlines()[-1] == "error: terminated by SIGTERM"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary left behind
    step = json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
    result = gptkit("train", "recipe.yaml", "--quiet", "--resume", f"--train.max_steps={step + 2}",
                    f"--train.out_dir={run}", cwd=workdir)
    assert f"done: step {step + 2}" in result.stdout


def test_a_second_run_into_the_same_out_dir_is_refused(workdir: Path, tmp_path: Path) -> None:
    run = copy_run(workdir, tmp_path)
    # Another process holds the run directory (as a run in progress does).
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from gptkit.train.run import lock_run_directory; "
         f"lock = lock_run_directory(Path({str(run)!r})); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = (run / "metrics.jsonl").read_text()
        result = gptkit("train", "recipe.yaml", "--quiet", "--resume", "--train.max_steps=6",
                        f"--train.out_dir={run}", cwd=workdir, check=False)
        assert_one_line_error(result, f"train.out_dir {run} is in use by another gptkit run")
        assert (run / "metrics.jsonl").read_text() == before
    finally:
        holder.communicate("", timeout=60)
    result = gptkit("train", "recipe.yaml", "--quiet", "--resume", "--train.max_steps=6",
                    f"--train.out_dir={run}", cwd=workdir)
    assert "done: step 6" in result.stdout


def test_checkpoints_keep_the_tokenizer_the_run_started_with(workdir: Path, tmp_path: Path) -> None:
    shutil.copytree(workdir / "prepared", tmp_path / "prepared")
    config = load_run_config(workdir / "recipe.yaml", [
        f"--train.out_dir={tmp_path / 'run'}", f"--data.dir={tmp_path / 'prepared'}", "--train.max_steps=2",
    ])
    trainer = start_run(config)
    tokenizer = (tmp_path / "prepared" / "tokenizer.json").read_bytes()
    shutil.rmtree(tmp_path / "prepared")  # deleted (or prepared anew) while the run goes on
    trainer.fit()
    assert (tmp_path / "run" / "checkpoint" / "tokenizer.json").read_bytes() == tokenizer


def test_a_plain_run_never_deletes_the_run_an_interrupted_overwrite_set_aside(workdir: Path, tmp_path: Path) -> None:
    run = copy_run(workdir, tmp_path)
    # What `--overwrite` leaves when it stops before its first save (Ctrl-C, a full disk, ...).
    os.replace(run / "checkpoint", run / "checkpoint.previous")
    weights = (run / "checkpoint.previous" / "model.safetensors").read_bytes()
    config = load_run_config(workdir / "recipe.yaml", [f"--train.out_dir={run}"])
    with pytest.raises(ConfigError, match=r"holds an earlier run's checkpoint \(step 4\) in .*checkpoint.previous"):
        run_training(config)
    result = gptkit("train", "recipe.yaml", "--quiet", "--resume", f"--train.out_dir={run}", cwd=workdir,
                    check=False)
    assert_one_line_error(result, "checkpoint.previous", "rename it back")
    assert (run / "checkpoint.previous" / "model.safetensors").read_bytes() == weights
    with pytest.raises(CheckpointError, match="checkpoint.previous"):
        run_training(config, resume=True)


def test_a_save_interrupted_between_its_two_renames_keeps_the_previous_checkpoint(
    workdir: Path, tmp_path: Path, monkeypatch
) -> None:
    import gptkit.fileio as fileio

    run = copy_run(workdir, tmp_path)
    weights = (run / "checkpoint" / "model.safetensors").read_bytes()
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(dst) == run / "checkpoint" and Path(src).name.endswith(".tmp"):
            raise KeyboardInterrupt  # Ctrl-C right after the old checkpoint was renamed aside
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", interrupted)
    config = load_run_config(workdir / "recipe.yaml", [f"--train.out_dir={run}", "--train.max_steps=6"])
    with pytest.raises(KeyboardInterrupt):
        run_training(config, resume=True)
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == weights
    # A process killed there (kill -9) leaves the previous one renamed aside: the next run puts it back.
    os.replace(run / "checkpoint", run / ".checkpoint.old")
    summary = run_training(config, resume=True)
    assert summary.steps == 6 and not (run / ".checkpoint.old").exists()
