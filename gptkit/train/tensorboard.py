"""The run's metrics as TensorBoard scalars (``train.tensorboard: true``), beside metrics.jsonl.

Event files go to ``<out_dir>/tensorboard``; ``tensorboard --logdir <out_dir>`` shows them. The
JSONL log stays the record the trainer reads back (resume truncates it); this is a view of the same
records for people who browse runs in TensorBoard:

- ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s`` at every logged step;
- ``val/loss`` at every evaluation.

A resumed run hides what the interrupted session logged after its checkpoint (TensorBoard's purge
step), so the curves read as one run, as metrics.jsonl does. A fresh run removes the event files an
earlier run without a checkpoint left there (``--overwrite`` moves a checkpointed run's aside with
its checkpoint instead).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from pathlib import Path
from typing import Any

from gptkit.errors import ConfigError

TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "val_loss": "val/loss",
}


def check_available() -> None:
    """ConfigError when the tensorboard package, whose event format TensorBoardLog writes, is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "train.tensorboard needs the tensorboard package, which is not installed; "
            "pip install tensorboard (or gptkit[tensorboard]), or set train.tensorboard=false"
        ) from None


# Tells apart the event files one process opens within a second (TensorBoard reads them in name order).
_file_numbers = itertools.count()


class TensorBoardLog:
    """Writes metric records (the dicts of metrics.jsonl) as scalars; flushed after each record,
    so that what a crash interrupts is on disk as far as metrics.jsonl is.

    The events are written here, in the calling thread, with tensorboard's record format, rather
    than by torch's SummaryWriter: its background thread prints a traceback of its own when a write
    fails (a full disk), and its close raises that error again, in place of the trainer's one-line
    error."""

    def __init__(self, directory: Path, *, new_run: bool, resumed_at: int | None) -> None:
        """``new_run``: the run's first record (not resumed, nothing logged yet): event files already
        in ``directory`` are an earlier run's. ``resumed_at``: the checkpoint step this session
        resumed from, whose later events the interrupted session wrote."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        if new_run:
            # An earlier run's curves (one that saved no checkpoint) would otherwise overlap ours.
            for stale in directory.glob("events.out.tfevents.*"):
                stale.unlink()
        # The name torch's SummaryWriter gives its files.
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_numbers)}"
        self._file = open(directory / name, "wb")  # noqa: SIM115 (closed by close())
        self._records = RecordWriter(self._file)
        try:
            self._event(Event(file_version="brain.Event:2"))
            if resumed_at is not None:
                # TensorBoard's purge step: it hides the events of steps after resumed_at that
                # earlier files hold, what the interrupted session logged after its checkpoint.
                self._event(Event(step=resumed_at + 1, session_log=SessionLog(status=SessionLog.START)))
            self._file.flush()
        except BaseException:
            self.close()
            raise

    def _event(self, event: Any) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())

    def write(self, record: dict[str, Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [
            Summary.Value(tag=tag, simple_value=float(record[key]))
            for key, tag in TAGS.items()
            if record.get(key) is not None
        ]
        self._event(Event(step=int(record["step"]), summary=Summary(value=values)))
        self._file.flush()

    def close(self) -> None:
        """Never raises: every record was flushed when written, and an error here would replace
        the one the run is ending with."""
        with contextlib.suppress(OSError):
            self._file.close()
