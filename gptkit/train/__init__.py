"""Training: one Trainer for every recipe, its optimizer, schedule and exact-resume checkpoints."""

from gptkit.train.run import build_trainer, resume_run_config, run_training
from gptkit.train.trainer import StepMetrics, Trainer, TrainSummary, causal_lm_loss

__all__ = [
    "StepMetrics",
    "TrainSummary",
    "Trainer",
    "build_trainer",
    "causal_lm_loss",
    "resume_run_config",
    "run_training",
]
