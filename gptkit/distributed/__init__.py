"""Running on several processes and at lower precision, applied to a plain model from outside:
process-group setup from torchrun's environment, parallelize (activation checkpointing, compile,
DDP) and the mixed-precision policy."""

from gptkit.distributed.parallelize import apply_activation_checkpointing, parallelize
from gptkit.distributed.precision import PrecisionPolicy
from gptkit.distributed.setup import DistInfo, init_distributed

__all__ = ["DistInfo", "PrecisionPolicy", "apply_activation_checkpointing", "init_distributed", "parallelize"]
