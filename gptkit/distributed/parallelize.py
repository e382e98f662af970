"""Apply training-time transformations to a plain model from outside, torchtitan-style:
tensor parallel -> activation checkpointing -> DDP or FSDP2 -> compile. The model file knows nothing of them.

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


# ------------------------------------------------------------------ tensor parallel


def fused_rows_by_rank(sizes: list[int], tp: int) -> torch.Tensor:
    """Row order that regroups a fused projection so each TP rank's contiguous chunk holds its
    share of every part.

    A fused Linear stores parts one after another, e.g. qkv = [q (H*D), k (Hkv*D), v (Hkv*D)] or
    swiglu up = [gate (F), up (F)]. ColwiseParallel gives rank r the r-th contiguous block of rows,
    which would hand rank 0 all of q and none of v. Reordering to [q_0, k_0, v_0, q_1, k_1, v_1, ...]
    (part_r = the r-th slice of that part, whole heads since tp divides the head counts) makes the
    contiguous block of rank r exactly [q_r, k_r, v_r]: the module's own split/chunk then works on
    the local output unchanged, with the local head counts. Returns the index ``new = old[order]``.
    """
    offsets = [0]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    order = []
    for r in range(tp):
        for start, size in zip(offsets, sizes):
            part = size // tp
            order.append(torch.arange(start + r * part, start + (r + 1) * part))
    return torch.cat(order)


@torch.no_grad()
def _reorder_rows(linear: nn.Linear, order: torch.Tensor) -> None:
    linear.weight.copy_(linear.weight[order])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[order])


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron-style TP on every block: qkv and MLP ``up`` column-parallel (outputs split by
    head / hidden unit), ``out`` and ``down`` row-parallel (partial sums all-reduced). Embeddings,
    norms and the head stay replicated plain tensors; their gradients agree on all TP ranks because
    the column-parallel inputs' gradients are all-reduced.

    The fused rows are regrouped first (:func:`fused_rows_by_rank`), and each attention module is
    told its local head counts. Consequence: under TP the *global* qkv (and swiglu up) weight is in
    the rank-grouped row order; ``unshard_row_order`` gives the permutation back to the model's
    own layout for anything that saves or compares global weights.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if getattr(block, "_gptkit_tp", 1) != 1:
            continue
        D = attn.head_dim
        _reorder_rows(attn.qkv, fused_rows_by_rank([attn.n_head * D, attn.n_kv_head * D, attn.n_kv_head * D], tp))
        attn.n_head //= tp  # local heads: the forward views its (B, T, local width) output by these
        attn.n_kv_head //= tp
        if mlp.gated:
            hidden = mlp.down.in_features
            _reorder_rows(mlp.up, fused_rows_by_rank([hidden, hidden], tp))
        parallelize_module(
            block,
            tp_mesh,
            {
                "attn.qkv": ColwiseParallel(),
                "attn.out": RowwiseParallel(),
                "mlp.up": ColwiseParallel(),
                "mlp.down": RowwiseParallel(),
            },
        )
        block._gptkit_tp = tp


def unshard_row_order(model_config, tp: int) -> dict[str, torch.Tensor]:
    """For each fused weight regrouped by TP, the index that restores the model's own row order
    from a full (gathered) global tensor: ``original = global[index]``. Keys are the parameter
    names' suffixes (``attn.qkv`` and, for swiglu, ``mlp.up``)."""
    D = model_config.head_dim
    sizes = [model_config.n_head * D, model_config.kv_heads * D, model_config.kv_heads * D]
    result = {"attn.qkv": torch.argsort(fused_rows_by_rank(sizes, tp))}
    if model_config.mlp == "swiglu":
        hidden = model_config.mlp_hidden
        result["mlp.up"] = torch.argsort(fused_rows_by_rank([hidden, hidden], tp))
    return result


# ------------------------------------------------------------------ FSDP2


def apply_fsdp(model: nn.Module, dp_mesh, precision: str) -> None:
    """FSDP2: each block is one all-gather / reduce-scatter unit, the root holds the rest
    (embeddings, final norm, head). Precision stays with the trainer's autocast (float32 master
    weights and float32 gradient reduction), identical to the other strategies."""
    from torch.distributed.fsdp import fully_shard

    del precision  # autocast handles bf16; see gptkit/distributed/precision.py
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


# ------------------------------------------------------------------ gradients


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> float:
    """Total L2 norm of the gradients (scaled down to ``max_norm`` when it exceeds it and
    ``max_norm > 0``); correct for plain tensors, DTensors, and a mix of DTensors on different
    meshes (TP keeps norms plain, FSDP makes 1-D and 2-D DTensors). Plain tensors only: exactly
    ``torch.nn.utils.clip_grad_norm_``."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if not any(isinstance(p.grad, DTensor) for p in params):
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    # Group by (mesh, placements): one reduction per group, its norm a replicated DTensor.
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        key = (id(g.device_mesh), g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    squares = []
    for grads in groups.values():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.double() ** 2)
    total = float(torch.stack(squares).sum().sqrt())
    if max_norm > 0:
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
    return total


# ------------------------------------------------------------------ all together


def parallelize(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """The module to run forward/backward on, with ``config``'s strategy applied to ``model``,
    torchtitan's order: TP -> activation checkpointing -> FSDP -> compile. Under fsdp/tp the
    parameters of ``model`` become DTensors in place, so build the optimizer afterwards."""
    from gptkit.distributed.mesh import parallel_dims

    dims = parallel_dims(config)
    if dims.needs_mesh:
        if not dist.is_initialized():
            raise ConfigError(f"train.strategy: {config.strategy} needs a process group; launch with torchrun")
        model_config = getattr(model, "config", None)
        if model_config is not None:
            dims.validate_model(model_config)
        mesh = dims.build_mesh(device.type)
        if dims.tp > 1:
            apply_tensor_parallel(model, mesh["tp"])
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    forward_model: nn.Module = model
    if config.strategy in ("fsdp", "fsdp+tp") and not getattr(model, "_gptkit_fsdp", False):
        apply_fsdp(model, mesh["dp"], config.precision)
        model._gptkit_fsdp = True
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
