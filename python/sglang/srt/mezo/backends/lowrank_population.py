"""A full-parameter step's population in one call: low-rank perturbations as LoRA-shaped deltas.

With the ``lowrank`` estimator a direction's perturbation of a matrix W (out x in) is
``scale * Z``, ``Z = U V^T / sqrt(r)`` (`structured_directions.LowRank`: U and V Gaussian,
r columns). That is a LoRA-shaped adapter on the frozen base: ``x (W + scale Z)^T = x W^T +
(x V)(scale / sqrt r) U^T``. So every point of a step runs in one call, the batch once per
point, each Linear adding its point's product to its rows' outputs (a forward hook): W is
never written, the base GEMM reads it once for all points (EGGROLL's scheme for ES
populations), and the update ``sum_i c_i Z_i`` is then written into W in place by the
existing exact kernels, as without the population.

Covered: the weights of ``nn.Linear`` layers (what the LoRA machinery covers). A step
whose trainable tensors include anything else (embeddings, norms, biases, a head tied to
the embedding) has no one-call form here (their perturbations would differ per row) and
runs pass by pass; select the Linear weights with ``--trainable-patterns``.

Exactness: the same U and V as the one-by-one pass draws; the sum differs from the pass's
(which writes ``round(W + scale Z)`` and multiplies by it) by rounding only, and the
trained weights are never written by a population call (lr = 0 stays bit-exact).
Memory: (out + in) r float32 per covered matrix and point, and the activations of the
points' rows (the backend's micro-batching bounds them).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from sglang.srt.mezo.structured_directions import LowRank


def unsupported_reason(tensors: list) -> Optional[str]:
    """Why a full-parameter low-rank step cannot run in one call (None: it can)."""
    outside = [t.name for t in tensors if t.layout is not None or not all(_plain_linear(m, t) for m in t.owners)]
    if outside:
        return (
            f"the low-rank population perturbs nn.Linear weights only, and {', '.join(outside[:3])} are trained too: "
            "select the Linear weights with --trainable-patterns"
        )
    return None


def _plain_linear(module: nn.Module, t) -> bool:
    """`t` is the weight of an `nn.Linear` that computes x W^T + b itself (a subclass with a
    forward of its own, a router returning a tuple, say, is not covered)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and module.weight is t.param


class LowRankDeltas:
    """The step's low-rank points as products added to each covered Linear's output rows.

    `adapter_names(points)` draws each point's factors and names it by its index (None:
    the unperturbed point, no delta); `routed(row_names)` makes a call's i-th row take
    the delta of point ``row_names[i]`` (rows of one point contiguous, as the backend
    stacks them).
    """

    def __init__(self, tensors: list, family: LowRank):
        self.family = family
        self.targets = {m: t for t in tensors for m in t.owners}
        self._points: list = []  # per point: None, or (coefficient, {module: (U, V)})
        self._runs: Optional[list] = None  # the running call's (point, first row, end row)
        self._hooks = [m.register_forward_hook(self._add) for m in self.targets]

    def adapter_names(self, points: list) -> list:
        self._points = []
        for seed, scale in points:
            if seed is None:
                self._points.append(None)
                continue
            factors = {}
            for module, t in self.targets.items():
                rows, cols = t.param.shape
                factors[module] = self.family.factors(seed, t.name, rows, cols, t.param.device)
            self._points.append((float(scale) * self.family.scale, factors))
        return list(range(len(points)))

    @contextlib.contextmanager
    def routed(self, row_names: list) -> Iterator[dict]:
        runs, start = [], 0
        for i in range(1, len(row_names) + 1):
            if i == len(row_names) or row_names[i] != row_names[start]:
                runs.append((row_names[start], start, i))
                start = i
        self._runs = runs
        try:
            yield {}
        finally:
            self._runs = None

    def _add(self, module, args, output):
        if self._runs is None:
            return None
        x = args[0]
        if x.shape[0] != self._runs[-1][2]:  # e.g. a mixture-of-experts block flattening tokens into rows
            raise RuntimeError(
                f"{type(module).__name__} got {x.shape[0]} rows in a population call of {self._runs[-1][2]}: its "
                "input is not one row per batch row, so the points' deltas cannot be told apart (use "
                "--population-batch off, or leave this layer out of --trainable-patterns)"
            )
        for point, start, end in self._runs:
            if self._points[point] is None:
                continue
            coefficient, factors = self._points[point]
            u, v = factors[module]
            dtype = torch.promote_types(x.dtype, torch.float32)  # float64 models keep float64
            delta = (x[start:end].to(dtype) @ v.to(dtype)) @ u.to(dtype).T
            output[start:end] += (delta * coefficient).to(output.dtype)
        return output

    def parameter_ids(self) -> set:
        return set()

    def export_options(self) -> dict:
        return {}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
