"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).

``init_distributed`` is the one place that decides how many processes a strategy runs on and
which device each uses; gloo on CPU, nccl on CUDA, with a timeout so that a rank that dies makes
the others fail instead of waiting forever.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptkit.errors import ConfigError

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank in [0, world_size) and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def launched_world_size() -> int:
    """WORLD_SIZE from the environment, 1 when not launched by torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer; got {os.environ['WORLD_SIZE']!r}") from None


def init_distributed(strategy: str, device: torch.device, *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``strategy`` needs; return this process's rank and device.

    ``single`` needs nothing and refuses to run as several processes (each would train alone and
    write the same files). ``ddp`` needs torchrun's environment. On CUDA each process takes
    ``cuda:LOCAL_RANK``.
    """
    world_size = launched_world_size()
    if strategy == "single":
        if world_size > 1:
            raise ConfigError(
                f"train.strategy: single runs one process but {world_size} were launched; use --train.strategy=ddp"
            )
        return DistInfo(device=device)
    if strategy not in ("ddp", "fsdp", "tp", "fsdp+tp"):
        raise ConfigError(f"train.strategy: must be one of single, ddp, fsdp, tp, fsdp+tp; got {strategy!r}")
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ConfigError(
            f"train.strategy: {strategy} needs torchrun's environment (missing {', '.join(missing)}); "
            "launch with `torchrun --nproc_per_node=N -m gptkit.cli train ...`"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"train.strategy: {strategy} rank {rank} wants cuda:{local_rank} but this machine has "
                f"{torch.cuda.device_count()} CUDA devices; launch at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        atexit.register(_destroy)
    logger.info("rank %d of %d on %s (%s)", rank, world_size, device, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shutdown_distributed() -> None:
    """Leave the process group together after a successful run.

    All ranks first meet at a barrier (so no rank tears down its connections while a peer is still
    inside a collective), then destroy the group while the interpreter is fully alive: gloo's worker
    threads must not outlive it (otherwise the process can abort at exit). After a failure, do not
    call this: a dead peer would make the barrier wait for the timeout; the atexit hook still runs.
    """
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _reduce_over_ranks(value: float, op: dist.ReduceOp) -> float:
    """``op`` of a Python float over all ranks (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def mean_over_ranks(value: float) -> float:
    """The mean of a Python float over all ranks (identity without a process group)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return _reduce_over_ranks(value, dist.ReduceOp.SUM) / world_size


def max_over_ranks(value: float) -> float:
    """The largest of a Python float over all ranks (identity without a process group)."""
    return _reduce_over_ranks(value, dist.ReduceOp.MAX)
