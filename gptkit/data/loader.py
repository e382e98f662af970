"""Reading prepared token shards: random-access windows, training batches and evaluation batches.

Shards are memory-mapped read-only, so a data set of any size costs no RAM up front and many
processes (one per rank) share the page cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.data.prepare import SPLITS, load_meta, token_dtype
from gptkit.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["BatchLoader", "TokenSplit", "eval_batches"]


class TokenSplit:
    """One split (``"train"`` or ``"val"``) of a prepared data set, as one long token sequence.

    ``len(split)`` is the number of tokens; :meth:`window` and :meth:`gather` read across shard
    boundaries as if the shards were one array.
    """

    def __init__(self, data_dir: str | os.PathLike[str], split: str) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = load_meta(data_dir)
        self.dtype = token_dtype(self.meta["dtype"])
        self.shards: list[np.memmap] = []
        for shard in self.meta["splits"][split]["shards"]:
            path = self.data_dir / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            try:
                actual = path.stat().st_size
            except OSError:
                raise DataError(
                    f"shard {path} is missing; run `gptkit prepare` again"
                ) from None
            if actual != expected:
                raise DataError(
                    f"shard {path} has {actual} bytes but meta.json says {shard['tokens']} tokens "
                    f"({expected} bytes); the data set is damaged, run `gptkit prepare` again"
                )
            if shard["tokens"]:  # np.memmap cannot map an empty file, and it holds nothing anyway
                self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        # ends[i] is one past the global index of shard i's last token.
        self.ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)
        self.starts = self.ends - np.array([len(s) for s in self.shards], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as an array of shape (length,) in the shard dtype."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) is outside [0, {len(self)})")
        pieces = []
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while length > 0:
            offset = start - int(self.starts[shard])
            piece = self.shards[shard][offset : offset + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
            shard += 1
        if len(pieces) == 1:
            return self._checked(np.asarray(pieces[0]))
        return self._checked(np.concatenate(pieces) if pieces else np.empty(0, self.dtype))

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Windows of ``length`` tokens at each of ``starts`` (shape (N,)), as shape (N, length).

        One fancy-indexing read per shard touched, instead of a Python loop over windows.
        """
        starts = np.asarray(starts, dtype=np.int64)
        if len(starts) and (starts.min() < 0 or starts.max() + length > len(self)):
            raise IndexError(f"a window of {length} tokens falls outside [0, {len(self)})")
        index = starts[:, None] + np.arange(length, dtype=np.int64)  # (N, length) global positions
        if len(self.shards) == 1:
            return self._checked(np.asarray(self.shards[0][index]))
        out = np.empty(index.shape, dtype=self.dtype)
        owner = np.searchsorted(self.ends, index, side="right")  # shard of each position
        for shard in np.unique(owner):
            mask = owner == shard
            out[mask] = self.shards[shard][index[mask] - self.starts[shard]]
        return self._checked(out)

    def _checked(self, tokens: np.ndarray) -> np.ndarray:
        """``tokens``, after making sure each is an id of the vocabulary: a damaged shard would
        otherwise fail deep inside the model's embedding (an IndexError, or a device assert on CUDA)."""
        if tokens.size and int(tokens.max()) >= self.meta["vocab_size"]:
            raise DataError(
                f"the {self.split} shards of {self.data_dir} hold token id {int(tokens.max())}, outside the "
                f"vocabulary of {self.meta['vocab_size']} in meta.json; the data set is damaged, run "
                "`gptkit prepare` again"
            )
        return tokens


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T+1) token windows w -> LongTensors x = w[:, :-1] and y = w[:, 1:], each (N, T)."""
    data = torch.from_numpy(windows.astype(np.int64))
    # Contiguous so callers can .view(-1) them (e.g. for cross-entropy).
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) so nearby pairs such as (0, 1) and (1, 0) are unrelated.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


class BatchLoader:
    """Deterministic, resumable, rank-disjoint random batches of (x, y), each of shape (B, T).

    Epoch ``e`` is defined by a ``torch.Generator`` seeded from ``(seed, e)``: it draws a shift
    ``s`` in ``[0, T)`` and a permutation of the non-overlapping windows that start at
    ``s + k*T`` (each window holds T+1 tokens: x and the next-token targets y). The random shift
    means that over epochs the model sees every position at every offset in its context.

    Global batch ``i`` of an epoch is split over ranks: rank ``r`` takes permuted windows
    ``[(i*world_size + r)*B, +B)``, so ranks never share a window within a batch and together
    they consume the epoch in order. Batches that would be incomplete are dropped and the next
    epoch starts automatically. Everything depends only on ``(seed, epoch, batch_index)``, so
    :meth:`state_dict` / :meth:`load_state_dict` resume the exact same stream.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        split: str,
        batch_size: int,
        block_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1: {batch_size}, {block_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.tokens = TokenSplit(data_dir, split)
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        n, T = len(self.tokens), block_size
        if n < T + 1:
            raise DataError(
                f"the {split} split of {data_dir} has {n} tokens, fewer than "
                f"block_size+1 = {T + 1}; use a smaller block_size or more data"
            )
        # The worst shift (s = T-1) must still give one window per row of every rank's batch.
        needed = (world_size * batch_size + 1) * T
        if n < needed:
            raise DataError(
                f"the {split} split of {data_dir} has {n} tokens, {(n - T) // T} windows of "
                f"block_size+1 = {T + 1} tokens; batch_size*world_size = "
                f"{batch_size * world_size} windows need at least {needed} tokens; use a smaller "
                "batch_size or block_size, or more data"
            )
        self.epoch = 0
        self.batch_index = 0  # next global batch of self.epoch to produce
        self._plan_epoch: int | None = None
        self._shift = 0
        self._order = np.empty(0, dtype=np.int64)

    def _plan(self) -> None:
        """Draw (once per epoch) the shift and window order of ``self.epoch``."""
        if self._plan_epoch == self.epoch:
            return
        T = self.block_size
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        self._shift = int(torch.randint(0, T, (1,), generator=g).item())
        windows = (len(self.tokens) - 1 - self._shift) // T  # each needs T+1 tokens
        self._order = torch.randperm(windows, generator=g).numpy()
        self._plan_epoch = self.epoch

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in the current epoch (varies by at most one between epochs)."""
        self._plan()
        return len(self._order) // (self.world_size * self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next batch: LongTensors x, y of shape (batch_size, block_size)."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        self._plan()
        B, T = self.batch_size, self.block_size
        first = (self.batch_index * self.world_size + self.rank) * B
        starts = self._shift + self._order[first : first + B] * T
        self.batch_index += 1
        return _to_xy(self.tokens.gather(starts, T + 1))

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Position in the stream, JSON-serialisable: ``{"epoch": e, "batch_index": i,
        "windows_per_batch": world_size * batch_size}`` (the global batch the index counts in)."""
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "windows_per_batch": self.world_size * self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` with the same seed).

        A state saved with another global batch (world_size * batch_size: a resume on another
        number of ranks, or with another batch_size) is converted through the number of windows of
        the epoch already consumed, so the run neither reads those windows again nor skips ahead;
        when that number is not a multiple of the new global batch, the few windows up to the next
        multiple are skipped (never read twice)."""
        try:
            epoch, index = state["epoch"], state["batch_index"]
        except (KeyError, TypeError):
            raise DataError(f"bad data loader state {state!r}: no epoch/batch_index") from None
        if not all(type(v) is int and v >= 0 for v in (epoch, index)):  # bools are ints too
            raise DataError(f"bad data loader state {state!r}: need non-negative integers")
        mine = self.world_size * self.batch_size
        saved = state.get("windows_per_batch", mine)  # absent in older checkpoints: assume the same
        if type(saved) is not int or saved < 1:
            raise DataError(f"bad data loader state {state!r}: windows_per_batch must be a positive integer")
        if saved != mine:
            consumed = index * saved
            converted = -(-consumed // mine)  # ceil: never read a window of this epoch twice
            log = logger.warning if self.rank == 0 else logger.debug  # once, not per rank
            log(
                "the global batch changed from %d to %d sequences (world size x train.batch_size); the data "
                "position, %d sequences into epoch %d, is batch %d of the new size",
                saved, mine, consumed, epoch, converted,
            )
            index = converted
        self.epoch, self.batch_index = epoch, index


def eval_batches(
    data_dir: str | os.PathLike[str],
    split: str,
    batch_size: int,
    block_size: int,
    max_batches: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of at most ``max_batches`` (x, y) batches, each of shape (≤batch_size, T).

    Window starts are spaced evenly from the first to the last possible position, so the
    estimate covers the whole split and is identical on every call (and every rank). Batches are
    full; only when the split holds fewer than ``batch_size`` windows is there a single smaller one.

    With ``world_size`` data-parallel ranks, ``batch_size`` is per rank as in :class:`BatchLoader`:
    the set is the one a single process with batch ``world_size * batch_size`` evaluates, and rank
    ``rank`` gets its share of every batch (a batch that does not split evenly goes whole to every
    rank). The mean over ranks of each rank's mean loss is then the single process's val loss.
    """
    if batch_size < 1 or block_size < 1 or max_batches < 1:
        raise ValueError("batch_size, block_size and max_batches must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    tokens = TokenSplit(data_dir, split)
    n, T = len(tokens), block_size
    if n < T + 1:
        raise DataError(
            f"the {split} split of {data_dir} has {n} tokens, fewer than block_size+1 = {T + 1}; "
            "use a smaller block_size or more data"
        )
    global_batch = batch_size * world_size
    count = min(max_batches * global_batch, (n - 1) // T)  # no more windows than fit side by side
    if count >= global_batch:
        count -= count % global_batch
    starts = np.linspace(0, n - T - 1, num=count).round().astype(np.int64)
    windows = tokens.gather(starts, T + 1)
    batches = []
    for i in range(0, count, global_batch):
        batch = windows[i : i + global_batch]
        if len(batch) % world_size == 0:
            share = len(batch) // world_size
            batch = batch[rank * share : (rank + 1) * share]
        batches.append(_to_xy(batch))
    return batches
