"""Batches of MeZO examples: padding, candidate rows, and sharding across ranks.

`MeZOCollator` pads dynamically to the longest row of the batch (right or left) and, for
candidate examples, emits one row per candidate (an example's rows adjacent) with
``example_id``, ``candidate_id``, ``is_gold`` and ``prompt_length``.

Sampling policy (`create_dataloader`)
    ``batch_size`` counts examples per rank, so candidate groups are never split across
    batches or ranks; the global batch of a data-parallel step is ``batch_size x
    world_size`` examples. Sharding is torch's `DistributedSampler` (also with one
    process, where it is simply a seeded shuffler): epoch ``e`` is a permutation seeded
    with ``seed + e`` (``sampler.set_epoch(e)``), and rank ``r`` takes positions
    ``r, r + W, r + 2W, ...``. When the size ``n`` divides by ``W`` the shards are
    disjoint and cover the dataset. Otherwise, by default, the first ``ceil(n/W)*W - n``
    examples of the epoch's order are repeated at the end (every rank gets
    ``ceil(n/W)`` examples, up to ``W - 1`` examples are seen twice per epoch, never twice
    on one rank); with ``drop_last=True`` the last ``n mod W`` examples of the epoch's
    order are dropped (every rank gets ``floor(n/W)``). Either way every rank gets the
    same number of examples and therefore of batches, which the per-step all-reduce of
    data-parallel MeZO requires.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from sglang.srt.mezo.distributed import get_rank, get_world_size, is_distributed
from sglang.srt.mezo.objectives import IGNORE_INDEX

PAD_SIDES = ("right", "left")


class MeZOCollator:
    """Pads a list of examples into one batch of rows (one row per candidate).

    Output: ``input_ids``, ``attention_mask``, ``labels`` ([R, L] long; labels -100 on
    prompt and padding), padded to the longest row (rounded up to ``pad_to_multiple_of``)
    on ``pad_side``; for candidate examples also ``example_id``, ``candidate_id``,
    ``prompt_length`` ([R] long) and ``is_gold`` ([R] bool), an example's rows adjacent.
    """

    def __init__(self, pad_token_id: int, pad_side: str = "right", pad_to_multiple_of: int | None = None):
        if pad_side not in PAD_SIDES:
            raise ValueError(f"pad_side={pad_side!r}: expected one of {PAD_SIDES}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is required")
        self.pad_token_id = int(pad_token_id)
        self.pad_side = pad_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        kinds = {ex["gold"] is not None for ex in examples}
        if len(kinds) > 1:
            raise ValueError(
                "batch mixes candidate and plain examples (example ids "
                f"{[ex['example_id'] for ex in examples]}); a dataset must be all one kind"
            )
        candidates = kinds.pop()
        ids = [ex["example_id"] for ex in examples]
        if candidates and len(set(ids)) != len(ids):
            raise ValueError(f"example ids repeat within one batch ({ids}): candidate groups would merge")
        rows = [(ex, c, row) for ex in examples for c, row in enumerate(ex["rows"])]
        length = max(len(row[0]) for _, _, row in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for r, (_, _, (tokens, row_labels)) in enumerate(rows):
            n = len(tokens)
            span = slice(0, n) if self.pad_side == "right" else slice(length - n, length)
            input_ids[r, span] = torch.tensor(tokens, dtype=torch.long)
            labels[r, span] = torch.tensor(row_labels, dtype=torch.long)
            attention_mask[r, span] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if candidates:
            batch["example_id"] = torch.tensor([ex["example_id"] for ex, _, _ in rows], dtype=torch.long)
            batch["candidate_id"] = torch.tensor([c for _, c, _ in rows], dtype=torch.long)
            batch["is_gold"] = torch.tensor([c == ex["gold"] for ex, c, _ in rows], dtype=torch.bool)
            batch["prompt_length"] = torch.tensor([ex["prompt_length"] for ex, _, _ in rows], dtype=torch.long)
        if "record" in examples[0]:  # prompts to generate from: the reward reads their records
            batch["records"] = [ex["record"] for ex in examples]
            batch["prompts"] = [ex["prompt_text"] for ex in examples]
        return batch


class MeZOSampler(DistributedSampler):
    """torch's `DistributedSampler`, optionally grouping examples of similar length.

    Without ``group_by_length`` it is exactly `DistributedSampler` (seeded permutation per
    epoch, padding/dropping as documented in the module docstring, rank ``r`` takes every
    ``W``-th index). With it, the epoch's permutation is cut into mega-batches of
    ``batch_size * num_replicas * megabatch_mult`` examples, each sorted by length
    (longest first, stable) before the same padding and sharding, so every rank's batches
    hold examples of similar length. `DistributedSampler` has no hook for the order it pads
    and shards, so `__iter__` applies its rule (repeat the first indices up to
    ``total_size``, or cut to it; then every ``W``-th from rank ``r``) to that order itself.
    """

    def __init__(
        self,
        dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        group_by_length: bool = False,
        batch_size: int = 1,
        lengths: Sequence[int] | None = None,
        megabatch_mult: int = 50,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.group_by_length = group_by_length
        if group_by_length:
            if lengths is None:
                lengths = getattr(dataset, "lengths", None)
            if lengths is None or len(lengths) != len(dataset):
                raise ValueError("group_by_length needs one length per example (dataset.lengths)")
            self.lengths = np.asarray(lengths)
            self.megabatch = max(1, batch_size * num_replicas * megabatch_mult)

    def __iter__(self):
        if not self.group_by_length:
            return super().__iter__()
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        indices = []
        for s in range(0, n, self.megabatch):
            chunk = order[s : s + self.megabatch]
            indices.extend(sorted(chunk, key=lambda i: -int(self.lengths[i])))
        if not self.drop_last:
            padding = self.total_size - len(indices)
            if padding > 0:
                indices += (indices * math.ceil(padding / len(indices)))[:padding]
        else:
            indices = indices[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


def create_dataloader(
    dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    pad_side: str = "right",
    group_by_length: bool = False,
    distributed: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    pad_token_id: int | None = None,
    pad_to_multiple_of: int | None = None,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader of padded MeZO batches; ``batch_size`` examples per rank and step.

    ``distributed=None`` shards over the initialised ``torch.distributed`` group if any
    (``rank``/``world_size`` default to the group's); ``distributed=True`` with explicit
    ``rank``/``world_size`` needs no process group. ``drop_last`` is the sampler's policy
    for a size that does not divide by the world size (see the module docstring); the
    last batch of a rank may be smaller than ``batch_size`` and is kept.
    ``dataloader.sampler.set_epoch(e)`` reshuffles deterministically (seed + e).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1 (examples per rank)")
    initialised = is_distributed()
    if distributed is None:
        distributed = initialised or world_size not in (None, 1)
    if distributed:
        if world_size is None:
            if not initialised:
                raise ValueError("distributed=True needs world_size= (and rank=) or an initialised process group")
            world_size = get_world_size()
        if rank is None:
            if not initialised:
                raise ValueError("distributed=True needs rank= or an initialised process group")
            rank = get_rank()
    else:
        rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    if len(dataset) == 0:
        raise ValueError("cannot build a dataloader over an empty dataset")
    if drop_last and len(dataset) < world_size:
        raise ValueError(f"drop_last=True with {len(dataset)} examples and world_size={world_size} leaves no data")
    sampler = MeZOSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        group_by_length=group_by_length,
        batch_size=batch_size,
    )
    if collate_fn is None:
        if pad_token_id is None:
            pad_token_id = getattr(dataset, "pad_token_id", None)
        if pad_token_id is None:
            raise ValueError("pad_token_id= is required when the dataset does not carry one")
        collate_fn = MeZOCollator(pad_token_id, pad_side=pad_side, pad_to_multiple_of=pad_to_multiple_of)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=False,
        persistent_workers=False,
    )
