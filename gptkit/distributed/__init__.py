"""Running on several processes and at lower precision, applied to a plain model from outside:
process-group setup from torchrun's environment, the parallel layout (ParallelDims and its device
mesh), parallelize (tensor parallel, activation checkpointing, DDP or FSDP2, compile) and the
mixed-precision policy."""

from gptkit.distributed.mesh import ParallelDims
from gptkit.distributed.parallelize import apply_activation_checkpointing, parallelize
from gptkit.distributed.precision import PrecisionPolicy
from gptkit.distributed.setup import DistInfo, init_distributed

__all__ = ["DistInfo", "ParallelDims", "PrecisionPolicy", "apply_activation_checkpointing", "init_distributed", "parallelize"]
