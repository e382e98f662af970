"""Atomic file writes: write to a temporary sibling, fsync, then rename over the target.

A reader therefore sees either the old file or the complete new one, never half of it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def is_or_contains_cwd(path: Path) -> bool:
    """Whether ``path`` is the current directory or one above it: a directory replaced whole there
    would leave the shell in a deleted directory (and delete what the user is working on)."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    return resolved == cwd or resolved in cwd.parents


def nearest_existing(path: Path) -> Path | None:
    """``path`` itself if it exists (a dangling link counts), else its nearest existing parent: where a
    directory to be made at ``path`` would go, and which must then be a directory."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return None


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets us open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's file-creation mask: from /proc on Linux; elsewhere by setting it and setting it
    straight back (a moment in which another thread's new file would get the mask 0)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed to ``path``.

    The file gets the permissions a plain ``open(path, "w")`` would give it (0666 less the umask),
    not mkstemp's private 0600; the caller may still chmod the temporary path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _link_target(path: Path) -> Path:
    """``path``, or the path a symbolic link there points to: replacing the link itself by a real
    directory would move the data off the disk the user chose (and ``rmtree`` refuses links)."""
    return path.resolve() if path.is_symlink() else path


def _pid_namespace() -> str:
    """An id of this process's PID namespace ("" where there is none to read): containers that
    share the host's name (``docker run --network=host``) number their processes apart, so a pid
    seen from one of them says nothing about the processes of another."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return "".join(c for c in link if c.isdigit())


# Who owns a temporary: the host and its PID namespace, where a pid can be checked. No dots: the
# temporary names split on them.
_HOST = "-".join(filter(None, [socket.gethostname().replace(".", "_"), _pid_namespace()]))


def _remove_abandoned_temporaries(target: Path) -> None:
    """Remove the temporary siblings of ``target`` left by processes of this host that died
    (``kill -9``, a lost machine) before they could clean up: each would otherwise keep a partial
    copy of a data set or checkpoint on disk for good. A live process's temporary is left alone,
    and so are other hosts' and other PID namespaces' (the folder may be on a shared file system,
    or shared with containers), and any name this code did not write."""
    prefix = f".{target.name}.{_HOST}."
    for candidate in target.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid_text = candidate.name[len(prefix):].split(".", 1)[0]
        if not (pid_text.isascii() and pid_text.isdigit()):  # "²".isdigit() is True too
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _process_exists(pid):
            continue
        shutil.rmtree(candidate, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    """Whether ``pid`` may be a live process; True (leave it alone) when that cannot be told."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: another user's; OverflowError: no pid at all
        return True
    return True


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` as a whole.

    If the block raises, the temporary directory is removed and ``path`` is left as it was.
    A ``path`` that is a symbolic link (say ``data -> /big/disk/data``) keeps pointing where it
    did: the directory it points to is the one replaced, and the temporary one is made next to it.
    """
    target = _link_target(Path(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_set_aside(target)
    _remove_abandoned_temporaries(target)
    owner = f"{_HOST}.{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{owner}.", suffix=".tmp", dir=target.parent))
    # mkdtemp makes a private (0700) directory; give the result the usual permissions instead.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        publish_directory(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def restore_set_aside(path: str | os.PathLike[str]) -> None:
    """Put back ``.<name>.old``, the previous directory that :func:`publish_directory` renames aside
    for a moment, when a process died between its two renames (``kill -9``, a lost machine) and
    left no ``path`` at all; the next publish would otherwise delete it."""
    target = _link_target(Path(path))
    old = target.with_name(f".{target.name}.old")
    if not (target.exists() or target.is_symlink()) and old.is_dir() and not old.is_symlink():
        with contextlib.suppress(OSError):  # another process got there first
            os.replace(old, target)


def publish_directory(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """fsync every file under ``tmp``, then rename it to ``target``, replacing any old one whole.

    Files made private (0600) — what safetensors' ``save_file`` and mkstemp create — get the
    permissions a plain ``open(path, "w")`` gives (0666 less the umask), like the JSON files next to
    them: a checkpoint shared on a team's disk must be readable by those who may read its folder."""
    tmp, target = Path(tmp), _link_target(Path(target))
    usual = 0o666 & ~_umask()
    for child in tmp.rglob("*"):
        if child.is_file() and not child.is_symlink():
            if child.stat().st_mode & 0o777 == 0o600:
                os.chmod(child, usual)
            with open(child, "rb+") as f:
                os.fsync(f.fileno())
    if target.exists():
        # Rename the old one aside first so that at no moment is there no complete directory.
        old = target.with_name(f".{target.name}.old")
        if old.is_symlink() or old.is_file():  # not a directory of ours: never recurse into it
            old.unlink()
        elif old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:  # Ctrl-C, SIGTERM or an error between the two renames
            if not target.exists():
                os.replace(old, target)  # the previous one goes back: never no directory at all
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)
