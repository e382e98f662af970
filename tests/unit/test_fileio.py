"""Atomic writes: complete files or none, with the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gptkit.fileio import atomic_directory, atomic_path, atomic_write_json, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_are_readable_by_others_as_with_open(tmp_path: Path, umask_022) -> None:
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "sub" / "b.json", {"k": 1})
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "plain.txt") == 0o644
    assert mode(tmp_path / "sub" / "b.json") == 0o644


def test_umask_is_respected(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "private.txt") == 0o600


def test_caller_chmod_inside_the_block_wins(tmp_path: Path, umask_022) -> None:
    with atomic_path(tmp_path / "tool") as tmp:
        tmp.write_text("#!/bin/sh\n")
        tmp.chmod(0o755)
    assert mode(tmp_path / "tool") == 0o755


def test_directory_gets_usual_permissions(tmp_path: Path, umask_022) -> None:
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert mode(tmp_path / "d") == 0o755


def test_checkpoint_weights_get_the_permissions_of_its_json_files(tmp_path: Path, umask_022) -> None:
    """safetensors' save_file creates its file 0600; a checkpoint's files must all be readable alike."""
    from gptkit.checkpoint import write_model_files
    from gptkit.model import GPT, ModelConfig
    from gptkit.model.hf import save_hf

    model = GPT(ModelConfig(vocab_size=17, block_size=8, n_layer=1, n_head=2, d_model=8))
    with atomic_directory(tmp_path / "ckpt") as tmp:
        write_model_files(tmp, model)
        (tmp / "kept.bin").write_bytes(b"x")
        (tmp / "kept.bin").chmod(0o640)  # a mode the writer chose is kept
    assert mode(tmp_path / "ckpt" / "model.safetensors") == mode(tmp_path / "ckpt" / "config.json") == 0o644
    assert mode(tmp_path / "ckpt" / "kept.bin") == 0o640
    pytest.importorskip("transformers")
    save_hf(model, tmp_path / "hf")
    assert {mode(p) for p in (tmp_path / "hf").iterdir()} == {0o644}


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_a_symlinked_directory_is_replaced_through_the_link(tmp_path: Path) -> None:
    # data -> elsewhere/real (the data on another disk): the link stays, the folder it names is replaced.
    real = tmp_path / "elsewhere" / "real"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("old")
    link = tmp_path / "data"
    link.symlink_to(real, target_is_directory=True)
    with atomic_directory(link) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in real.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "elsewhere"]  # no .data.old left
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["real"]


def test_temporaries_of_dead_processes_on_this_host_are_removed(tmp_path: Path) -> None:
    """`kill -9` during a write leaves the temporary sibling behind (no `finally` runs); the next
    atomic write of the same directory removes it, but not a live process's or another host's."""
    import subprocess
    import sys

    from gptkit.fileio import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now (and not reused within this test in practice)
    abandoned = tmp_path / f".data.{_HOST}.{dead.pid}.x1y2.tmp"
    live = tmp_path / f".data.{_HOST}.{os.getppid()}.a1b2.tmp"
    elsewhere = tmp_path / f".data.otherhost.{dead.pid}.c3d4.tmp"
    for folder in (abandoned, live, elsewhere):
        (folder / "train_00000.bin").parent.mkdir()
        (folder / "train_00000.bin").write_bytes(b"partial")
    with atomic_directory(tmp_path / "data") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert not abandoned.exists()
    assert live.exists() and elsewhere.exists()
    assert (tmp_path / "data" / "meta.json").exists()


@pytest.mark.parametrize("pid_text", ["99999999999999999999", "\u00b2"])
def test_a_temporary_whose_pid_is_no_pid_is_left_alone(tmp_path: Path, pid_text: str) -> None:
    """A sibling that only looks like ours (a pid no process can have, a non-ASCII digit) must not
    stop the write (it raised OverflowError / ValueError) nor be deleted."""
    from gptkit.fileio import _HOST

    odd = tmp_path / f".data.{_HOST}.{pid_text}.x1y2.tmp"
    odd.mkdir()
    with atomic_directory(tmp_path / "data") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert odd.is_dir() and (tmp_path / "data" / "meta.json").exists()


def _host_of_another_pid_namespace() -> str | None:
    """``_HOST`` as a process in a new PID namespace (a container sharing this host's name, as
    ``docker run --network=host`` does) computes it; None where no namespace can be made."""
    import subprocess
    import sys

    code = "from gptkit.fileio import _HOST; print(_HOST)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))}
    for unshare in (["unshare", "--pid", "--fork"], ["unshare", "--user", "--map-root-user", "--pid", "--fork"]):
        try:
            result = subprocess.run([*unshare, sys.executable, "-c", code], env=env, capture_output=True,
                                    text=True, timeout=60)
        except OSError:
            return None
        if result.returncode == 0:
            return result.stdout.strip()
    return None


def test_a_temporary_of_another_pid_namespace_is_left_alone(tmp_path: Path) -> None:
    """Its writer's pid means nothing in this namespace: that no process here has it does not
    make the writer dead (it deleted a live container's half-written data set)."""
    import subprocess
    import sys

    other_host = _host_of_another_pid_namespace()
    if other_host is None:
        pytest.skip("cannot create a PID namespace here (unshare)")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # no process of this namespace has its pid now; the writer's namespace may
    theirs = tmp_path / f".data.{other_host}.{dead.pid}.x1y2.tmp"
    theirs.mkdir()
    with atomic_directory(tmp_path / "data") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert theirs.is_dir()
