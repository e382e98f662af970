"""The trainer: optimizer groups, schedule, learning, exact resume and atomic checkpoints."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from gptkit.config import TrainConfig, load_run_config
from gptkit.errors import CheckpointError, ConfigError, TrainingError
from gptkit.model import GPT, fused_trunk
from gptkit.train import Trainer, resume_run_config, run_training
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


def recipe(corpus: Path, out: Path, *, dropout: float = 0.1, **train) -> list[str]:
    overrides = {
        "data.source": str(corpus),
        "data.dir": str(corpus.parent / "prepared"),
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.d_model": 32,
        "model.block_size": 32,
        "model.dropout": dropout,  # with dropout, resume must restore the RNG that dropout draws from
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


@pytest.mark.parametrize("dropout", [0.1, 0.0], ids=["dropout", "fused_trunk"])
def test_exact_resume_matches_an_uninterrupted_run(corpus: Path, tmp_path: Path, dropout: float,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Without dropout, CPU training runs the fused trunk (gptkit/model/fused_trunk.py): count it.
    trunk_calls: list[int] = []
    original = fused_trunk.run
    monkeypatch.setattr(fused_trunk, "run", lambda *args: trunk_calls.append(1) or original(*args))
    n = 6
    straight = losses_of(load_run_config(None, recipe(corpus, tmp_path / "straight", dropout=dropout, max_steps=2 * n)))
    assert (len(trunk_calls) >= 2 * n) == (dropout == 0.0)
    assert not fused_trunk._pool  # fit() ended: the trunk's buffers are freed

    first_half = recipe(corpus, tmp_path / "split", dropout=dropout, max_steps=n, lr_decay_steps=2 * n)
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
    # One line for the CLI (a CheckpointError), naming the cause and the checkpoint that is kept.
    with pytest.raises(CheckpointError, match="No space left on device; the checkpoint of step 2 there is kept"):
        run_training(resume_run_config(config, ["--train.max_steps=4"]), resume=True)
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_resume_without_checkpoint_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    config = load_run_config(None, recipe(corpus, tmp_path / "none", max_steps=2))
    with pytest.raises(CheckpointError, match="nothing to resume: no checkpoint at"):
        resume_run_config(config)


def test_a_moved_or_copied_run_resumes_where_it_is_now(corpus: Path, tmp_path: Path) -> None:
    import shutil

    first = tmp_path / "first"
    run_training(load_run_config(None, recipe(corpus, first, max_steps=2)))
    # The recipe (not an override) names the run's new place, as after `mv first moved` and an edit.
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"train:\n  out_dir: {moved}\n")
    config = resume_run_config(load_run_config(recipe_file), ["--train.max_steps=3"])
    assert config.train.out_dir == str(moved)
    before = (first / "checkpoint" / "trainer_state.json").read_text()
    run_training(config, resume=True)
    assert json.loads((moved / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert (first / "checkpoint" / "trainer_state.json").read_text() == before  # the other run is untouched
    # Moved away (the first place gone): it resumes too, instead of "nothing to resume" there.
    shutil.rmtree(first)
    run_training(resume_run_config(load_run_config(recipe_file), ["--train.max_steps=4"]), resume=True)
    assert json.loads((moved / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert not first.exists()


def test_resume_refuses_a_changed_model_shape(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_training(load_run_config(None, recipe(corpus, out, max_steps=2)))
    changed = load_run_config(None, recipe(corpus, out, max_steps=4) + ["--model.n_layer=3"])
    with pytest.raises(CheckpointError, match=r"model config changed \(model.n_layer 2 -> 3\)"):
        run_training(changed, resume=True)


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(corpus: Path, tmp_path: Path) -> None:
    """A typo such as model.n_layer=100000000 would otherwise build blocks for hours (or fail with
    an allocator's traceback); nothing is left in train.out_dir."""
    out = tmp_path / "run"
    config = load_run_config(None, recipe(corpus, out, max_steps=2) + ["--model.n_layer=100000000"])
    with pytest.raises(ConfigError, match=r"the model has [\d,]+ parameters: its weights, gradients and optimizer "
                       r"state in float32 need at least [\d,.]+ GiB, more than this machine's"):
        run_training(config)
    assert not out.exists()


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


# ------------------------------------------------------------------ train.out_dir (fresh, overwrite, file)


def metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_refuses_an_out_dir_that_holds_a_checkpoint(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_training(load_run_config(None, recipe(corpus, out, max_steps=3)))
    weights = (out / "checkpoint" / "model.safetensors").read_bytes()
    # A fresh data.dir shows that the refusal comes before data preparation.
    again = recipe(corpus, out, max_steps=2) + [f"--data.dir={tmp_path / 'other-data'}"]
    with pytest.raises(ConfigError) as caught:
        run_training(load_run_config(None, again))
    assert str(caught.value) == (
        f"train.out_dir {out} already holds a checkpoint (step 3); "
        "pass --resume to continue it or --overwrite to start over"
    )
    assert not (tmp_path / "other-data").exists()
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == weights
    assert metrics_steps(out) == [1, 2, 3]


def test_overwrite_starts_a_new_log_and_replaces_the_checkpoint(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    run_training(load_run_config(None, recipe(corpus, out, max_steps=4)))
    run_training(load_run_config(None, recipe(corpus, out, max_steps=2)), overwrite=True)
    assert metrics_steps(out) == [1, 2]  # replaced, not appended to (was 1..4 then 1, 2)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "checkpoint.previous").exists() and not (out / "metrics.previous.jsonl").exists()
    # A new run that dies before its first save leaves no mix of two runs, and loses nothing: the
    # earlier run waits aside until the new one has a checkpoint.
    weights = (out / "checkpoint" / "model.safetensors").read_bytes()
    import gptkit.train.checkpointing as checkpointing

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "save_file", disk_full)
    # One line for the CLI (a CheckpointError), naming the cause and the checkpoint that is kept.
    with pytest.raises(CheckpointError, match="No space left on device; no checkpoint of this run was saved"):
        run_training(load_run_config(None, recipe(corpus, out, max_steps=3)), overwrite=True)
    assert not (out / "checkpoint").exists() and metrics_steps(out) == [1, 2, 3]
    assert (out / "checkpoint.previous" / "model.safetensors").read_bytes() == weights
    assert [json.loads(line)["step"] for line in (out / "metrics.previous.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_and_overwrite_together_is_an_error(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = load_run_config(None, recipe(corpus, out, max_steps=2))
    run_training(config)
    with pytest.raises(ConfigError, match="--resume and --overwrite contradict each other"):
        run_training(config, resume=True, overwrite=True)


@pytest.mark.parametrize("inside", [False, True])
def test_an_out_dir_that_is_a_file_fails_before_any_work(corpus: Path, tmp_path: Path, inside: bool) -> None:
    file = tmp_path / "taken"
    file.write_text("not a directory\n")
    out = file / "run" if inside else file
    config = load_run_config(None, recipe(corpus, out, max_steps=2))
    expected = f"lies inside {file}, which is a file" if inside else "is a file, not a directory"
    with pytest.raises(ConfigError, match=expected):
        run_training(config)
    assert not (tmp_path / "prepared").exists()  # failed before data preparation, let alone training
    assert file.read_text() == "not a directory\n"


# ------------------------------------------------------------------ resume from incomplete checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 2-step run with a complete checkpoint; tests copy it before damaging anything."""
    root = tmp_path_factory.mktemp("finished")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    args = recipe(corpus, root / "run", max_steps=2)
    run_training(load_run_config(None, args))
    return root / "run", args


def copy_of(finished_run, tmp_path: Path) -> tuple[Path, object]:
    import shutil

    source, args = finished_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    config = load_run_config(None, [*args, f"--train.out_dir={out}", "--train.max_steps=4"])
    return out / "checkpoint", config


def _edit_state(checkpoint: Path, **changes) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state.update(changes)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def _edit_optimizer_entry(checkpoint: Path, **changes) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["optimizer"].update(changes)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def _edit_optimizer_tensor(checkpoint: Path, name: str, tensor: torch.Tensor | None) -> None:
    """Replace (or with None, drop) one tensor of optimizer.safetensors."""
    from safetensors.torch import load_file, save_file

    path = checkpoint / "optimizer.safetensors"
    tensors = load_file(str(path))
    assert name in tensors
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: (c / "optimizer.safetensors").unlink(),
         r"optimizer.safetensors is missing \(a weights-only checkpoint"),
        (lambda c: (c / "trainer_state.json").unlink(),
         r"trainer_state.json is missing \(a weights-only checkpoint"),
        (lambda c: [(c / n).unlink() for n in ("optimizer.safetensors", "trainer_state.json")],
         "trainer_state.json and optimizer.safetensors are missing"),
        (lambda c: (c / "optimizer.safetensors").write_bytes(b"\x00garbage" * 8),
         "optimizer.safetensors is corrupt"),
        (lambda c: (c / "trainer_state.json").write_text("{not json"),
         "trainer_state.json is corrupt"),
        (lambda c: _edit_state(c, data=None), r'trainer_state.json is corrupt \(no "data" position\)'),
        (lambda c: _edit_state(c, rng="x"), r'trainer_state.json is corrupt \(no "rng" state\)'),
        (lambda c: _edit_state(c, step="two"), r'"step" must be a non-negative integer'),
        (lambda c: _edit_state(c, rng={"torch": "!!not base64!!"}), "training state does not fit this run"),
        (lambda c: _edit_state(c, data={"epoch": -1, "batch_index": 0}),
         "trainer_state.json does not fit this run"),
        (lambda c: _edit_optimizer_entry(c, scalars=[1]), "training state does not fit this run"),
        # load_state_dict checks neither: the fused AdamW kernel would read past the 3x3 tensor,
        # and a missing moment would be a KeyError at the first step.
        (lambda c: _edit_optimizer_tensor(c, "state.0.exp_avg", torch.zeros(3, 3)),
         r"training state does not fit this run \(state.0.exp_avg has shape \(3, 3\), its parameter \("),
        (lambda c: _edit_optimizer_tensor(c, "state.0.exp_avg", None),
         r"training state does not fit this run \(no state.0.exp_avg\)"),
    ],
    ids=["no-optimizer", "no-state", "weights-only", "corrupt-optimizer", "state-not-json", "no-data",
         "bad-rng-type", "bad-step", "bad-rng", "bad-data-position", "bad-optimizer-scalars",
         "optimizer-moment-of-another-shape", "optimizer-moment-missing"],
)
def test_resume_from_a_damaged_checkpoint_names_the_file(finished_run, tmp_path: Path, damage, message) -> None:
    checkpoint, config = copy_of(finished_run, tmp_path)
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message) as caught:
        run_training(config, resume=True)
    assert str(caught.value).startswith(f"cannot resume {checkpoint}: ")
    assert "\n" not in str(caught.value)


def test_loading_training_state_without_optimizer_file_is_a_checkpoint_error(finished_run, tmp_path: Path) -> None:
    """The loader itself (which a Trainer used without start_run reaches), not only the pre-check."""
    from gptkit.config import ModelConfig
    from gptkit.train.checkpointing import load_training_state

    checkpoint, _ = copy_of(finished_run, tmp_path)
    (checkpoint / "optimizer.safetensors").unlink()
    model = GPT(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing"):
        load_training_state(checkpoint, build_optimizer(model, TrainConfig()))


# ------------------------------------------------------------------ resume at or past max_steps


def test_resume_at_max_steps_trains_nothing_and_says_so(finished_run, tmp_path: Path) -> None:
    checkpoint, config = copy_of(finished_run, tmp_path)
    before = (checkpoint.parent / "metrics.jsonl").read_text()
    summary = run_training(resume_run_config(config, ["--train.max_steps=2"]), resume=True)
    assert summary.steps == 2 and summary.steps_trained == 0
    assert summary.final_loss is None and summary.final_val_loss is None and summary.tokens_per_second == 0
    assert (checkpoint.parent / "metrics.jsonl").read_text() == before


def test_resume_with_max_steps_below_the_checkpoint_is_a_config_error(finished_run, tmp_path: Path) -> None:
    checkpoint, config = copy_of(finished_run, tmp_path)
    with pytest.raises(ConfigError) as caught:
        run_training(resume_run_config(config, ["--train.max_steps=1"]), resume=True)
    assert str(caught.value) == (
        "train.max_steps 1 is below the checkpoint's step 2; give a larger train.max_steps to continue"
    )


# ------------------------------------------------------------------ divergence (inf/nan)


def test_a_diverging_run_stops_with_a_one_line_error_and_no_nan_checkpoint(corpus: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "run"
    config = load_run_config(None, recipe(corpus, out, max_steps=8, lr=1e30, checkpoint_interval=1))
    with pytest.raises(TrainingError) as caught:
        run_training(config)
    message = str(caught.value)
    assert message.startswith("training diverged: loss is ") and "\n" not in message
    step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert f"at step {step + 1} (the last checkpoint is at step {step} in {out / 'checkpoint'})" in message
    assert message.endswith("; lower train.lr or raise train.warmup_steps")
    weights = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(r["loss"] == r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))


class _Batches:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 30, (2, 9), generator=g)
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]

    def next_batch(self):
        return self.x, self.y

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


def _tiny_trainer(out_dir: Path | None = None, **train):
    from gptkit.config import ModelConfig
    from gptkit.train import Trainer

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, d_model=16))
    config = TrainConfig(max_steps=3, warmup_steps=0, batch_size=2, **train)
    return Trainer(model, config, train_batches=_Batches(), out_dir=out_dir)


def test_an_inf_gradient_without_a_loss_scaler_is_divergence() -> None:
    import copy
    import math

    trainer = _tiny_trainer()
    trainer.train_step()
    before = copy.deepcopy(trainer.model.state_dict())
    handle = trainer.model.blocks[0].mlp_norm.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    message = r"training diverged: gradient norm is (inf|nan) \(loss [0-9.]+\) at step 2"
    with pytest.raises(TrainingError, match=message):
        trainer.train_step()
    handle.remove()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad step was not applied
    assert trainer.step == 1


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path: Path) -> None:
    trainer = _tiny_trainer(tmp_path / "run")
    trainer.train_step()
    with torch.no_grad():
        trainer.model.blocks[0].mlp_norm.weight[0] = float("nan")
    with pytest.raises(TrainingError, match="training diverged: the weights hold inf/nan at step 1"):
        trainer.save_checkpoint()
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_throughput_counts_the_tokens_of_any_batch_source(tmp_path: Path) -> None:
    """A batch source with no block_size attribute (only next_batch and state dicts) still gets
    its tokens per second from the batches' own shape."""
    from gptkit.config import ModelConfig

    class Plain:
        def next_batch(self):
            x = torch.randint(0, 32, (3, 8))
            return x, x

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    model = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16))
    trainer = Trainer(model, TrainConfig(max_steps=3, batch_size=3, warmup_steps=1, eval_interval=0,
                                         checkpoint_interval=0), train_batches=Plain())
    steps = []
    summary = trainer.fit(on_step=steps.append)
    assert summary.tokens_per_second > 0 and all(m.tokens_per_second > 0 for m in steps)
    assert trainer.train_batches_shape() == (3, 8)


@pytest.mark.parametrize(
    ("before", "after", "key", "expected"),
    [
        ({"weight_decay": 0.5}, {"weight_decay": 0.0}, "weight_decay", 0.0),
        ({"beta2": 0.95}, {"beta2": 0.99}, "betas", (0.9, 0.99)),
        ({"optimizer": "muon", "muon_momentum": 0.95}, {"optimizer": "muon", "muon_momentum": 0.5}, "momentum", 0.5),
    ],
)
def test_resume_takes_optimizer_hyper_parameters_from_this_run(tmp_path: Path, before, after, key, expected) -> None:
    # `gptkit train --resume --train.weight_decay=0` puts the new value in the run config the
    # checkpoint records: the optimizer must use it too, not the value saved with the old run.
    first = _tiny_trainer(tmp_path / "run", **before)
    first.train_step()
    first.save_checkpoint()
    second = _tiny_trainer(tmp_path / "run", **after)
    second.resume(tmp_path / "run" / "checkpoint")
    groups = [g for g in second.optimizer.param_groups if key != "momentum" or g["use_muon"]]
    assert groups and all((tuple(g[key]) if key == "betas" else g[key]) == expected for g in groups)
    # The per-parameter state still comes from the checkpoint (exact resume).
    saved, loaded = first.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[i][k], loaded[i][k]) for i in saved for k in saved[i])


def test_resume_of_a_run_whose_stored_config_a_newer_check_refuses(corpus: Path, tmp_path: Path) -> None:
    """An older gptkit accepted lr_decay_steps <= warmup_steps: its checkpoint must still resume
    once the command line overrides the field, and without that the error names the field."""
    overrides = recipe(corpus, tmp_path / "run", max_steps=2)
    run_training(load_run_config(None, overrides))
    config_path = tmp_path / "run" / "checkpoint" / "config.json"
    stored = json.loads(config_path.read_text())
    stored["run"]["train"]["lr_decay_steps"] = stored["run"]["train"]["warmup_steps"]  # as an older gptkit wrote
    config_path.write_text(json.dumps(stored))
    config = load_run_config(None, overrides)
    with pytest.raises(CheckpointError, match="stored run config is not valid .*train.lr_decay_steps"):
        resume_run_config(config, ["--train.max_steps=4"])
    resumed = resume_run_config(config, ["--train.max_steps=4", "--train.lr_decay_steps=4"])
    assert resumed.train.lr_decay_steps == 4 and resumed.train.max_steps == 4
    # A key this gptkit does not know (another version's setting) cannot be overridden away: the
    # error says to remove it from the checkpoint's config.json instead.
    stored["run"]["train"]["lr_decay_steps"] = None
    stored["run"]["train"]["future_setting"] = 1
    config_path.write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match=r"unknown key 'train.future_setting'.*\); remove it from .*config.json to resume"):
        resume_run_config(config, ["--train.max_steps=4"])


# ------------------------------------------------------------------ TensorBoard (train.tensorboard)


def tensorboard_scalars(out: Path, folder: str = "tensorboard") -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows for the run: each scalar tag's (step, value) points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def metrics_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_mirrors_the_metrics_log_and_a_resume_reads_as_one_run(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = recipe(corpus, out, max_steps=6, checkpoint_interval=3, tensorboard="true")

    def crash_at_step_5(metrics) -> None:
        if metrics.step == 5:
            raise KeyboardInterrupt  # steps 4 and 5 are logged after the checkpoint of step 3

    with pytest.raises(KeyboardInterrupt):
        run_training(load_run_config(None, first), on_step=crash_at_step_5)
    crashed_lr = dict(tensorboard_scalars(out)["train/lr"])[4]
    # The resumed session runs steps 4..6 at another learning rate: its points must replace the
    # interrupted session's, as its records replace theirs in metrics.jsonl.
    run_training(resume_run_config(load_run_config(None, first), ["--train.lr=5e-4"]), resume=True)

    records = metrics_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    scalars = tensorboard_scalars(out)
    assert set(scalars) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"}
    for key, tag in [("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")]:
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4, 5, 6], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([r[key] for r in records], rel=1e-6), tag
    assert dict(scalars["train/lr"])[4] != pytest.approx(crashed_lr)
    # val/loss at the evaluations only (eval_interval 4, and the last step).
    assert scalars["val/loss"] == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in records if "val_loss" in r]
    assert [step for step, _ in scalars["val/loss"]] == [4, 6]


def test_tensorboard_of_a_new_run_replaces_the_earlier_runs(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    run_training(load_run_config(None, recipe(corpus, out, max_steps=4, tensorboard="true")))
    assert [step for step, _ in tensorboard_scalars(out)["train/loss"]] == [1, 2, 3, 4]
    # --overwrite: set aside with the checkpoint; an overwriting run that fails before its first
    # save loses nothing of the earlier run.
    import gptkit.train.checkpointing as checkpointing

    with monkeypatch.context() as patch:
        patch.setattr(checkpointing, "save_file", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(28, "full")))
        with pytest.raises(CheckpointError):
            run_training(load_run_config(None, recipe(corpus, out, max_steps=3, tensorboard="true")), overwrite=True)
    assert [step for step, _ in tensorboard_scalars(out, "tensorboard.previous")["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in tensorboard_scalars(out)["train/loss"]] == [1, 2, 3]  # the failed run's
    # Then gone at the first save of the next run.
    shutil.move(out / "checkpoint.previous", out / "checkpoint")
    run_training(load_run_config(None, recipe(corpus, out, max_steps=2, tensorboard="true")), overwrite=True)
    assert [step for step, _ in tensorboard_scalars(out)["train/loss"]] == [1, 2]
    assert not (out / "tensorboard.previous").exists()
    # A run without a checkpoint (deleted here) leaves events that a fresh run replaces.
    shutil.rmtree(out / "checkpoint")
    run_training(load_run_config(None, recipe(corpus, out, max_steps=3, tensorboard="true", lr=2e-3)))
    lrs = tensorboard_scalars(out)["train/lr"]
    assert [step for step, _ in lrs] == [1, 2, 3]
    assert [value for _, value in lrs] == pytest.approx([r["lr"] for r in metrics_records(out)], rel=1e-6)


def test_a_set_aside_run_is_to_be_renamed_back_with_its_logs(tmp_path: Path) -> None:
    """An --overwrite run stopped before its first save: the message that says how to resume the
    earlier run names its logs too. Renaming back the checkpoint alone, the resume continues the
    stopped run's metrics.jsonl and TensorBoard events, and its first save deletes the earlier run's."""
    from gptkit.train.checkpointing import check_run_directory

    out = tmp_path / "run"
    (out / "checkpoint.previous").mkdir(parents=True)
    (out / "tensorboard.previous").mkdir()
    (out / "metrics.previous.jsonl").write_text("")
    with pytest.raises(
        CheckpointError,
        match=r"rename it back to .*checkpoint \(and metrics.previous.jsonl to metrics.jsonl, "
        r"tensorboard.previous to tensorboard, in place of the stopped run's\) to resume it",
    ):
        check_run_directory(out, resume=True, overwrite=False)
    (out / "tensorboard.previous").rmdir()
    (out / "metrics.previous.jsonl").unlink()
    with pytest.raises(CheckpointError, match=r"rename it back to \S*checkpoint to resume it"):
        check_run_directory(out, resume=True, overwrite=False)


def test_tensorboard_of_a_trainer_fitted_twice_reads_as_one_run(tmp_path: Path) -> None:
    """fit() called again (max_steps raised in between) continues metrics.jsonl; the TensorBoard
    events must continue too, neither replaced nor purged."""
    import dataclasses

    trainer = _tiny_trainer(tmp_path / "run", tensorboard=True, log_interval=1)
    trainer.fit()
    trainer.config = dataclasses.replace(trainer.config, max_steps=5)
    trainer.fit()
    assert metrics_steps(tmp_path / "run") == [1, 2, 3, 4, 5]
    assert [step for step, _ in tensorboard_scalars(tmp_path / "run")["train/loss"]] == [1, 2, 3, 4, 5]


def test_tensorboard_without_the_package_fails_before_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    with pytest.raises(ConfigError, match="train.tensorboard needs the tensorboard package"):
        _tiny_trainer(tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run").exists()
    _tiny_trainer(tmp_path / "run")  # off by default: no package needed


def test_an_unwritable_tensorboard_directory_is_a_one_line_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("not a directory")
    trainer = _tiny_trainer(out, tensorboard=True, log_interval=1)
    with pytest.raises(TrainingError, match=r"cannot write TensorBoard events to .*tensorboard: .*\(at step 1; no checkpoint"):
        trainer.fit()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a writer thread's traceback
def test_a_tensorboard_write_that_fails_midway_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    """A disk that fills up after the event file was opened: the trainer's one line, not the
    OSError of a writer closed on the way out, nor a traceback from a background thread."""
    import errno

    from tensorboard.summary.writer.record_writer import RecordWriter

    original, written = RecordWriter.write, []

    def fill_up(self, data: bytes) -> None:
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(data)
        original(self, data)

    monkeypatch.setattr(RecordWriter, "write", fill_up)
    trainer = _tiny_trainer(tmp_path / "run", tensorboard=True, log_interval=1)
    with pytest.raises(TrainingError, match=r"cannot write TensorBoard events to .*: No space left on device \(at step"):
        trainer.fit()


class _Rows:
    """One batch of 4 rows, served whole (micro=1) or as two micro-batches of 2 rows (micro=2)."""

    def __init__(self, micro: int) -> None:
        tokens = torch.randint(0, 30, (4, 9), generator=torch.Generator().manual_seed(1))
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        self.rows, self.calls = 4 // micro, 0

    def next_batch(self):
        start = (self.calls * self.rows) % 4
        self.calls += 1
        return self.x[start : start + self.rows], self.y[start : start + self.rows]

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state) -> None:
        self.calls = state["calls"]


def test_the_trainer_averages_accumulated_micro_batches() -> None:
    """grad_accum_steps=2 over two halves is the step of one whole batch: the same loss, the same
    gradient norm (the trainer divides each micro-batch's loss), the same weights."""
    from gptkit.config import ModelConfig

    trainers = []
    for micro in (1, 2):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, d_model=16))
        config = TrainConfig(max_steps=3, warmup_steps=0, batch_size=4 // micro, grad_accum_steps=micro, grad_clip=0.0)
        trainers.append(Trainer(model, config, train_batches=_Rows(micro)))
    whole, accumulated = trainers
    for _ in range(3):
        (loss_w, norm_w), (loss_a, norm_a) = whole.train_step(), accumulated.train_step()
        assert loss_a == pytest.approx(loss_w, rel=1e-5)
        assert norm_a == pytest.approx(norm_w, rel=1e-4)
    for a, w in zip(accumulated.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)


def test_a_wall_clock_budget_ends_the_run() -> None:
    summary = _tiny_trainer(max_seconds=1e-9).fit()  # max_steps is 3: the clock stops it first
    assert summary.steps_trained == 1 and summary.steps == 1


def test_under_a_wall_clock_budget_the_schedule_follows_the_clock() -> None:
    trainer = _tiny_trainer(max_seconds=100.0, lr=1e-3, min_lr=0.0)
    trainer.train_seconds = 75.0  # three quarters of the budget used, at step 0
    trainer.train_step()
    expected = learning_rate(0, trainer.config, progress=0.75)
    assert trainer.current_lr == pytest.approx(expected) and expected < 0.5e-3


def test_resume_restores_the_wall_clock_already_used(tmp_path: Path) -> None:
    first = _tiny_trainer(tmp_path / "run", max_seconds=1000.0)
    first.train_step()
    first.train_seconds = 123.5
    first.save_checkpoint()
    second = _tiny_trainer(tmp_path / "run", max_seconds=1000.0)
    second.resume(tmp_path / "run" / "checkpoint")
    assert second.train_seconds == 123.5
    # A budget the first session already used up leaves nothing to train.
    spent = _tiny_trainer(tmp_path / "run", max_seconds=100.0)
    spent.resume(tmp_path / "run" / "checkpoint")
    assert spent.fit().steps_trained == 0


def test_resume_drops_metric_records_written_after_the_checkpoint(tmp_path: Path) -> None:
    """A run that logged steps past its last checkpoint and then died: the resumed run's log must
    read as one run, so those records (and a line torn by the crash) go."""
    out = tmp_path / "run"
    _tiny_trainer(out, log_interval=1).fit()  # steps 1..3, checkpoint at 3
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    resumed = _tiny_trainer(out, log_interval=1)
    resumed.resume(out / "checkpoint")
    assert metrics_steps(out) == [1, 2, 3]
