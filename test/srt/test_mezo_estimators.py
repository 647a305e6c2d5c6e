"""Estimators beyond two-point SPSA: FZOO-style one-sided normalised steps, magnitude-masked
(Sparse-MeZO) and low-rank (LOZO) directions.

Run as ``pytest test/srt/test_mezo_estimators.py`` or ``python3 test/srt/test_mezo_estimators.py``.
Each estimator's update is checked against its theory on float64 toy objectives (derived
in each test), restore and replay are checked bit for bit on a tiny Llama, and every
property has a canary (a broken variant shown failing):

* fzoo: a two-point difference in place of L(w + eps z) - L(w) doubles the expectation;
  the unnormalised step is not invariant to the loss scale;
* sparse: a mask of the largest magnitudes moves elements outside the support;
* lowrank: z without the 1/sqrt(r) scale is biased (E = r grad); a basis redrawn every
  step gives the updates of one interval rank 3r, not r;
* exactness: a perturbation that is never put back fails the lr = 0 snapshot; a changed
  logged coefficient fails the replay.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
from mezo_testing import assert_bit_identical, lm_batch, snapshot, tiny_llama, tiny_tokenizer
from torch import nn
from toy_models import TOY_BATCH, Linear, Quadratic, toy_objective, toy_trainer

from sglang.srt.mezo import estimators, structured_directions
from sglang.srt.mezo.config import ESTIMATOR_DEFAULTS, MeZOConfig
from sglang.srt.mezo.perturbation import UnitScopedPerturbation
from sglang.srt.mezo.trainer import MeZOTrainer


class MatrixQuadratic(nn.Module):
    """f(W) = 1/2 vec(W)^T H vec(W) + b . vec(W) for a (rows x cols) float64 matrix W."""

    def __init__(self, rows: int, cols: int, seed: int = 0):
        super().__init__()
        flat = Quadratic(rows * cols, seed)
        self.register_buffer("H", flat.H)
        self.register_buffer("b", flat.b)
        self.theta = nn.Parameter(flat.theta.detach().clone().view(rows, cols))

    def forward(self):
        t = self.theta.reshape(-1)
        return 0.5 * t @ (self.H @ t) + self.b @ t

    def grad(self) -> torch.Tensor:
        return (self.H @ self.theta.detach().reshape(-1) + self.b).view(self.theta.shape)


def steps_from(trainer: MeZOTrainer, model, count: int) -> torch.Tensor:
    """-(w_after - w_before) / lr of `count` steps, each taken from the same starting weights."""
    start = model.theta.detach().clone()
    lr = trainer.config.learning_rate
    out = []
    for _ in range(count):
        trainer.step(TOY_BATCH)
        out.append(-(model.theta.detach() - start) / lr)
        with torch.no_grad():
            model.theta.copy_(start)
    return torch.stack(out)


def assert_mean_close(test, samples: torch.Tensor, expected: torch.Tensor, sigmas: float = 5.0):
    """Each coordinate's sample mean within `sigmas` standard errors of `expected` (CLT: the
    mean of N i.i.d. samples has standard error std / sqrt(N); 5 sigma over a few dozen
    coordinates fails by chance with probability < 1e-5). A coordinate that never varies
    must equal its expectation exactly."""
    mean = samples.mean(0)
    error = samples.std(0) / math.sqrt(samples.shape[0])
    constant = error == 0
    test.assertTrue(torch.equal(mean[constant], expected[constant]), "a constant coordinate is off")
    worst = ((mean - expected).abs()[~constant] / error[~constant]).max().item()
    test.assertLess(worst, sigmas, f"mean off by {worst:.1f} standard errors")


class TwoPointNormalised(estimators.OneSidedNormalised):
    """Canary: FZOO's normalisation over two-point differences L(w + eps u) - L(w - eps u)."""

    def points(self, step):
        seeds = [estimators.direction_seed(self.run_seed, step, d) for d in range(self.directions)]
        return [(seed, +self.epsilon) for seed in seeds] + [(seed, -self.epsilon) for seed in seeds]

    def combine(self, step, losses):
        seeds = [seed for seed, _ in self.points(step)[: self.directions]]
        plus, minus = losses[: self.directions], losses[self.directions :]
        sigma = statistics.stdev(plus)
        return [estimators.DirectionEstimate(s, p, m, (p - m) / sigma) for s, p, m in zip(seeds, plus, minus)]


class TestOneSidedNormalised(unittest.TestCase):
    def test_one_sided_difference_is_unbiased_on_a_quadratic(self):
        """FZOO's difference L(w + eps u) - L(w) = eps g.u + eps^2/2 u'Hu on a quadratic; with
        Rademacher u every third moment E[u_i u_j u_k] is 0, so E[(L_i - L0) u_i] = eps g
        exactly. The step is -lr/q sum_i (L_i - L0)/sigma u_i with sigma the sample std of
        the L_i: multiplying each step by its sigma (recomputed here from the logged losses)
        leaves q^-1 sum (L_i - L0) u_i, whose mean over N = 2000 steps must be eps g within
        5 standard errors. Canary: L(w - eps u) in place of L(w) doubles the mean."""
        eps, q, n = 1e-2, 4, 2000

        def run(canary: bool) -> torch.Tensor:
            model = Quadratic(8, seed=1)
            trainer = toy_trainer(
                model, estimator="fzoo", learning_rate=1e-6, epsilon=eps, num_directions=q, perturbation="rademacher"
            )
            if canary:
                trainer.estimator = TwoPointNormalised(0, eps, q)
            grad = model.grad() * eps
            start = model.theta.detach().clone()
            samples = []
            for _ in range(n):
                out = trainer.step(TOY_BATCH)
                losses = torch.tensor([d.loss_perturbed for d in out.per_direction], dtype=torch.float64)
                sigma = losses.std().item()  # sample std (n - 1), as the estimator's statistics.stdev
                samples.append(-(model.theta.detach() - start) / trainer.config.learning_rate * sigma)
                with torch.no_grad():
                    model.theta.copy_(start)
            return torch.stack(samples), grad

        samples, expected = run(canary=False)
        assert_mean_close(self, samples, expected)
        broken, expected = run(canary=True)
        with self.assertRaises(AssertionError):
            assert_mean_close(self, broken, expected)

    def test_step_is_invariant_to_the_loss_scale(self):
        """For a linear f, L_i - L0 = eps b.u_i and sigma = eps std_i(b.u_i): the coefficients
        b.u_i / std_i(b.u_i) do not depend on eps or on scaling f by 100, so the update is
        the same up to rounding (relative 1e-9: float64 differences of O(1) losses carry
        ~1e-16 / (eps |b.u|) ~ 1e-13 relative error). Canary: MeZO's step (not normalised)
        grows 100-fold."""

        def update(estimator: str, scale: float) -> torch.Tensor:
            model = Linear(16, seed=3)
            trainer = MeZOTrainer(
                model,
                MeZOConfig(estimator=estimator, learning_rate=1e-3, epsilon=1e-3, num_directions=4, disable_tqdm=True),
                objective=lambda m, batch: (scale * toy_objective(m, batch)[0], 1),
            )
            start = model.theta.detach().clone()
            trainer.step(TOY_BATCH)
            return model.theta.detach() - start

        one, hundred = update("fzoo", 1.0), update("fzoo", 100.0)
        torch.testing.assert_close(hundred, one, rtol=1e-9, atol=0)
        self.assertGreater(one.abs().max().item(), 1e-4)  # it moved
        mezo_one, mezo_hundred = update("mezo", 1.0), update("mezo", 100.0)
        with self.assertRaises(AssertionError):
            torch.testing.assert_close(mezo_hundred, mezo_one, rtol=1e-9, atol=0)

    def test_costs_q_plus_one_passes_and_needs_two_directions(self):
        calls = []
        model = Quadratic(4)
        trainer = MeZOTrainer(
            model,
            MeZOConfig(estimator="fzoo", learning_rate=1e-3, epsilon=1e-3, num_directions=3, disable_tqdm=True),
            objective=lambda m, b: (calls.append(1), toy_objective(m, b))[1],
        )
        unperturbed = float(model())
        out = trainer.step(TOY_BATCH)
        self.assertEqual(len(calls), 4)
        self.assertEqual(trainer.estimator.passes_per_step(), 4)
        self.assertEqual({d.loss_baseline for d in out.per_direction}, {unperturbed})  # L0, once
        with self.assertRaisesRegex(ValueError, "num_directions.*q >= 2"):
            MeZOConfig(estimator="fzoo", num_directions=1)


class TestMagnitudeMasked(unittest.TestCase):
    def test_update_support_and_expectation(self):
        """Sparse-MeZO moves exactly the k = ceil(f d) smallest-magnitude elements (tau = the
        k-th smallest |w|, found here by sorting): Gaussian z is never 0, so every masked-in
        element moves and no other. Two-point SPSA on a quadratic is exact: g = grad.(m z),
        so E[g m z] = m grad (diag mask), checked as a mean of N = 2000 steps within 5
        standard errors. Canary: a mask of the largest magnitudes moves other elements."""
        d, fraction = 12, 0.25
        model = Quadratic(d, seed=2)
        k = math.ceil(fraction * d)
        tau = model.theta.detach().abs().sort().values[k - 1]
        support = model.theta.detach().abs() <= tau
        self.assertEqual(int(support.sum()), k)
        trainer = toy_trainer(model, estimator="sparse", learning_rate=1e-6, sparse_fraction=fraction)
        samples = steps_from(trainer, model, 2000)
        moved = (samples != 0).any(0)
        self.assertTrue(torch.equal(moved, support))
        self.assertTrue(((samples != 0) == support).all())  # every step, not just some
        assert_mean_close(self, samples, model.grad() * support)

        class Largest(structured_directions.MagnitudeMasked):
            def threshold(self, values):
                flat = values.detach().reshape(-1).float().abs()
                return flat.kthvalue(flat.numel() - math.ceil(self.fraction * flat.numel()) + 1).values

            def source(self, name, values):
                tau = self.threshold(values)
                dense = structured_directions.dense_source(self.kind, name, values.device)
                return lambda seed, start, piece: torch.where(
                    piece.float().abs() >= tau, dense(seed, start, piece), 0.0
                )

        canary = toy_trainer(Quadratic(d, seed=2), estimator="sparse", learning_rate=1e-6, sparse_fraction=fraction)
        canary.backend.perturbation.family = Largest("gaussian", fraction)
        moved = (steps_from(canary, canary.backend.model, 5) != 0).any(0)
        self.assertFalse(torch.equal(moved, support))

    def test_an_all_zero_tensor_is_perturbed_whole(self):
        """LoRA's B starts at zero: every |w| = 0 = tau, and ties at tau are in the mask, so a
        sparse run trains B from the first step (each element moves: Gaussian z is never 0).
        Canary: a strict comparison (|w| < tau) leaves B at zero forever."""

        def moved(strict: bool) -> torch.Tensor:
            model = Quadratic(10, seed=6)
            with torch.no_grad():
                model.theta.zero_()
            trainer = toy_trainer(model, estimator="sparse", learning_rate=1e-6, sparse_fraction=0.3)
            if strict:
                family = trainer.backend.perturbation.family
                dense = structured_directions.dense_source

                def strict_source(name, values):
                    tau, z = family.threshold(values), dense(family.kind, name, values.device)
                    return lambda seed, start, piece: torch.where(piece.abs() < tau, z(seed, start, piece), 0.0)

                family.source = strict_source
            return steps_from(trainer, model, 1)[0] != 0

        self.assertTrue(bool(moved(strict=False).all()))
        self.assertFalse(bool(moved(strict=True).any()))

    def test_refuses_momentum_and_weight_decay(self):
        """Both would move elements outside the mask (decay scales every element; a momentum
        buffer keeps earlier masks' z)."""
        for extra in (dict(momentum=0.9), dict(weight_decay=0.1)):
            with self.assertRaisesRegex(ValueError, "sparse moves only its masked elements"):
                MeZOConfig(estimator="sparse", learning_rate=1e-3, **extra)


class TestLowRank(unittest.TestCase):
    def test_updates_have_rank_r_and_share_the_basis_within_an_interval(self):
        """Z = U V^T / sqrt(r): one step's update of a 7 x 6 matrix has rank r = 2, and the
        updates of steps in one interval share V, so stacked side by side (rows) they still
        span r dimensions of R^6, while steps of two intervals span 2r. Canary: V redrawn
        every step (interval ignored): the 3 updates of one interval span 3r = 6. Numerical rank:
        singular values above 1e-6 of the largest. The update is measured as w_after -
        w_before with |w| < 4 and entries ~1e-6 (lr 1e-6): rounding adds at most
        ulp(4)/2 = 4.4e-16 per entry, a spectral norm below sqrt(42) 4.4e-16 = 3e-15, i.e.
        ~1e-9 of the largest singular value; a true direction's are within 1e-3 of it."""

        def ranks(interval_respected: bool) -> tuple:
            model = MatrixQuadratic(7, 6, seed=4)
            trainer = toy_trainer(model, estimator="lowrank", learning_rate=1e-6, lowrank_rank=2, lowrank_interval=3)
            if not interval_respected:
                seed_of = trainer.estimator.seed_of
                trainer.estimator.seed_of = lambda step, d: seed_of(step * 3, d)
            ups = [u.reshape(7, 6) for u in steps_from(trainer, model, 6)]

            def rank(m):
                s = torch.linalg.svdvals(m)
                return int((s > 1e-6 * s[0]).sum())

            return rank(ups[0]), rank(torch.cat(ups[:3])), rank(torch.cat(ups))

        self.assertEqual(ranks(True), (2, 2, 4))
        self.assertEqual(ranks(False)[1], 6)

    def test_unbiased_when_the_basis_is_redrawn(self):
        """E[Z_ij Z_kl] = sum_ab E[U_ia U_kb] E[V_ja V_lb] / r = delta_ik delta_jl, so with a
        new V each step (interval 1) E[g Z] = grad exactly on a quadratic (g = grad . Z,
        two-point SPSA); N = 2000 steps, 5 standard errors. Canary: z without the 1/sqrt(r)
        scale (r = 4): g and Z both grow by 2, E = 4 grad."""
        model = MatrixQuadratic(5, 4, seed=5)
        trainer = toy_trainer(model, estimator="lowrank", learning_rate=1e-6, lowrank_rank=4, lowrank_interval=1)
        assert_mean_close(self, steps_from(trainer, model, 2000), model.grad())
        canary = toy_trainer(
            MatrixQuadratic(5, 4, seed=5), estimator="lowrank", learning_rate=1e-6, lowrank_rank=4, lowrank_interval=1
        )
        canary.backend.perturbation.family.scale = 1.0
        with self.assertRaises(AssertionError):
            assert_mean_close(self, steps_from(canary, canary.backend.model, 2000), model.grad())


DTYPES = (torch.float32, torch.bfloat16)


class TestEstimatorExactness(unittest.TestCase):
    """Every estimator on a tiny Llama, LoRA and full-parameter."""

    CASES = [
        ("fzoo", dict(num_directions=3)),
        ("sparse", dict(sparse_fraction=0.3)),
        ("lowrank", dict(lowrank_rank=2, lowrank_interval=2)),
    ]

    def test_lr0_steps_restore_every_weight_bit_for_bit(self):
        """10 steps at lr = 0 (each perturbing the weights 2q or q + 1 times) leave every
        weight bit-identical, in float32 and bfloat16, LoRA and full-parameter, and over
        float32 masters (written from the master, synced back). Canary: with the unit-scoped
        restore disabled the same comparison fails."""
        cases = [(case, peft, dtype, False) for case in self.CASES for peft in ("none", "lora") for dtype in DTYPES]
        cases += [(case, "none", torch.bfloat16, True) for case in self.CASES]  # float32 masters
        for (estimator, extra), peft, dtype, masters in cases:
            with self.subTest(estimator=estimator, peft=peft, dtype=dtype, fp32_trainable=masters):
                model = tiny_llama(dtype=dtype)
                config = MeZOConfig(
                    estimator=estimator, peft=peft, learning_rate=0.0, epsilon=1e-2, fp32_trainable=masters,
                    disable_tqdm=True, **extra,
                )  # fmt: skip
                trainer = MeZOTrainer(model, config)
                before = snapshot(trainer.model)
                for _ in range(10):
                    trainer.step(lm_batch())
                assert_bit_identical(self, trainer.model, before)
        trainer = MeZOTrainer(tiny_llama(), MeZOConfig(estimator="sparse", learning_rate=0.0, epsilon=1e-2))
        before = snapshot(trainer.model)
        with mock.patch.object(UnitScopedPerturbation, "_restore", lambda self, unit, saved: None):
            trainer.step(lm_batch())
        with self.assertRaises(AssertionError):
            assert_bit_identical(self, trainer.model, before)

    def test_replay_rebuilds_each_estimators_run(self):
        """The main job, 4 steps per estimator (LoRA, momentum 0), then `replay` from
        metrics.jsonl: bit-identical to the final checkpoint. Canary: one step's logged
        coefficient changed is detected."""
        from sglang.srt.mezo import replay
        from sglang.srt.mezo_trainer import main

        with tempfile.TemporaryDirectory() as root:
            model_dir = os.path.join(root, "tiny")
            tiny_llama().save_pretrained(model_dir)
            tiny_tokenizer().save_pretrained(model_dir)
            train = os.path.join(root, "train.jsonl")
            with open(train, "w") as f:
                for i in range(16):
                    f.write(json.dumps({"prompt": f"word {i} is", "completion": " good" if i % 2 else " bad"}) + "\n")
            for estimator, extra in self.CASES:
                with self.subTest(estimator=estimator):
                    out = os.path.join(root, estimator)
                    flags = [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
                    main(["--model", model_dir, "--train-file", train, "--output-dir", out, "--batch-size", "4",
                          "--steps", "4", "--estimator", estimator, "--lr", "1e-2", "--epsilon", "1e-2",
                          "--peft", "lora", "--disable-tqdm", *flags])  # fmt: skip
                    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
                    self.assertEqual(rows[0]["estimator"], estimator)
                    checkpoint = Path(out) / "checkpoints" / "step-4"
                    self.assertEqual(replay.differing_tensors(replay.replay(out), checkpoint), [])
                    rows[1]["directions"][0][1] *= 1.5
                    Path(out, "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                    self.assertNotEqual(replay.differing_tensors(replay.replay(out), checkpoint), [])


class TestEstimatorConfig(unittest.TestCase):
    def test_explicit_hyperparameters_mean_mezo_as_before(self):
        """lr and epsilon given: MeZO with one direction (the behaviour before estimators
        existed); none given: the recommended estimator with its defaults, recorded."""
        config = MeZOConfig(learning_rate=1e-3, epsilon=1e-2)
        self.assertEqual((config.estimator, config.num_directions), ("mezo", 1))
        self.assertEqual(
            config.defaults_applied, {"estimator": "mezo", "num_directions": 1, "perturbation": "gaussian"}
        )
        chosen = MeZOConfig(peft="lora")
        self.assertEqual(chosen.estimator, "fzoo")  # the recommendation, by name
        expected = ESTIMATOR_DEFAULTS["fzoo"]["lora"]
        self.assertEqual(
            {k: getattr(chosen, k) for k in expected}, expected, "unset hyperparameters take the estimator's defaults"
        )
        self.assertEqual(chosen.defaults_applied, {"estimator": chosen.estimator, **expected})
        self.assertEqual(MeZOConfig.from_dict(chosen.to_dict()), chosen)  # config.json holds the resolved values
        with self.assertRaisesRegex(ValueError, "transformers backend"):
            MeZOConfig(estimator="sparse", backend="sglang", learning_rate=1e-3)
        with self.assertRaisesRegex(ValueError, "estimator"):
            MeZOConfig(estimator="adam")
        self.assertEqual(MeZOConfig(num_directions=8).estimator, "mezo")  # any hyperparameter set: MeZO's

    def test_checkpoints_from_before_estimators_resume(self):
        """A checkpoint whose identity predates the estimator fields resumes as MeZO (what it
        ran); a changed estimator is still refused."""
        from sglang.srt.mezo.checkpoint import check_identity, run_identity

        config = MeZOConfig(learning_rate=1e-3, epsilon=1e-2)
        added = ("estimator", "sparse_fraction", "lowrank_rank", "lowrank_interval")
        with tempfile.TemporaryDirectory() as root:
            identity = run_identity(config)
            step = Path(root) / "step-1"
            step.mkdir()
            old = {k: v for k, v in identity.items() if k not in added}
            (step / "trainer_state.json").write_text(json.dumps({"global_step": 1, "identity": old}))
            check_identity(step, identity)
            other = run_identity(MeZOConfig(estimator="lowrank", learning_rate=1e-3, epsilon=1e-2))
            with self.assertRaisesRegex(ValueError, "estimator: 'mezo' -> 'lowrank'"):
                check_identity(step, other)


if __name__ == "__main__":
    unittest.main()
