"""No hyperparameters to tune: ``--lr auto`` (`lr_search`) and the divergence guard (`guard`),
on float64 quadratics whose best rate is known in closed form.

Run as ``pytest test/srt/test_mezo_auto.py`` or ``python3 test/srt/test_mezo_auto.py``.
"""

from __future__ import annotations

import math
import unittest

import torch
from toy_models import TOY_BATCH, Linear, Quadratic, toy_trainer

from sglang.srt.mezo.config import MeZOConfig, estimator_default
from sglang.srt.mezo.guard import RESTORE, SNAPSHOT, DivergenceGuard


def best_rate(model: Quadratic, q: int) -> float:
    """The rate that minimises the expected loss after one MeZO step with q Gaussian
    directions, in float64 from H and the gradient. With s = (1/q) sum_i (g . z_i) z_i,
    E[g . s] = |g|^2 and (Isserlis) E[s^T H s] = (|g|^2 tr H + 2 g^T H g) / q
    + (q - 1) / q * g^T H g, so the best eta = E[g . s] / E[s^T H s]."""
    g, h = model.grad(), model.H
    gg, ghg = float(g @ g), float(g @ (h @ g))
    return gg / ((gg * float(torch.trace(h)) + 2 * ghg) / q + (q - 1) / q * ghg)


def run_to_the_end(trainer, steps: int) -> list:
    outputs = []
    trainer.train([TOY_BATCH] * steps, on_step=lambda out, seconds: outputs.append(out))
    return outputs


class TestLearningRateSearch(unittest.TestCase):
    def chosen_rate(self, model: Quadratic, **overrides) -> float:
        values = dict(learning_rate="auto", estimator="mezo", perturbation="gaussian", max_steps=100)
        trainer = toy_trainer(model, **{**values, **overrides})
        search = trainer.find_learning_rate([TOY_BATCH, TOY_BATCH])
        self.assertEqual(trainer.base_learning_rate, search.learning_rate)
        self.assertEqual(search.passes, 2 * (2 * 4 + 1))  # 2 batches x (L(w) + 4 directions x 2)
        return search.learning_rate

    def test_auto_is_within_a_factor_two_of_the_best_rate(self):
        """On quadratics of 64 weights (H = A A^T / 64 + I/2, tr H ~ 96) and 10x that curvature,
        q = 1 and 4: auto's rate is within [1/2, 2] of `best_rate`. The median of 8 probes of
        z^T H z (variance 2 tr H^2, ~19% of tr H per probe) and the 2/3 safety factor keep
        it near 0.6-0.8 of the best. Canary: one fixed rate (the estimator's default, or
        any single number) cannot pass on both curvatures, 10x apart."""
        for q in (1, 4):
            for scale in (1.0, 10.0):
                with self.subTest(q=q, curvature=scale):
                    model = Quadratic(64, seed=1)
                    model.H.mul_(scale)
                    best = best_rate(model, q)
                    chosen = self.chosen_rate(model, num_directions=q)
                    self.assertGreaterEqual(chosen, best / 2)
                    self.assertLessEqual(chosen, 2 * best)
        rates = []
        for scale in (1.0, 10.0):
            model = Quadratic(64, seed=1)
            model.H.mul_(scale)
            rates.append(best_rate(model, 1))
        self.assertGreater(rates[0] / rates[1], 4)  # no rate is within 2x of both
        fixed = estimator_default(MeZOConfig(estimator="mezo", learning_rate=1.0), "learning_rate")
        self.assertFalse(all(best / 2 <= fixed <= 2 * best for best in rates))

    def test_the_search_leaves_the_weights_exactly_as_they_were(self):
        model = Quadratic(64, seed=1)
        before = model.theta.detach().clone()
        self.chosen_rate(model)
        self.assertTrue(torch.equal(model.theta.detach(), before))

    def test_no_measurable_curvature_falls_back_to_the_default(self):
        """A linear loss: L+ + L- - 2L is rounding only, below float32's machine epsilon of
        the loss (the float64 toy's is far below); the estimator's default rate is used."""
        trainer = toy_trainer(Linear(64, seed=1), learning_rate="auto", estimator="mezo", max_steps=100)
        search = trainer.find_learning_rate([TOY_BATCH, TOY_BATCH])
        self.assertEqual(
            search.learning_rate, estimator_default(MeZOConfig(estimator="mezo", learning_rate=1.0), "learning_rate")
        )

    def test_the_search_stays_within_a_tenth_of_the_run(self):
        """A 10-step MeZO run has 20 passes: the probes may take 2 (one batch, one direction:
        3 passes is the least a curvature needs, so it takes 3)."""
        trainer = toy_trainer(Quadratic(8), learning_rate="auto", estimator="mezo", max_steps=10)
        self.assertEqual(trainer.find_learning_rate([TOY_BATCH, TOY_BATCH]).passes, 3)
        trainer = toy_trainer(Quadratic(8), learning_rate="auto", estimator="mezo", max_steps=60)
        self.assertEqual(trainer.find_learning_rate([TOY_BATCH, TOY_BATCH]).passes, 9)  # 12 allowed

    def test_train_searches_first_and_logs_the_probes_with_the_first_step(self):
        model = Quadratic(16, seed=2)
        trainer = toy_trainer(model, learning_rate="auto", estimator="mezo", max_steps=30, perturbation="gaussian")
        outputs = run_to_the_end(trainer, 30)
        record = outputs[0].lr_search
        self.assertEqual(record["learning_rate"], trainer.learning_rate_found)
        self.assertEqual(len(record["probes"]), 2)  # 30 steps x 2 passes: 6 allowed, 1 batch x 2 directions
        self.assertTrue(all(o.lr_search is None for o in outputs[1:]))
        self.assertTrue(all(o.lr == trainer.learning_rate_found for o in outputs))


class TestEpsilonSearch(unittest.TestCase):
    """On a one-weight quadratic with Rademacher z (z = +-1), L(w +- eps z) = L +- eps g z + eps^2 h / 2
    exactly, so the second-order share of the change is eps h / (2 |g|) for every direction:
    the loss counts as linear (share <= 0.1) exactly for eps <= 0.2 |g| / h."""

    def boundary_and_choice(self, curvature: float) -> tuple:
        model = Quadratic(1)
        with torch.no_grad():  # L(w) = h w^2 / 2 + g w at w = 0: slope g = 0.02, curvature h
            model.H.fill_(curvature), model.b.fill_(0.02), model.theta.zero_()
        boundary = 0.2 * 0.02 / curvature
        trainer = toy_trainer(model, epsilon="auto", estimator="mezo", perturbation="rademacher", max_steps=1000)
        search = trainer.find_epsilon(TOY_BATCH)
        self.assertEqual(trainer.epsilon, search.epsilon)
        return boundary, search.epsilon

    def test_auto_is_the_largest_rung_below_the_linear_boundary(self):
        """The ladder steps down by sqrt(10): the choice is at or below the boundary and the
        rung above it is not (choice > boundary / sqrt(10)), for curvatures 10x apart (whose
        boundaries, 4e-3 and 4e-4, are 26% from the nearest rungs: float64 rounding is far smaller). Canary: one fixed
        scale (the default 1e-3, or any single number) cannot pass on both."""
        choices = []
        for curvature in (1.0, 10.0):
            with self.subTest(curvature=curvature):
                boundary, chosen = self.boundary_and_choice(curvature)
                self.assertLessEqual(chosen, boundary)
                self.assertGreater(chosen, boundary / math.sqrt(10))
                choices.append((boundary, chosen))
        fixed = estimator_default(MeZOConfig(estimator="mezo", learning_rate=1.0), "epsilon")
        self.assertFalse(all(b / math.sqrt(10) < fixed <= b for b, _ in choices))

    def test_no_linear_scale_keeps_the_default_and_the_weights(self):
        """A loss without slope (g = 0 at the minimum: only curvature, at every scale) is
        linear at no rung: the default is used, and the probes leave w bit for bit."""
        model = Quadratic(4, seed=5)
        with torch.no_grad():
            model.theta.copy_(-torch.linalg.solve(model.H, model.b))
        before = model.theta.detach().clone()
        trainer = toy_trainer(model, epsilon="auto", estimator="mezo", perturbation="rademacher", max_steps=1000)
        search = trainer.find_epsilon(TOY_BATCH)
        self.assertEqual(search.epsilon, estimator_default(trainer.config, "epsilon"))
        self.assertEqual(search.passes, 1 + 7 * 4)  # every rung probed, 2 directions x 2 passes
        self.assertTrue(torch.equal(model.theta.detach(), before))

    def test_both_searches_stay_within_a_tenth_of_the_run(self):
        """300 MeZO steps (600 passes): with --lr auto too, the epsilon search takes at most
        half of the 60 passes allowed and the two together at most 60."""
        trainer = toy_trainer(Quadratic(4, seed=6), epsilon="auto", learning_rate="auto", estimator="mezo",
                              perturbation="rademacher", max_steps=300)  # fmt: skip
        outputs = run_to_the_end(trainer, 300)
        first = outputs[0]
        self.assertLessEqual(first.epsilon_search["passes"], 30)
        self.assertLessEqual(first.epsilon_search["passes"] + first.lr_search["passes"], 60)
        self.assertEqual(first.epsilon_search["epsilon"], trainer.epsilon)
        self.assertTrue(all(o.epsilon_search is None for o in outputs[1:]))


class TestDivergenceGuard(unittest.TestCase):
    """On a 32-weight quadratic at 2.5x the best rate (MeZO diverges beyond 2x), 150 steps."""

    def run_guarded(self, guard: str) -> tuple:
        model = Quadratic(32, seed=3)
        start = float(model().detach())
        rate = 2.5 * best_rate(model, 1)
        trainer = toy_trainer(
            model, learning_rate=rate, estimator="mezo", perturbation="gaussian", max_steps=150,
            divergence_guard=guard, guard_window=10, max_nonfinite_steps=150,
        )  # fmt: skip
        outputs = run_to_the_end(trainer, 150)
        return start, float(model().detach()), outputs

    def test_the_guard_backs_off_and_the_run_ends_below_its_start(self):
        """The run backs off (restores and halves the rate, logged on the step) until it
        descends, and ends below its starting loss. Canary: the same run without the guard
        ends far above its start."""
        start, end, outputs = self.run_guarded("on")
        restores = [o.guard for o in outputs if o.guard and o.guard.get("action") == "restore"]
        self.assertGreaterEqual(len(restores), 1)
        self.assertEqual(restores[0]["lr_scale"], 0.5)
        self.assertLess(end, start)
        start, unguarded, _ = self.run_guarded("off")
        self.assertTrue(not math.isfinite(unguarded) or unguarded > 10 * abs(start))

    def test_a_restore_is_exact(self):
        """After a restore, the weights are bitwise those of the step the guard names (the
        same run, stopped there)."""
        _, _, outputs = self.run_guarded("on")
        restore = next(o for o in outputs if o.guard and o.guard.get("action") == "restore")
        to_step = restore.guard["to_step"]
        model = Quadratic(32, seed=3)
        rate = 2.5 * best_rate(model, 1)
        if to_step > 0:  # the weights of step to_step: the same run, stopped there
            trainer = toy_trainer(
                model, learning_rate=rate, estimator="mezo", perturbation="gaussian", max_steps=to_step,
                divergence_guard="on", guard_window=10, max_nonfinite_steps=150,
            )  # fmt: skip
            run_to_the_end(trainer, to_step)
        replayed = Quadratic(32, seed=3)
        again = toy_trainer(
            replayed, learning_rate=rate, estimator="mezo", perturbation="gaussian", max_steps=restore.step + 1,
            divergence_guard="on", guard_window=10, max_nonfinite_steps=150,
        )  # fmt: skip
        run_to_the_end(again, restore.step + 1)
        self.assertTrue(torch.equal(replayed.theta.detach(), model.theta.detach()))

    def test_the_rule_keeps_the_best_acceptable_check_and_ends_on_it(self):
        """Checks against a start of loss 1.0 / accuracy 0.5 (tolerance 0.2): a better check
        is kept; a lower loss at a lower accuracy than the start is not acceptable (kept
        going, not kept); a loss above the best's 0.8 x 1.2 restores the best and halves the
        rate; the last check, not the best, ends on the best. Canary: judged on the loss
        alone, the guard keeps step 10, whose accuracy is below the start's, and ends there."""

        def judged(guard) -> list:
            guard.begin({"loss": 1.0, "accuracy": 0.5})
            checks = [(5, 0.8, 0.6), (10, 0.7, 0.4), (15, 1.0, 0.6), (20, 0.75, 0.55), (25, 0.74, 0.45)]
            return [
                (
                    guard.judge(step, {"loss": loss, "accuracy": accuracy}, last=step == 25),
                    guard.best_step,
                    guard.lr_scale,
                )
                for step, loss, accuracy in checks
            ]

        self.assertEqual(
            judged(DivergenceGuard(window=10, tolerance=0.2)),
            [(SNAPSHOT, 5, 1.0), (None, 5, 1.0), (RESTORE, 5, 0.5), (SNAPSHOT, 20, 0.5), (RESTORE, 20, 0.5)],
        )

        class LossOnly(DivergenceGuard):
            def acceptable(self, check):
                return check["loss"] <= self.start["loss"]

        self.assertEqual(judged(LossOnly(window=10, tolerance=0.2))[1], (SNAPSHOT, 10, 1.0))

    def test_checks_come_every_window_of_passes_and_after_the_last_step(self):
        """MeZO makes 2 passes a step: with a window of 10 passes a check follows steps 5, 10,
        ... and the last step (13), each logged with its held-back loss; the start's check is
        logged with the first step; every check spends the held-back batches' passes."""
        model = Quadratic(8, seed=0)
        trainer = toy_trainer(
            model, learning_rate=1e-3, estimator="mezo", perturbation="gaussian", max_steps=13,
            divergence_guard="on", guard_window=10, guard_batches=2,
        )  # fmt: skip
        outputs = run_to_the_end(trainer, 13)
        checked = [o.step for o in outputs if o.guard and "check" in o.guard]
        self.assertEqual(checked, [4, 9, 12])
        self.assertIn("start", outputs[0].guard)
        self.assertEqual(trainer.guard.check_passes, 2 * 4)  # the start and three checks, 2 batches each

    def test_explicit_hyperparameters_keep_the_guard_off(self):
        """A number given for the learning rate means what it meant before the guard existed:
        no guard, no search (the run is bit-identical to one without them); defaults and auto
        turn it on, and config.json records the resolved choice."""
        self.assertEqual(MeZOConfig(learning_rate=1e-3, epsilon=1e-2, estimator="mezo").divergence_guard, "off")
        self.assertEqual(MeZOConfig().divergence_guard, "on")
        self.assertEqual(MeZOConfig(learning_rate="auto").divergence_guard, "on")
        self.assertEqual(MeZOConfig(learning_rate=1e-3, divergence_guard="on").divergence_guard, "on")
        recorded = MeZOConfig.from_dict(MeZOConfig().to_dict())
        self.assertEqual(recorded.divergence_guard, "on")
        trainer = toy_trainer(Quadratic(8), learning_rate=1e-3, max_steps=3)
        self.assertIsNone(trainer.guard)
        outputs = run_to_the_end(trainer, 3)
        self.assertTrue(all(o.guard is None and o.lr_search is None and o.lr == 1e-3 for o in outputs))


if __name__ == "__main__":
    unittest.main(verbosity=2)
