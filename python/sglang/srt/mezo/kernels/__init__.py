"""MeZO's directions z and the writes built on them, for every device: one dispatch.

* `reference` defines z and every write (torch, readable, any device, chunked);
* `numba_kernels` (and `numba_restore_log`) serve float32 CPU tensors;
* `triton_kernels` serve every non-CPU device Triton supports (CUDA/ROCm, XPU).

All three give the same bits for the same (seed, canonical name, element offset), so a
run trained on a GPU replays bit for bit on a CPU. Neither numba nor triton is imported
until a tensor needs it: importing `MeZOConfig` (or an SGLang scheduler loading the MeZO
plugin) never loads numba or changes its settings.

`implementation(tensor)` is the one place that decides which implementation writes a
tensor; `forced(name)` overrides it within a block (tests run the Triton kernels on CPU
tensors this way, under ``TRITON_INTERPRET=1``). A tensor-parallel shard (a
`sharding.ShardLayout` that is not the whole tensor) draws z at its elements' offsets in the
unsharded tensor: on CPU, a block of rows that starts on a 64-element boundary of the
unsharded tensor goes to numba (on a GPU: Triton) from that offset (`fast_kernel_start`); column
shards and unaligned rows go to the reference. Whole tensors take the fast kernels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from sglang.srt.mezo.kernels.reference import (
    CHUNK,
    GAUSSIAN,
    PERTURBATIONS,
    RADEMACHER,
    check_kind,
    effective_alpha,
    tensor_key,
)
from sglang.srt.mezo.sharding import ShardLayout, is_shard

__all__ = [
    "CHUNK",
    "GAUSSIAN",
    "PERTURBATIONS",
    "RADEMACHER",
    "IMPLEMENTATIONS",
    "PairedWrites",
    "UpdateTarget",
    "axpy_direction_",
    "direction",
    "direction_chunk",
    "fast_kernel_start",
    "forced",
    "implementation",
    "tensor_key",
    "update_",
]

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("numba", "triton", "reference")
TRITON_DEVICE_TYPES = ("cuda", "xpu")  # torch reports ROCm GPUs as "cuda" too
_forced: Optional[str] = None


@contextlib.contextmanager
def forced(name: Optional[str]) -> Iterator[None]:
    """Within this block every tensor is written by implementation `name` (None: the default
    choice; numba still only where it can: float32 CPU tensors, the reference elsewhere).
    Triton on CPU tensors needs ``TRITON_INTERPRET=1`` set before triton is imported."""
    global _forced
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {name!r}; expected one of {IMPLEMENTATIONS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton imports (checked once; without it non-CPU devices use the reference)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        logger.warning("triton is not importable (%s): MeZO's non-CPU writes use the chunked torch reference", error)
        return False
    return True


def implementation(tensor: torch.Tensor) -> str:
    """Which implementation writes `tensor`: numba for float32 CPU tensors, Triton on the
    devices it supports, the torch reference otherwise (or what `forced` says)."""
    numba_serves = tensor.device.type == "cpu" and tensor.dtype == torch.float32
    if _forced is not None:
        return "reference" if _forced == "numba" and not numba_serves else _forced
    if tensor.device.type == "cpu":
        return "numba" if numba_serves else "reference"
    if tensor.device.type in TRITON_DEVICE_TYPES and triton_available():
        return "triton"
    return "reference"


@functools.lru_cache(maxsize=None)
def _module(name: str):
    """The module of implementation `name`, imported on first use."""
    if name == "numba":
        from sglang.srt.mezo.kernels import numba_kernels

        return numba_kernels
    if name == "triton":
        from sglang.srt.mezo.kernels import triton_kernels

        return triton_kernels
    from sglang.srt.mezo.kernels import reference

    return reference


def direction_chunk(
    kind: str, key: int, start: int, n: int, device="cpu", layout: Optional[ShardLayout] = None
) -> torch.Tensor:
    """z for elements [start, start + n) of the tensor keyed `key` (a shard if `layout` says
    so), float32 on `device`."""
    check_kind(kind)
    device = torch.device(device)
    if is_shard(layout):
        return _module("reference").z_chunk(kind, key, start, n, device, layout)
    probe = torch.empty(0, dtype=torch.float32, device=device)
    name = implementation(probe)
    if name == "numba":
        return _module(name).fill(kind, key, start, n)
    if name == "triton":
        return _module(name).fill(kind, key, start, n, device)
    return _module(name).z_chunk(kind, key, start, n, device)


def direction(kind: str, seed: int, name: str, shape, device="cpu") -> torch.Tensor:
    """The whole z of one tensor (tests and small tensors; the trainer never calls this)."""
    return direction_chunk(kind, tensor_key(seed, name), 0, math.prod(shape), device).reshape(shape)


def axpy_direction_(
    w: torch.Tensor,
    src: torch.Tensor,
    kind: str,
    key: int,
    alpha: float,
    save: Optional[torch.Tensor] = None,
    layout: Optional[ShardLayout] = None,
) -> None:
    """``w = round(src + alpha * z)`` elementwise, z of the tensor keyed `key` (see `reference`;
    of the shard `layout` places, if given).

    `src` is `w` itself or another tensor of its shape on its device (a backup, a float32
    master); `save`, if given, receives src's values in the same pass. Shards the fast
    kernels cannot address go to the reference kernel (`fast_kernel_start`). If this raises, `w`
    is as it was (the kernels fail only before writing; the chunked reference undoes itself
    from `save`).
    """
    check_kind(kind)
    if w.device != src.device or (save is not None and save.device != w.device):
        raise ValueError(f"axpy_direction_: w on {w.device}, src on {src.device}: one device expected")
    alpha = effective_alpha(kind, w.dtype, alpha)
    first = fast_kernel_start(layout, w, src, save)
    name = "reference" if first is None else implementation(w)
    if name == "numba" and not all(t.dtype == torch.float32 for t in (src, *([save] if save is not None else []))):
        name = "reference"  # e.g. a bfloat16 backup: numba writes float32 only
    if name == "reference":
        _module(name).axpy_(w, src, kind, key, alpha, save, layout)
    elif name == "numba":
        _module(name).axpy_(w, src, kind, key, alpha, save, first)
    else:
        _module(name).axpy_(w, src, kind, key, alpha, save, first)


def fast_kernel_start(layout: Optional[ShardLayout], *tensors: Optional[torch.Tensor]) -> Optional[int]:
    """Where a tensor's z starts in its unsharded tensor when a fast kernel can write it: a
    contiguous tensor whose elements are one run of the unsharded one (a whole tensor: 0;
    a block of rows) starting on a 64-element boundary (a Rademacher word, 32 Gaussian
    pairs). None: only the reference kernel can (column shards, unaligned rows, views that
    are not contiguous: the fast kernels address memory as one flat run)."""
    if any(t is not None and not t.is_contiguous() for t in tensors):
        return None
    first = 0 if layout is None else layout.flat_start
    return first if first is not None and first % 64 == 0 else None


class PairedWrites:
    """``dst_i = round(src_i + alpha * z_i)`` for a fixed list of (dst, src) pairs, issued
    together: one launch per device and dtype where the implementation takes groups
    (Triton), one `axpy_direction_` per pair elsewhere. The perturbation writes a unit's
    tensors this way on every pass (into its scratch slots, or in place with each backup
    written to its slot in the same pass: `saves`); the launch tables are built once.
    `layouts` place tensor-parallel shards (z from their offsets in the unsharded tensor);
    a pair the fast kernels cannot address (`fast_kernel_start`) is written on its own."""

    def __init__(
        self,
        dsts: Sequence[torch.Tensor],
        srcs: Sequence[torch.Tensor],
        saves: Optional[Sequence[torch.Tensor]] = None,
        layouts: Optional[Sequence[Optional[ShardLayout]]] = None,
    ):
        self.dsts, self.srcs = list(dsts), list(srcs)
        self.saves = list(saves) if saves is not None else None
        self.layouts = list(layouts) if layouts is not None else [None] * len(self.dsts)
        self._plans: dict = {}  # forced implementation -> [(triton group or None, [pair index])]

    def __call__(self, kind: str, keys: Sequence[int], alpha: float, written=None) -> None:
        """The writes, each launch whole or not at all; `written(indices)`, if given, is told
        the pairs each launch wrote as soon as it has (a later failure leaves them known)."""
        check_kind(kind)
        for group, indices in self._plan():
            if group is None:
                for i in indices:
                    save = self.saves[i] if self.saves is not None else None
                    axpy_direction_(self.dsts[i], self.srcs[i], kind, keys[i], alpha, save=save, layout=self.layouts[i])
                    if written is not None:
                        written([i])
            else:
                group(kind, [keys[i] for i in indices], effective_alpha(kind, group.dtype, alpha))
                if written is not None:
                    written(indices)

    def _plan(self) -> list:
        if _forced not in self._plans:
            by_key: dict = {}
            for i, dst in enumerate(self.dsts):
                save = self.saves[i] if self.saves is not None else None
                grouped = (
                    implementation(dst) == "triton"
                    and fast_kernel_start(self.layouts[i], dst, self.srcs[i], save) is not None
                )
                by_key.setdefault((dst.device, dst.dtype) if grouped else None, []).append(i)
            plan = []
            for key, indices in by_key.items():
                group = None
                if key is not None:
                    group = _module("triton").AxpyGroup(
                        [self.dsts[i] for i in indices],
                        [self.srcs[i] for i in indices],
                        [self.saves[i] for i in indices] if self.saves is not None else None,
                        [fast_kernel_start(self.layouts[i], self.dsts[i]) for i in indices],
                    )
                plan.append((group, indices))
            self._plans[_forced] = plan
        return self._plans[_forced]


@dataclass
class UpdateTarget:
    """One tensor of a ZO-SGD update: the values updated in place (a float32 master where there
    is one), its float32 momentum buffer (None without momentum), its key for each term,
    its weight decay (0 for bias and norm tensors) and, for a tensor-parallel shard, its
    place in the unsharded tensor."""

    weight: torch.Tensor
    momentum: Optional[torch.Tensor]
    keys: list
    weight_decay: float
    layout: Optional[ShardLayout] = None


def update_(targets: Sequence[UpdateTarget], kind: str, coefs: Sequence[float], lr: float, mu: float = 0.0) -> None:
    """The ZO-SGD update of every target (`reference.update_` defines it), each tensor in one
    pass where its implementation allows. `coefs[i]` is term i's coefficient / q;
    with momentum (mu > 0) every target carries a buffer."""
    check_kind(kind)
    if any((t.momentum is not None) != (mu > 0) for t in targets):
        raise ValueError("update_: every target needs a momentum buffer when mu > 0, and none when mu == 0")
    if mu == 0:  # adding 0 * z would turn -0.0 into +0.0: zero terms are skipped
        kept = [i for i, c in enumerate(coefs) if c]
        coefs = [coefs[i] for i in kept]
        targets = [UpdateTarget(t.weight, None, [t.keys[i] for i in kept], t.weight_decay, t.layout) for t in targets]
    by_implementation: dict = {}
    for t in targets:
        first = fast_kernel_start(t.layout, t.weight, t.momentum)
        name = "reference" if first is None else implementation(t.weight)
        by_implementation.setdefault(name, []).append((t, first))
    for name, group in by_implementation.items():
        if name == "triton":
            _module(name).update_([t for t, _ in group], kind, coefs, lr, mu, z_firsts=[first for _, first in group])
            continue
        for t, first in group:
            if name == "numba" and t.momentum is None:
                _numba_update(t, kind, coefs, lr, first)
            else:
                _module("reference").update_(
                    t.weight, kind, t.keys, coefs, lr, t.weight_decay, t.momentum, mu, t.layout
                )


def _numba_update(t: UpdateTarget, kind: str, coefs: Sequence[float], lr: float, first: int) -> None:
    """Without momentum on float32 CPU: the decay as one float32 multiply, then one fused
    in-place sweep per term (the reference's values), z from unsharded element `first`."""
    if t.weight_decay and lr:
        t.weight.mul_(1.0 - lr * t.weight_decay)  # float32 tensor: one float32 multiply
    for key, coef in zip(t.keys, coefs):
        alpha = effective_alpha(kind, t.weight.dtype, -lr * coef)
        _module("numba").axpy_(t.weight, t.weight, kind, key, alpha, first=first)
