"""Byte-level BPE tokenizer (GPT-2 style), backed by Hugging Face ``tokenizers``.

Text is UTF-8 encoded, each byte is shown as a printable character (GPT-2's byte-to-unicode
map), the GPT-2 regex splits it into words, and learned merges join bytes into tokens. The
base vocabulary holds all 256 bytes, so every string is encodable. The file is Hugging Face's
own ``tokenizer.json``, so ``tokenizers.Tokenizer.from_file`` and ``transformers`` can load it
(and we can load a GPT-2 ``tokenizer.json``).

Decoding does not go through Hugging Face's decoder: each id maps to its bytes
(``token_bytes``) and the bytes are joined and UTF-8 decoded. That makes ``decode`` and
streaming decode identical by construction, and nothing strips or "cleans up" spaces.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptkit.errors import TokenizerError
from gptkit.tokenizer.base import EOT_TOKEN, Tokenizer, one_line, surrogate_error

MIN_VOCAB_SIZE = 256 + 1  # every byte, plus <|endoftext|>
# The trainer allocates per vocabulary entry up front: a typo like 2**40 would abort the process.
MAX_VOCAB_SIZE = 2**24

# Large texts are cut into pieces of about this many characters and encoded as a batch
# (in parallel, and much faster than one huge string even on one core).
_CHUNK_CHARS = 1 << 14

# A cut is only made where the GPT-2 pre-tokenizer would split anyway, so that the ids are
# identical to encoding the whole text at once: just after a newline that has a
# non-whitespace character on each side. (The newline is then a word of its own in both
# cases; a longer whitespace run could be split differently at the end of a piece.)
# Python's \s is a superset of the regex engine's, so this errs on the side of not cutting.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")

# Probe text checked on load: a tokenizer that does not reproduce it exactly (a normalizer,
# add_prefix_space, a non-byte-level pre-tokenizer) is rejected rather than silently lossy.
# "e\u0301", "\u212b" and "\ufb01" are changed by NFC/NFD/NFKC/NFKD (Qwen2's tokenizer.json has NFC).
_PROBE = (
    "Hello, world!  It's 3.14\t\u00e9\u0301 e\u0301\u212b\ufb01 \u65e5\u672c\U0001F468\u200D\U0001F469"
    "\n\r\n\x00 <|endoftext|>x "
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by the ByteLevel pre-tokenizer.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}


class BPETokenizer(Tokenizer):
    """A byte-level BPE tokenizer; wraps a ``tokenizers.Tokenizer``."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: HFTokenizer, *, source: str = "tokenizer") -> None:
        """Wrap ``hf_tokenizer``; ``source`` names it in error messages.

        Raises TokenizerError unless it is a byte-level BPE with an ``<|endoftext|>`` token
        that round-trips text exactly.
        """
        tk = hf_tokenizer
        if not isinstance(tk.model, models.BPE):
            raise TokenizerError(
                f"{source}: unsupported tokenizer model {type(tk.model).__name__} "
                "(gptkit supports byte-level BPE only)"
            )
        # Encoding must never truncate or pad behind our back.
        tk.no_truncation()
        tk.no_padding()
        self._tk = tk

        size = tk.get_vocab_size(with_added_tokens=True)
        added = tk.get_added_tokens_decoder()  # id -> AddedToken; matched verbatim in text
        id_bytes: list[bytes] = []
        for token_id in range(size):
            if token_id in added:
                id_bytes.append(added[token_id].content.encode("utf-8"))
                continue
            token = tk.id_to_token(token_id)
            if token is None:
                raise TokenizerError(f"{source}: token ids are not contiguous (no token has id {token_id})")
            try:
                id_bytes.append(bytes(UNICODE_TO_BYTE[c] for c in token))
            except KeyError:
                raise TokenizerError(
                    f"{source}: token {token!r} (id {token_id}) is not a byte-level token "
                    "(gptkit supports byte-level BPE only)"
                ) from None
        super().__init__(id_bytes)

        eot = tk.token_to_id(EOT_TOKEN)
        if eot is None:
            raise TokenizerError(f"{source}: the vocabulary has no {EOT_TOKEN} token")
        if tk.encode(EOT_TOKEN).ids != [eot]:
            raise TokenizerError(
                f"{source}: {EOT_TOKEN} is in the vocabulary but not a special (added) token, so text holding it "
                "would not encode to it; list it under added_tokens"
            )
        self._eot_id = eot

        # Chunked encoding is only known to be exact for the GPT-2 regex pre-tokenizer.
        pre = tk.pre_tokenizer
        self._chunkable = (
            tk.normalizer is None
            and isinstance(pre, pre_tokenizers.ByteLevel)
            and bool(getattr(pre, "use_regex", False))
            and not getattr(pre, "add_prefix_space", True)
        )
        try:
            probe_ok = self.decode(self.encode(_PROBE)) == _PROBE
        except Exception as e:  # noqa: BLE001 - any failure here means "unusable tokenizer"
            raise TokenizerError(f"{source}: tokenizer fails on test text ({one_line(e)})") from None
        if not probe_ok:
            raise TokenizerError(
                f"{source}: tokenizer does not reproduce text exactly (a normalizer, "
                "add_prefix_space, or a pre-tokenizer that is not byte-level?)"
            )

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The wrapped Hugging Face tokenizer."""
        return self._tk

    @property
    def eot_id(self) -> int:
        return self._eot_id

    # -- encoding ---------------------------------------------------------------------------

    def encode_array(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        pieces = list(self._chunks(text)) if self._chunkable else [text]
        try:
            if len(pieces) == 1:
                encodings = [self._tk.encode(pieces[0], add_special_tokens=False)]
            else:
                # encode_batch_fast skips computing character offsets (tokenizers >= 0.20).
                batch = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
                encodings = batch(pieces, add_special_tokens=False)
        except TypeError:
            # The only str the Rust side refuses is one with a lone surrogate.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise surrogate_error(text, e) from None
            raise
        if not encodings:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings])

    @staticmethod
    def _chunks(text: str) -> Iterator[str]:
        """Cut ``text`` at safe newlines into pieces of at least ``_CHUNK_CHARS`` characters."""
        start = 0
        while len(text) - start > _CHUNK_CHARS:
            match = _SAFE_CUT.search(text, start + _CHUNK_CHARS)
            if match is None:
                break
            yield text[start : match.start()]
            start = match.start()
        yield text[start:]

    # -- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Hugging Face's ``tokenizer.json`` content."""
        return json.loads(self._tk.to_str())

    @classmethod
    def from_json_str(cls, text: str, *, source: str = "tokenizer") -> BPETokenizer:
        """Load from the text of a Hugging Face ``tokenizer.json``."""
        try:
            tk = HFTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise TokenizerError(f"{source}: malformed Hugging Face tokenizer ({one_line(e)})") from None
        return cls(tk, source=source)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer with at most ``vocab_size`` tokens.

    The vocabulary is ``<|endoftext|>`` (id 0), the 256 bytes, then merges in the order they
    were learned. Merges stop early when no pair occurs ``min_frequency`` times, so a small
    corpus can give fewer than ``vocab_size`` tokens; ``vocab_size`` on the result is the
    actual size.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TokenizerError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too large (at most {MAX_VOCAB_SIZE:,}: GPT-2 has 50,257, large models ~256k)"
        )
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE tokenizer "
            f"(need at least {MIN_VOCAB_SIZE}: 256 bytes + {EOT_TOKEN})"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, numbers.Integral) or min_frequency < 0:
        raise TokenizerError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")
    if isinstance(texts, str):
        texts = [texts]

    tk = HFTokenizer(models.BPE())  # no unk token: every byte is in the vocabulary
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()  # for other consumers of the file; we decode ourselves
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        show_progress=show_progress,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def checked(items: Iterable[str]) -> Iterator[str]:
        for text in items:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise surrogate_error(text, e) from None
            yield text

    tk.train_from_iterator(checked(texts), trainer=trainer)
    return BPETokenizer(tk, source="trained tokenizer")
