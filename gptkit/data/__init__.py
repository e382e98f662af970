"""Corpora, data preparation (tokenize + shard) and batch loading.

``sources`` and ``prepare`` need only numpy; the torch-based loader is imported on first use so
that ``gptkit prepare`` starts without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gptkit.data.prepare import load_meta, prepare_dataset
from gptkit.data.sources import Corpus, Document, fetch_shakespeare, load_documents

if TYPE_CHECKING:
    from gptkit.data.loader import BatchLoader, TokenSplit, eval_batches

__all__ = [
    "BatchLoader",
    "Corpus",
    "Document",
    "TokenSplit",
    "eval_batches",
    "fetch_shakespeare",
    "load_documents",
    "load_meta",
    "prepare_dataset",
]

_LAZY = {"BatchLoader", "TokenSplit", "eval_batches"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from gptkit.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
