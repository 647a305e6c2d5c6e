"""Exact, scoped perturbation of trainable tensors.

The trainer sees one interface, ``scope(seed, scale)`` / ``holding()`` / ``commit(plan)``
(the ZO-SGD update of `zo_sgd`),
with two exact implementations. `UnitScopedPerturbation` (Gaussian directions, half
precision, GPUs, the SGLang engine): inside a scope every module that owns trainable
tensors is perturbed *just before it runs* and put back *right after*, so only one
module's tensors are ever perturbed and the extra memory is the largest module's
trainable bytes. A parameter's perturbed values ``round(w + scale * z)`` are written into
a one-module scratch buffer that is swapped in as the parameter's data for the module's
call (one read of w and one write per pass; w itself is never written, so putting it back
is exact in every dtype and costs nothing). A tensor that is a view into a larger buffer
(the SGLang engine's fused and LoRA-pool tensors) cannot be swapped: it is perturbed in
place, its backup written in the same pass, and restored by copy. Either way any number
of lr=0 steps is bit-exact. Leaving the scope, by return or by exception, puts back
whatever is still perturbed. `restore_log.RestoreLogPerturbation` (Rademacher directions on
float32 CPU tensors, where memory traffic is the whole cost) moves all weights at once
and restores by subtraction plus a log of the elements that subtraction would miss.

Inside `holding()` (which the trainer's loop spans across steps) the restore log lets a
committed update wait for the next move, which writes it in the same sweep. Per-unit copies
write it at once: waiting would save them no sweep (each pass writes its own copies from w,
and the update draws its own z), on a GPU it would split the one grouped update launch into
one per unit, and a unit's pass can be retried (out of memory) after part of it ran.

Every write (perturb, restore, update, load) advances the module's entry in
`WeightVersions`, which caches key their entries on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from typing import Iterator, Optional

import torch
from torch import nn

from sglang.srt.mezo.kernels import (
    PairedWrites,
    axpy_direction_,
    direction_chunk,
    fast_kernel_start,
    reference,
    tensor_key,
)
from sglang.srt.mezo.kernels.reference import axpy_values, effective_alpha
from sglang.srt.mezo.sharding import is_shard
from sglang.srt.mezo.structured_directions import DirectionFamily
from sglang.srt.mezo.trainable import TrainableTensor
from sglang.srt.mezo.zo_sgd import UpdatePlan, commit_update

logger = logging.getLogger(__name__)


class WeightVersions:
    """A version number per module, advanced on every in-place write of its weights.

    Versions come from one global counter, so a (module, version) pair never repeats and
    a snapshot taken before any write compares unequal to every snapshot after it.
    """

    def __init__(self):
        self._counter = itertools.count(1)
        self._versions: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()

    def bump(self, module: nn.Module) -> int:
        version = next(self._counter)
        self._versions[module] = version
        return version

    def get(self, module: nn.Module) -> int:
        return self._versions.get(module, 0)


def largest_module_bytes(tensors: list) -> int:
    """Bytes of the largest module's trainable tensors (without float32 masters)."""
    by_module: dict = {}
    for t in tensors:
        for m in t.owners:
            by_module.setdefault(m, []).append(t)
    sizes = [sum(t.param.numel() * t.param.element_size() for t in ts if t.master is None) for ts in by_module.values()]
    return max(sizes, default=0)


# Modules whose trainable tensors together stay under this many bytes may share one
# perturbation unit (a decoder layer, the LoRA tensors of a layer) even when the largest
# single module is smaller: fewer hooks and kernel launches, a bounded scratch.
MERGE_MIN_BYTES = 8 << 20
_SLOT_ALIGN = 256  # scratch slots start on 256-byte boundaries (vector loads on every device)


def perturbation_units(root: Optional[nn.Module], tensors: list, budget: int) -> dict:
    """{unit module: [tensors]}: where each tensor's perturbation is scoped.

    A tensor is perturbed while a unit that reads it runs. By default a unit is a module that
    owns the tensor; with `root`, each owner is replaced by its highest ancestor below the
    root such that the tensors owned within the ancestor total at most `budget` bytes,
    every module on the way up has a single parent (a module shared by two parents could
    run outside the ancestor) and the ancestor has a forward of its own (a ModuleList is
    never called). For a decoder that is a layer: one hook pair and one launch per layer
    instead of one per linear layer.
    """
    owners_of: dict = {}
    for t in tensors:
        for m in t.owners:
            owners_of.setdefault(m, []).append(t)
    if root is None:
        return owners_of
    parents: dict = {}
    for module in root.modules():
        for child in module.children():
            parents.setdefault(id(child), set()).add(id(module))
    by_id = {id(m): m for m in root.modules()}
    below: dict = {}  # id(module) -> {id(tensor): bytes} owned within its subtree
    for owner, owned in owners_of.items():
        chain, node = [owner], owner
        while len(parents.get(id(node), ())) == 1:
            node = by_id[next(iter(parents[id(node)]))]
            chain.append(node)
        for module in chain:
            below.setdefault(id(module), {}).update({id(t): _nbytes(t.param) for t in owned if t.master is None})
    units: dict = {}
    for owner, owned in owners_of.items():
        unit, node = owner, owner
        while len(parents.get(id(node), ())) == 1:
            node = by_id[next(iter(parents[id(node)]))]
            if node is root or sum(below[id(node)].values()) > budget:
                break
            if type(node).forward is not nn.Module.forward:
                unit = node
        for t in owned:
            if all(u is not t for u in units.setdefault(unit, [])):
                units[unit].append(t)
    return units


class NestedHolding:
    """`holding()` blocks that nest (a `train()` loop around each step's own block): the
    weights may rest perturbed, or wait for an update, until the outermost block exits,
    which settles them (the class's `settle`)."""

    _holding_depth = 0

    @property
    def held(self) -> bool:
        """Whether a `holding()` block is open."""
        return self._holding_depth > 0

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Within this block the weights may wait to be settled; exact when the outermost block exits."""
        self._holding_depth += 1
        try:
            yield
        finally:
            self._holding_depth -= 1
            if not self._holding_depth:
                self.settle()


class UnitScopedPerturbation(NestedHolding):
    """Perturbs each unit's trainable tensors only while that unit runs (`perturbation_units`).

    Its name in `MeZOConfig.perturbation_mechanism` and metrics.jsonl is ``unit_scoped``.

    Args:
        root: the model; when given, owner modules are merged into larger units (decoder
            layers) within the scratch budget. Without it every owner module is a unit.
        family: structured directions (`structured_directions`) instead of the dense z;
            their copies are written one tensor at a time by the torch reference.
    """

    name = "unit_scoped"

    def __init__(
        self,
        tensors: list,
        kind: str,
        versions: WeightVersions,
        root: Optional[nn.Module] = None,
        family: Optional[DirectionFamily] = None,
    ):
        self.tensors = tensors
        self.kind = kind
        self.versions = versions
        self.family = family
        budget = max(largest_module_bytes(tensors), MERGE_MIN_BYTES)
        self._by_unit = perturbation_units(root, tensors, budget)
        self._owners = {u: list({id(m): m for t in ts for m in t.owners}.values()) for u, ts in self._by_unit.items()}
        self._scope: Optional[tuple] = None  # (seed, scale, {name: key})
        self._active: list = []  # stack of (unit, [(tensor, how to put it back)])
        self._perturbed: set = set()  # ids of tensors perturbed now (a tied tensor may have several units)
        self._scratch: dict = {}  # device -> uint8 buffer: one unit's perturbed copies or backups
        self._writes: dict = {}  # unit -> its batches of writes and their tensors: `_unit_writes`
        self._handles = []
        for unit in self._by_unit:
            self._handles.append(unit.register_forward_pre_hook(self._before))
            self._handles.append(unit.register_forward_hook(self._after, always_call=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def backup_bytes(self) -> int:
        """Bytes of scratch per device: the largest unit's perturbed copies (slots aligned)."""
        return max((_slots(ts)[1] for ts in self._by_unit.values()), default=0)

    def settle(self) -> None:
        """Nothing to settle: scopes restore on exit and updates are written at once."""

    def commit(self, plan: "UpdatePlan") -> None:
        """The ZO-SGD update (`commit_update`), written at once (see the module docstring)."""
        commit_update(self.tensors, plan, self.kind, self.versions, self.family)

    @contextlib.contextmanager
    def scope(self, seed: int, scale: float) -> Iterator[None]:
        """Within this block, forward passes see w + scale * z(seed); weights exact after."""
        if self._scope is not None:
            raise RuntimeError("perturbation scopes do not nest")
        keys = {t.name: tensor_key(seed, t.name) for t in self.tensors}
        self._scope = (seed, float(scale), keys)
        try:
            yield
        finally:
            while self._active:
                self._restore(*self._active.pop())
            self._scope = None

    # -- hooks ---------------------------------------------------------------------------
    def _before(self, unit, args):
        if self._scope is None or any(u is unit for u, _ in self._active):
            return
        _, scale, keys = self._scope
        saved = []
        try:
            if self._active or self.family is not None:  # tensor by tensor, each its own buffer
                for t in self._by_unit[unit]:
                    if id(t) not in self._perturbed:
                        self._perturb_one(t, keys[t.name], scale, saved)
            else:
                self._perturb_unit(unit, keys, scale, saved)
        finally:
            for m in self._owners[unit]:
                self.versions.bump(m)
            self._active.append((unit, saved))

    def _after(self, unit, args, output):
        if self._active and self._active[-1][0] is unit:
            self._restore(*self._active.pop())

    def _perturb_unit(self, unit, keys: dict, scale: float, saved: list) -> None:
        """The unit's tensors in one batch of launches per kind of write: its parameters'
        perturbed copies into fixed scratch slots, then swapped in (w itself is never
        written); views into larger buffers (the engine's) perturbed in place, each backup
        written to its slot in the same pass. Masters and views the fast kernels cannot
        address: one by one."""
        copies, swapped, in_place, views, others = self._unit_writes(unit)
        copies(self.kind, [keys[t.name] for t in swapped], scale)
        for t, perturbed in zip(swapped, copies.dsts):
            saved.append((t, t.param.data))
            t.param.data = perturbed
            self._perturbed.add(id(t))

        def written(indices: list) -> None:  # after each launch: a failing later one leaves these restorable
            for i in indices:
                saved.append((views[i], in_place.saves[i]))
                self._perturbed.add(id(views[i]))

        in_place(self.kind, [keys[t.name] for t in views], scale, written=written)
        for t in others:
            self._perturb_one(t, keys[t.name], scale, saved)

    def _perturb_one(self, t: TrainableTensor, key: int, scale: float, saved: list) -> None:
        p = t.param.detach()
        if t.master is not None:  # written from the float32 master, synced back after: no scratch
            self._write(p, t.master, t, key, scale)
            saved.append((t, None))
        elif swappable(t):  # a perturbed copy swapped in
            perturbed = torch.empty_like(p)
            self._write(perturbed, p, t, key, scale)
            saved.append((t, t.param.data))
            t.param.data = perturbed
        else:  # a view into a larger buffer: in place, the backup written in the same pass
            backup = torch.empty_like(p)
            self._write(p, p, t, key, scale, save=backup)
            saved.append((t, backup))  # only now does the backup hold p (if the write fails, p is intact)
        self._perturbed.add(id(t))

    def _write(self, dst, src, t: TrainableTensor, key: int, scale: float, save=None) -> None:
        write_perturbed(dst, src, t, self.kind, self._scope[0], scale, self.family, save=save, key=key)

    def _restore(self, unit, saved):
        views, backups = [], []
        for t, original in saved:
            if t.master is not None:
                t.sync_param()
            elif swappable(t):
                t.param.data = original
            else:
                views.append(t.param.detach())
                backups.append(original)
            self._perturbed.discard(id(t))
        if views:
            torch._foreach_copy_(views, backups)  # one multi-tensor launch on a GPU
        for m in self._owners[unit]:
            self.versions.bump(m)

    def _unit_writes(self, unit) -> tuple:
        """(`PairedWrites` of perturbed copies into scratch slots (`_slots`), the swappable
        parameters they are of, `PairedWrites` in place with backups into slots, the views
        they write, the unit's other tensors, written one by one): built once."""
        if unit in self._writes:
            return self._writes[unit]
        slotted = [t for t in self._by_unit[unit] if _slot_kind(t) is not None]
        offsets, _ = _slots(slotted)
        slot = {}
        for t, offset in zip(slotted, offsets):
            p = t.param.detach()
            buffer = self._scratch_buffer(p.device)
            slot[id(t)] = buffer[offset : offset + _nbytes(p)].view(p.dtype).view(p.shape)
        swapped = [t for t in slotted if _slot_kind(t) == "copy"]
        views = [t for t in slotted if _slot_kind(t) == "backup"]
        copies = PairedWrites([slot[id(t)] for t in swapped], [t.param for t in swapped])
        in_place = PairedWrites(
            [t.param.detach() for t in views], [t.param.detach() for t in views], [slot[id(t)] for t in views],
            [t.layout for t in views],
        )  # fmt: skip
        others = [t for t in self._by_unit[unit] if _slot_kind(t) is None]
        self._writes[unit] = (copies, swapped, in_place, views, others)
        return self._writes[unit]

    def _scratch_buffer(self, device: torch.device) -> torch.Tensor:
        if device not in self._scratch:
            self._scratch[device] = torch.empty(self.backup_bytes(), dtype=torch.uint8, device=device)
        return self._scratch[device]


def write_perturbed(
    dst: torch.Tensor,
    src: torch.Tensor,
    t: TrainableTensor,
    kind: str,
    seed: int,
    scale: float,
    family: Optional[DirectionFamily] = None,
    save: Optional[torch.Tensor] = None,
    key: Optional[int] = None,
) -> None:
    """``dst = round(src + scale * z)`` for trainable tensor `t`: the dense z of direction
    `seed` (`key`: its `tensor_key` for `t`, when already computed), or the family's
    direction drawn from src (the unperturbed values). Every perturbed copy of a tensor is
    written by this rule, so copies made for different purposes hold the same bits."""
    if family is None:
        key = tensor_key(seed, t.name) if key is None else key
        axpy_direction_(dst, src, kind, key, scale, save=save, layout=t.layout)
        return
    write_kind = family.write_kind
    z_of = family.source(t.name, src)
    reference.axpy_(dst, src, write_kind, seed, effective_alpha(write_kind, dst.dtype, scale), save, z_of=z_of)


def swappable(t: TrainableTensor) -> bool:
    """A whole parameter of its own (not a view into a larger buffer, not a shard) without a
    float32 master."""
    return t.master is None and isinstance(t.param, nn.Parameter) and not is_shard(t.layout)


def _slot_kind(t: TrainableTensor) -> Optional[str]:
    """What a tensor's scratch slot holds during its unit's call: ``"copy"``, its perturbed
    copy (swappable parameters); ``"backup"``, its values while it is perturbed in place (a
    view into a larger buffer that the fast kernels address as one run: `fast_kernel_start`);
    None: no slot (float32 masters; views written by the reference, with their own backup)."""
    if swappable(t):
        return "copy"
    if t.master is None and fast_kernel_start(t.layout, t.param.detach()) is not None:
        return "backup"
    return None


def _slots(tensors: list) -> tuple:
    """(byte offset of each tensor's scratch slot, bytes of scratch), per device."""
    offsets, end = [], {}
    for t in tensors:
        if _slot_kind(t) is None:
            offsets.append(None)
            continue
        device = t.param.device
        start = -(-end.get(device, 0) // _SLOT_ALIGN) * _SLOT_ALIGN
        offsets.append(start)
        end[device] = start + _nbytes(t.param)
    return offsets, max(end.values(), default=0)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def vanishing_fraction(
    tensors: list, kind: str, seed: int, scale: float, update: bool = False, sample: int = 4096
) -> float:
    """Fraction of sampled elements whose value does not change under ``w + scale * z``.

    The sample is the first `sample` elements of every trainable tensor; the write is
    computed exactly as the perturbation/update would (`kernels.reference.axpy_values`,
    into the parameter for a perturbation, into the float32 master if there is one for an
    update). Above 0.5 the write is mostly below the dtype's resolution.
    Counts stay on each tensor's device until the end (one host sync per device).
    """
    same: dict = {}
    total = 0
    for t in tensors:
        w = (t.value if update else t.param.detach()).view(-1)[:sample]
        src = t.value.view(-1)[:sample]
        z = direction_chunk(kind, tensor_key(seed, t.name), 0, w.numel(), w.device, t.layout)
        moved = axpy_values(src, z, effective_alpha(kind, w.dtype, scale), kind, w.dtype)
        same[w.device] = same.get(w.device, 0) + (moved == w).sum()
        total += w.numel()
    return sum(int(count) for count in same.values()) / max(total, 1)
