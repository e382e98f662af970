"""The trainer: optimizer groups, schedule, learning, exact resume and atomic checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptkit.config import TrainConfig, load_run_config
from gptkit.errors import CheckpointError
from gptkit.model import GPT
from gptkit.train import resume_run_config, run_training
from gptkit.train.optim import build_optimizer
from gptkit.train.schedule import learning_rate

TEXT = "".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog, and the cat sat on the mat.\n" for i in range(400)
)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def recipe(corpus: Path, out: Path, **train) -> list[str]:
    overrides = {
        "data.source": str(corpus),
        "data.dir": str(corpus.parent / "prepared"),
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.d_model": 32,
        "model.block_size": 32,
        "model.dropout": 0.1,  # resume must restore the RNG that dropout draws from
        "train.out_dir": str(out),
        "train.batch_size": 4,
        "train.grad_accum_steps": 2,
        "train.warmup_steps": 3,
        "train.log_interval": 1,
        "train.eval_interval": 4,
        "train.eval_batches": 2,
        "train.checkpoint_interval": 0,
        **{f"train.{k}": v for k, v in train.items()},
    }
    return [f"--{k}={v}" for k, v in overrides.items()]


def losses_of(config) -> list[float]:
    losses: list[float] = []
    run_training(config, on_step=lambda m: losses.append(m.loss))
    return losses


def test_exact_resume_matches_an_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    n = 6
    straight = losses_of(load_run_config(None, recipe(corpus, tmp_path / "straight", max_steps=2 * n)))

    first_half = recipe(corpus, tmp_path / "split", max_steps=n, lr_decay_steps=2 * n)
    first = losses_of(load_run_config(None, first_half))
    second_config = resume_run_config(
        load_run_config(None, first_half), [f"--train.max_steps={2 * n}"]
    )
    second: list[float] = []
    run_training(second_config, resume=True, on_step=lambda m: second.append(m.loss))

    assert len(first) == n and len(second) == n
    assert first + second == straight  # bit-for-bit, step for step
    # The metrics log of the resumed run reads as one run of 2n steps.
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 2 * n + 1))


def test_training_reduces_loss_and_writes_a_complete_checkpoint(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = load_run_config(None, recipe(corpus, out, max_steps=40, lr=3e-3))
    losses: list[float] = []
    summary = run_training(config, on_step=lambda m: losses.append(m.loss))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert summary.final_val_loss is not None and summary.final_val_loss < losses[0]
    checkpoint = out / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json", "trainer_state.json",
    ]
    stored = json.loads((checkpoint / "config.json").read_text())
    assert stored["step"] == 40 and stored["run"]["train"]["max_steps"] == 40
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_a_failing_save_keeps_the_previous_checkpoint(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    config = load_run_config(None, recipe(corpus, out, max_steps=2))
    run_training(config)
    before = (out / "checkpoint" / "model.safetensors").read_bytes()

    import gptkit.train.checkpointing as checkpointing

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "save_file", disk_full)
    with pytest.raises(OSError):
        run_training(load_run_config(None, recipe(corpus, out, max_steps=4)))
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_resume_without_checkpoint_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    config = load_run_config(None, recipe(corpus, tmp_path / "none", max_steps=2))
    with pytest.raises(CheckpointError, match="nothing to resume: no checkpoint at"):
        resume_run_config(config)


def test_resume_refuses_a_changed_model_shape(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_training(load_run_config(None, recipe(corpus, out, max_steps=2)))
    changed = load_run_config(None, recipe(corpus, out, max_steps=4) + ["--model.n_layer=3"])
    with pytest.raises(CheckpointError, match=r"model config changed \(model.n_layer 2 -> 3\)"):
        run_training(changed, resume=True)


def test_weight_decay_only_on_matrices() -> None:
    from gptkit.config import ModelConfig

    model = GPT(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=16))
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [learning_rate(step, config) for step in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 11)
    assert max(lrs) == pytest.approx(1e-3, rel=0.01)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warm-up
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # falling after
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-6)  # half-way through the cosine
    assert lrs[115] == pytest.approx(1e-4)


def test_gradient_accumulation_equals_a_larger_batch() -> None:
    """Two micro-batches of 2 give the same gradient as one batch of 4 (mean loss)."""
    from gptkit.config import ModelConfig
    from gptkit.train.trainer import causal_lm_loss

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, d_model=16))
    x, y = torch.randint(0, 30, (4, 8)), torch.randint(0, 30, (4, 8))
    causal_lm_loss(model, (x, y)).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):
        (causal_lm_loss(model, (x[half], y[half])) / 2).backward()
    for expected, param in zip(full, model.parameters()):
        torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=1e-5)
