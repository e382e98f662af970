"""CPU inference with prepacked weights.

Decoding reads every weight once per token, with only a few rows of activations: there the
layout of the weights decides the speed. gptkit's C kernels (``cpu_kernels``) read nn.Linear's
row-major weight at memory speed for one row (batch-1 decode steps, no copy), and a blocked copy
made once for 2 to 8 rows (about 1.4x oneDNN's prepacked weights at batch 8 on the 2-core test
machine, and 2-3x ``F.linear``). For more rows, or where the C kernels cannot be built, oneDNN
(PyTorch's CPU backend, the path inductor's ``freezing`` takes) reorders the weight once into its
own blocked layout tuned for the batch size.

``packed_for_inference(model)`` returns a view of the model for decoding: the same module tree,
sharing every parameter, except that each ``nn.Linear`` is replaced by a ``PackedLinear`` (holding
the reordered weight when the batch needs one). It is cached per model and rebuilt when any weight
changes (an optimizer step, ``load_state_dict``), so callers need not think about it. The model
itself is not touched.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from gptkit.model.cpu_kernels import FewRowsLinear, OneRowLinear
from gptkit.model.gpt import GPT

# Packing pays off when the weights are big enough that streaming them dominates a step.
MIN_PACKED_D_MODEL = 256


def cpu_packing_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` for decoding, choosing a kernel by the number of input rows:

    - 1 row (batch-1 decode steps): gptkit's one-row C kernel on the model's own row-major weight;
    - 2..8 rows (decode steps at batch_hint 2..8): gptkit's C kernel on a blocked copy of the weight;
    - otherwise (batch_hint > 8, or without the C kernels): oneDNN's blocked copy for batch_hint rows;
    - anything else (a prompt's prefill): ``F.linear`` on the model's weight.

    At most one copy of the weight is made, and none at batch_hint 1.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight.detach()  # shared with the model, row-major (out, in)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.one_row = OneRowLinear.for_linear(self.weight, self.bias)
        few_rows_hint = 2 <= batch_hint <= FewRowsLinear.MAX_ROWS
        self.few_rows = FewRowsLinear.for_linear(self.weight, self.bias) if few_rows_hint else None
        self.packed_weight = (
            None if self.few_rows is not None or (batch_hint == 1 and self.one_row is not None)
            else torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_hint)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in_features) -> (..., out_features)
        if self.one_row is not None and self.one_row.covers(x):
            return self.one_row(x)
        if self.few_rows is not None and self.few_rows.covers(x):
            return self.few_rows(x)
        if self.packed_weight is None:
            return F.linear(x, self.weight, self.bias)
        # no post-op, so "none" with no scalars
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def should_pack(model: GPT) -> bool:
    weight = model.token_embedding.weight
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not model.training
        and model.config.d_model >= MIN_PACKED_D_MODEL
        and cpu_packing_available()
    )


# model -> {batch_hint: (weights key, packed clone)}; at most MAX_HINTS hints are kept per model.
_cache: weakref.WeakKeyDictionary[GPT, dict[int, tuple[tuple, GPT]]] = weakref.WeakKeyDictionary()
MAX_HINTS = 2


def _weights_key(model: GPT) -> tuple:
    # The version counts in-place writes; the data pointer catches memory swapped in under the same
    # tensor object (``p.data = ...``, ``share_memory()``, a dtype round trip).
    return tuple((id(p), p._version, p.data_ptr()) for p in model.parameters())


def packed_for_inference(model: GPT, batch_hint: int = 1) -> GPT:
    """The model with every Linear prepacked for ``batch_hint`` rows (cached; see module doc)."""
    key = _weights_key(model)
    per_hint = _cache.setdefault(model, {})
    cached = per_hint.get(batch_hint)
    if cached is not None and cached[0] == key:
        return cached[1]
    # Copy the module tree but share every parameter and buffer (no weight is duplicated here).
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    clone = copy.deepcopy(model, memo)
    for module in list(clone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child, batch_hint))
    clone.eval()
    per_hint.pop(batch_hint, None)
    while len(per_hint) >= MAX_HINTS:  # forget the oldest hint (dicts keep insertion order)
        per_hint.pop(next(iter(per_hint)))
    per_hint[batch_hint] = (key, clone)
    return clone
