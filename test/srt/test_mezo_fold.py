"""The update folded into the next step's first pass (`RestoreLogPerturbation.commit` inside
a `holding()` that `MeZOTrainer.train` spans across steps): the same bits as a step-by-step
run wherever the weights are read, one sweep fewer. Per-unit copies write each update at
once (`UnitScopedPerturbation.commit`): the same loop gives the same bits there too.

The reference is "today's run": `MeZOTrainer.step` called step by step, which writes each
update before it returns. Both runs do the same float32 / bf16 operations on the same
elements in the same order, so every comparison here is bit for bit.

Run as ``pytest test/srt/test_mezo_fold.py`` or ``python3 test/srt/test_mezo_fold.py``.
"""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numba
import torch
from mezo_testing import assert_bit_identical, lm_batch, snapshot, tiny_llama
from safetensors.torch import load_file

from sglang.srt.mezo.checkpoint import TRAINABLE_FILE, save_checkpoint
from sglang.srt.mezo.kernels.numba_restore_log import ITEM
from sglang.srt.mezo.perturbation import UnitScopedPerturbation, WeightVersions
from sglang.srt.mezo.restore_log import RestoreLogPerturbation
from sglang.srt.mezo.trainable import collect_trainable
from sglang.srt.mezo.zo_sgd import commit_update, prepare_update
from sglang.srt.mezo_trainer import MeZOConfig, MeZOTrainer

BATCHES = [lm_batch(seed=s) for s in range(3)]
STEPS = 20
# (perturbation, estimator, extra config): the restore log (Rademacher on float32, which folds)
# and the per-unit copies (Gaussian, which do not), the latter with weight decay and momentum.
CASES = (
    ("rademacher", "mezo", {}),
    ("rademacher", "fzoo", {"weight_decay": 0.1}),
    ("gaussian", "mezo", {"weight_decay": 0.1, "momentum": 0.9}),
)


def make_trainer(perturbation: str, estimator: str, dtype=torch.float32, **overrides) -> MeZOTrainer:
    values = dict(learning_rate=1e-2, epsilon=1e-2, perturbation=perturbation, estimator=estimator,
                  num_directions=2, max_steps=STEPS, disable_tqdm=True)  # fmt: skip
    return MeZOTrainer(tiny_llama(dtype=dtype), MeZOConfig(**{**values, **overrides}))


def step_by_step(trainer: MeZOTrainer, steps: int) -> tuple:
    """Today's run: (per-step (L+, L-) pairs, {step count: weights after it, evaluation})."""
    losses, after = [], {}
    for i in range(steps):
        out = trainer.step(BATCHES[i % len(BATCHES)])
        losses.append((out.loss_perturbed, out.loss_baseline))
        after[i + 1] = (snapshot(trainer.model), trainer.evaluate(BATCHES[:1]) if i + 1 == 5 else None)
    return losses, after


class TestFoldedUpdate(unittest.TestCase):
    def test_folded_run_equals_the_step_by_step_run_wherever_weights_are_read(self):
        """20 steps of `train` with a callback that evaluates at step 5, checkpoints at step
        10 and stops at step 12 (as SIGTERM does: `should_stop`), then a second `train` to
        step 20 with an exception in the first pass of step 17: the losses of every step,
        the evaluation, the checkpoint's tensors, the weights after the stop, after the
        exception (those of step 16) and at the end all equal the step-by-step run's bits.

        Canary: with the restore log, at step 3 the raw parameters, read without
        materialising, are not the step-by-step run's weights after step 3 (the update is
        waiting: the fold is on), and the same callback with ``on_step_reads_weights=True``
        sees them exactly. Per-unit copies: the raw parameters are exact already."""
        for perturbation, estimator, extra in CASES:
            with self.subTest(perturbation=perturbation, estimator=estimator):
                self._fold_matches_step_by_step(perturbation, estimator, extra)

    def _fold_matches_step_by_step(self, perturbation: str, estimator: str, extra: dict) -> None:
        losses, after = step_by_step(make_trainer(perturbation, estimator, **extra), STEPS)
        trainer = make_trainer(perturbation, estimator, **extra)
        seen, raw_at_3 = [], {}

        def on_step(out, seconds):
            step = trainer.global_step
            seen.append((out.loss_perturbed, out.loss_baseline))
            if step == 3:
                raw_at_3.update(snapshot(trainer.model))
            if step == 5:
                self.assertEqual(trainer.evaluate(BATCHES[:1]), after[5][1])
            if step == 10:
                with tempfile.TemporaryDirectory() as directory:
                    saved = save_checkpoint(trainer, directory)
                    weights = load_file(str(Path(saved) / TRAINABLE_FILE))
                for name, value in weights.items():
                    reference = after[10][0][name]
                    self.assertTrue(torch.equal(value.view(torch.uint8), reference.view(torch.uint8)), name)

        trainer.train(BATCHES, on_step=on_step, should_stop=lambda: trainer.global_step == 12,
                      on_step_reads_weights=False)  # fmt: skip
        self.assertEqual(trainer.global_step, 12)
        assert_bit_identical(self, trainer.model, after[12][0])
        folds = isinstance(trainer.backend.perturbation, RestoreLogPerturbation)
        self.assertEqual(all(torch.equal(raw_at_3[n], after[3][0][n]) for n in raw_at_3), not folds)  # canary

        passes = {"n": 0}
        first_pass_of_17 = 4 * trainer.estimator.passes_per_step() + 1  # steps 13..16, then one

        def explode(module, args, output):
            passes["n"] += 1
            if passes["n"] == first_pass_of_17:
                raise RuntimeError("a failing pass")

        handle = trainer.model.model.norm.register_forward_hook(explode)
        with self.assertRaisesRegex(RuntimeError, "a failing pass"):
            trainer.train(BATCHES, on_step=on_step, on_step_reads_weights=False)
        handle.remove()
        self.assertEqual(trainer.global_step, 16)
        assert_bit_identical(self, trainer.model, after[16][0])
        trainer.train(BATCHES, on_step=on_step, on_step_reads_weights=False)
        assert_bit_identical(self, trainer.model, after[STEPS][0])
        self.assertEqual(seen, losses)

        exact = make_trainer(perturbation, estimator, **extra)
        exact.config.max_steps = 3
        read = []
        exact.train(BATCHES, on_step=lambda out, seconds: read.append(snapshot(exact.model)))
        for step, weights in enumerate(read, start=1):
            self.assertTrue(all(torch.equal(weights[n], after[step][0][n]) for n in weights))

    def test_lr_zero_is_bit_exact_with_the_fold_in_three_dtypes(self):
        """lr = 0 over 3 folded steps (`train`, callback not reading): every weight is its
        start, in float32 (restore log, Rademacher), bfloat16 and float16 (per-unit copies)."""
        for dtype, perturbation in ((torch.float32, "rademacher"), (torch.bfloat16, "gaussian"),
                                    (torch.float16, "rademacher")):  # fmt: skip
            with self.subTest(dtype=dtype):
                trainer = make_trainer(perturbation, "mezo", dtype=dtype, learning_rate=0.0, max_steps=3)
                start = snapshot(trainer.model)
                trainer.train(BATCHES, on_step=lambda out, seconds: None, on_step_reads_weights=False)
                assert_bit_identical(self, trainer.model, start)

    def test_the_restore_log_sweeps_the_weights_twice_per_two_point_step(self):
        """MeZO (q = 1) over 6 steps: the folded run moves the weights 2 x 6 + 1 times (the
        last update is written when `train` ends); step by step, 3 x 6 (canary: today's count).
        Both add one at step 0, where the update's sampled resolution check reads exact weights."""
        counts = {}
        for mode in ("folded", "step by step"):
            trainer = make_trainer("rademacher", "mezo", num_directions=1, max_steps=6)
            mechanism = trainer.backend.perturbation
            self.assertIsInstance(mechanism, RestoreLogPerturbation)
            with mock.patch.object(mechanism, "_sweep", wraps=mechanism._sweep) as sweeps:
                if mode == "folded":
                    trainer.train(BATCHES, on_step=lambda out, seconds: None, on_step_reads_weights=False)
                else:
                    for i in range(6):
                        trainer.step(BATCHES[i % 3])
            counts[mode] = sweeps.call_count
        self.assertEqual(counts, {"folded": 2 * 6 + 1 + 1, "step by step": 3 * 6 + 1})

    def test_a_log_overflow_on_the_move_that_carries_the_update(self):
        """The move that carries a waiting update overflows the log: every element ends at the
        updated weights (the items already moved through the new log, the rest through the
        old one with the update written on the way), the per-unit fallback perturbs from
        there, and the weights after `settle` are the update's bits exactly (`commit_update`
        on a copy). Canary: undoing the rest without the update leaves those items behind."""
        batch = lm_batch()
        plan_terms = [(5, 0.7), (6, -1.3)]

        def fresh():
            model = tiny_llama()
            return model, collect_trainable(model, [n for n, _ in model.named_parameters()], fp32_master=False)

        expected_model, expected_tensors = fresh()
        commit_update(expected_tensors, prepare_update(expected_tensors, plan_terms, 1e-2, 0.0, 0.0), "rademacher",
                      WeightVersions())  # fmt: skip
        backups = UnitScopedPerturbation(expected_tensors, "rademacher", WeightVersions())
        with torch.no_grad(), backups.scope(2, 1.0):
            expected_logits = expected_model(input_ids=batch["input_ids"]).logits
        expected = snapshot(expected_model)
        for undo_with_update in (True, False):
            with self.subTest(undo_with_update=undo_with_update):
                model, logits = self._overflow_with_waiting_update(fresh, batch, plan_terms, undo_with_update)
                same = all(torch.equal(p.detach(), expected[n]) for n, p in model.named_parameters())
                self.assertEqual(same, undo_with_update)
                if undo_with_update:
                    self.assertTrue(torch.equal(logits, expected_logits))

    def _overflow_with_waiting_update(self, fresh, batch, plan_terms, undo_with_update: bool) -> tuple:
        """(the model, the logits of the pass at scale 1.0) of a restore log whose move to that
        scale carries a waiting update and overflows."""
        model, tensors = fresh()
        threads = numba.get_num_threads()  # the log is split into one region per thread
        # each region holds 2 items + 100 entries: the move at scale 1.0 logs nearly every element
        logged = RestoreLogPerturbation(tensors, "rademacher", WeightVersions(),
                                        log_bytes=(2 * ITEM + 100) * 8 * 2 * threads)  # fmt: skip
        if not undo_with_update:
            sweep = logged._sweep

            def undo_without_update(source, read, target, lo, hi, update=None):
                return sweep(source, read, target, lo, hi, update if target is not None else None)

            logged._sweep = undo_without_update
        with torch.no_grad(), logged.holding():
            with logged.scope(1, 1e-6):
                model(input_ids=batch["input_ids"])
            logged.commit(prepare_update(tensors, plan_terms, 1e-2, 0.0, 0.0))
            self.assertTrue(logged.pending_update)
            with logged.scope(2, 1.0):
                logits = model(input_ids=batch["input_ids"]).logits
        self.assertIsNotNone(logged.fallback)
        return model, logits


if __name__ == "__main__":
    unittest.main()
