"""Estimators: how one step turns forward passes at seeded perturbations into update terms.

Every estimator returns `DirectionEstimate`s whose (seed, coefficient) pairs are the
update's terms: the backend applies ``w <- w - lr * sum_i (g_i / q) z_i(seed_i)`` with z
regenerated from the seed (`zo_sgd.commit_update`), and ``metrics.jsonl`` logs the
pairs, so replay (`replay.py`) and bit-exact restores work alike for all of them. Which
z a seed names (dense, magnitude-masked, low-rank) is the backend's direction family
(`structured_directions`), chosen by the same config field.

* ``mezo``: MeZO's two-point SPSA (Malladi et al. 2023), q directions, 2q passes.
* ``fzoo``: one-sided, normalised (FZOO, ICLR 2026): L0 = L(w) and L_i = L(w + eps z_i)
  for q >= 2 directions, g_i = (L_i - L0) / sigma with sigma the sample standard deviation
  of the L_i: q + 1 passes. Where the spread of the L_i reflects the gradient (sigma ~ eps
  |grad|) this is a normalised-gradient step of ~lr / sqrt(q) per element whatever the loss
  scale; the offset all L_i share (eps^2 / 2 z'Hz, a loss rounded in half precision) is
  not in sigma, so when the L_i cluster tightly g_i grows without bound: `grad_clip`
  bounds it.
* ``sparse``: two-point SPSA on magnitude-masked z (Sparse-MeZO).
* ``lowrank``: two-point SPSA on low-rank z = U V^T per matrix (LOZO), V kept for
  ``lowrank_interval`` steps.

Memory: none beyond the direction family's (see its docstring); FZOO keeps q + 1 floats.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Protocol

from sglang.srt.mezo.primitives import derived_seed
from sglang.srt.mezo.structured_directions import lowrank_seed

ESTIMATORS = ("mezo", "fzoo", "sparse", "lowrank")

# (seed or None for the unperturbed weights, scale): a point w + scale * z(seed) a step evaluates
Point = tuple  # [Optional[int], float]


def direction_seed(run_seed: int, step: int, direction: int) -> int:
    """The seed of direction `direction` at step `step`: stable, 63 bits, logged per step."""
    return derived_seed("mezo", int(run_seed), int(step), int(direction))


@dataclass
class DirectionEstimate:
    """One direction of a step, in names every estimator shares: its seed, `loss_perturbed`
    = L(w + eps z), `loss_baseline` = the loss it is compared with (L(w - eps z) for
    two-point estimators, L(w) for one-sided ones), and `coefficient`, the factor of z in
    the update ``w -= lr * coefficient * z`` (the projected gradient for two-point
    estimators, a normalised difference for fzoo)."""

    seed: int
    loss_perturbed: float
    loss_baseline: float
    coefficient: float


class Estimator(Protocol):
    """A step is its points (every weight setting it evaluates, known before any pass runs,
    so a backend may evaluate them all in one batched call: `Backend.loss_sums`) and the
    rule combining their losses into `DirectionEstimate`s."""

    name: str

    def passes_per_step(self) -> int:
        """Forward passes (over the batch) one step costs."""

    def points(self, step: int) -> list:
        """The step's `Point`s, in the order one-by-one passes run them."""

    def combine(self, step: int, losses: list) -> list:
        """The step's `DirectionEstimate`s from the mean loss at each of `points(step)`."""


class TwoPoint:
    """MeZO's SPSA: ``g = (L(w + eps z) - L(w - eps z)) / (2 eps)`` per direction (its
    expectation on a quadratic is exactly grad . z; `sparse` and `lowrank` use it on their z)."""

    def __init__(self, name: str, run_seed: int, epsilon: float, directions: int, seed_of=None):
        self.name, self.run_seed, self.epsilon, self.directions = name, run_seed, epsilon, directions
        self.seed_of = seed_of or (lambda step, d: direction_seed(run_seed, step, d))

    def passes_per_step(self) -> int:
        return 2 * self.directions

    def points(self, step: int) -> list:
        seeds = [self.seed_of(step, d) for d in range(self.directions)]
        return [(seed, sign * self.epsilon) for seed in seeds for sign in (+1, -1)]

    def combine(self, step: int, losses: list) -> list:
        seeds = [seed for seed, _ in self.points(step)[::2]]
        estimates = []
        for seed, loss_plus, loss_minus in zip(seeds, losses[::2], losses[1::2]):
            projected_grad = (loss_plus - loss_minus) / (2 * self.epsilon)
            estimates.append(DirectionEstimate(seed, loss_plus, loss_minus, projected_grad))
        return estimates


class OneSidedNormalised:
    """FZOO's step: q one-sided differences against one unperturbed pass, each divided by
    the standard deviation of the q perturbed losses (0 when they are all equal: no update)."""

    name = "fzoo"

    def __init__(self, run_seed: int, epsilon: float, directions: int):
        self.run_seed, self.epsilon, self.directions = run_seed, epsilon, directions

    def passes_per_step(self) -> int:
        return self.directions + 1

    def points(self, step: int) -> list:
        seeds = [direction_seed(self.run_seed, step, d) for d in range(self.directions)]
        return [(None, 0.0)] + [(seed, +self.epsilon) for seed in seeds]

    def combine(self, step: int, losses: list) -> list:
        seeds = [seed for seed, _ in self.points(step)[1:]]
        base, losses = losses[0], losses[1:]
        finite = all(math.isfinite(loss) for loss in (base, *losses))  # else the trainer skips the step
        sigma = statistics.stdev(losses) if finite else math.nan
        scale = 1.0 / sigma if sigma > 0 else 0.0
        return [DirectionEstimate(s, loss, base, (loss - base) * scale) for s, loss in zip(seeds, losses)]


def make_estimator(config, epsilon: Optional[float]) -> Estimator:
    """The estimator `config.estimator` names, with the config's hyperparameters at scale
    `epsilon` (the config's, or --epsilon auto's choice; None: not chosen yet: the trainer
    chooses it before the first step)."""
    seed, eps, q = config.seed, epsilon, config.num_directions
    if config.estimator == "fzoo":
        return OneSidedNormalised(seed, eps, q)
    if config.estimator == "lowrank":
        interval = config.lowrank_interval

        def seed_of(step: int, d: int) -> int:
            return lowrank_seed(direction_seed(seed, step, d), direction_seed(seed, -1 - step // interval, d))

        return TwoPoint("lowrank", seed, eps, q, seed_of)
    return TwoPoint(config.estimator, seed, eps, q)
