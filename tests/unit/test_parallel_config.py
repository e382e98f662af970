"""Parallel strategies: configuration and layout validation (no processes launched)."""

from __future__ import annotations

import pytest
import torch

from gptkit.config import ModelConfig, TrainConfig, load_run_config
from gptkit.distributed.mesh import ParallelDims
from gptkit.distributed.parallelize import fused_rows_by_rank, unshard_row_order
from gptkit.distributed.setup import init_distributed
from gptkit.errors import ConfigError


def dims(world: int, **train) -> ParallelDims:
    return ParallelDims.from_config(TrainConfig(**train), world)


def test_layouts() -> None:
    assert (dims(4, strategy="fsdp").dp, dims(4, strategy="fsdp").tp) == (4, 1)
    assert (dims(2, strategy="tp").dp, dims(2, strategy="tp").tp) == (1, 2)  # tp_size 1: all ranks
    both = dims(8, strategy="fsdp+tp", tp_size=2)
    assert (both.dp, both.tp) == (4, 2)
    assert [both.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [both.tp_rank(r) for r in range(8)] == [0, 1] * 4


@pytest.mark.parametrize(
    ("world", "train", "message"),
    [
        (2, dict(strategy="fsdp+tp", tp_size=2), r"^train.strategy: fsdp\+tp with tp_size=2 needs .* >= 4 .*2 were launched"),
        (6, dict(strategy="fsdp+tp", tp_size=4), r"^train.strategy: fsdp\+tp with tp_size=4 needs a multiple of 4"),
        (4, dict(strategy="tp", tp_size=2), r"^train.tp_size: strategy tp .* must be 4 \(or 1\); got 2"),
    ],
)
def test_layout_that_does_not_fit_the_launch(world: int, train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dims(world, **train)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (dict(n_head=3, d_model=48), r"^model.n_head: 3 is not divisible by the TP degree 2"),
        (dict(n_head=4, n_kv_head=1, d_model=32), r"^model.n_kv_head: 1 is not divisible by the TP degree 2"),
        (dict(n_head=4, d_model=32, d_ff=33), r"^model.d_ff: 33 is not divisible by the TP degree 2"),
    ],
)
def test_model_must_split_evenly_over_tp(model: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dims(2, strategy="tp").validate_model(ModelConfig(**model))
    dims(2, strategy="fsdp").validate_model(ModelConfig(**model))  # no TP: anything goes


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (dict(strategy="ddp", tp_size=2), r"^train.tp_size: a TP degree of 2 needs train.strategy tp or fsdp\+tp; got ddp"),
        (dict(strategy="fsdp+tp"), r"^train.tp_size: fsdp\+tp needs a TP degree >= 2"),
        (dict(strategy="pp"), r"^train.strategy: must be one of single, ddp, fsdp, tp, fsdp\+tp"),
        (dict(tp_size=0), r"^train.tp_size: must be > 0"),
    ],
)
def test_train_config_rejects(train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**train)


@pytest.mark.parametrize("strategy", ["fsdp", "tp", "fsdp+tp"])
def test_sharded_strategies_take_muon_and_fp16(strategy: str) -> None:
    tp_size = 2 if strategy == "fsdp+tp" else 1
    config = TrainConfig(strategy=strategy, tp_size=tp_size, optimizer="muon", precision="fp16")
    assert (config.optimizer, config.precision) == ("muon", "fp16")


def test_strategy_from_overrides() -> None:
    config = load_run_config(None, ["--train.strategy=fsdp+tp", "--train.tp_size=2"])
    assert (config.train.strategy, config.train.tp_size) == ("fsdp+tp", 2)


@pytest.mark.parametrize("strategy", ["fsdp", "tp", "fsdp+tp"])
def test_sharded_strategies_need_torchrun(monkeypatch, strategy: str) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=rf"^train.strategy: {strategy.replace('+', '[+]')} needs torchrun's environment"):
        init_distributed(strategy, torch.device("cpu"))


def test_fused_rows_are_regrouped_by_rank_and_restored() -> None:
    # qkv with H=4, Hkv=2, D=1 on tp=2: [q0 q1 q2 q3 | k0 k1 | v0 v1] -> rank 0 [q0 q1 k0 v0], rank 1 [q2 q3 k1 v1]
    order = fused_rows_by_rank([4, 2, 2], 2)
    assert order.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    config = ModelConfig(n_head=4, n_kv_head=2, d_model=8, mlp="swiglu", d_ff=6)
    restore = unshard_row_order(config, 2)
    rows = torch.arange(16)  # (4 + 2 + 2) heads x D=2
    regrouped = rows[fused_rows_by_rank([8, 4, 4], 2)]
    assert torch.equal(regrouped[restore["attn.qkv"]], rows)
    up = torch.arange(12)
    assert torch.equal(up[fused_rows_by_rank([6, 6], 2)][restore["mlp.up"]], up)
