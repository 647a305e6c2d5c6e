"""Data-parallel MeZO on ``torch.distributed`` (gloo on CPU, nccl on GPU).

Every rank holds a full copy of the model and evaluates L+ and L- on its own shard of
the batch; the trainer all-reduces each pass's ``(sum, count)`` so every rank sees the
token-weighted loss of the union of the shards; every rank derives the same direction
seed from ``(config.seed, step)`` and applies the same update. The weights therefore stay
identical on all ranks without any weight broadcast, *provided* they start identical
(same checkpoint, same ``torch.manual_seed`` before any random initialisation such as
LoRA's) and the reduced scalars are bitwise equal on every rank.

`assert_ranks_agree` checks exactly that: it hashes the trainable tensors (BLAKE2b of
their bytes, per tensor), gathers the digests from every rank and raises a `RuntimeError`
naming the step, the ranks and the first differing tensor if any rank disagrees with
rank 0. Call it once before training and optionally every N steps
(`agreement_callback`). Every rank raises, so no rank is left waiting in a collective.

Launch with ``torchrun --nproc-per-node N -m sglang.srt.mezo_trainer ...``;
`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sglang.srt.mezo.primitives import tensor_digest

__all__ = [
    "DistributedContext",
    "agreement_callback",
    "assert_ranks_agree",
    "destroy_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "reduce_sum_count",
    "tensor_digests",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the data-parallel group (world_size 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _current_context() -> DistributedContext:
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def init_distributed(backend: str | None = None, *, timeout_s: float = 600.0) -> DistributedContext:
    """Joins the process group torchrun set up; a no-op context outside torchrun.

    backend: ``None`` picks nccl when CUDA is available, else gloo. With nccl the process
    uses GPU ``LOCAL_RANK``. ``timeout_s`` bounds every collective, so a rank that dies or
    diverges in control flow makes the others fail instead of hanging forever.
    Idempotent: returns the current context if the group already exists.
    """
    if is_distributed():
        return _current_context()
    if not launched_by_torchrun():
        return DistributedContext()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return _current_context()


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def _collective_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_sum_count(total: float, count: int, group=None) -> tuple:
    """(sum of `total`, sum of `count`) over the ranks, bitwise identical on every rank.

    The pairs are all-gathered and added in rank order in float64 on every rank, so the
    result does not depend on the collective's reduction algorithm (an all-reduce is
    not guaranteed to hand every rank the same bits). Outside a process group it returns
    its arguments. The tensor lives on the GPU under nccl (which cannot reduce CPU tensors).
    """
    if not is_distributed():
        return float(total), int(count)
    local = torch.tensor([float(total), float(count)], dtype=torch.float64, device=_collective_device(group))
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    summed, n = 0.0, 0.0
    for part in parts:
        values = part.tolist()
        summed += values[0]
        n += values[1]
    return summed, int(n)


# ----------------------------------------------------------------------------- checksums
def _named_tensors(obj, include_frozen: bool = False) -> dict:
    """name -> tensor: a ``{name: tensor}`` mapping as it is, or a trainer's backend's trainable
    tensors (float32 masters included), with ``include_frozen`` also every other weight it
    holds in this process (prefixed ``model:``)."""
    if isinstance(obj, Mapping):
        return dict(obj)
    named = dict(obj.backend.trainable_state())
    if include_frozen:
        named.update({f"model:{name}": t for name, t in obj.backend.frozen_state().items()})
    return named


def tensor_digests(obj, include_frozen: bool = False) -> dict:
    """name -> BLAKE2b digest of the tensor's dtype, shape and bytes (bit-exact identity)."""
    return {name: tensor_digest(t) for name, t in sorted(_named_tensors(obj, include_frozen).items())}


def assert_ranks_agree(obj, step: int, *, include_frozen: bool = False, group=None) -> str:
    """Raises RuntimeError on every rank unless all ranks hold bit-identical tensors at `step`.

    obj: a `MeZOTrainer` (its backend's trainable tensors, float32 masters included; with
    ``include_frozen`` also every other weight in this process) or a ``{name: tensor}``
    mapping. `step` is the
    caller's step counter: it is compared across ranks too and named in the error.
    Returns the local checksum (also outside a process group, where nothing is compared).
    Costs one hash pass over the tensors (~1 GB/s) and one small all_gather_object.
    """
    digests = tensor_digests(obj, include_frozen)
    overall = hashlib.blake2b("".join(f"{k}={v};" for k, v in digests.items()).encode(), digest_size=16).hexdigest()
    if not is_distributed():
        return overall
    world = dist.get_world_size(group)
    mine = {"step": int(step), "overall": overall, "digests": digests, "rank": dist.get_rank()}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    problems = _disagreements(gathered)
    if problems:
        raise RuntimeError(
            f"MeZO data-parallel ranks disagree at step {step}: "
            + "; ".join(problems)
            + ". The ranks' weights are no longer identical (or their step counters differ): check that every "
            "rank loads the same checkpoint and seeds torch identically before any random initialisation "
            "(e.g. LoRA), and that the per-pass loss reduction returns bitwise-equal values on all ranks."
        )
    return overall


def _disagreements(gathered: list) -> list:
    reference = gathered[0]
    problems = []
    for other in gathered[1:]:
        a, b = reference["rank"], other["rank"]
        if other["step"] != reference["step"]:
            problems.append(f"rank {b} is at step {other['step']}, rank {a} at step {reference['step']}")
        if other["overall"] == reference["overall"]:
            continue
        names_a, names_b = set(reference["digests"]), set(other["digests"])
        if names_a != names_b:
            only_a, only_b = sorted(names_a - names_b), sorted(names_b - names_a)
            problems.append(
                f"ranks {a} and {b} hold different tensors (only on {a}: {only_a[:3]}, only on {b}: {only_b[:3]})"
            )
            continue
        differing = [n for n in sorted(names_a) if reference["digests"][n] != other["digests"][n]]
        problems.append(
            f"rank {b} differs from rank {a} in {len(differing)} of {len(names_a)} tensors (first: {differing[0]!r})"
        )
    return problems


def agreement_callback(trainer, every: int, *, include_frozen: bool = False) -> Callable:
    """An ``on_step(output, seconds)`` for ``trainer.train`` checking agreement every `every` steps.

    The check runs after the update of every step whose new ``trainer.global_step`` is a
    multiple of `every` (``every <= 0`` disables it). All ranks call it at the same steps.
    """

    def on_step(output=None, seconds=None) -> None:
        step = trainer.global_step
        if every > 0 and step % every == 0:
            assert_ranks_agree(trainer, step, include_frozen=include_frozen)

    return on_step
