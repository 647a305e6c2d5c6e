"""The ZO-SGD update, atomic in two phases: `prepare_update` validates and allocates (it may
raise and changes nothing), `commit_update` writes every trainable tensor from the step's
(seed, coefficient) terms with Ctrl-C deferred, so the weights end pre-step or post-step,
never in between. z is regenerated from the seeds (`kernels`), never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from sglang.srt.mezo.kernels import UpdateTarget, reference, tensor_key, update_
from sglang.srt.mezo.signals import DeferredInterrupts
from sglang.srt.mezo.structured_directions import DirectionFamily

if TYPE_CHECKING:  # the perturbation mechanisms import this module
    from sglang.srt.mezo.perturbation import WeightVersions


@dataclass
class UpdatePlan:
    """Everything a ZO-SGD update needs, computed and allocated before any weight changes."""

    terms: list  # [(seed, factor of z)]: each direction's coefficient / q
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


def commit_update(
    tensors: list, plan: UpdatePlan, kind: str, versions: WeightVersions, family: Optional[DirectionFamily] = None
) -> None:
    """Phase two: in-place arithmetic only, with Ctrl-C deferred until it is done.

    Without momentum: ``w <- (1 - lr*wd) w - lr * sum_i (g_i / q) z_i``.
    With momentum:    ``m <- mu m + sum_i (g_i / q) z_i + wd w;  w <- w - lr m``.
    (`kernels.reference` defines the rounding of each step.)

    A zero update (lr = 0, or every g_i = 0, without momentum) writes nothing: adding 0 * z
    costs a sweep over the weights and would turn -0.0 into +0.0. Weights, versions and
    the caches keyed by them stay as they are. With a direction `family` each tensor's z_i
    come from its values before the update, written by the torch reference.
    """
    if plan.writes_nothing:
        return
    if family is not None:
        _commit_structured(tensors, plan, kind, versions, family)
        return
    targets = [
        UpdateTarget(
            t.value,
            t.momentum if plan.momentum > 0 else None,
            [tensor_key(seed, t.name) for seed, _ in plan.terms],
            plan.weight_decay if t.decay else 0.0,
            t.layout,
        )
        for t in tensors
    ]
    with DeferredInterrupts():
        update_(targets, kind, [coef for _, coef in plan.terms], plan.lr, plan.momentum)
        for t in tensors:
            t.sync_param()
            for m in t.owners:
                versions.bump(m)


def _commit_structured(tensors: list, plan: UpdatePlan, kind: str, versions, family: DirectionFamily) -> None:
    seeds, coefs = [seed for seed, _ in plan.terms], [coef for _, coef in plan.terms]
    write_kind = family.write_kind
    sources = [family.source(t.name, t.value) for t in tensors]  # before any write (a mask's threshold)
    with DeferredInterrupts():
        for t, z_of in zip(tensors, sources):
            momentum = t.momentum if plan.momentum > 0 else None
            decay = plan.weight_decay if t.decay else 0.0
            reference.update_(t.value, write_kind, seeds, coefs, plan.lr, decay, momentum, plan.momentum, z_of=z_of)
            t.sync_param()
            for m in t.owners:
                versions.bump(m)
