"""Where a tensor-parallel shard's elements sit in the unsharded tensor.

A tensor-parallel engine holds each logical (HF) tensor as one shard per rank: a block of
rows (column-parallel layers, the vocabulary of embeddings and LM heads), a block of
columns (row-parallel layers), or the whole tensor (replicated: norms, and LoRA matrices
SGLang does not split). MeZO's z is a function of the element's offset in the
*unsharded* tensor, so every rank draws exactly the z a single process draws for the
same elements. `ShardLayout` is that map, and the one rule for it: the kernels use it to
draw z, the engine plugin to compare and load shards, the SGLang backend to gather them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch


@dataclass(frozen=True)
class ShardLayout:
    """A shard = elements [start, start + count) of dimension `dim` (0: rows, 1: columns of a
    matrix) of an unsharded tensor of shape `full_shape`, all of every other dimension."""

    full_shape: tuple
    dim: int
    start: int
    count: int

    def __post_init__(self):
        if self.dim not in (0, 1) or (self.full_shape and self.dim >= len(self.full_shape)):
            raise ValueError(f"a shard splits dimension 0 or 1 of a tensor, not {self.dim} of {self.full_shape}")
        if not 0 <= self.start <= self.start + self.count <= self._extent:
            raise ValueError(
                f"[{self.start}, {self.start + self.count}) is outside dimension {self.dim} of {self.full_shape}"
            )

    @property
    def _extent(self) -> int:
        return self.full_shape[self.dim] if self.full_shape else 1  # a 0-d tensor: one element

    @classmethod
    def whole(cls, shape: Sequence[int]) -> "ShardLayout":
        """A tensor held whole (replicated on every rank, or a single process's)."""
        shape = tuple(shape)
        return cls(shape, 0, 0, shape[0] if shape else 1)

    @classmethod
    def rows(cls, full_shape: Sequence[int], start: int, count: int) -> "ShardLayout":
        """Rows [start, start + count) (elements of a 1-D tensor)."""
        return cls(tuple(full_shape), 0, start, count)

    @classmethod
    def columns(cls, full_shape: Sequence[int], start: int, count: int) -> "ShardLayout":
        """Columns [start, start + count) of a matrix."""
        return cls(tuple(full_shape), 1, start, count)

    @property
    def shape(self) -> tuple:
        """The shard's own shape."""
        return tuple(self.count if d == self.dim else n for d, n in enumerate(self.full_shape))

    @property
    def is_whole(self) -> bool:
        return self.count == self._extent

    @property
    def region(self) -> tuple:
        """The index of the shard in the unsharded tensor: ``full[region]`` is the shard."""
        if self.is_whole:
            return (...,)
        return (slice(None),) * self.dim + (slice(self.start, self.start + self.count),)

    @property
    def flat_start(self) -> Optional[int]:
        """The unsharded flat offset of the shard's first element when its elements are one
        contiguous run of the unsharded tensor (the whole tensor, a block of rows), else None."""
        if self.is_whole:
            return 0
        if self.dim == 0:
            return self.start * math.prod(self.full_shape[1:])
        return None

    def global_index(self, local: torch.Tensor) -> torch.Tensor:
        """Flat offsets in the unsharded tensor of the shard's elements at flat offsets `local` (int64)."""
        if self.is_whole:
            return local
        inner = math.prod(self.full_shape[self.dim + 1 :])  # elements per index of `dim`
        if self.dim == 0:
            return local + self.start * inner
        run = self.count * inner  # a row of the shard
        return (
            torch.div(local, run, rounding_mode="floor") * (self.full_shape[1] * inner)
            + self.start * inner
            + local % run
        )

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The shard's values in the unsharded tensor `full` (a view)."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"expected the unsharded tensor of shape {self.full_shape}, got {tuple(full.shape)}")
        return full[self.region]

    def as_json(self) -> list:
        """The layout as a JSON value (`from_json` reads it back)."""
        return [list(self.full_shape), self.dim, self.start, self.count]

    @classmethod
    def from_json(cls, value: list) -> "ShardLayout":
        full_shape, dim, start, count = value
        return cls(tuple(full_shape), int(dim), int(start), int(count))


def is_shard(layout: Optional[ShardLayout]) -> bool:
    """Whether a tensor with this layout (None: a plain whole tensor) is part of a larger one:
    such a tensor's z is drawn at its unsharded offsets (`flat_start` where they are one run)."""
    return layout is not None and not layout.is_whole


def gather(name: str, pieces: Iterable[tuple]) -> torch.Tensor:
    """The unsharded tensor from its shards [(layout, values)] (one per rank).

    Every element must be held by some rank, and an element held by several ranks
    (replicated tensors, KV heads shared by ranks) must have the same bits on each: a
    divergence means the ranks perturbed or updated differently, and is an error naming
    the tensor.
    """
    full = held = None
    for layout, values in pieces:
        if tuple(values.shape) != layout.shape:
            raise ValueError(f"{name}: a shard of shape {tuple(values.shape)}, its layout says {layout.shape}")
        if full is None:
            full = torch.empty(layout.full_shape, dtype=values.dtype)
            held = torch.zeros(layout.full_shape, dtype=torch.bool)
        elif values.dtype != full.dtype or layout.full_shape != tuple(full.shape):
            raise ValueError(
                f"{name}: shards of {full.dtype} {tuple(full.shape)} and {values.dtype} {layout.full_shape}"
            )
        region, again = layout.region, held[layout.region]
        if bool(again.any()) and not torch.equal(_bits(full[region])[again], _bits(values)[again]):
            raise RuntimeError(f"{name}: tensor-parallel ranks hold different values for the same elements")
        full[region] = values
        held[region] = True
    if full is None:
        raise ValueError(f"{name}: no shards")
    if not bool(held.all()):
        raise RuntimeError(f"{name}: {int((~held).sum())} elements are held by no tensor-parallel rank")
    return full


def _bits(t: torch.Tensor) -> torch.Tensor:
    """`t` reinterpreted as integers of its width: bits compare exactly (NaN payloads, -0.0)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
