"""Structured directions: z with a shape beyond i.i.d. elements, from the same seeded draws.

MeZO's direction is i.i.d. per element (`kernels`). Two later methods restrict it:

* `MagnitudeMasked` (Sparse-MeZO, NeurIPS 2025): z times a mask that keeps the
  ``fraction`` of each tensor's elements with the smallest magnitude.
* `LowRank` (LOZO, ICLR 2025): for a matrix, ``Z = U V^T / sqrt(r)`` with Gaussian
  U (m x r) drawn each step and V (n x r) kept for ``interval`` steps; other tensors
  take the dense z.

A family turns a tensor's *unperturbed* values into a `ZSource` for the torch reference
writes (`kernels.reference.axpy_` / `update_`), which then round exactly as for dense z:
the perturbation is undone exactly (as the unit-scoped mechanism undoes dense z), every
element's z is a pure function of (seed, tensor name, offset, the tensor's values), so
replaying the logged seeds rebuilds the run. Nothing is stored across steps: U, V and the
mask threshold are recomputed from seeds and weights. Extra memory by design: the mask's
threshold needs one float32 copy of |w| of the tensor being written (`torch.kthvalue`);
the low-rank factors take (m + n) r float32 per matrix plus, per chunk of
`kernels.CHUNK` elements, 2 r gathered floats per element.

Both run on the transformers backend with the unit-scoped mechanism, on every device
(the torch reference is device-independent); tensor-parallel shards are not supported.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol

import torch

from sglang.srt.mezo.kernels import GAUSSIAN, direction_chunk, tensor_key
from sglang.srt.mezo.kernels.reference import ZSource, f32

BASIS_SHIFT = 31  # a low-rank seed's bits above this one name its basis V (see `LowRank`)
STRUCTURED_ESTIMATORS = ("sparse", "lowrank")  # the estimators whose z is a family's (transformers backend)


class DirectionFamily(Protocol):
    name: str
    write_kind: str  # the write arithmetic `kernels.reference` uses for these z (see `math_dtype`)

    def source(self, name: str, values: torch.Tensor) -> ZSource:
        """z of tensor `name` whose unperturbed values are `values`, keyed by direction seed."""


def dense_source(kind: str, name: str, device) -> ZSource:
    """The i.i.d. z of the tensor `name` (what every write draws without a family)."""
    return lambda seed, start, piece: direction_chunk(kind, tensor_key(seed, name), start, piece.numel(), device)


class MagnitudeMasked:
    """``z * 1[|w| <= tau]`` with tau the k-th smallest |w| of the tensor, k = ceil(fraction n).

    Ties at tau are kept (LoRA's zero-initialised B is perturbed whole). The mask comes from
    the values before the write: the same at L+, L- and the update of one step. An element
    outside it keeps its value (a -0.0 can become +0.0 under an update; the config refuses
    momentum and weight decay, which would move it). Magnitudes are compared in float32
    (float64 weights: the k smallest up to float32 rounding).
    """

    name = "sparse"

    def __init__(self, kind: str, fraction: float):
        self.kind = kind
        self.write_kind = kind  # z in {0} u the base draws: the base kind's arithmetic is exact for 0 too
        self.fraction = fraction

    def threshold(self, values: torch.Tensor) -> torch.Tensor:
        magnitudes = values.detach().reshape(-1).float().abs()
        k = max(1, math.ceil(self.fraction * magnitudes.numel()))
        return magnitudes.kthvalue(k).values

    def source(self, name: str, values: torch.Tensor) -> ZSource:
        dense = dense_source(self.kind, name, values.device)
        tau = self.threshold(values)

        def masked(seed: int, start: int, piece: torch.Tensor) -> torch.Tensor:
            z = dense(seed, start, piece)
            return torch.where(piece.float().abs() <= tau, z, torch.zeros_like(z))

        return masked


def lowrank_seed(step_seed: int, basis_seed: int) -> int:
    """A 63-bit low-rank direction seed: its top 32 bits come from `basis_seed` and alone
    key V (shared by the steps of one interval), its low 31 from `step_seed`; U is keyed by
    the whole seed. One logged integer, as for MeZO."""
    return ((basis_seed >> BASIS_SHIFT) << BASIS_SHIFT) | (step_seed & ((1 << BASIS_SHIFT) - 1))


class LowRank:
    """``Z[i, j] = (sum_k U[i, k] V[j, k]) / sqrt(r)`` for 2-D tensors, the dense z otherwise.

    U's key is ``tensor_key(seed, name + "/U")`` and V's ``tensor_key(seed >> 31, name +
    "/V")`` (`lowrank_seed`), both standard Gaussian draws of the seeded generator. The sum
    runs over k in order, each product and sum rounded in float32 (separate elementwise
    ops: no fused multiply-add on any device), then times f32(1/sqrt(r)): every element
    has unit variance, as MeZO's z.
    """

    name = "lowrank"
    write_kind = GAUSSIAN  # Z is not +-1: Gaussian arithmetic (float64 on float32 weights)

    def __init__(self, kind: str, rank: int):
        self.kind = kind
        self.rank = rank
        self.scale = f32(1.0 / math.sqrt(rank))

    def factors(self, seed: int, name: str, rows: int, cols: int, device) -> tuple:
        r = self.rank
        u = direction_chunk(GAUSSIAN, tensor_key(seed, f"{name}/U"), 0, rows * r, device).view(rows, r)
        v = direction_chunk(GAUSSIAN, tensor_key(seed >> BASIS_SHIFT, f"{name}/V"), 0, cols * r, device).view(cols, r)
        return u, v

    def source(self, name: str, values: torch.Tensor) -> ZSource:
        if values.dim() != 2:
            return dense_source(self.kind, name, values.device)
        rows, cols = values.shape
        cached: dict = {}  # seed -> (U, V): a write's chunks and terms share them

        def lowrank(seed: int, start: int, piece: torch.Tensor) -> torch.Tensor:
            if seed not in cached:
                cached[seed] = self.factors(seed, name, rows, cols, values.device)
            u, v = cached[seed]
            index = torch.arange(start, start + piece.numel(), device=values.device)
            u_rows, v_rows = u[index // cols], v[index % cols]
            z = u_rows[:, 0] * v_rows[:, 0]
            for k in range(1, self.rank):
                z = z + u_rows[:, k] * v_rows[:, k]
            return z * self.scale

        return lowrank


def direction_family(estimator: str, kind: str, sparse_fraction: float, lowrank_rank: int) -> Optional[DirectionFamily]:
    """The family an estimator draws from (None: MeZO's dense z, written by the fast kernels)."""
    if estimator == "sparse":
        return MagnitudeMasked(kind, sparse_fraction)
    if estimator == "lowrank":
        return LowRank(kind, lowrank_rank)
    return None
