"""Optimizer construction: AdamW with weight decay on matrices only, or Muon + AdamW."""

from __future__ import annotations

import torch
from torch import nn

from gptkit.config import TrainConfig
from gptkit.train.muon import MuonWithAdamW


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (and embeddings) decay; biases and norm scales do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def split_by_mesh(groups: list[dict]) -> list[dict]:
    """Under fsdp/tp the parameters are DTensors on different meshes (TP: 1-D "tp"; FSDP: "dp" or
    2-D "dp"x"tp") or plain tensors (replicated under TP). A fused/foreach kernel takes one kind per
    call, and it runs once per param group, so each group is split by mesh. No-op without DTensors."""
    from torch.distributed.tensor import DTensor

    result = []
    for group in groups:
        by_mesh: dict[object, list] = {}
        for p in group["params"]:
            key = (id(p.device_mesh), p.device_mesh.ndim) if isinstance(p, DTensor) else None
            by_mesh.setdefault(key, []).append(p)
        if len(by_mesh) <= 1:
            result.append(group)
            continue
        result.extend({**group, "params": params} for params in by_mesh.values())
    return result


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the transformer blocks: what Muon orthogonalises. Embeddings and
    the LM head stay with AdamW (their rows are looked up one token at a time, not mixed)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return []
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (the fused kernel: one pass over all parameters), or Muon for hidden matrices."""
    if config.optimizer == "muon":
        muon_params = hidden_matrices(model)
        muon_ids = {id(p) for p in muon_params}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in muon_ids]
        return MuonWithAdamW(
            [
                {"params": muon_params, "use_muon": True, "lr": config.lr, "momentum": config.muon_momentum,
                 "weight_decay": config.weight_decay},
                {"params": [p for p in rest if p.dim() >= 2], "lr": config.lr, "weight_decay": config.weight_decay,
                 "betas": (config.beta1, config.beta2), "eps": config.eps},
                {"params": [p for p in rest if p.dim() < 2], "lr": config.lr, "weight_decay": 0.0,
                 "betas": (config.beta1, config.beta2), "eps": config.eps},
            ]
        )
    return torch.optim.AdamW(
        split_by_mesh(parameter_groups(model, config.weight_decay)),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=True,
    )
