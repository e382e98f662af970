"""The tokenizer interface shared by the character-level and byte-level BPE tokenizers.

Every tokenizer maps *any* Python ``str`` (without lone surrogates) to token ids and back
exactly. Each id stands for a fixed byte string (``token_bytes``), and decoding is simply
"concatenate the bytes, then UTF-8 decode", so text can also be decoded incrementally while
tokens stream out of a model: a multi-byte character split over several tokens is only
emitted once all of its bytes have arrived.
"""

from __future__ import annotations

import abc
import json
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptkit.errors import TokenizerError, reason
from gptkit.fileio import atomic_write_json

EOT_TOKEN = "<|endoftext|>"
"""The one special token: separates documents, and ends generation."""

TOKENIZER_FILENAME = "tokenizer.json"


class Tokenizer(abc.ABC):
    """Text <-> token ids, exact for any string.

    Subclasses pass ``id_bytes`` (the UTF-8 bytes of every id, indexed by id) to ``__init__``
    and implement ``encode_array``, ``eot_id`` and ``to_dict``; decoding is shared.
    """

    kind: str
    """``"char"`` or ``"bpe"``."""

    def __init__(self, id_bytes: Sequence[bytes]) -> None:
        self._id_bytes: list[bytes] = list(id_bytes)

    # -- sizes and special ids -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids; valid ids are ``0 .. vocab_size - 1``."""
        return len(self._id_bytes)

    @property
    @abc.abstractmethod
    def eot_id(self) -> int:
        """The id of ``<|endoftext|>``."""

    # -- encoding ---------------------------------------------------------------------------

    @abc.abstractmethod
    def encode_array(self, text: str) -> np.ndarray:
        """Encode ``text`` to a 1-D ``int64`` array (fast path for large corpora).

        A literal ``<|endoftext|>`` in the text becomes the EOT token; it decodes back to the
        same text, so round-trips stay exact.
        """

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to a list of token ids (the same ids as ``encode_array``)."""
        return self.encode_array(text).tolist()

    # -- decoding ---------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes token ``token_id`` stands for (a special token: its text's bytes).

        One token may hold only part of a multi-byte character, so join the bytes of several
        tokens before decoding; ``b"".join(map(tok.token_bytes, ids)).decode() == tok.decode(ids)``.
        """
        try:
            index = operator.index(token_id)
        except TypeError:
            raise TokenizerError(f"token id must be an integer, got {token_id!r}") from None
        if not 0 <= index < len(self._id_bytes):
            raise self._out_of_range(index)
        return self._id_bytes[index]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode token ids to text; the exact inverse of ``encode``.

        Id sequences that ``encode`` cannot produce (for example a lone byte token of a
        multi-byte character) decode with U+FFFD replacement characters instead of failing,
        because a sampling model can emit them.
        """
        table = self._id_bytes
        data = b"".join([table[i] for i in self._checked_ids(ids)])
        return data.decode("utf-8", errors="replace")

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        """Return ``ids`` as a list of Python ints, raising TokenizerError for any bad id."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise TokenizerError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            return []
        if arr.dtype.kind not in "iu":  # bools, floats, strings, or ints too big for int64
            raise TokenizerError(f"token ids must be integers, got values of type {arr.dtype}")
        low, high = int(arr.min()), int(arr.max())
        if low < 0:
            raise self._out_of_range(low)
        if high >= len(self._id_bytes):
            raise self._out_of_range(high)
        return arr.tolist()

    def _out_of_range(self, token_id: int) -> TokenizerError:
        return TokenizerError(
            f"token id {token_id} is out of range for this {self.kind} tokenizer "
            f"(vocab size {self.vocab_size}, valid ids 0..{self.vocab_size - 1})"
        )

    # -- persistence -------------------------------------------------------------------------

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable form of this tokenizer (what ``save`` writes)."""

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` atomically.

        ``path`` is either a directory (``path/tokenizer.json`` is written, the directory is
        created if needed) or a file path ending in ``.json``.
        """
        atomic_write_json(tokenizer_file_path(path), self.to_dict())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def tokenizer_file_path(path: str | os.PathLike[str]) -> Path:
    """Resolve a directory or ``*.json`` path to the tokenizer file it names."""
    p = Path(path)
    if p.is_file() or (p.suffix.lower() == ".json" and not p.is_dir()):
        return p
    return p / TOKENIZER_FILENAME


def read_tokenizer_json(path: str | os.PathLike[str]) -> tuple[Path, str, dict[str, Any]]:
    """Read a tokenizer file; return ``(file, raw text, parsed JSON object)``.

    Raises TokenizerError (one line naming the file) when it is missing, unreadable,
    not JSON, or not a JSON object.
    """
    file = tokenizer_file_path(path)
    if not file.exists():
        if Path(path).is_dir():
            raise TokenizerError(f"{file}: no {TOKENIZER_FILENAME} in directory {path}")
        raise TokenizerError(f"{file}: tokenizer file not found")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{file}: not a tokenizer file (not UTF-8 text: {e.reason})") from None
    except OSError as e:
        raise TokenizerError(f"{file}: cannot read tokenizer file ({reason(e)})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(
            f"{file}: not a tokenizer file (invalid JSON at line {e.lineno} column {e.colno}: {e.msg})"
        ) from None
    if not isinstance(obj, dict):
        raise TokenizerError(
            f"{file}: not a tokenizer file (expected a JSON object, got {type(obj).__name__})"
        )
    return file, text, obj


def one_line(message: object) -> str:
    """Collapse an exception message (possibly multi-line, from Rust) into one line."""
    return " ".join(str(message).split())


def surrogate_error(text: str, error: UnicodeEncodeError) -> TokenizerError:
    """The error for text that is not valid Unicode (it holds a lone UTF-16 surrogate)."""
    position = error.start
    return TokenizerError(
        f"cannot tokenize text: lone surrogate {text[position]!r} at position {position} "
        "is not a valid Unicode character"
    )
