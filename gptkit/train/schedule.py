"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math

from gptkit.config import TrainConfig


def cosine_lr(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``lr_decay_steps`` (default: max_steps), then constant ``min_lr``."""
    decay_steps = config.lr_decay_steps or config.max_steps
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    if step >= decay_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / max(1, decay_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def learning_rate(step: int, config: TrainConfig) -> float:
    return cosine_lr(step, config)
