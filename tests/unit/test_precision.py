"""Precision policy (fp32 / bf16 / fp16 with loss scaling) and activation checkpointing, as the
Trainer applies them: close losses, skipped overflow steps, scaler state in the checkpoint,
identical gradients with recomputed activations."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from gptkit.config import ModelConfig, TrainConfig
from gptkit.distributed import PrecisionPolicy, apply_activation_checkpointing
from gptkit.errors import ConfigError
from gptkit.model import GPT
from gptkit.train import Trainer, causal_lm_loss

TINY = ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=32)


class FixedBatches:
    """The same (x, y) batch every step: isolates precision effects from data order."""

    def __init__(self, batch_size: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, TINY.vocab_size, (batch_size, TINY.block_size + 1), generator=g)
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        self.batch_size, self.block_size = batch_size, TINY.block_size
        self.calls = 0

    def next_batch(self):
        self.calls += 1
        return self.x, self.y

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def make_trainer(precision: str, out_dir: Path | None = None, **train) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(
        precision=precision, max_steps=3, warmup_steps=0, lr=1e-3, min_lr=1e-3, batch_size=4, **train
    )
    return Trainer(GPT(TINY), config, train_batches=FixedBatches(), out_dir=out_dir)


def test_precision_is_validated() -> None:
    with pytest.raises(ConfigError, match="train.precision: must be one of fp32, bf16, fp16"):
        TrainConfig(precision="fp8")  # type: ignore[arg-type]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_losses_track_fp32(precision: str, optimizer: str) -> None:
    reference = make_trainer("fp32", optimizer=optimizer)
    low = make_trainer(precision, optimizer=optimizer)
    # The matmuls really run in the lower precision (a no-op policy would track fp32 exactly).
    computed = []
    low.model.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: computed.append(out.dtype))
    for _ in range(3):
        ref_loss, _ = reference.train_step()
        loss, grad_norm = low.train_step()
        assert math.isfinite(loss) and math.isfinite(grad_norm)
        assert abs(loss - ref_loss) < 0.05, (loss, ref_loss)
    assert set(computed) == {torch.bfloat16 if precision == "bf16" else torch.float16}, computed
    # Master weights stay float32 whatever the compute precision.
    assert all(p.dtype == torch.float32 for p in low.model.parameters())
    assert low.skipped_steps == 0


def test_fp32_policy_is_a_plain_step() -> None:
    policy = PrecisionPolicy("fp32", "cpu")
    assert policy.scaler is None and policy.loss_scale is None and policy.state_dict() == {}
    a, b = make_trainer("fp32"), make_trainer("fp32")
    # The same step written by hand, without the policy: bit-identical weights.
    x, y = b.train_batches.next_batch()
    lr = 1e-3
    for group in b.optimizer.param_groups:
        group["lr"] = lr
    causal_lm_loss(b.model, (x, y)).backward()
    torch.nn.utils.clip_grad_norm_(b.model.parameters(), b.config.grad_clip)
    b.optimizer.step()
    a.train_step()
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_fp16_scaler_skips_a_step_with_inf_gradients() -> None:
    trainer = make_trainer("fp16")
    trainer.train_step()  # one clean step
    scale = trainer.precision.loss_scale
    before = copy.deepcopy(trainer.model.state_dict())
    target = trainer.model.blocks[0].mlp_norm.weight
    handle = target.register_hook(lambda grad: torch.full_like(grad, math.inf))
    loss, grad_norm = trainer.train_step()
    handle.remove()
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    assert trainer.skipped_steps == 1
    assert trainer.precision.loss_scale == scale * 0.5
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no parameter moved
    assert trainer.step == 2  # the step counts (schedule and data move on)
    trainer.train_step()  # and training continues normally afterwards
    assert trainer.skipped_steps == 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_fp16_scaler_state_is_checkpointed_and_restored(tmp_path: Path) -> None:
    trainer = make_trainer("fp16", out_dir=tmp_path / "run")
    # A scale the default (65536) would not reach in a few steps.
    trainer.precision.load_state_dict({**trainer.precision.state_dict(), "scale": 1024.0})
    trainer.train_step()
    trainer.save_checkpoint()
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 1024.0
    resumed = make_trainer("fp16", out_dir=tmp_path / "run")
    assert resumed.precision.loss_scale == 65536.0
    resumed.resume(tmp_path / "run" / "checkpoint")
    assert resumed.precision.loss_scale == 1024.0
    assert resumed.precision.state_dict() == trainer.precision.state_dict()
    # The continued run matches the uninterrupted one exactly.
    assert resumed.train_step() == trainer.train_step()


def test_activation_checkpointing_gives_identical_gradients() -> None:
    config = ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=32, dropout=0.1)
    torch.manual_seed(0)
    plain = GPT(config)
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # same checkpoint keys
    x = torch.randint(0, 40, (2, 16))
    y = torch.randint(0, 40, (2, 16))
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(1)  # same dropout masks; recomputation must redraw the same ones
        causal_lm_loss(model, (x, y)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-7, msg=name)
    with torch.no_grad():  # inference through a checkpointed model is unchanged
        plain.eval(), checkpointed.eval()
        assert torch.equal(plain(x), checkpointed(x))


def test_trainer_applies_activation_checkpointing_from_config() -> None:
    trainer = make_trainer("fp32", activation_checkpointing=True)
    reference = make_trainer("fp32")
    assert all(getattr(b, "_gptkit_checkpointed", False) for b in trainer.model.blocks)
    for _ in range(2):
        assert trainer.train_step()[0] == pytest.approx(reference.train_step()[0], abs=1e-6)
