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
    """ConfigError when torch's TensorBoard writer cannot run here (it needs the tensorboard package)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "train.tensorboard needs the tensorboard package, which is not installed; "
            "pip install tensorboard (or gptkit[tensorboard]), or set train.tensorboard=false"
        ) from None


class TensorBoardLog:
    """Writes metric records (the dicts of metrics.jsonl) as scalars; flushed after each record,
    so that what a crash interrupts is on disk as far as metrics.jsonl is."""

    def __init__(self, directory: Path, *, resumed_at: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = directory
        if resumed_at is None:
            # An earlier run's curves (one that saved no checkpoint) would otherwise overlap ours.
            for stale in directory.glob("events.out.tfevents.*"):
                stale.unlink()
        # purge_step: TensorBoard hides the events of steps >= it written before this session.
        self._writer = SummaryWriter(str(directory), purge_step=None if resumed_at is None else resumed_at + 1)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, tag in TAGS.items():
            if record.get(key) is not None:
                self._writer.add_scalar(tag, float(record[key]), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
