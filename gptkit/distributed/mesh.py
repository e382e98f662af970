"""How the launched ranks are arranged: one ``ParallelDims`` validates the strategy against the
world size and the model, and owns the DeviceMesh.

The mesh is 2-D with dims ("dp", "tp"), row-major: global rank = dp_rank * tp + tp_rank, so the
ranks of one TP group are neighbours (on a GPU node they share the fast links). Strategies map to
shapes as follows (W = world size):

    single   dp=1, tp=1   (no mesh)
    ddp      dp=W, tp=1   (DDP uses the default process group, no mesh)
    fsdp     dp=W, tp=1
    tp       dp=1, tp=W   (train.tp_size 1 means "all ranks"; any other value must equal W)
    fsdp+tp  dp=W/tp, tp=train.tp_size (>= 2, with dp >= 2)

Data parallelism is over "dp" only: the data loader takes the dp rank and dp size, so the ranks of
one TP group read the same batches, and per-rank random streams (dropout) are seeded by dp rank so
that TP ranks draw the same masks on their replicated activations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from gptkit.config import ModelConfig, TrainConfig
from gptkit.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    strategy: str
    world_size: int
    dp: int
    tp: int

    @classmethod
    def from_config(cls, config: TrainConfig, world_size: int) -> ParallelDims:
        """The layout of ``config.strategy`` on ``world_size`` ranks; a ConfigError when it does not fit."""
        strategy, tp_size = config.strategy, config.tp_size
        if strategy in ("single", "ddp", "fsdp"):
            return cls(strategy, world_size, world_size, 1)
        if strategy == "tp":
            tp = world_size if tp_size == 1 else tp_size
            if tp != world_size:
                raise ConfigError(
                    f"train.tp_size: strategy tp runs one TP group over all {world_size} ranks, so tp_size "
                    f"must be {world_size} (or 1); got {tp_size}; use fsdp+tp to combine with data parallelism"
                )
            return cls(strategy, world_size, 1, tp)
        if strategy == "fsdp+tp":
            if world_size < 2 * tp_size or world_size % tp_size != 0:
                raise ConfigError(
                    f"train.strategy: fsdp+tp with tp_size={tp_size} needs a multiple of {tp_size} ranks and "
                    f">= {2 * tp_size} (2 data-parallel groups); {world_size} were launched"
                )
            return cls(strategy, world_size, world_size // tp_size, tp_size)
        raise ConfigError(f"train.strategy: unknown strategy {strategy!r}")

    @property
    def needs_mesh(self) -> bool:
        return self.strategy in ("fsdp", "tp", "fsdp+tp")

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def validate_model(self, model: ModelConfig) -> None:
        """The TP degree must divide the head counts and the MLP width (each rank holds whole heads)."""
        if self.tp == 1:
            return
        for name, value in (("n_head", model.n_head), ("n_kv_head", model.kv_heads), ("d_ff", model.mlp_hidden)):
            if value % self.tp != 0:
                raise ConfigError(
                    f"model.{name}: {value} is not divisible by the TP degree {self.tp} (train.tp_size); "
                    "each rank must hold a whole number of heads / hidden units"
                )

    def build_mesh(self, device_type: str):
        """The ("dp", "tp") DeviceMesh (created once per layout and reused)."""
        return _device_mesh(device_type, self.dp, self.tp)


@functools.lru_cache(maxsize=None)
def _device_mesh(device_type: str, dp: int, tp: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


def parallel_dims(config: TrainConfig) -> ParallelDims:
    """The layout for this process's process group (world size 1 without one)."""
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return ParallelDims.from_config(config, world_size)
