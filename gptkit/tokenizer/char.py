"""Character-level tokenizer with byte fallback.

Vocabulary layout (ids in this order):

* ``0 .. n-1``: the ``n`` characters seen in training, sorted by code point (so on
  Shakespeare the first 65 ids are the same as nanoGPT's character ids);
* ``n .. n+255``: one token per byte value, used to spell characters never seen in training
  as their UTF-8 bytes (so any text can be encoded, and decoded back exactly);
* ``n+256``: ``<|endoftext|>``.

File format (``tokenizer.json``)::

    {"type": "gptkit-char", "version": 1,
     "chars": ["\\n", " ", "!", ...],                       # id i is chars[i]
     "byte_fallback": {"first_id": n, "count": 256},         # implied; written for readers
     "special_tokens": {"<|endoftext|>": n + 256}}
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gptkit.errors import TokenizerError
from gptkit.tokenizer.base import EOT_TOKEN, Tokenizer, surrogate_error

FORMAT_TYPE = "gptkit-char"
FORMAT_VERSION = 1
_N_BYTES = 256


def _code_points(text: str) -> np.ndarray:
    """``text`` as a uint32 array of code points (raises UnicodeEncodeError on lone surrogates)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class CharTokenizer(Tokenizer):
    """One token per known character; unknown characters fall back to their UTF-8 bytes."""

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        """``chars[i]`` is the character with id ``i`` (``train_char_tokenizer`` sorts them)."""
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise TokenizerError(f"character vocabulary entries must be single characters, got {c!r}")
            if 0xD800 <= ord(c) <= 0xDFFF:
                raise TokenizerError(f"character vocabulary holds a lone surrogate {c!r}")
        if len(set(chars)) != len(chars):
            duplicates = sorted({c for c in chars if chars.count(c) > 1})
            raise TokenizerError(f"character vocabulary has duplicate entries: {duplicates!r}")
        self._chars = chars
        n = len(chars)
        super().__init__(
            [c.encode("utf-8") for c in chars]
            + [bytes([b]) for b in range(_N_BYTES)]
            + [EOT_TOKEN.encode("utf-8")]
        )
        self._byte_offset = n
        self._eot_id = n + _N_BYTES
        # Code point -> id lookup table; -1 marks "not in the vocabulary". It has one spare
        # entry at the end so that larger code points can be clipped onto it (one gather, no
        # branch). Its size follows the largest known code point: at most 1.1M entries.
        cps = np.array([ord(c) for c in chars], dtype=np.int64)
        size = int(cps.max()) + 2 if n else 1
        self._lookup = np.full(size, -1, dtype=np.int64)
        self._lookup[cps] = np.arange(n, dtype=np.int64)

    @property
    def chars(self) -> list[str]:
        """The known characters, in id order (ids ``0 .. len(chars)-1``)."""
        return list(self._chars)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    # -- encoding ---------------------------------------------------------------------------

    def encode_array(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            _code_points(text)  # a lone surrogate anywhere: one error, its position in ``text``
        except UnicodeEncodeError as e:
            raise surrogate_error(text, e) from None
        if EOT_TOKEN not in text:  # the common case: one vectorised pass
            return self._encode_plain(text)
        pieces: list[np.ndarray] = []
        eot = np.array([self._eot_id], dtype=np.int64)
        for i, part in enumerate(text.split(EOT_TOKEN)):
            if i:
                pieces.append(eot)
            pieces.append(self._encode_plain(part))
        return np.concatenate(pieces)

    def _encode_plain(self, text: str) -> np.ndarray:
        """Encode valid text that holds no special token."""
        cps = _code_points(text)
        table = self._lookup
        ids = table[np.minimum(cps, len(table) - 1)]
        unknown = ids < 0
        if not unknown.any():
            return ids
        # Slow(er) path, still vectorised: every unknown character expands to its 1-4 UTF-8
        # bytes. Compute each character's output length, mark which output slots are byte
        # tokens, and fill them from the UTF-8 encoding of all unknown characters in order.
        unknown_cps = cps[unknown]
        n_bytes = 1 + (unknown_cps >= 0x80).astype(np.int64) + (unknown_cps >= 0x800) + (unknown_cps >= 0x10000)
        lengths = np.ones(len(cps), dtype=np.int64)
        lengths[unknown] = n_bytes
        slot_is_byte = np.repeat(unknown, lengths)
        out = np.empty(len(slot_is_byte), dtype=np.int64)
        out[~slot_is_byte] = ids[~unknown]
        utf8 = "".join(map(chr, unknown_cps.tolist())).encode("utf-8")
        out[slot_is_byte] = np.frombuffer(utf8, dtype=np.uint8).astype(np.int64) + self._byte_offset
        return out

    # -- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": FORMAT_TYPE,
            "version": FORMAT_VERSION,
            "chars": list(self._chars),
            "byte_fallback": {"first_id": self._byte_offset, "count": _N_BYTES},
            "special_tokens": {EOT_TOKEN: self._eot_id},
        }

    def to_hf_json(self) -> str:
        """The same tokenizer in Hugging Face ``tokenizers`` format (the text of a tokenizer.json),
        for model exports that ``transformers.AutoTokenizer`` should load: a BPE model without
        merges, so each character is looked up alone, whose byte fallback spells an unknown
        character as its UTF-8 bytes (tokens ``<0x00>`` .. ``<0xFF>``), with ``<|endoftext|>`` as
        a special token. Every id is the same as here, so both encode any text to the same ids
        (tested); :func:`char_tokenizer_from_hf` reads it back."""
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {c: i for i, c in enumerate(self._chars)}
        vocab.update({_byte_token(b): self._byte_offset + b for b in range(_N_BYTES)})
        vocab[EOT_TOKEN] = self._eot_id
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        hf.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
        return hf.to_str()

    @classmethod
    def from_dict(cls, obj: dict[str, Any], *, source: str = "tokenizer") -> CharTokenizer:
        """Rebuild from ``to_dict`` output; ``source`` names the file in error messages."""

        def bad(problem: str) -> TokenizerError:
            return TokenizerError(f"{source}: malformed {FORMAT_TYPE} tokenizer ({problem})")

        if obj.get("type") != FORMAT_TYPE:
            raise bad(f"type is {obj.get('type')!r}, expected {FORMAT_TYPE!r}")
        if obj.get("version") != FORMAT_VERSION:
            raise TokenizerError(
                f"{source}: unsupported {FORMAT_TYPE} tokenizer version {obj.get('version')!r} "
                f"(this gptkit reads version {FORMAT_VERSION})"
            )
        chars = obj.get("chars")
        if not isinstance(chars, list):
            raise bad("'chars' must be a list of single characters")
        n = len(chars)
        fallback = obj.get("byte_fallback", {"first_id": n, "count": _N_BYTES})
        if fallback != {"first_id": n, "count": _N_BYTES}:
            raise bad(f"'byte_fallback' is {fallback!r}, expected first_id {n} and count {_N_BYTES}")
        expected_special = {EOT_TOKEN: n + _N_BYTES}
        if obj.get("special_tokens") != expected_special:
            raise bad(f"'special_tokens' is {obj.get('special_tokens')!r}, expected {expected_special!r}")
        try:
            return cls(chars)
        except TokenizerError as e:
            raise bad(str(e)) from None


def _byte_token(value: int) -> str:
    return f"<0x{value:02X}>"


def char_tokenizer_from_hf(obj: dict[str, Any]) -> CharTokenizer | None:
    """The CharTokenizer that a Hugging Face tokenizer.json written by
    :meth:`CharTokenizer.to_hf_json` describes (e.g. in a model exported by ``gptkit convert``), or
    None when ``obj`` is any other tokenizer: only the exact layout is recognised, so that a model
    converted back to gptkit gets its character tokenizer back, ids and all."""
    model = obj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("merges") or not model.get("byte_fallback"):
        return None
    if obj.get("normalizer") is not None or obj.get("pre_tokenizer") is not None or obj.get("post_processor") is not None:
        return None
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or len(vocab) < _N_BYTES + 1:
        return None
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [token_id for _, token_id in by_id] != list(range(len(by_id))):
        return None
    n = len(by_id) - _N_BYTES - 1
    chars = [token for token, _ in by_id[:n]]
    layout_ok = (
        [token for token, _ in by_id[n : n + _N_BYTES]] == [_byte_token(b) for b in range(_N_BYTES)]
        and by_id[-1][0] == EOT_TOKEN
        and all(isinstance(c, str) and len(c) == 1 for c in chars)
    )
    added = obj.get("added_tokens") or []
    if not layout_ok or [(t.get("content"), t.get("id")) for t in added] != [(EOT_TOKEN, n + _N_BYTES)]:
        return None
    try:
        return CharTokenizer(chars)
    except TokenizerError:
        return None


def train_char_tokenizer(texts: Iterable[str]) -> CharTokenizer:
    """Build a character tokenizer whose vocabulary is every character in ``texts``.

    ``texts`` is an iterable of strings (a single ``str`` is accepted as one text). Characters
    are sorted by code point, so ids do not depend on the order of the texts.
    """
    if isinstance(texts, str):
        texts = [texts]
    seen: set[int] = set()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        try:
            seen.update(np.unique(_code_points(text)).tolist())
        except UnicodeEncodeError as e:
            raise surrogate_error(text, e) from None
    return CharTokenizer([chr(cp) for cp in sorted(seen)])
