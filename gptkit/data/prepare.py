"""Turn a text corpus into a prepared data set: a tokenizer plus train/val token shards.

Layout of a prepared directory::

    tokenizer.json          the tokenizer trained on the whole corpus
    train_00000.bin ...     raw little-endian token ids (uint16, or uint32 for vocabularies over 65,536 ids)
    val_00000.bin ...
    meta.json               what is in the shards and what they were prepared from (see
                            ``prepare_dataset``)

The directory is written through :func:`~gptkit.fileio.atomic_directory`: it appears complete or
not at all, and a failed run leaves an earlier data set in its place untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from gptkit.data.sources import Corpus, Fingerprint, corpus_fingerprint, has_text, resolve_source
from gptkit.errors import ConfigError, DataError, reason
from gptkit.fileio import is_or_contains_cwd, nearest_existing
from gptkit.fileio import atomic_directory, atomic_write_json

__all__ = [
    "META_FORMAT",
    "META_VERSION",
    "SPLITS",
    "check_prepared_from",
    "load_meta",
    "prepare_dataset",
    "token_dtype",
    "whole_document_val",
]

logger = logging.getLogger(__name__)

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


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """Turn an OSError of the output side (no permission, a file where a folder should be, a full
    disk) into the one-line DataError of a user mistake; the corpus side raises DataError itself."""
    try:
        yield
    except OSError as exc:
        raise DataError(f"cannot write the prepared data to {out}: {reason(exc)}") from None


def _check_out_dir(out: Path) -> None:
    """Refuse to replace a non-empty directory that is not a prepared data set.

    ``atomic_directory`` swaps the whole directory, so a typo like ``--out .`` would otherwise
    delete unrelated files.
    """
    if is_or_contains_cwd(out):  # the directory is replaced whole
        raise DataError(
            f"output directory {out} is or contains the current directory; choose another one, "
            "such as a new subdirectory"
        )
    nearest = nearest_existing(out)
    if nearest is not None and nearest.exists() and not nearest.is_dir():  # a dangling link is replaced
        if nearest == out:
            raise DataError(f"output {out} exists and is not a directory")
        raise DataError(f"output {out} lies inside {nearest}, which is a file, not a directory")
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
        # A prepared data set is replaced whole: anything else in it (a run's checkpoint when
        # train.out_dir is data.dir, the user's notes) would be deleted with it.
        foreign = sorted(entry.name for entry in out.iterdir() if not _is_data_set_file(entry))
        if foreign:
            raise DataError(
                f"output directory {out} holds a prepared data set and more ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}), which preparing again would delete; "
                "move those elsewhere or choose another directory"
            )


_SHARD_NAME = re.compile(r"(?:train|val)_\d{5,}\.bin")


def _is_data_set_file(entry: Path) -> bool:
    """Whether ``entry`` is a file that prepare_dataset writes into a data directory."""
    if entry.is_symlink() or not entry.is_file():
        return False
    return entry.name in ("meta.json", "tokenizer.json") or bool(_SHARD_NAME.fullmatch(entry.name))


def whole_document_val(n_docs: int, val_fraction: float) -> list[bool]:
    """Which of ``n_docs`` documents go to val when whole documents are split: document ``i``
    (0-based) does iff ``floor((i + 1) * f) > floor(i * f)``.

    That holds out exactly ``floor(n_docs * f)`` documents spread evenly over the corpus (with
    ``f = 0.1`` documents 9, 19, 29, ...). ``f`` is taken as the decimal ``val_fraction`` is written
    as (0.1 is exactly 1/10), so no rounding error moves a document across the boundary.
    """
    f = _exact_fraction(val_fraction)
    return [_held_out(i, f) for i in range(n_docs)]


def _exact_fraction(val_fraction: float) -> Fraction:
    """``val_fraction`` as the decimal it is written as (0.1 is exactly 1/10)."""
    return Fraction(repr(float(val_fraction)))


def _held_out(index: int, f: Fraction) -> bool:
    """Whether document ``index`` goes to val when whole documents are split at fraction ``f``:
    iff ``floor((index + 1) * f) > floor(index * f)``, in integers (cheap for every document)."""
    p, q = f.numerator, f.denominator
    return (index + 1) * p // q > index * p // q


def _count_documents(corpus: Corpus, progress: bool) -> tuple[int, int]:
    """One pass over ``corpus``: ``(documents, non-empty documents)``.

    Reading every document also validates every file and line before anything is written;
    DataError if the corpus holds no non-whitespace text.
    """
    documents = non_empty = 0
    any_text = False
    docs = tqdm(corpus, desc="reading", unit="doc", total=corpus.file_count, disable=not progress)
    for doc in docs:
        documents += 1
        non_empty += bool(doc.text)
        any_text = any_text or has_text(doc.text)
    if not any_text:
        raise corpus.empty_error()
    return documents, non_empty


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

    Every document is encoded and ends with the EOT token, in train as in val, so the model learns
    where a document ends and that a new one starts after EOT. The split is deterministic; its
    mode is recorded in meta.json as ``"split"``:

    - ``"cut-per-document"`` (the built-in corpus, a ``.txt`` file, a folder of them): the first
      ``n - floor(n * val_fraction)`` of a document's ``n`` tokens go to train and the rest to val,
      each part followed by EOT, so val samples every part of the corpus rather than only its end.
      A document too short to give val a single token goes wholly to train.
    - ``"whole-documents"`` (a ``.jsonl`` file, whose records are usually many short documents):
      each document goes wholly to train or to val, evenly spread (see :func:`whole_document_val`).
      A ``.jsonl`` file with too few documents to hold out one (fewer than ``1 / val_fraction``)
      is cut per document instead.

    Empty documents (no text at all) are skipped: they would only add a lone EOT.

    ``vocab_size`` applies to ``tokenizer="bpe"``; a char tokenizer's vocabulary is the set of
    characters in the corpus. Raises DataError for a bad or too small corpus, ConfigError for
    out-of-range arguments (TokenizerError for a bad ``vocab_size``); on any failure ``out_dir``
    is left as it was.
    """
    from gptkit.tokenizer import train_bpe_tokenizer, train_char_tokenizer

    _check_args(tokenizer, val_fraction, shard_tokens)
    out = Path(out_dir)
    with _writing(out):
        _check_out_dir(out)

    # The corpus is streamed: three passes (count, train the tokenizer, encode), each holding one
    # document at a time, so memory does not grow with the corpus.
    corpus = Corpus(source)
    n_docs, n_non_empty = _count_documents(corpus, progress)
    split_mode, f = "cut-per-document", _exact_fraction(val_fraction)
    if corpus.jsonl is not None:
        if math.floor(n_non_empty * f) > 0:  # at least one whole document to hold out
            split_mode = "whole-documents"
        else:
            logger.info(
                "%s has %d documents, too few to hold out whole ones at val_fraction=%s; "
                "cutting each document instead", source, n_non_empty, val_fraction,
            )  # fmt: skip
    texts = (doc.text for doc in corpus)
    if tokenizer == "char":
        tok = train_char_tokenizer(texts)
    else:
        tok = train_bpe_tokenizer(texts, vocab_size, show_progress=progress)
    dtype_name = "uint16" if tok.vocab_size <= 2**16 else "uint32"  # ids 0..65535 fit in 16 bits
    dtype = token_dtype(dtype_name)
    eot = np.array([tok.eot_id], dtype=np.int64)

    with _writing(out), atomic_directory(out) as tmp:
        writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        fingerprint = Fingerprint()  # of the texts as encoded, so it describes these very tokens
        try:
            seen = index = 0  # documents read; index of the document among the non-empty ones
            docs = tqdm(corpus, desc="tokenizing", unit="doc", total=n_docs, disable=not progress)
            for doc in docs:
                seen += 1
                fingerprint.update(doc.text)
                if not doc.text:
                    continue
                ids = np.asarray(tok.encode_array(doc.text), np.int64)
                if split_mode == "whole-documents":
                    split = "val" if _held_out(index, f) else "train"
                    writers[split].write(np.concatenate([ids, eot]))
                else:
                    # floor(n * f) in integers, as documented (int(90 * 0.7) is 62, not 63)
                    cut = len(ids) - len(ids) * f.numerator // f.denominator
                    writers["train"].write(np.concatenate([ids[:cut], eot]))
                    if cut < len(ids):
                        writers["val"].write(np.concatenate([ids[cut:], eot]))
                index += 1
        finally:
            for writer in writers.values():
                writer.close()
        if (seen, index) != (n_docs, n_non_empty):
            raise DataError(
                f"corpus {source} changed while it was being prepared; run `gptkit prepare` again"
            )
        if writers["val"].tokens == 0:
            raise DataError(
                f"corpus {source} is too small to split: val_fraction={val_fraction} of its "
                f"{writers['train'].tokens} tokens leaves no validation tokens; add text or "
                "raise val_fraction"
            )
        tok.save(tmp)
        source_bytes, source_sha256 = fingerprint.value()
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "source": str(source),
            # What the tokens were prepared from, so `gptkit train` can refuse a stale data.dir.
            "source_path": resolve_source(source),
            "tokenizer": tok.kind,
            "requested_vocab_size": vocab_size if tokenizer == "bpe" else None,
            "val_fraction": val_fraction,
            "split": split_mode,
            "vocab_size": tok.vocab_size,
            "dtype": dtype_name,
            "eot_id": tok.eot_id,
            "splits": {
                split: {"tokens": w.tokens, "shards": w.shards} for split, w in writers.items()
            },
            "documents": n_docs,
            "source_bytes": source_bytes,
            "source_sha256": source_sha256,
        }
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def _describe(source: str, tokenizer: Any, vocab_size: Any, val_fraction: Any) -> str:
    text = f"{source} with the {tokenizer} tokenizer"
    if tokenizer == "bpe" and vocab_size is not None:
        text += f" (vocab {vocab_size})"
    if val_fraction is not None:
        text += f", val_fraction {val_fraction}"
    return text


def _same_corpus(meta: dict[str, Any], source: str) -> bool:
    """Whether ``source`` holds the very texts the data was prepared from (the project moved, or the
    corpus was copied): compared by size and SHA-256, read only when the paths differ."""
    if "source_sha256" not in meta or "source_bytes" not in meta:
        return False
    try:
        size, digest = corpus_fingerprint(Corpus(source))  # streamed: one document at a time
    except DataError:
        return False  # not readable now: then it is not the same corpus either
    return (size, digest) == (meta["source_bytes"], meta["source_sha256"])


def _shown_path(source_path: str) -> str:
    """``source_path`` relative to the working directory when it lies below it (shorter to read)."""
    try:
        return Path(source_path).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return source_path


def check_prepared_from(
    meta: dict[str, Any],
    data_dir: str | os.PathLike[str],
    *,
    source: str,
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
) -> None:
    """DataError unless ``data_dir`` (whose meta.json is ``meta``) was prepared from these settings.

    The source compares by :func:`~gptkit.data.sources.resolve_source`, ``vocab_size`` only for the
    BPE tokenizer (a char vocabulary is whatever the corpus holds). A field that an older meta.json
    does not record is unknown and not compared; such a data set is used with a warning.
    """
    source_now = resolve_source(source)
    source_then = meta.get("source_path")
    tokenizer_then = meta.get("tokenizer")
    vocab_then = meta.get("requested_vocab_size")
    val_then = meta.get("val_fraction")
    differs = {
        "source": source_then is not None and source_then != source_now and not _same_corpus(meta, source),
        "tokenizer": tokenizer_then is not None and tokenizer_then != tokenizer,
        "vocab": tokenizer == tokenizer_then == "bpe"
        and "requested_vocab_size" in meta
        and vocab_then != vocab_size,
        "val_fraction": val_then is not None and float(val_then) != float(val_fraction),
    }
    if any(differs.values()):
        shown_then = _shown_path(source_then) if differs["source"] else source
        shown_now = _shown_path(source_now) if differs["source"] else source
        show_val = differs["val_fraction"]
        then = _describe(shown_then, tokenizer_then, vocab_then, val_then if show_val else None)
        now = _describe(shown_now, tokenizer, vocab_size, val_fraction if show_val else None)
        # The settings to pass to train on the data as it is: those that differ.
        flags = []
        if differs["source"]:
            flags.append(f"--data.source={meta.get('source', source_then)}")
        if differs["tokenizer"]:
            flags.append(f"--data.tokenizer={tokenizer_then}")
        if tokenizer_then == "bpe" and vocab_then is not None and (differs["tokenizer"] or differs["vocab"]):
            flags.append(f"--data.vocab_size={vocab_then}")
        if differs["val_fraction"]:
            flags.append(f"--data.val_fraction={val_then}")
        raise DataError(
            f"data.dir {data_dir} was prepared from {then}; this run asks for {now}: to train on that data "
            f"pass {' '.join(flags)}, or give another data.dir for the new settings"
        )
    if "split" not in meta:
        logger.warning(
            "data.dir %s was prepared by an older gptkit: its meta.json does not record all it was "
            "prepared from, and its train split holds no end-of-text tokens; run `gptkit prepare` "
            "again to rebuild it",
            data_dir,
        )


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
            if not isinstance(meta[key], int) or isinstance(meta[key], bool):
                raise ValueError(f"{key} is not an integer")
        if meta["vocab_size"] < 1:
            raise ValueError(f"vocab_size is {meta['vocab_size']}")
        if not 0 <= meta["eot_id"] < meta["vocab_size"]:
            raise ValueError(f"eot_id {meta['eot_id']} is outside the vocabulary of {meta['vocab_size']}")
        # What check_prepared_from compares (absent or null in an older meta.json).
        val_fraction = meta.get("val_fraction")
        if val_fraction is not None and (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))):
            raise ValueError(f"val_fraction is not a number: {val_fraction!r}")
        for key in ("source", "source_path", "tokenizer"):
            if meta.get(key) is not None and not isinstance(meta[key], str):
                raise ValueError(f"{key} is not a string: {meta[key]!r}")
    except KeyError as exc:
        raise DataError(f"{path} is corrupt (no field {exc}); run `gptkit prepare` again") from None
    except (TypeError, ValueError, DataError) as exc:
        raise DataError(f"{path} is corrupt ({exc}); run `gptkit prepare` again") from None
    if not (Path(data_dir) / "tokenizer.json").is_file():
        # Training would go on and write checkpoints that no one could sample from.
        raise DataError(
            f"no tokenizer.json in {data_dir}: the data set is damaged, run `gptkit prepare` again"
        )
    return meta
