"""Learning-rate schedules as pure functions of training progress.

Warm-up is counted in steps. After it, ``progress`` runs from 0 to 1: by default the fraction of
the post-warm-up steps up to ``lr_decay_steps`` (or max_steps) done before ``step`` (0-based), so
it reaches 1 at step ``lr_decay_steps`` and the last step of a run decaying over max_steps gets a
rate just above min_lr (transformers' ``get_cosine_schedule_with_warmup`` counts the same way).
Under a wall-clock budget (train.max_seconds) the trainer passes the fraction of the time used
instead, so the decay ends when time runs out.
"""

from __future__ import annotations

import math

from gptkit.config import TrainConfig


def step_progress(step: int, config: TrainConfig) -> float:
    """Fraction of the post-warm-up phase done at ``step`` (0..1, clamped)."""
    decay_steps = config.lr_decay_steps or config.max_steps
    return min(1.0, max(0.0, (step - config.warmup_steps) / max(1, decay_steps - config.warmup_steps)))


def learning_rate(step: int, config: TrainConfig, progress: float | None = None) -> float:
    """The learning rate for ``step``: linear warm-up to ``lr``, then the configured decay to ``min_lr``.

    - cosine: half a cosine from lr to min_lr over the whole post-warm-up phase;
    - wsd (warm-up, stable, decay): constant lr, then a linear decay to min_lr over the last
      ``decay_fraction`` of the post-warm-up phase (Hu et al., 2024), which lets a run be extended
      or cut short without retuning.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    p = step_progress(step, config) if progress is None else min(1.0, max(0.0, progress))
    if config.schedule == "wsd":
        decay_start = 1.0 - config.decay_fraction
        if p <= decay_start:
            return config.lr
        return config.lr + (config.min_lr - config.lr) * (p - decay_start) / config.decay_fraction
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (config.lr - config.min_lr)
