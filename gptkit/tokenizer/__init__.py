"""Tokenizers: character-level (with byte fallback) and byte-level BPE.

Both round-trip any text exactly and save to a ``tokenizer.json``; ``load_tokenizer`` tells
the two formats apart by content. Nothing here imports torch.
"""

from __future__ import annotations

import os

from gptkit.errors import TokenizerError
from gptkit.tokenizer.base import EOT_TOKEN, Tokenizer, read_tokenizer_json
from gptkit.tokenizer.bpe import BPETokenizer, train_bpe_tokenizer
from gptkit.tokenizer.char import FORMAT_TYPE as _CHAR_FORMAT
from gptkit.tokenizer.char import CharTokenizer, char_tokenizer_from_hf, train_char_tokenizer

__all__ = [
    "EOT_TOKEN",
    "BPETokenizer",
    "CharTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
    "train_char_tokenizer",
]


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file or a directory holding one.

    Reads gptkit's character format (also as exported for Hugging Face, see
    ``CharTokenizer.to_hf_json``) and Hugging Face byte-level BPE files (including GPT-2's).
    Raises TokenizerError, one line naming the file and the problem, for a missing, unreadable
    or malformed file, or one in an unknown format.
    """
    file, text, obj = read_tokenizer_json(path)
    if obj.get("type") == _CHAR_FORMAT:
        return CharTokenizer.from_dict(obj, source=str(file))
    if isinstance(obj.get("model"), dict):  # Hugging Face tokenizers format
        # A character tokenizer that `gptkit convert` exported in this format reads back as one.
        return char_tokenizer_from_hf(obj) or BPETokenizer.from_json_str(text, source=str(file))
    raise TokenizerError(
        f"{file}: unknown tokenizer format (expected a {_CHAR_FORMAT} tokenizer or a "
        "Hugging Face byte-level BPE tokenizer.json)"
    )
