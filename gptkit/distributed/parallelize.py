"""Apply training-time transformations to a plain model from outside, torchtitan-style:
activation checkpointing -> DDP -> compile. The model file knows nothing of them.

The returned module is what the trainer calls forward on; ``model`` itself keeps its parameter
names, so checkpoints save and load the same keys whatever was applied.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptkit.config import TrainConfig
from gptkit.errors import ConfigError


def _checkpointed_forward(forward, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation/inference: nothing to save for backward
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each of ``model.blocks`` in backward instead of storing its activations.

    The block's bound ``forward`` is replaced on the instance, not wrapped in a new module, so
    ``state_dict`` keys stay ``blocks.<i>.…``. Dropout recomputes the same mask (checkpoint
    restores the RNG state).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("train.activation_checkpointing: the model has no `blocks` to checkpoint")
    for block in blocks:
        if getattr(block, "_gptkit_checkpointed", False):
            continue
        block.forward = functools.partial(_checkpointed_forward, block.forward)
        block._gptkit_checkpointed = True
    return model


def parallelize(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """The module to run forward/backward on, with ``config``'s strategy applied to ``model``."""
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    forward_model: nn.Module = model
    if config.strategy == "ddp":
        if not dist.is_initialized():
            raise ConfigError("train.strategy: ddp needs a process group; launch with torchrun")
        forward_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # the model's buffers (RoPE tables) are constants
        )
    if config.compile:
        forward_model = torch.compile(forward_model)
    return forward_model
