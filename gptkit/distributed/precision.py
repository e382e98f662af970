"""Mixed-precision policy: where autocast applies and how the loss is scaled.

    fp32  no autocast, plain backward and step (bit-identical to training without a policy)
    bf16  autocast(bfloat16) around forward + loss; weights, gradients and optimizer stay float32
    fp16  autocast(float16) plus a GradScaler: the loss is multiplied by a scale before backward,
          gradients are unscaled before clipping, and a step whose gradients hold inf/nan is skipped
          while the scale is lowered (it grows back after ``growth_interval`` clean steps)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionPolicy:
    """One training run's precision: ``autocast()`` for the forward pass, then ``backward(loss)``,
    ``unscale_(optimizer)`` before clipping and ``step(optimizer)``."""

    def __init__(self, precision: str, device: torch.device | str) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}; got {precision!r}")
        self.precision = precision
        self.device_type = torch.device(device).type
        self.dtype = _DTYPES[precision]
        self.scaler: torch.amp.GradScaler | None = (
            torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        )

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
