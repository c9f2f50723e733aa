"""The decoder's state, held outside the model.

`KVCache` is the self-attention cache: preallocated once per decode, written at
an explicit length per row. Appending writes at `length` and raises it;
rolling back only lowers it (O(1), no copy). Attention masks are built from the
lengths, so slots past a row's length are stale but harmless: the next write
overwrites them. Reordering rows (beam search) is the one operation that copies.

`AudioKV` is the cross-attention K/V of one batch of audio windows: computed
once per window and reused by every decoding step (and by an assistant that
shares the main model's encoder output and cross-attention weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def repeat_rows(tensor: Tensor, n: int) -> Tensor:
    """(B, ...) -> (B*n, ...), each row n times in a row. One row is repeated as a stride-0 view, no copy
    (the attention kernels and SDPA all take strides): beam_size copies of a window's K/V cost nothing."""
    if tensor.shape[0] == 1:
        return tensor.expand(n, *tensor.shape[1:])
    return tensor.repeat_interleave(n, dim=0)


@dataclass
class AudioKV:
    keys: list[Tensor]  # per decoder layer, (B, H, S_audio, D)
    values: list[Tensor]
    _half: "AudioKV | None" = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def rows(self, index: list[int]) -> "AudioKV":
        """The K/V of these rows, in this order (a view for one row)."""
        if len(index) == 1:
            return AudioKV([k[index[0]:index[0] + 1] for k in self.keys], [v[index[0]:index[0] + 1] for v in self.values])
        picked = torch.tensor(index, device=self.keys[0].device)
        return AudioKV([k.index_select(0, picked) for k in self.keys], [v.index_select(0, picked) for v in self.values])

    def repeat_rows(self, n: int) -> "AudioKV":
        """Each row n times in a row (b0 b0 b0 b1 b1 b1 ...): the beams or samples of each window."""
        return AudioKV([repeat_rows(k, n) for k in self.keys], [repeat_rows(v, n) for v in self.values])

    def half(self) -> "AudioKV":
        """The same K/V in fp16, computed once: what a draft's C kernel reads (its numbers never reach the
        output, and half the bytes is most of its step)."""
        if self._half is None:
            self._half = AudioKV([k.half().contiguous() for k in self.keys],
                                 [v.half().contiguous() for v in self.values])
        return self._half


class CacheOverflow(RuntimeError):
    """A write would pass the preallocated length (Whisper's 448-token context)."""


class KVCache:
    """Per layer K and V of shape (B, H, max_len, D), with one explicit length per row.

    The lengths are kept as Python ints: every decision about them (where to
    write, how far to roll back, which keys a query may see) is made on the
    host, and keeping them off the device avoids a sync per step on a GPU.
    """

    def __init__(self, keys: Tensor, values: Tensor, lengths: list[int]):
        self.keys = keys  # (L, B, H, S_max, D)
        self.values = values
        self.lengths = lengths
        self._lengths_tensor: Tensor | None = None

    @classmethod
    def allocate(cls, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        keys = torch.zeros(shape, dtype=dtype, device=device)
        values = torch.zeros(shape, dtype=dtype, device=device)
        return cls(keys, values, [0] * batch_size)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def computes_positions_alone(self) -> bool:
        """Whether a pass must give each new position the bits of a one-token step (after the prompt):
        how this cache's passes, whose shapes vary, stay exact (docs/exactness.md)."""
        return max(self.lengths) > 0

    def pass_mask(self) -> None:
        return None  # attention reads only the valid keys, whose count the host knows

    def uniform_length(self) -> int | None:
        """The shared length when every row has the same one, else None."""
        first = self.lengths[0]
        return first if all(n == first for n in self.lengths) else None

    def lengths_tensor(self) -> Tensor:
        if self._lengths_tensor is None:
            self._lengths_tensor = torch.tensor(self.lengths, dtype=torch.long, device=self.keys.device)
        return self._lengths_tensor

    def positions(self, n_new: int) -> Tensor:
        """Positions of the next n_new tokens of every row: (B, n_new)."""
        if max(self.lengths) + n_new > self.max_len:
            raise CacheOverflow(f"writing {n_new} tokens after {max(self.lengths)} passes the {self.max_len}-token context")
        offsets = torch.arange(n_new, device=self.keys.device)
        return self.lengths_tensor()[:, None] + offsets[None, :]

    def write(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, H, T, D) new K/V at each row's length; return the layer's full (B, H, S_max, D) views.

        The lengths do not move here: all layers write at the same positions,
        and `advance` commits the step once the whole decoder has run.
        """
        n_new = k_new.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        start = self.uniform_length()
        if start is not None:
            keys[:, :, start:start + n_new] = k_new
            values[:, :, start:start + n_new] = v_new
        else:
            for row, row_start in enumerate(self.lengths):
                keys[row, :, row_start:row_start + n_new] = k_new[row]
                values[row, :, row_start:row_start + n_new] = v_new[row]
        return keys, values

    def advance(self, n_new: int) -> None:
        self.lengths = [n + n_new for n in self.lengths]
        self._lengths_tensor = None

    def extend(self, counts: list[int]) -> None:
        """Record that row b's next counts[b] slots were written outside the model (a fused draft step)."""
        if max(n + c for n, c in zip(self.lengths, counts)) > self.max_len:
            raise CacheOverflow(f"extending by {max(counts)} tokens passes the {self.max_len}-token context")
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]
        self._lengths_tensor = None

    def reorder(self, sources: list[int]) -> None:
        """Row i becomes a copy of what row sources[i] was: beam search keeping, dropping and duplicating
        hypotheses. The number of rows may change (one prompt's row into beam_size rows). Only the slots
        below the longest kept length are copied, and in place only the rows that change (docs/beam-search.md
        has the cost)."""
        if sources == list(range(self.batch_size)):
            return
        n = max(self.lengths[s] for s in sources)
        if len(sources) == self.batch_size:
            moved = [i for i, s in enumerate(sources) if s != i]
            targets = torch.tensor(moved, device=self.keys.device)
            picked = torch.tensor([sources[i] for i in moved], device=self.keys.device)
            # The right side is gathered into a new tensor before the write: a row may be both read and written.
            self.keys[:, targets, :, :n] = self.keys[:, picked, :, :n]
            self.values[:, targets, :, :n] = self.values[:, picked, :, :n]
        else:
            picked = torch.tensor(sources, device=self.keys.device)
            shape = (self.keys.shape[0], len(sources), *self.keys.shape[2:])  # (L, B', H, S_max, D)
            keys = torch.zeros(shape, dtype=self.keys.dtype, device=self.keys.device)
            values = torch.zeros(shape, dtype=self.values.dtype, device=self.values.device)
            keys[:, :, :, :n] = self.keys[:, picked, :, :n]
            values[:, :, :, :n] = self.values[:, picked, :, :n]
            self.keys, self.values = keys, values
        self.lengths = [self.lengths[s] for s in sources]
        self._lengths_tensor = None

    def rollback(self, new_lengths: int | list[int]) -> None:
        """Forget everything past new_lengths (per row, or one int for all): O(1), nothing is copied."""
        if isinstance(new_lengths, int):
            new_lengths = [new_lengths] * self.batch_size
        if len(new_lengths) != self.batch_size:
            raise ValueError(f"rollback needs {self.batch_size} lengths, got {len(new_lengths)}")
        for old, new in zip(self.lengths, new_lengths):
            if not 0 <= new <= old:
                raise ValueError(f"cannot roll back from length {old} to {new}")
        self.lengths = list(new_lengths)
        self._lengths_tensor = None


class StaticKVCache:
    """A KV cache whose passes have fixed shapes and no host-side lengths: the GPU path's (fixed_shape.py).

    The lengths are a (B,) tensor on the cache's device. A pass of T tokens writes at lengths .. +T by a
    scatter and attention reads all S_max slots under a mask, so nothing about a pass (shapes, launch
    arguments) depends on a length: it can be captured once as a CUDA graph and replayed at any position.
    S_max has room past the context for the padded rows of a pass that starts near its end.
    """

    def __init__(self, keys: Tensor, values: Tensor, context: int):
        self.keys = keys  # (L, B, H, S_max, D)
        self.values = values
        self.context = context  # the decoder's positions (448): padded rows past it reuse the last embedding
        self.lengths = torch.zeros(keys.shape[1], dtype=torch.long, device=keys.device)  # (B,)
        self.slots: Tensor | None = None  # (B, T): the current pass's, set by `positions`
        self.mask: Tensor | None = None  # (B, 1, T, S_max)

    @classmethod
    def allocate(cls, n_layer: int, batch_size: int, n_head: int, context: int, rows_per_pass: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> "StaticKVCache":
        shape = (n_layer, batch_size, n_head, context + rows_per_pass, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   context)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def computes_positions_alone(self) -> bool:
        return False  # fixed shapes give a position the same bits in every pass

    def uniform_length(self) -> None:
        return None  # the lengths stay on the device

    def lengths_tensor(self) -> Tensor:
        return self.lengths

    def positions(self, n_new: int) -> Tensor:
        """Begin a pass of n_new tokens: its slots (B, T) and attention mask (B, 1, T, S_max) are computed here,
        once for every layer. Returns (B, T) positional-embedding indices; padded rows past the context take
        its last one."""
        self.slots = self.lengths[:, None] + torch.arange(n_new, device=self.lengths.device)  # (B, T)
        keys = torch.arange(self.max_len, device=self.lengths.device)
        self.mask = (keys[None, None, :] <= self.slots[:, :, None])[:, None]  # query at slot p sees keys 0 .. p
        return self.slots.clamp(max=self.context - 1)

    def pass_mask(self) -> Tensor:
        return self.mask

    def write(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Scatter (B, H, T, D) new K/V at this pass's slots; return the layer's full (B, H, S_max, D) tensors."""
        batch, n_head, n_new, head_dim = k_new.shape
        slots = self.slots[:, None, :, None].expand(batch, n_head, n_new, head_dim)  # (B, H, T, D)
        self.keys[layer].scatter_(2, slots, k_new)
        self.values[layer].scatter_(2, slots, v_new)
        return self.keys[layer], self.values[layer]

    def advance(self, n_new: int) -> None:
        self.lengths += n_new

    def set_lengths(self, lengths: Tensor) -> None:
        """Rollback and commit alike, on the device: lengths (B,)."""
        self.lengths.copy_(lengths)
