"""``gptkit train`` refusing what it cannot do well, as one line and a non-zero exit, before it
trains: an out_dir that holds a checkpoint or is a file, a resume it cannot do exactly, and a run
whose loss diverges to inf/nan."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cli import assert_one_line_error, finished_tiny_run, gptkit


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A recipe and a finished 3-step run in ``run`` (trained in this process: quicker than the CLI)."""
    return finished_tiny_run(tmp_path_factory.mktemp("train-errors"), max_steps=3)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ((), ("already holds a checkpoint (step 3)", "--resume", "--overwrite")),
        (("--train.out_dir=recipe.yaml",), ("train.out_dir recipe.yaml is a file, not a directory",)),
        (("--resume", "--train.max_steps=2"), ("train.max_steps 2 is below the checkpoint's step 3",)),
    ],
    ids=["checkpoint-there", "out-dir-is-a-file", "max-steps-below"],
)
def test_train_refuses_before_training_in_one_line(workdir: Path, args: tuple[str, ...], fragments) -> None:
    before = (workdir / "run" / "metrics.jsonl").read_text()
    result = gptkit("train", "recipe.yaml", "--quiet", *args, cwd=workdir, check=False)
    assert_one_line_error(result, *fragments)
    assert (workdir / "run" / "metrics.jsonl").read_text() == before


def test_resume_without_optimizer_state_is_one_line(workdir: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(workdir / "run", tmp_path / "run")
    (tmp_path / "run" / "checkpoint" / "optimizer.safetensors").unlink()
    result = gptkit("train", "recipe.yaml", "--quiet", "--resume", "--train.max_steps=6",
                    f"--train.out_dir={tmp_path / 'run'}", cwd=workdir, check=False)
    assert_one_line_error(result, "optimizer.safetensors is missing", "weights-only checkpoint")


def test_a_diverging_run_fails_in_one_line(workdir: Path, tmp_path: Path) -> None:
    result = gptkit("train", "recipe.yaml", "--quiet", "--train.lr=1e30", "--train.max_steps=20",
                    f"--train.out_dir={tmp_path / 'diverged'}", cwd=workdir, check=False)
    assert_one_line_error(result, "training diverged: loss is", "lower train.lr")
    assert "done:" not in result.stdout
    assert not (tmp_path / "diverged" / "checkpoint").exists()  # no checkpoint of a diverged model
