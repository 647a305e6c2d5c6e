"""``--epsilon auto``: the largest perturbation scale at which the loss is still linear along z.

A difference quotient along z measures the slope only while the loss is linear over the
step eps z: along a seeded direction, ``L(w +- eps z) = L(w) +- eps a + eps^2 b + O(eps^3)``
with ``a = grad . z`` and ``b = z^T H z / 2``, so the two passes MeZO makes split into a
first-order part ``(L+ - L-) / 2 = eps a`` and a second-order part
``(L+ + L- - 2 L) / 2 = eps^2 b``. Their ratio ``eps |b| / |a|`` is the relative bias that
curvature adds to a one-sided difference (FZOO's), and grows with eps. Too small an eps
drowns the difference in the rounding of the forward pass (half-precision weights cannot
even hold the write); too large a one measures curvature instead of slope.

The search walks down a ladder from `TOP` times the estimator's default for the trainable
set, by factors of sqrt(10), probing the same seeded directions on one held-back batch, and
keeps the first (largest) rung where the second-order part is at most `LINEARITY` of the
first-order part (summed over directions). No rung passes (no measurable slope, or only
rounding at every scale): the default is kept, and the log says so. The probes and the
choice are part of the run's record (replay and resume stay bit-exact; the weights are left
as they were).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from sglang.srt.mezo.estimators import direction_seed

LINEARITY = 0.1  # the largest second-order share of the change that still counts as linear
TOP = 10.0  # the ladder's first rung, in units of the default
RUNGS = 7  # 10x .. 1e-2x the default
DIRECTIONS = 2
PROBE_STEP = -1_000_000  # probe seeds: direction_seed(run seed, PROBE_STEP, d), never a training step's


@dataclass
class EpsilonSearch:
    """What `search_epsilon` measured and chose (`epsilon` None: no rung was linear)."""

    epsilon: Optional[float]
    probes: list = field(default_factory=list)  # [{epsilon, seed, loss_plus, loss_minus, loss}]
    passes: int = 0

    def record(self) -> dict:
        return asdict(self)


def ladder(default: float) -> list:
    return [default * TOP * 10 ** (-k / 2) for k in range(RUNGS)]


def search_epsilon(
    loss_at: Callable[[Optional[int], float], float], *, run_seed: int, default: float, max_passes: float
) -> EpsilonSearch:
    """``loss_at(seed, scale)``: the held-back batch's loss at ``w + scale z(seed)`` (seed
    None: w). Probes rung after rung until one is linear, within `max_passes` (one rung at
    least)."""
    seeds = [direction_seed(run_seed, PROBE_STEP, d) for d in range(DIRECTIONS)]
    base = loss_at(None, 0.0)
    search = EpsilonSearch(None, passes=1)
    for rung, epsilon in enumerate(ladder(default)):
        if rung and search.passes + 2 * len(seeds) > max_passes:
            break
        first = second = 0.0
        for seed in seeds:
            plus, minus = loss_at(seed, epsilon), loss_at(seed, -epsilon)
            search.probes.append(
                {"epsilon": epsilon, "seed": seed, "loss_plus": plus, "loss_minus": minus, "loss": base}
            )
            first += abs(plus - minus) / 2
            second += abs(plus + minus - 2 * base) / 2
        search.passes += 2 * len(seeds)
        if math.isfinite(first) and math.isfinite(second) and first > 0 and second <= LINEARITY * first:
            search.epsilon = epsilon
            break
    return search
