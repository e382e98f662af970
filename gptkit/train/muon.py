"""Muon (Jordan et al., 2024): momentum whose update is orthogonalised by a Newton-Schulz iteration,
for the hidden weight matrices; AdamW for everything else (embeddings, head, biases, norms).

Both live in one ``torch.optim.Optimizer`` so that the trainer, the schedule and checkpoints treat
it like any other optimizer: groups with ``use_muon=True`` take the Muon update.

Sharded parameters (DTensors, under FSDP2 and tensor parallel) work too. Everything elementwise
(momentum, AdamW moments, weight decay) runs on the local shards. The orthogonalisation needs the
whole matrix, so each rank gathers the direction, orthogonalises the full matrix (the same batched
call as one process) and keeps its own slice of the result, without further communication.
"""

from __future__ import annotations

import math

import torch

# Coefficients of the quintic iteration from Jordan et al. (2024): they push every singular value
# of X / ||X|| into roughly [0.7, 1.2] within five steps, which is all the update needs.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for matrix = U S V^T (all singular values moved near 1).

    (m, n) -> (m, n), or a batch (k, m, n) -> (k, m, n) of same-shaped matrices at once.
    """
    a, b, c = _NS_COEFFICIENTS
    x = matrix.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # spectral norm <= Frobenius <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a) if x.dim() == 3 else (
            a * x + (b * gram + c * gram @ gram) @ x
        )
    if transposed:
        x = x.mT
    return x.to(matrix.dtype)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole (global) matrix: a DTensor is gathered from its shards (a collective, so every rank
    of its mesh must call it in the same order); a plain tensor is returned as it is."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _like_param(update: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``update`` (the full matrix, identical on every rank) laid out like ``param``: for a DTensor,
    this rank's shard of it, cut locally (``src_data_rank=None`` means no scatter/broadcast)."""
    if not _is_dtensor(param):
        return update
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(update, param.device_mesh, param.placements, src_data_rank=None)


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer, two update rules, chosen per parameter group by ``use_muon``.

    Muon groups: ``lr``, ``momentum``, ``nesterov``, ``weight_decay`` (decoupled), ``ns_steps``.
    AdamW groups: ``lr``, ``betas``, ``eps``, ``weight_decay``.
    The Muon update is scaled by 0.2 * sqrt(max(rows, cols)) so that its RMS matches a typical
    AdamW update (Liu et al., 2025); AdamW's learning rate can then be shared with it.
    """

    def __init__(self, param_groups: list[dict]) -> None:
        defaults = dict(
            lr=1e-3, momentum=0.95, nesterov=True, ns_steps=5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
            use_muon=False,
        )
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups may only hold 2-D weight matrices")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        # Same-shaped matrices (one per layer) are orthogonalised together in one batched call.
        by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffer = state["momentum_buffer"]
            buffer.mul_(group["momentum"]).add_(p.grad)
            direction = p.grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
            by_shape.setdefault(tuple(p.shape), []).append((p, direction))
        for shape, items in by_shape.items():  # shape is the global one, also for DTensors
            # Newton-Schulz mixes all rows and columns: a sharded direction is orthogonalised whole.
            updates = orthogonalize(torch.stack([_full(d) for _, d in items]), group["ns_steps"])
            scale = 0.2 * math.sqrt(max(shape))
            for (p, _), update in zip(items, updates):
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(_like_param(update, p), alpha=-group["lr"] * scale)

    def _adamw_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = float(state["step"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias1 = 1 - beta1**step
            bias2 = 1 - beta2**step
            denominator = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / bias1)
