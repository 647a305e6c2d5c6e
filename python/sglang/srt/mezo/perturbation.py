"""Exact, scoped perturbation of trainable tensors, and the ZO-SGD update.

The trainer sees one interface, ``scope(seed, scale)`` / ``holding()`` / ``commit(plan)``,
with two exact implementations. `ModuleScopedPerturbation` (Gaussian directions, half
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
whatever is still perturbed. `offset_log.LoggedPerturbation` (Rademacher directions on
float32 CPU tensors, where memory traffic is the whole cost) moves all weights at once
and restores by subtraction plus a log of the elements that subtraction would miss.

Every write (perturb, restore, update, load) advances the module's entry in
`WeightVersions`, which caches key their entries on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from sglang.srt.mezo.kernels import UpdateTarget, axpy_direction_, direction_chunk, tensor_key, update_

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

    def snapshot(self, modules: Iterable[nn.Module]) -> tuple:
        return tuple(self.get(m) for m in modules)


@dataclass
class TrainableTensor:
    """One trainable tensor: its canonical (HF) name keys its direction z."""

    name: str
    param: nn.Parameter
    owners: list  # modules that hold it directly (several when tied)
    decay: bool  # weight decay applies (not bias / norm)
    master: Optional[torch.Tensor] = None  # float32 master copy over a half-precision param
    momentum: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def value(self) -> torch.Tensor:
        """The tensor the optimizer updates (the master copy when there is one)."""
        return self.master if self.master is not None else self.param.detach()

    def sync_param(self) -> None:
        if self.master is not None:
            self.param.detach().copy_(self.master)


def collect_trainable(model: nn.Module, selected: Iterable[str], fp32_master: bool, canonical=lambda n: n) -> list:
    """TrainableTensors for the selected parameter names (first name of a tied tensor wins).

    `canonical` maps a parameter's module path to the name that keys its direction.
    """
    selected = set(selected)
    owners: dict[int, list] = {}
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    tensors, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if name not in selected or id(p) in seen:
            continue
        seen.add(id(p))
        if not p.is_contiguous():
            raise ValueError(f"trainable parameter {name} is not contiguous")
        if type(p.data) is not torch.Tensor or not p.is_floating_point():
            raise ValueError(
                f"trainable parameter {name} is {type(p.data).__name__} {p.dtype}: MeZO perturbs plain float tensors"
            )
        decay = p.dim() >= 2 and "norm" not in name.lower()
        master = p.detach().float().clone() if fp32_master and p.dtype != torch.float32 else None
        tensors.append(TrainableTensor(canonical(name), p, owners[id(p)], decay, master))
    return tensors


def largest_module_bytes(tensors: list) -> int:
    """Bytes of the largest module's trainable tensors (without float32 masters)."""
    by_module: dict = {}
    for t in tensors:
        for m in t.owners:
            by_module.setdefault(m, []).append(t)
    sizes = [sum(t.param.numel() * t.param.element_size() for t in ts if t.master is None) for ts in by_module.values()]
    return max(sizes, default=0)


class ModuleScopedPerturbation:
    """Perturbs each module's trainable tensors only while that module runs."""

    def __init__(self, tensors: list, kind: str, versions: WeightVersions):
        self.tensors = tensors
        self.kind = kind
        self.versions = versions
        self._by_module: dict[nn.Module, list] = {}
        for t in tensors:
            for m in t.owners:
                self._by_module.setdefault(m, []).append(t)
        self._scope: Optional[tuple] = None  # (seed, scale, {name: key})
        self._active: list = []  # stack of (module, [(tensor, how to put it back)])
        self._perturbed: set = set()  # ids of tensors perturbed now (a tied tensor may have several owners)
        self._scratch: dict = {}  # device -> uint8 buffer of the largest module's trainable bytes
        self._handles = []
        for module in self._by_module:
            self._handles.append(module.register_forward_pre_hook(self._before))
            self._handles.append(module.register_forward_hook(self._after, always_call=True))

    @property
    def modules(self) -> list:
        return list(self._by_module)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def backup_bytes(self) -> int:
        """Bytes of the largest module's trainable tensors: the scratch this mechanism needs."""
        return largest_module_bytes(self.tensors)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Every scope restores on exit here: nothing to hold (see `LoggedPerturbation`)."""
        yield

    def settle(self) -> None:
        """Weights are never left perturbed outside a scope."""

    def commit(self, plan: "UpdatePlan") -> None:
        """The ZO-SGD update (`commit_update`)."""
        commit_update(self.tensors, plan, self.kind, self.versions)

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
    def _before(self, module, args):
        if self._scope is None or any(m is module for m, _ in self._active):
            return
        _, scale, keys = self._scope
        saved = []
        offsets = {}  # device -> bytes of scratch taken by the modules active now
        for _, entries in self._active:
            for t, _ in entries:
                offsets[t.param.device] = offsets.get(t.param.device, 0) + _nbytes(t.param)
        try:
            for t in self._by_module[module]:
                if id(t) in self._perturbed:
                    continue
                p = t.param.detach()
                src = t.master if t.master is not None else p
                offset = offsets.get(p.device, 0)
                if t.master is not None:  # written from the float32 master, synced back after: no scratch
                    axpy_direction_(p, src, self.kind, keys[t.name], scale)
                    saved.append((t, None))
                    self._perturbed.add(id(t))
                    continue
                if isinstance(t.param, nn.Parameter):  # a perturbed copy swapped in: w is never written
                    perturbed = self._scratch_view(p, offset)
                    axpy_direction_(perturbed, src, self.kind, keys[t.name], scale)
                    original = t.param.data
                    t.param.data = perturbed
                    saved.append((t, original))
                    self._perturbed.add(id(t))
                else:  # a view into a larger buffer: in place, the backup written in the same pass
                    backup = self._scratch_view(p, offset)
                    axpy_direction_(p, p, self.kind, keys[t.name], scale, save=backup)
                    saved.append((t, backup))  # only now does the backup hold p (if the write fails, p is intact)
                    self._perturbed.add(id(t))
                offsets[p.device] = offset + _nbytes(p)
        finally:
            self.versions.bump(module)
            self._active.append((module, saved))

    def _after(self, module, args, output):
        if self._active and self._active[-1][0] is module:
            self._restore(*self._active.pop())

    def _restore(self, module, saved):
        for t, original in saved:
            if t.master is not None:
                t.sync_param()
            elif isinstance(t.param, nn.Parameter):
                t.param.data = original
            else:
                t.param.detach().copy_(original)
            self._perturbed.discard(id(t))
        self.versions.bump(module)

    def _scratch_view(self, p: torch.Tensor, offset: int) -> torch.Tensor:
        """`p`-shaped scratch at byte `offset` of its device's buffer (a nested module's
        tensors come after the outer module's, or get a buffer of their own)."""
        nbytes = _nbytes(p)
        scratch = self._scratch.get(p.device)
        if scratch is None or scratch.numel() < offset + nbytes:
            if offset:
                return torch.empty_like(p)
            scratch = self._scratch[p.device] = torch.empty(
                max(nbytes, self.backup_bytes()), dtype=torch.uint8, device=p.device
            )
        return scratch[offset : offset + nbytes].view(p.dtype).view(p.shape)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _DeferredInterrupts:
    """Holds SIGINT until the block ends, so an update is never cut in half by Ctrl-C."""

    def __enter__(self):
        self.received = None
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self.received = (signum, frame)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            if self.received is not None and callable(self.previous):
                self.previous(*self.received)
        return False


@dataclass
class UpdatePlan:
    """Everything a ZO-SGD update needs, computed and allocated before any weight changes."""

    terms: list  # [(seed, coefficient of z)] with coefficient = projected_grad / q
    lr: float
    weight_decay: float
    momentum: float

    @property
    def writes_nothing(self) -> bool:
        """No momentum and nothing to add (lr = 0, or no decay and every g_i = 0)."""
        return self.momentum == 0 and not (self.lr and (self.weight_decay or any(c for _, c in self.terms)))


def prepare_update(tensors: list, directions: list, lr: float, weight_decay: float, momentum: float) -> UpdatePlan:
    """Phase one of the atomic update: validate and allocate (may raise; changes nothing)."""
    q = len(directions)
    terms = [(seed, float(g) / q) for seed, g in directions]
    if momentum > 0:
        for t in tensors:
            if t.momentum is None:
                t.momentum = torch.zeros_like(t.value, dtype=torch.float32)
    return UpdatePlan(terms, float(lr), float(weight_decay), float(momentum))


def commit_update(tensors: list, plan: UpdatePlan, kind: str, versions: WeightVersions) -> None:
    """Phase two: in-place arithmetic only, with Ctrl-C deferred until it is done.

    Without momentum: ``w <- (1 - lr*wd) w - lr * sum_i (g_i / q) z_i``.
    With momentum:    ``m <- mu m + sum_i (g_i / q) z_i + wd w;  w <- w - lr m``.
    (`kernels.reference` defines the rounding of each step.)

    A zero update (lr = 0, or every g_i = 0, without momentum) writes nothing: adding 0 * z
    costs a sweep over the weights and would turn -0.0 into +0.0. Weights, versions and
    the caches keyed by them stay as they are.
    """
    if plan.writes_nothing:
        return
    targets = [
        UpdateTarget(
            t.value,
            t.momentum if plan.momentum > 0 else None,
            [tensor_key(seed, t.name) for seed, _ in plan.terms],
            plan.weight_decay if t.decay else 0.0,
        )
        for t in tensors
    ]
    with _DeferredInterrupts():
        update_(targets, kind, [coef for _, coef in plan.terms], plan.lr, plan.momentum)
        for t in tensors:
            t.sync_param()
            for m in t.owners:
                versions.bump(m)


def vanishing_fraction(
    tensors: list, kind: str, seed: int, scale: float, update: bool = False, sample: int = 4096
) -> float:
    """Fraction of sampled elements whose value does not change under ``w + scale * z``.

    The sample is the first `sample` elements of every trainable tensor; the write is
    computed exactly as the perturbation/update would (float64, one rounding to the
    written tensor's dtype: the parameter for a perturbation, the float32 master if there
    is one for an update). Above 0.5 the write is mostly below the dtype's resolution.
    Counts stay on each tensor's device until the end (one host sync per device).
    """
    same: dict = {}
    total = 0
    for t in tensors:
        w = (t.value if update else t.param.detach()).view(-1)[:sample]
        src = t.value.view(-1)[:sample]
        z = direction_chunk(kind, tensor_key(seed, t.name), 0, w.numel(), w.device).to(torch.float64)
        moved = (src.to(torch.float64) + scale * z).to(w.dtype)
        same[w.device] = same.get(w.device, 0) + (moved == w).sum()
        total += w.numel()
    return sum(int(count) for count in same.values()) / max(total, 1)
