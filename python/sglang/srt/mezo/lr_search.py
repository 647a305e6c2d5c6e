"""``--lr auto``: the learning rate from the loss's measured curvature along the run's own z.

Along a direction z the passes MeZO already makes give the curvature for free:
``kappa(z) = (L(w + eps z) + L(w - eps z) - 2 L(w)) / eps^2 = z^T H z`` (exactly, on a
quadratic). For the SPSA step ``s = (1/q) sum_i g_i z_i`` with ``g_i ~ grad . z_i``, the
expected change of the loss after ``w <- w - lr s`` is, to second order,

    -lr |grad|^2 + lr^2 / 2 * E[s^T H s],   E[s^T H s] ~ |grad|^2 (tr H / q + grad^T H grad / |grad|^2)

and, with many weights (tr H far above H's Rayleigh quotients), ``E[z^T H z] = tr H``:
the best rate of one step is ``q / kappa``. `search_learning_rate` measures kappa at the
starting weights on held-back batches (the median over probes: one odd direction does not
move it), and picks two thirds of that optimum (`SAFETY`). At ``c`` times the optimum one
step's expected decrease is ``2c - c^2`` of the best, and its second-order term, where
what the probes cannot see lives (the gradient's batch-to-batch noise, curvature that
grows along the run), weighs ``c^2``: c = 2/3 keeps 89% of the progress at 44% of the risk.

For fzoo, whose coefficient is normalised by the spread of the q losses (about eps times
the spread of g), the same step in its units is that rate times the spread of g measured
by the probes. Every probe (seed, batch, the three losses) and the choice are returned for
the run's log: they are part of the run's record, so replay and resume stay bit-exact
(the probes leave the weights as they found them; the chosen rate is checkpointed).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

from sglang.srt.mezo.estimators import direction_seed

SAFETY = 2 / 3  # of the one-step optimum q / kappa
BUDGET_FRACTION = 0.1  # the search's forward passes, at most this fraction of the run's
PROBE_STEP = -2  # probe seeds: direction_seed(run seed, PROBE_STEP - batch, d), never a training step's


@dataclass
class LearningRateSearch:
    """What `search_learning_rate` measured and chose (`learning_rate` None: no usable curvature)."""

    learning_rate: Optional[float]
    kappa: Optional[float]  # median curvature z^T H z over the probes
    slope_spread: Optional[float]  # standard deviation of g = (L+ - L-) / 2 eps over the probes
    probes: list = field(default_factory=list)  # [{batch, seed, loss_plus, loss_minus, loss}]
    passes: int = 0

    def record(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "kappa": self.kappa,
            "slope_spread": self.slope_spread,
            "passes": self.passes,
            "probes": self.probes,
        }


def probe_plan(passes_per_step: int, max_steps: int, batches: int, directions: int) -> tuple:
    """(batches, directions per batch) within BUDGET_FRACTION of the run's passes: fewer
    batches first, then fewer directions; at least one of each (3 passes)."""
    budget = BUDGET_FRACTION * passes_per_step * max_steps
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
    """Probes `directions` seeded z on each of `batches` held-back batches;
    ``loss_at(batch, seed, scale)`` is the loss of batch index `batch` at ``w + scale z(seed)``
    (seed None: w)."""
    probes, kappas, slopes = [], [], []
    for b in range(batches):
        base = loss_at(b, None, 0.0)
        for d in range(directions):
            seed = direction_seed(run_seed, PROBE_STEP - b, d)
            plus, minus = loss_at(b, seed, epsilon), loss_at(b, seed, -epsilon)
            probes.append({"batch": b, "seed": seed, "loss_plus": plus, "loss_minus": minus, "loss": base})
            kappas.append((plus + minus - 2 * base) / epsilon**2)
            slopes.append((plus - minus) / (2 * epsilon))
    passes = batches * (2 * directions + 1)
    if not all(math.isfinite(v) for v in kappas + slopes):
        return LearningRateSearch(None, None, None, probes, passes)
    kappa = statistics.median(kappas)
    spread = statistics.pstdev(slopes) if len(slopes) > 1 else abs(slopes[0])
    if not kappa > 0:
        return LearningRateSearch(None, kappa, spread, probes, passes)
    rate = SAFETY * num_directions / kappa
    if estimator == "fzoo":
        rate *= spread
    return LearningRateSearch(rate, kappa, spread, probes, passes)
