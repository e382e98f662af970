"""A preallocated key/value cache with a length per sequence.

Each row (sequence) of the batch has its own length, so sequences of different lengths can decode
together; the generator's common case, where every row has the same length, takes a fast path that
writes with a slice and attends without a mask.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for a batch of sequences.

    Storage: ``keys``/``values`` of shape (n_layer, B, n_kv_head, max_len, head_dim).
    ``lengths`` (B,) counts the tokens already stored for each row.
    """

    def __init__(
        self,
        *,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KV cache {name} must be a positive integer; got {value!r}")
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        # Python-side copy of the shared length while all rows agree; None once they differ.
        self._uniform_length: int | None = 0
        # Set by begin_step for the layers of one forward pass.
        self._step_positions: torch.Tensor | None = None
        self._step_tokens = 0

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def uniform_length(self) -> int | None:
        """The length every row shares, or None when the rows differ."""
        return self._uniform_length

    def begin_step(self, n_tokens: int, batch_size: int | None = None) -> torch.Tensor:
        """Reserve ``n_tokens`` new positions per row; returns their absolute positions (B, T).
        ``batch_size``, when given, must be the cache's (the rows of the tokens fed in)."""
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"{batch_size} rows of tokens for a KV cache of {self.batch_size} rows")
        longest = self._uniform_length if self._uniform_length is not None else int(self.lengths.max())
        if longest + n_tokens > self.max_len:
            raise ValueError(f"KV cache full: {longest} + {n_tokens} tokens > max_len {self.max_len}")
        offsets = torch.arange(n_tokens, device=self.lengths.device)
        self._step_positions = self.lengths[:, None] + offsets  # (B, T)
        self._step_tokens = n_tokens
        return self._step_positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (B, n_kv_head, T, head_dim) of ``layer`` at this step's positions.

        Returns the keys and values to attend over, (B, n_kv_head, S, head_dim), where S is the
        longest row's length after this step.
        """
        n_new = k.shape[2]
        if self._uniform_length is not None:
            start = self._uniform_length
            end = start + n_new
            self.keys[layer, :, :, start:end] = k
            self.values[layer, :, :, start:end] = v
        else:
            assert self._step_positions is not None, "begin_step must come before update"
            index = self._step_positions[:, None, :, None].expand_as(k)  # (B, H, T, D)
            self.keys[layer].scatter_(2, index, k)
            self.values[layer].scatter_(2, index, v)
            end = int(self._step_positions[:, -1].max()) + 1
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def end_step(self) -> None:
        """Commit the positions reserved by begin_step (call once after all layers ran)."""
        self.lengths += self._step_tokens
        if self._uniform_length is not None:
            self._uniform_length += self._step_tokens
        self._step_positions = None
        self._step_tokens = 0

    def advance(self, n_tokens: int) -> None:
        """Count ``n_tokens`` more per row, written straight into the storage by a fused kernel
        (``gptkit.model.fused_decode``) at the length every row shares."""
        if self._uniform_length is None:
            raise ValueError("advance needs rows of equal length")
        if self._uniform_length + n_tokens > self.max_len:
            raise ValueError(f"KV cache full: {self._uniform_length} + {n_tokens} tokens > max_len {self.max_len}")
        self.lengths += n_tokens
        self._uniform_length += n_tokens

    def attention_mask(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Boolean mask (B, 1, T, S) of which cached keys each new query may see, or None.

        None means "no mask needed": a single new token per row of equal length sees every
        cached key. Otherwise key j is visible to a query at absolute position p iff j <= p,
        which also hides stale slots beyond a shorter row's length.
        """
        n_new = positions.shape[1]
        if self._uniform_length is not None and n_new == 1:
            return None
        key_count = int(positions[:, -1].max()) + 1
        key_index = torch.arange(key_count, device=positions.device)
        return (key_index[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)

    def set_lengths(self, lengths: torch.Tensor | list[int]) -> None:
        """Declare how many tokens each row holds (for example after prefilling rows separately)."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device)
        if lengths.shape != self.lengths.shape:
            raise ValueError(f"expected {self.lengths.shape[0]} lengths, got {tuple(lengths.shape)}")
        if bool((lengths < 0).any()) or bool((lengths > self.max_len).any()):
            raise ValueError(f"lengths must be in [0, max_len={self.max_len}]; got {lengths.tolist()}")
        self.lengths.copy_(lengths)
        first = int(lengths[0])
        self._uniform_length = first if bool((lengths == first).all()) else None

    def reset(self) -> None:
        self.lengths.zero_()
        self._uniform_length = 0
