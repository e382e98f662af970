"""The scale planner: published numbers it must reproduce, fit logic, errors and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gptkit.config import ModelConfig
from gptkit.errors import ConfigError
from gptkit.plan import count_parameters, format_plan, parse_quantity, plan, resolve_model


def test_gpt2_parameter_count_is_exact() -> None:
    p = plan("gpt2")
    assert p.parameters == 124_439_808
    assert "124,439,808" in format_plan(p)


def test_parameter_count_matches_gpt_on_meta_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from gptkit.model import GPT
    from gptkit.model.layers import RotaryEmbedding

    # normal_ and arange on the meta device go through torch._refs, whose first call imports
    # torch._dynamo (~2 s). Values mean nothing on meta and the RoPE tables hold no parameters,
    # so both are skipped: the count of parameters is unchanged.
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, *args, **kwargs: tensor)
    monkeypatch.setattr(RotaryEmbedding, "__init__", lambda self, *args: torch.nn.Module.__init__(self))

    for name in ("gpt2", "llama-125m"):  # learned positions + biases + tied; RoPE + GQA + SwiGLU + untied
        config, _ = resolve_model(name)
        with torch.device("meta"):
            model = GPT(config)
        total, _ = count_parameters(config)
        assert total == model.num_parameters(), name
    assert count_parameters(resolve_model("llama-2-7b")[0])[0] == 6_738_415_616  # as published


def test_gpt3_175b_training_flops_and_state_bytes() -> None:
    p = plan("gpt3-175b", gpus=1024, gpu="H100", strategy="fsdp+tp", tp=8, tokens=300e9)
    assert p.parameters == pytest.approx(174.6e9, rel=1e-3)
    assert p.train_flops_6nd == pytest.approx(3.14e23, rel=0.05)  # Brown et al. 2020
    assert p.train_flops == pytest.approx(3.14e23, rel=0.05)  # attention adds ~3%
    assert p.train_flops > p.train_flops_6nd
    assert p.state_bytes_per_param == 16
    assert p.state_bytes_total == pytest.approx(2.8e12, rel=0.01)
    assert p.memory.weights + p.memory.gradients + p.memory.optimizer == pytest.approx(
        p.state_bytes_total / 1024
    )
    assert plan("gpt3-175b", precision="fp32", gpus=8, strategy="fsdp").state_bytes_per_param == 16
    # Step time and days follow from FLOPs / (gpus * peak * mfu).
    assert p.train_seconds == pytest.approx(p.train_flops / (1024 * 989e12 * 0.4))
    assert 5 < p.train_days < 15


def test_default_tokens_are_compute_optimal() -> None:
    p = plan("gpt2")
    assert p.tokens_default and p.tokens == 20 * p.parameters
    assert "20 tokens/parameter" in format_plan(p)


def test_175b_on_8_gpus_with_ddp_does_not_fit_and_gets_a_suggestion() -> None:
    p = plan("gpt3-175b", gpu="H100", gpus=8, strategy="ddp")
    assert not p.fits
    assert p.memory.weights == pytest.approx(2 * p.parameters)  # replicated
    assert p.suggestion and "--strategy" in p.suggestion and "--gpus" in p.suggestion
    assert "suggestion" in format_plan(p)


def test_small_model_fits_on_one_gpu() -> None:
    p = plan("gpt2", gpu="A100", gpus=1, global_batch=8)
    assert p.fits and p.suggestion is None
    assert p.memory.total < 0.9 * 80e9


def test_sharding_and_checkpointing_reduce_memory_per_gpu() -> None:
    kwargs = dict(gpus=64, global_batch=64, seq_len=4096)
    ddp = plan("llama-2-7b", strategy="ddp", **kwargs)
    fsdp = plan("llama-2-7b", strategy="fsdp", **kwargs)
    both = plan("llama-2-7b", strategy="fsdp+tp", tp=8, **kwargs)
    assert fsdp.memory.optimizer == pytest.approx(ddp.memory.optimizer / 64)
    assert both.memory.optimizer == pytest.approx(ddp.memory.optimizer / 64)
    assert both.memory.activations_full == pytest.approx(fsdp.memory.activations_full * 8 / 8)  # b x8, /tp 8
    ckpt = plan("llama-2-7b", strategy="fsdp", checkpointing=True, **kwargs)
    assert ckpt.memory.activations < fsdp.memory.activations
    assert ckpt.memory.total == pytest.approx(ckpt.memory.states + ckpt.memory.activations_checkpointed)


def test_suggestion_is_the_first_alternative_that_fits() -> None:
    p = plan("gpt2", gpu="H100", global_batch=512)  # micro-batch 512 on one GPU: too many activations
    assert not p.fits
    assert p.suggestion.startswith("--micro-batch")
    fixed = plan("gpt2", gpu="H100", global_batch=512, micro_batch=int(p.suggestion.split()[1].rstrip(":")))
    assert fixed.fits


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(gpu="V100"), "gpu:"),
        (dict(strategy="tp", tp=5, gpus=10), "tp:"),  # 12 heads not divisible by 5
        (dict(strategy="fsdp+tp", tp=4, gpus=6), "gpus:"),
        (dict(gpus=-1), "gpus:"),
        (dict(tokens=-5.0), "tokens:"),
        (dict(seq_len=0), "seq_len:"),
        (dict(global_batch=-8), "global_batch:"),
        (dict(mfu=1.5), "mfu:"),
        (dict(strategy="zero"), "strategy:"),
        (dict(strategy="ddp", tp=2, gpus=2), "tp:"),
        (dict(gpus=4, global_batch=6), "global_batch:"),
        (dict(seq_len=4096), "seq_len:"),  # past gpt2's learned positions
    ],
)
def test_bad_input_is_a_one_line_config_error(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan("gpt2", **kwargs)
    message = str(info.value)
    assert message.startswith(field) and "\n" not in message


def test_unknown_preset_and_bad_shape_and_quantities() -> None:
    with pytest.raises(ConfigError, match="preset"):
        plan("gpt5")
    with pytest.raises(ConfigError, match="model.n_layer"):
        plan(ModelConfig(n_layer=-2))
    assert parse_quantity("300e9", "tokens") == 300e9
    assert parse_quantity("1.4T", "tokens") == pytest.approx(1.4e12)
    with pytest.raises(ConfigError, match="tokens"):
        parse_quantity("lots", "tokens")


def test_cli_plan_prints_the_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gptkit.cli", "plan", "--preset", "gpt3-175b", "--gpus", "1024", "--gpu", "H100",
         "--strategy", "fsdp+tp", "--tp", "8", "--tokens", "300e9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "3.14e+23" in result.stdout
    assert "174,604,259,328" in result.stdout
    assert "2.79 TB" in result.stdout
