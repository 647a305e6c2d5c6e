"""``--lr auto``: the learning rate from the loss's measured curvature and gradient noise
along the run's own z, on batches held back from training.

Along a direction z the passes MeZO already makes give the curvature for free:
``kappa(z) = (L(w + eps z) + L(w - eps z) - 2 L(w)) / eps^2 = z^T H z`` (exactly, on a
quadratic), and the slope ``g = (L(w + eps z) - L(w - eps z)) / 2 eps``. A step on batch b,
``w <- w - lr (1/q) sum_i g_b(z_i) z_i``, changes the loss, to second order and in
expectation over z, by

    -lr |grad|^2 + lr^2 / 2 * (|grad|^2 + noise) * kappa / q,    kappa = E[z^T H z] = tr H

where noise is the batch-to-batch variance of the slope (many weights: H's Rayleigh
quotients are far below tr H). The best rate of one step is ``q * signal / kappa`` with
``signal = |grad|^2 / (|grad|^2 + noise)``. `search_learning_rate` probes the same
directions on every held-back batch: the slopes' second moment is |grad|^2 + noise, and
their variance across batches, direction by direction, is the noise. Curvature enters as
the mean |z^T H z|: a LoRA adapter at initialisation (B = 0) has indefinite curvature (the
A-B cross terms), and a step along z risks |z^T H z| whichever its sign. The rate is two
thirds of that optimum (`SAFETY`): at c times the optimum one step's expected decrease is
2c - c^2 of the best and its second-order term, where what the probes cannot see lives
(curvature that grows along the run), weighs c^2; c = 2/3 keeps 89% of the progress at
44% of the risk.

For fzoo, whose coefficient is normalised by the spread of the q losses (about eps times
the slopes' root mean square), the same step in its units is that rate times the slopes'
root mean square. Every probe (seed, batch, the three losses) and the choice are returned
for the run's log: they are part of the run's record, so replay and resume stay bit-exact
(the probes leave the weights as they found them; the chosen rate is checkpointed).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

from sglang.srt.mezo.estimators import direction_seed

SAFETY = 2 / 3  # of the one-step optimum q * signal / kappa
MIN_SIGNAL = 0.05  # the signal fraction's floor (its estimate from a few batches can fall to or below 0)
BUDGET_FRACTION = 0.1  # the search's forward passes, at most this fraction of the run's
PROBE_STEP = -2  # probe seeds: direction_seed(run seed, PROBE_STEP - batch, d), never a training step's


@dataclass
class LearningRateSearch:
    """What `search_learning_rate` measured and chose (`learning_rate` None: no usable curvature)."""

    learning_rate: Optional[float]
    kappa: Optional[float]  # mean |z^T H z| over the probes
    signal: Optional[float]  # the gradient's share of the slopes' second moment (the rest: batch noise)
    slope_rms: Optional[float]  # root mean square of g = (L+ - L-) / 2 eps over the probes
    probes: list = field(default_factory=list)  # [{batch, seed, loss_plus, loss_minus, loss}]
    passes: int = 0

    def record(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "kappa": self.kappa,
            "signal": self.signal,
            "slope_rms": self.slope_rms,
            "passes": self.passes,
            "probes": self.probes,
        }


def probe_plan(budget: float, batches: int, directions: int) -> tuple:
    """(batches, directions per batch) within `budget` passes: fewer batches first, then
    fewer directions; at least one of each (3 passes)."""
    while batches > 1 and batches * (2 * directions + 1) > budget:
        batches -= 1
    while directions > 1 and batches * (2 * directions + 1) > budget:
        directions -= 1
    return batches, directions


def search_learning_rate(
    loss_at: Callable[[int, Optional[int], float], float],
    *,
    run_seed: int,
    epsilon: float,
    num_directions: int,
    estimator: str,
    batches: int,
    directions: int,
) -> LearningRateSearch:
    """Probes the same `directions` seeded z on each of `batches` held-back batches;
    ``loss_at(batch, seed, scale)`` is the loss of batch index `batch` at ``w + scale z(seed)``
    (seed None: w)."""
    seeds = [direction_seed(run_seed, PROBE_STEP, d) for d in range(directions)]
    probes, kappas, slopes = [], [], [[] for _ in seeds]
    for b in range(batches):
        base = loss_at(b, None, 0.0)
        for d, seed in enumerate(seeds):
            plus, minus = loss_at(b, seed, epsilon), loss_at(b, seed, -epsilon)
            probes.append({"batch": b, "seed": seed, "loss_plus": plus, "loss_minus": minus, "loss": base})
            kappas.append((plus + minus - 2 * base) / epsilon**2)
            slopes[d].append((plus - minus) / (2 * epsilon))
    passes = batches * (2 * directions + 1)
    flat = [g for per_direction in slopes for g in per_direction]
    if not all(math.isfinite(v) for v in kappas + flat):
        return LearningRateSearch(None, None, None, None, probes, passes)
    curvature = statistics.fmean(abs(k) for k in kappas)
    # a second difference within float32's machine epsilon of the losses is their rounding, not curvature
    resolution = 2.0**-23 * statistics.fmean(abs(p["loss"]) for p in probes) / epsilon**2
    second_moment = statistics.fmean(g * g for g in flat)
    noise = statistics.fmean(statistics.variance(g) for g in slopes) if batches > 1 else 0.0
    signal = min(1.0, max(MIN_SIGNAL, 1.0 - noise / second_moment)) if second_moment > 0 else MIN_SIGNAL
    if not curvature > resolution:
        return LearningRateSearch(None, curvature, signal, math.sqrt(second_moment), probes, passes)
    rate = SAFETY * num_directions * signal / curvature
    if estimator == "fzoo":
        rate *= math.sqrt(second_moment)
    return LearningRateSearch(rate, curvature, signal, math.sqrt(second_moment), probes, passes)
