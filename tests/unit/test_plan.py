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

    # normal_ on the meta device goes through torch._refs, whose first call imports torch._dynamo
    # (~2 s); values mean nothing on meta, so torch's initialiser is skipped. gptkit's own modules
    # (RotaryEmbedding included) are built as they are: a parameter there must be counted too.
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, *args, **kwargs: tensor)

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


# ---------------------------------------------------------------------------------------------
# Layouts: the planner never crashes, and accepts and suggests only what `gptkit train` runs
# ---------------------------------------------------------------------------------------------


def _apply_suggestion(suggestion: str, kwargs: dict) -> dict:
    """The plan() keyword arguments of ``kwargs`` changed by the flags a suggestion names."""
    text = suggestion.split(" GPUs: ", 1)[1] if "needs about" in suggestion else suggestion
    flags = text.split(":")[0].split()
    out = dict(kwargs)
    if "--strategy" in flags:
        out["tp"] = 1
    names = {"--strategy": "strategy", "--tp": "tp", "--gpus": "gpus", "--micro-batch": "micro_batch"}
    i = 0
    while i < len(flags):
        if flags[i] == "--checkpointing":
            out["checkpointing"] = True
            i += 1
        else:
            value = flags[i + 1]
            out[names[flags[i]]] = value if flags[i] == "--strategy" else int(value)
            i += 2
    return out


@pytest.mark.parametrize(
    ("preset", "kwargs", "needs"),
    [
        ("llama-2-7b", dict(gpus=1), 2),
        ("gpt3-175b", dict(gpus=4, strategy="fsdp"), 64),
        ("gpt-1t", dict(gpus=1), 256),
    ],
)
def test_too_few_gpus_for_tp_says_how_many_are_needed(preset: str, kwargs: dict, needs: int) -> None:
    # _suggest used to try TP 2, 4, 8 on fewer GPUs: data-parallel degree 0, ZeroDivisionError.
    p = plan(preset, **kwargs)
    assert not p.fits
    assert p.suggestion.startswith(f"does not fit on {kwargs['gpus']} x H100 SXM with any strategy; "
                                   f"needs about {needs} GPUs: ")
    assert f"--gpus {needs}" in p.suggestion
    fixed = plan(preset, global_batch=p.global_batch, **_apply_suggestion(p.suggestion, kwargs))
    assert fixed.fits and fixed.gpus == needs


@pytest.mark.parametrize(
    ("preset", "kwargs", "field", "words"),
    [
        ("llama-2-70b", dict(strategy="tp", tp=16, gpus=16), "tp:", "model.n_kv_head (8)"),
        ("llama-2-7b", dict(strategy="fsdp+tp", tp=8, gpus=8), "gpus:", "2 data-parallel groups"),
        ("llama-2-7b", dict(strategy="fsdp+tp", tp=1, gpus=8), "tp:", ">= 2"),
        ("llama-2-7b", dict(strategy="tp", tp=8, gpus=16), "tp:", "all 16 GPUs"),
        ("gpt2", dict(strategy="tp", gpus=16), "gpus:", "model.n_head (12)"),  # default tp: all GPUs
        ("gpt2", dict(strategy="fsdp+tp", gpus=2), "gpus:", "2 data-parallel groups"),
        (ModelConfig(n_head=8, d_model=64, d_ff=100), dict(strategy="fsdp+tp", tp=8, gpus=16), "tp:",
         "model.d_ff (100)"),
    ],
)
def test_layouts_train_refuses_are_refused(preset, kwargs: dict, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan(preset, **kwargs)
    message = str(info.value)
    assert message.startswith(field) and words in message and "\n" not in message


def _train_accepts(config: ModelConfig, strategy: str, gpus: int, tp: int) -> bool:
    from gptkit.config import TrainConfig
    from gptkit.distributed.mesh import ParallelDims

    try:
        dims = ParallelDims.from_config(TrainConfig(strategy=strategy, tp_size=tp), gpus)
        dims.validate_model(config)
    except ConfigError:
        return False
    return dims.tp == tp


def test_plan_accepts_exactly_the_layouts_train_accepts() -> None:
    models = [
        ModelConfig(n_layer=2, n_head=12, d_model=96, block_size=64, vocab_size=256),  # d_ff 384
        ModelConfig(n_layer=2, n_head=16, n_kv_head=4, d_model=64, d_ff=72, block_size=64, vocab_size=256),
    ]
    for config in models:
        for strategy in ("ddp", "fsdp", "tp", "fsdp+tp"):
            for gpus in (1, 2, 3, 4, 6, 8, 12, 16):
                for tp in (1, 2, 3, 4, 6, 8, 16):
                    try:
                        plan(config, strategy=strategy, gpus=gpus, tp=tp, global_batch=48 * gpus, tokens=1e9)
                        accepted = True
                    except ConfigError:
                        accepted = False
                    assert accepted == _train_accepts(config, strategy, gpus, tp), (config, strategy, gpus, tp)


@pytest.mark.parametrize("preset", ["gpt2", "llama-2-7b", "llama-2-70b", "gpt3-175b"])
def test_every_suggestion_is_a_layout_train_accepts_and_fits(preset: str) -> None:
    config, _ = resolve_model(preset)
    for strategy in ("ddp", "fsdp", "tp", "fsdp+tp"):
        for gpus in (1, 2, 3, 4, 6, 8, 16, 64):
            kwargs = dict(strategy=strategy, gpus=gpus, global_batch=128 * gpus)
            try:
                p = plan(preset, **kwargs)
            except ConfigError:
                continue  # a layout train refuses (checked above)
            if p.fits or ("needs about" not in p.suggestion and p.suggestion.startswith("does not fit")):
                continue
            fixed = plan(preset, **_apply_suggestion(p.suggestion, kwargs))
            assert fixed.fits, (kwargs, p.suggestion)
            assert _train_accepts(config, fixed.strategy, fixed.gpus, fixed.tp), (kwargs, p.suggestion)


# ---------------------------------------------------------------------------------------------
# Numbers: finite, at least one step, no silent surprises
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1e400", "3e11B", "1E3K", "inf", "nan"])
def test_parse_quantity_refuses_infinite_and_ambiguous_numbers(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_quantity(text, "tokens")
    assert str(info.value).startswith("tokens:") and "\n" not in str(info.value)
    assert parse_quantity("300B", "tokens") == 300e9 and parse_quantity("3e11", "tokens") == 3e11


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(tokens=float("inf")), "tokens:"),
        (dict(tokens=float("nan")), "tokens:"),
        (dict(tokens=1e30), "tokens:"),  # absurd: beyond MAX_TOKENS
        (dict(tokens=1e-3), "tokens:"),
        (dict(tokens=1), "tokens:"),  # less than one sequence
        (dict(tokens=1e5, global_batch=512), "tokens:"),  # less than one global batch
        (dict(gpus=1_000_000_000), "gpus:"),
        (dict(gpus=4096, tokens=1e6), "gpus:"),  # 4096 sequences a step at the least: 4.2M tokens
    ],
)
def test_bad_numbers_are_a_one_line_config_error(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan("gpt2", **kwargs)
    message = str(info.value)
    assert message.startswith(field) and "\n" not in message


def test_steps_round_up_and_the_default_batch_fits_the_token_budget() -> None:
    p = plan("gpt2", tokens=1.5 * 2**19)  # a step and a half of the default 512 x 1024
    assert p.global_batch == 512 and p.steps == 2
    assert "(2 steps)" in format_plan(p)
    small = plan("gpt2", tokens=200_000)  # less than the default ~2**19 tokens per step
    assert small.global_batch == 195 and small.tokens_per_step <= small.tokens and small.steps == 2
    wide = plan("gpt2", gpus=64, tokens=200_000)  # a multiple of dp that still fits the budget
    assert wide.global_batch == 192 and wide.steps == 2
    assert plan("gpt2", tokens=2**19).steps == 1
    assert plan("gpt2").global_batch == 512  # the default is unchanged when tokens allow it


def test_cli_plan_json_refuses_infinite_tokens() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gptkit.cli", "plan", "--preset", "gpt2", "--tokens", "1e400", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "Infinity" not in result.stdout
    assert result.stderr.strip().count("\n") == 0 and "tokens:" in result.stderr


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--seq-len", "0"], "--seq-len: must be > 0"),
        (["--n-layer", "0"], "--n-layer: must be > 0"),
        (["--preset", "gpt2", "--d-model", "100"], "--d-model: must be divisible"),
        # Flags the user did not give are named too: the preset's d_model against the given --n-head.
        (["--n-head", "7"], "--d-model: must be divisible by --n-head (7); got 768"),
        (["--preset", "gpt2", "--n-kv-head", "5"], "--n-head: must be divisible by --n-kv-head (5)"),
        # plan()'s own arguments: the flag, not the parameter name (gpus, micro_batch, ...).
        (["--gpus", "0"], "error: --gpus: must be > 0"),
        (["--mfu", "2"], "error: --mfu: must be in (0, 1]"),
        (["--tokens", "abc"], "error: --tokens: not a number"),
        (["--global-batch", "16", "--micro-batch", "7"], "error: --micro-batch: must divide"),
        (["--global-batch", "0"], "error: --global-batch: must be > 0"),
        (["--tp", "2"], "error: --tp: a degree of 2 needs --strategy tp or fsdp+tp"),
        (["--gpu", "V100"], "error: --gpu: unknown GPU 'V100'"),
        (["--preset", "gpt2", "--seq-len", "2048"], "error: --seq-len: must be <= "),
        (["--preset", "nope"], "error: --preset: unknown preset 'nope'"),
    ],
)
def test_cli_plan_errors_name_the_flag_given(flags: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Not the ModelConfig field behind it (``model.block_size`` for --seq-len)."""
    from gptkit.cli import main

    assert main(["plan", *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err


def test_plan_of_an_absurd_model_blames_the_model_not_tokens() -> None:
    """The default budget is 20 tokens per parameter: past the tokens limit it is the model that is
    out of range (the user gave no tokens)."""
    config = ModelConfig(n_layer=10**20, n_head=12, d_model=768, vocab_size=50257, block_size=1024)
    with pytest.raises(ConfigError, match=r"^model: 7.09e\+26 parameters.*give tokens"):
        plan(config)
    with pytest.raises(ConfigError, match=r"^tokens: must be a finite number"):
        plan("gpt2", tokens=1e19)  # a budget the user gave is still blamed as such
