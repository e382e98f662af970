"""Turn a text corpus into a prepared data set: a tokenizer plus train/val token shards.

Layout of a prepared directory::

    tokenizer.json          the tokenizer trained on the whole corpus
    train_00000.bin ...     raw little-endian token ids (uint16, or uint32 for vocabularies > 65535)
    val_00000.bin ...
    meta.json               what is in the shards (see ``prepare_dataset``)

The directory is written through :func:`~gptkit.fileio.atomic_directory`: it appears complete or
not at all, and a failed run leaves an earlier data set in its place untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from gptkit.data.sources import corpus_fingerprint, load_documents
from gptkit.errors import ConfigError, DataError
from gptkit.fileio import atomic_directory, atomic_write_json

__all__ = ["META_FORMAT", "META_VERSION", "SPLITS", "load_meta", "prepare_dataset", "token_dtype"]

META_FORMAT = "gptkit-tokens"
META_VERSION = 1
SPLITS = ("train", "val")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype for a meta.json ``dtype`` name (``"uint16"``/``"uint32"``)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise DataError(f"unknown token dtype {name!r}; expected {' or '.join(_DTYPES)}") from None


class _ShardWriter:
    """Appends token arrays to ``<split>_00000.bin``, ``<split>_00001.bin``, ... in ``directory``.

    A new shard starts every ``shard_tokens`` tokens, so one document may span two shards; the
    loader reads across shard boundaries transparently. No empty shard is ever written.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: BinaryIO | None = None
        self._in_shard = 0  # tokens written to the current shard

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def write(self, ids: np.ndarray) -> None:
        """Append ``ids`` (shape (N,), any integer dtype whose values fit ``dtype``)."""
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._open_next()
            take = min(len(ids), self.shard_tokens - self._in_shard)
            assert self._file is not None
            self._file.write(ids[:take].tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            ids = ids[take:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _check_args(tokenizer: str, val_fraction: float, shard_tokens: int) -> None:
    # vocab_size is checked by train_bpe_tokenizer, which knows its own minimum.
    if tokenizer not in ("char", "bpe"):
        raise ConfigError(f"unknown tokenizer {tokenizer!r}; expected 'char' or 'bpe'")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if not (isinstance(shard_tokens, int) and shard_tokens >= 1):
        raise ConfigError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")


def _check_out_dir(out: Path) -> None:
    """Refuse to replace a non-empty directory that is not a prepared data set.

    ``atomic_directory`` swaps the whole directory, so a typo like ``--out .`` would otherwise
    delete unrelated files.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / "meta.json").read_text("utf-8")).get("format") == META_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DataError(
                f"output directory {out} is not empty and is not a prepared gptkit data set; "
                "choose an empty or new directory"
            )


def prepare_dataset(
    source: str,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: str = "char",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    shard_tokens: int = 50_000_000,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize the corpus ``source`` into ``out_dir`` and return the metadata written to meta.json.

    Every document is encoded and followed by the EOT token. The split is deterministic and per
    document: the first ``n - floor(n * val_fraction)`` of a document's ``n`` tokens (EOT included)
    go to train, the rest to val, so val samples every part of the corpus rather than only its end.
    A document too short to give val a single token goes wholly to train.

    ``vocab_size`` applies to ``tokenizer="bpe"``; a char tokenizer's vocabulary is the set of
    characters in the corpus. Raises DataError for a bad or too small corpus, ConfigError for
    out-of-range arguments (TokenizerError for a bad ``vocab_size``); on any failure ``out_dir``
    is left as it was.
    """
    from gptkit.tokenizer import train_bpe_tokenizer, train_char_tokenizer

    _check_args(tokenizer, val_fraction, shard_tokens)
    out = Path(out_dir)
    _check_out_dir(out)

    docs = load_documents(source)
    texts = (doc.text for doc in docs)
    if tokenizer == "char":
        tok = train_char_tokenizer(texts)
    else:
        tok = train_bpe_tokenizer(texts, vocab_size, show_progress=progress)
    dtype_name = "uint16" if tok.vocab_size <= 65535 else "uint32"
    dtype = token_dtype(dtype_name)
    eot = np.array([tok.eot_id], dtype=np.int64)

    with atomic_directory(out) as tmp:
        writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        try:
            for doc in tqdm(docs, desc="tokenizing", unit="doc", disable=not progress):
                ids = np.concatenate([np.asarray(tok.encode_array(doc.text), np.int64), eot])
                n_val = int(len(ids) * val_fraction)
                writers["train"].write(ids[: len(ids) - n_val])
                writers["val"].write(ids[len(ids) - n_val :])
        finally:
            for writer in writers.values():
                writer.close()
        if writers["val"].tokens == 0:
            raise DataError(
                f"corpus {source} is too small to split: val_fraction={val_fraction} of its "
                f"{writers['train'].tokens} tokens leaves no validation tokens; add text or "
                "raise val_fraction"
            )
        tok.save(tmp)
        source_bytes, source_sha256 = corpus_fingerprint(docs)
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "source": str(source),
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "dtype": dtype_name,
            "eot_id": tok.eot_id,
            "splits": {
                split: {"tokens": w.tokens, "shards": w.shards} for split, w in writers.items()
            },
            "documents": len(docs),
            "source_bytes": source_bytes,
            "source_sha256": source_sha256,
        }
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def load_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``<data_dir>/meta.json``; DataError if it is missing, corrupt or foreign."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(
            f"no prepared data in {data_dir} (missing meta.json); run `gptkit prepare` first"
        )
    try:
        meta = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is corrupt ({exc}); run `gptkit prepare` again") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DataError(f"{path} is not a gptkit data set (format is not {META_FORMAT!r})")
    if meta.get("version") != META_VERSION:
        raise DataError(
            f"{path} has data format version {meta.get('version')!r}; this gptkit reads "
            f"version {META_VERSION}, run `gptkit prepare` again"
        )
    try:
        token_dtype(meta["dtype"])
        for split in SPLITS:
            info = meta["splits"][split]
            shard_total = 0
            for shard in info["shards"]:
                name = shard["file"]
                # meta.json may not be ours: shard names must stay inside data_dir.
                if not isinstance(name, str) or Path(name).name != name or name[-4:] != ".bin":
                    raise ValueError(f"bad shard file name {shard['file']!r}")
                if not isinstance(shard["tokens"], int) or shard["tokens"] < 0:
                    raise ValueError(f"bad token count for {shard['file']}")
                shard_total += shard["tokens"]
            if shard_total != info["tokens"]:
                raise ValueError(f"{split} shards hold {shard_total} tokens, not {info['tokens']}")
        for key in ("vocab_size", "eot_id"):
            if not isinstance(meta[key], int):
                raise ValueError(f"{key} is not an integer")
    except KeyError as exc:
        raise DataError(f"{path} is corrupt (no field {exc}); run `gptkit prepare` again") from None
    except (TypeError, ValueError, DataError) as exc:
        raise DataError(f"{path} is corrupt ({exc}); run `gptkit prepare` again") from None
    return meta
