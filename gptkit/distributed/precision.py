"""Mixed-precision policy: where autocast applies and how the loss is scaled.

    fp32  no autocast, plain backward and step (bit-identical to training without a policy)
    bf16  autocast(bfloat16) around forward + loss; weights, gradients and optimizer stay float32
    fp16  autocast(float16) plus a GradScaler: the loss is multiplied by a scale before backward,
          gradients are unscaled before clipping, and a step whose gradients hold inf/nan is skipped
          while the scale is lowered (it grows back after ``growth_interval`` clean steps)

Under the sharded strategies (fsdp, tp, fsdp+tp) each rank holds only part of the gradients, so
an inf/nan may show up on one rank alone; :class:`ShardedGradScaler` makes every rank skip (and
lower the scale) together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ShardedGradScaler(torch.amp.GradScaler):
    """A GradScaler for gradients sharded over ranks (DTensors under FSDP2 / tensor parallel, plain
    tensors for the parameters TP replicates): each rank checks and unscales its local shards, then
    one all-reduce (max) over the default process group tells every rank whether any shard held
    inf/nan, so all ranks skip the same steps and keep the same scale. State dict as GradScaler's.

    Why not ``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler`` (torch 2.13): it hands
    the DTensor gradients to the unscale kernel as they are, which DTensor refuses when plain and
    sharded gradients share an optimizer (TP's replicated norms and embeddings), and its found-inf
    flag has shape (1,), which the fused AdamW step cannot subtract from its 0-d step counters.
    """

    def _unscale_grads_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        allow_fp16: bool,
    ) -> dict[torch.device, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        # One kernel call per (device, dtype) on local tensors: no DTensor dispatch, no per-mesh
        # collectives; the in-place unscale writes through to the DTensor gradient it aliases.
        grouped: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    grad = param.grad
                    if grad is None:
                        continue
                    if not allow_fp16 and grad.dtype == torch.float16:
                        raise ValueError("Attempting to unscale FP16 gradients.")
                    local = grad.to_local() if isinstance(grad, DTensor) else grad
                    if local.numel():  # FSDP2 leaves a rank an empty shard of a small parameter
                        grouped.setdefault((local.device, local.dtype), []).append(local)
            found = found_inf
            for (device, _), grads in grouped.items():
                found_here = torch.zeros_like(found_inf, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_here, inv_scale.to(device))
                found = torch.maximum(found, found_here.to(found.device))
            if dist.is_initialized() and dist.get_world_size() > 1:
                # Every rank calls this exactly once per unscale, grads or not, so the collectives pair up.
                dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return {found.device: found}


class PrecisionPolicy:
    """One training run's precision: ``autocast()`` for the forward pass, then ``backward(loss)``,
    ``unscale_(optimizer)`` before clipping and ``step(optimizer)``.

    ``sharded``: the gradients are split over the ranks of the process group (train.strategy fsdp,
    tp or fsdp+tp); fp16 then uses :class:`ShardedGradScaler` so that all ranks agree on skipped steps.
    """

    def __init__(self, precision: str, device: torch.device | str, *, sharded: bool = False) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}; got {precision!r}")
        self.precision = precision
        self.device_type = torch.device(device).type
        self.dtype = _DTYPES[precision]
        scaler_class = ShardedGradScaler if sharded else torch.amp.GradScaler
        self.scaler: torch.amp.GradScaler | None = scaler_class(self.device_type) if precision == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale in place (call before clipping); no-op without one."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the optimizer; returns False when fp16 skipped the step (inf/nan gradients)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # update() lowers the scale exactly when it found inf/nan, i.e. when step() skipped.
        return not self.scaler.get_scale() < scale_before

    @property
    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler is not None else None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (the scaler's scale and growth tracker); empty without a scaler."""
        if self.scaler is None:
            return {}
        return {k: (float(v) if isinstance(v, float) else v) for k, v in self.scaler.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(dict(state))
