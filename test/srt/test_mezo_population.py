"""A step's population in one call (`population_batch`) on a tiny random Llama: the perturbed
LoRA adapters of a step as slots of one peft mixed-adapter batch, and the full-parameter
low-rank estimator's perturbations as LoRA-shaped deltas of one call.

The reference for every point (seed, scale) is the model holding ``w + scale z(seed)`` as
plain weights (`perturbed_weights`), run by a plain forward or ``generate``: it shares
neither the slots nor the per-pass perturbation with what it checks.
"""

import json
import math
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import torch
from mezo_testing import (
    candidate_batch,
    lm_batch,
    loss_tolerance,
    perturbed_weights,
    run_cli,
    save_tiny_model,
    snapshot,
    tiny_llama,
    tiny_tokenizer,
)
from safetensors.torch import load_file

from sglang.srt.mezo import replay
from sglang.srt.mezo.backends import transformers_backend
from sglang.srt.mezo.backends.engine_launch import lora_engine_args
from sglang.srt.mezo.backends.sglang_backend import SGLangBackend
from sglang.srt.mezo.generation import transformers_completions
from sglang.srt.mezo.objectives import make_objective
from sglang.srt.mezo.structured_directions import lowrank_seed
from sglang.srt.mezo.usage_errors import ConfigError
from sglang.srt.mezo_trainer import MeZOConfig, MeZODataset, MeZOTrainer, create_dataloader, main

LORA = dict(peft="lora", lora_target_modules="q_proj,v_proj", lora_rank=4, disable_tqdm=True, seed=5)
RECORDS = [{"prompt": f"Say {w}:" + " please" * (i % 3), "answer": w} for i, w in enumerate(["yes", "no", "cat", "a"])]


def lora_trainer(model=None, tokenizer=None, **overrides) -> MeZOTrainer:
    """A LoRA trainer whose B is non-zero (seeded): with B = 0 a perturbation of A is invisible."""
    trainer = MeZOTrainer(model or tiny_llama(), MeZOConfig(**{**LORA, **overrides}), tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in trainer.backend.tensors:
            t.param.copy_(torch.randn(t.param.shape, generator=generator, dtype=t.param.dtype) * 0.1)
    return trainer


def reference_losses(trainer, objective, batch, points) -> list:
    """The objective's mean at each point, each from plain weights ``w + scale z`` and a plain forward."""
    losses = []
    for seed, scale in points:
        with perturbed_weights(trainer, seed, scale) as model, torch.no_grad():
            total, count = objective(model, batch)
            losses.append(float(total) / int(count))
    return losses


def tolerances(trainer, batch, points) -> list:
    """`loss_tolerance` (derived in mezo_testing: two forwards of one model differing only in
    GEMM shapes and blocking) at each point's weights: the population's base GEMMs run over
    K x B rows, its LoRA products over each slot's rows, the reference's over B."""
    out = []
    for seed, scale in points:
        with perturbed_weights(trainer, seed, scale) as model:
            out.append(loss_tolerance(model, batch))
    return out


def population_losses(trainer, objective, batch, points) -> list:
    return [total / count for total, count in trainer.backend.loss_sums(objective, batch, points)]


class TestPopulationLosses(unittest.TestCase):
    def test_each_slots_loss_is_the_loss_at_its_point(self):
        """Per-slot losses of one call equal the losses of plain weights at each point within
        the derived tolerance (mezo: 2q slots; fzoo: q slots and the trained adapter for the
        unperturbed point; both kinds of z, NLL and candidate batches). Canary: two slots
        given the same perturbation (L- run on L+'s adapter) make g = 0 exactly, and the
        reference sees that slot's loss off by far more than the tolerance."""
        cases = {
            "mezo rademacher": dict(estimator="mezo", num_directions=2, perturbation="rademacher"),
            "fzoo gaussian": dict(estimator="fzoo", num_directions=4, perturbation="gaussian"),
        }
        for name, estimator in cases.items():
            for batch in (lm_batch(), candidate_batch()):
                with self.subTest(name, candidates="is_gold" in batch):
                    trainer = lora_trainer(population_batch="on", epsilon=1e-2, **estimator)
                    objective, points = make_objective("auto", batch), trainer.estimator.points(3)
                    expected = reference_losses(trainer, objective, batch, points)
                    tolerance = tolerances(trainer, batch, points)
                    got = population_losses(trainer, objective, batch, points)
                    self.assertEqual(trainer.backend.population.count, sum(s is not None for s, _ in points))
                    for g, e, tol in zip(got, expected, tolerance):
                        self.assertLessEqual(abs(g - e), tol)
                    if name.startswith("mezo"):
                        self.assertGreater(abs(expected[0] - expected[1]), 10 * tolerance[0])  # the canary can show

        trainer = lora_trainer(population_batch="on", epsilon=1e-2, **cases["mezo rademacher"])
        batch, objective = lm_batch(), make_objective("auto", lm_batch())
        points = trainer.estimator.points(3)
        names = trainer.backend.population.adapter_names

        def same_perturbation_twice(points):
            out = names(points)
            return [out[0], out[0], *out[2:]]

        with mock.patch.object(trainer.backend.population, "adapter_names", same_perturbation_twice):
            broken = population_losses(trainer, objective, batch, points)
        estimate = trainer.estimator.combine(3, broken)[0]
        self.assertEqual(estimate.coefficient, 0.0)
        expected = reference_losses(trainer, objective, batch, points)
        self.assertGreater(abs(broken[1] - expected[1]), 10 * tolerances(trainer, batch, points)[1])

    def test_a_slot_holds_the_bits_a_pass_reads(self):
        """Each slot's tensors equal, bit for bit, what a one-by-one pass at its point reads
        (captured inside the pass by hooks on the tensors' modules): per-unit copies with
        Gaussian z, the restore log (Rademacher, float32), float32 masters over a bfloat16
        adapter, low-rank z; and with only lora_B trained, the slot's lora_A equals the
        trained adapter's. Canary: the other sign's slot differs from the pass."""
        cases = {
            "unit-scoped gaussian": (torch.float32, dict(perturbation="gaussian")),
            "restore log": (torch.float32, dict(perturbation="rademacher", perturbation_mechanism="restore_log")),
            "float32 masters": (torch.bfloat16, dict(perturbation="gaussian", fp32_trainable=True)),
            "low-rank": (torch.float32, dict(estimator="lowrank")),
            "lora_B only": (torch.float32, dict(perturbation="gaussian", trainable_patterns="lora_B")),
        }
        for name, (dtype, values) in cases.items():
            with self.subTest(name):
                trainer = lora_trainer(tiny_llama(dtype=dtype), population_batch="on", epsilon=1e-2, **values)
                backend, seed, scale = trainer.backend, 77, 1e-2
                if name == "restore log":
                    self.assertEqual(backend.mechanism, "restore_log")
                read = {}

                def capture(module, args, output, backend=backend, read=read):
                    for t in backend.tensors:
                        if any(m is module for m in t.owners):
                            read[t.name] = t.param.detach().clone()

                hooks = [m.register_forward_hook(capture) for t in backend.tensors for m in t.owners]
                backend.row_logprobs(lm_batch(), seed, scale)
                for hook in hooks:
                    hook.remove()
                plus, minus = backend.population.adapter_names([(seed, scale), (seed, -scale)])
                params = dict(trainer.model.named_parameters())
                trained = {n: t for t in backend.tensors for n, p in params.items() if p is t.param}
                slots = 0
                for param_name, p in params.items():
                    if ".default." not in param_name:
                        continue
                    slot = params[param_name.replace(".default.", f".{plus}.")]
                    expected = read[trained[param_name].name] if param_name in trained else p.detach()
                    self.assertTrue(torch.equal(slot, expected), param_name)
                    if param_name in trained:
                        other = params[param_name.replace(".default.", f".{minus}.")]
                        self.assertFalse(torch.equal(other, expected), param_name)  # the canary
                    slots += 1
                self.assertEqual(slots, len(trained) if name != "lora_B only" else 2 * len(trained))

    def test_micro_batches_and_out_of_memory_split_the_call_with_the_same_losses(self):
        """The population's K x B rows in micro-batches that cut across slots (3 rows), and a
        call that runs out of memory above 5 rows (halved until it fits, as a plain pass
        is): the same per-slot losses within the tolerance."""
        batch, objective = lm_batch(), make_objective("auto", lm_batch())
        trainer = lora_trainer(population_batch="on", estimator="fzoo", num_directions=3, micro_batch_size=3)
        points = trainer.estimator.points(0)
        expected, tolerance = reference_losses(trainer, objective, batch, points), tolerances(trainer, batch, points)
        for g, e, tol in zip(population_losses(trainer, objective, batch, points), expected, tolerance):
            self.assertLessEqual(abs(g - e), tol)

        trainer = lora_trainer(population_batch="on", estimator="fzoo", num_directions=3)
        forward = trainer.model.forward
        calls = []

        def runs_out_above_five_rows(*args, **kwargs):
            rows = kwargs["input_ids"].shape[0]
            calls.append(rows)
            if rows > 5:
                raise torch.OutOfMemoryError("simulated")
            return forward(*args, **kwargs)

        with mock.patch.object(trainer.model, "forward", runs_out_above_five_rows):
            got = population_losses(trainer, objective, batch, points)
        self.assertEqual(calls[:2], [16, 8])  # 4 points x 4 rows, halved until it fits
        self.assertEqual(max(calls[-4:]), 4)
        for g, e, tol in zip(got, expected, tolerance):
            self.assertLessEqual(abs(g - e), tol)


class TestPopulationGeneration(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tok = tiny_tokenizer()
        config = MeZOConfig(reward="length=6", **LORA)
        data = MeZODataset(RECORDS, cls.tok, **config.dataset_options())
        cls.batch = next(iter(create_dataloader(data, 4, shuffle=False, seed=0)))

    def trainer(self, **overrides):
        # float64, sdpa: greedy argmax could differ between the one call and a plain pass only
        # at a near-tie of two logits (~1e-15 apart in float64): none in these prompts
        model = tiny_llama(dtype=torch.float64, attn_implementation="sdpa")
        values = dict(reward="length=6", max_new_tokens=8, estimator="fzoo", num_directions=3, epsilon=0.2)
        return lora_trainer(model, self.tok, **{**values, **overrides})

    def test_each_slot_generates_what_its_point_generates(self):
        """Completions of one generate() over every slot equal, per point, the completions of
        the plain perturbed weights, greedy and sampled (two samples per prompt, the step's
        common seeds); the rewards follow. Canary: the points generate different text (so a
        slot mix-up would show)."""
        for sampling in (dict(temperature=0.0), dict(temperature=1.0, num_samples=2)):
            with self.subTest(**sampling):
                trainer = self.trainer(**sampling)
                self.assertIsNotNone(trainer.backend.population)  # auto: on for the reward objective
                at, points = trainer.objective.at_step(2), trainer.estimator.points(2)
                names = trainer.backend.population.adapter_names(points)
                prompts = {k: self.batch[k] for k in ("input_ids", "attention_mask")}
                rows = [name for name in names for _ in range(4 * at.settings.num_samples)]
                with trainer.backend.population.routed(rows) as options:
                    together = transformers_completions(
                        trainer.model, self.tok, prompts, at.settings, len(names), **options
                    )
                apart = []
                for seed, scale in points:
                    with perturbed_weights(trainer, seed, scale):
                        apart.append(trainer.backend.completions(at, self.batch))
                self.assertEqual(together, apart)
                self.assertGreater(len({tuple(texts) for texts in apart}), 1)
                sums = trainer.backend.loss_sums(at, self.batch, points)
                self.assertEqual(sums, [tuple(map(float, at.reduce(self.batch, texts))) for texts in apart])

    def test_out_of_memory_generates_fewer_slots_per_call_with_the_same_text(self):
        trainer = self.trainer(temperature=1.0)
        at, points = trainer.objective.at_step(1), trainer.estimator.points(1)
        expected = trainer.backend._population_completions(at, self.batch, points)
        sizes = []

        def fits_two(model, tokenizer, batch, settings, copies=None, **options):
            sizes.append(copies)
            if copies > 2:
                raise torch.OutOfMemoryError("simulated")
            return transformers_completions(model, tokenizer, batch, settings, copies, **options)

        with mock.patch.object(transformers_backend, "transformers_completions", fits_two):
            got = trainer.backend._population_completions(at, self.batch, points)
        self.assertEqual(sizes, [4, 2, 2])
        self.assertEqual(got, expected)


LINEAR_WEIGHTS = r"layers\.\d+\..*_proj\.weight"  # every nn.Linear weight of the decoder layers


def lowrank_trainer(model=None, tokenizer=None, **overrides) -> MeZOTrainer:
    values = dict(estimator="lowrank", lowrank_rank=2, trainable_patterns=LINEAR_WEIGHTS, population_batch="on")
    values.update(epsilon=1e-2, disable_tqdm=True, seed=5)
    return MeZOTrainer(model or tiny_llama(), MeZOConfig(**{**values, **overrides}), tokenizer=tokenizer)


class TestLowRankPopulation(unittest.TestCase):
    """Full-parameter ``lowrank``: each point's perturbation of a Linear weight, scale U V^T /
    sqrt(r), added as a LoRA-shaped product in one call; the weights never written by it."""

    def test_the_delta_equals_the_dense_perturbation_of_the_weight(self):
        """A covered Linear's output in a population call equals x (W + scale Z)^T, Z the dense
        low-rank direction the one-by-one pass writes (`LowRank.source`, float32), computed
        in float64, within Higham's deterministic bound (gamma_n = n u / (1 - n u) for a
        float32 result of n roundings): x W^T sums `in` products and adds the delta (in + 1);
        the delta sums `in` products for x V, r for (x V) U^T, then the coefficient's
        rounding and product (in + r + 2), against Z's r products and sums and its 1/sqrt(r)
        (r + 1): |err| <= gamma_(in+1) |x| |W|^T + gamma_(in+2r+3) |c| (|x| |V|) |U|^T. A
        non-square weight (up_proj): swapped U and V would not even fit. Canary: the other
        basis (another V) is off by far more."""
        trainer = lowrank_trainer()
        population, family = trainer.backend.population, trainer.backend.family
        t = next(t for t in trainer.backend.tensors if "layers.0.mlp.up_proj" in t.name)
        (out_features, in_features), r = t.param.shape, trainer.config.lowrank_rank
        self.assertNotEqual(out_features, in_features)
        module, (seed, scale) = t.owners[0], trainer.estimator.points(7)[0]
        population.adapter_names([(seed, scale)])
        x = torch.randn(2, 5, in_features, generator=torch.Generator().manual_seed(3))
        with population.routed([0, 0]), torch.no_grad():
            got = module(x).double()
        z = family.source(t.name, t.param.detach())(seed, 0, t.param.detach().reshape(-1)).double()
        z = z.view(out_features, in_features)
        u, v = (f.double() for f in family.factors(seed, t.name, out_features, in_features, "cpu"))
        w, x64, unit = t.param.detach().double(), x.double(), 2.0**-24

        def gamma(n):
            return n * unit / (1 - n * unit)

        bound = gamma(in_features + 1) * (x64.abs() @ w.abs().T)
        c = scale * family.scale
        bound += gamma(in_features + 2 * r + 3) * abs(c) * ((x64.abs() @ v.abs()) @ u.abs().T)
        self.assertTrue(bool(((got - x64 @ (w + scale * z).T).abs() <= bound).all()))
        other = lowrank_seed(seed, seed ^ (1 << 40))  # the same U's seed bits, another basis V
        z2 = family.source(t.name, t.param.detach())(other, 0, t.param.detach().reshape(-1)).double()
        self.assertFalse(bool(((got - x64 @ (w + scale * z2.view_as(w)).T).abs() <= bound).all()))

    def test_a_layer_fed_other_rows_is_an_error_naming_it(self):
        """A covered Linear called on rows that are not the batch's (a mixture-of-experts block
        flattens tokens into rows) cannot tell the points apart: an error, not a silent mix."""
        trainer = lowrank_trainer()
        population = trainer.backend.population
        t = trainer.backend.tensors[0]
        population.adapter_names(trainer.estimator.points(0))
        x = torch.randn(2, 5, t.param.shape[1])
        with population.routed([0, 1]), torch.no_grad(), self.assertRaisesRegex(RuntimeError, "Linear got 10 rows"):
            t.owners[0](x.view(10, -1))

    def test_each_points_loss_is_the_loss_at_its_point_and_lr0_is_exact(self):
        """Per-point losses of one call against plain weights ``round(W + scale Z)``: the
        one-call form skips that rounding, one more relative u per weight, i.e. at most one
        more rounding per product of every sum (and the delta's own chain of about as many
        roundings, of the size of the perturbation's terms): K grows to at most 2K, the
        probabilistic bound of `loss_tolerance` (lambda sqrt(K) u) by at most sqrt(2). Canary:
        L- run on L+'s point makes g = 0 and misses its reference. A plain forward after the
        calls gives the bits it gave before them; 4 lr = 0 steps leave every weight bit for bit."""
        batch, objective = lm_batch(), make_objective("auto", lm_batch())
        trainer = lowrank_trainer(learning_rate=0.0, max_steps=4)
        self.assertIsNotNone(trainer.backend.population)
        points = trainer.estimator.points(2)
        with torch.no_grad():
            plain = objective(trainer.model, batch)
        expected = reference_losses(trainer, objective, batch, points)
        tolerance = [math.sqrt(2) * tol for tol in tolerances(trainer, batch, points)]
        got = population_losses(trainer, objective, batch, points)
        for g, e, tol in zip(got, expected, tolerance):
            self.assertLessEqual(abs(g - e), tol)
        self.assertGreater(abs(expected[0] - expected[1]), 10 * tolerance[0])
        names = trainer.backend.population.adapter_names
        with mock.patch.object(trainer.backend.population, "adapter_names", lambda p: [names(p)[0]] * len(p)):
            broken = population_losses(trainer, objective, batch, points)
        self.assertEqual(trainer.estimator.combine(2, broken)[0].coefficient, 0.0)
        self.assertGreater(abs(broken[1] - expected[1]), 10 * tolerance[1])
        with torch.no_grad():  # after the population calls: the hooks left no trace on a plain forward
            self.assertEqual(objective(trainer.model, batch), plain)
        before = snapshot(trainer.model)
        trainer.train([batch] * 4)
        self.assertEqual([k for k, v in snapshot(trainer.model).items() if not torch.equal(v, before[k])], [])

    def test_generation_in_one_call_equals_each_points_generation(self):
        """Greedy and sampled completions of every point in one generate() equal, point by
        point, those of the plain perturbed weights (float64, sdpa: no near-ties)."""
        tok = tiny_tokenizer()
        config = MeZOConfig(reward="length=6", **LORA)
        data = MeZODataset(RECORDS, tok, **config.dataset_options())
        batch = next(iter(create_dataloader(data, 4, shuffle=False, seed=0)))
        for sampling in (dict(temperature=0.0), dict(temperature=1.0, num_samples=2)):
            with self.subTest(**sampling):
                model = tiny_llama(dtype=torch.float64, attn_implementation="sdpa")
                trainer = lowrank_trainer(model, tok, reward="length=6", max_new_tokens=8, epsilon=0.3, **sampling)
                at, points = trainer.objective.at_step(1), trainer.estimator.points(1)
                together = trainer.backend._population_completions(at, batch, points)
                apart = []
                for seed, scale in points:
                    with perturbed_weights(trainer, seed, scale):
                        apart.append(trainer.backend.completions(at, batch))
                self.assertEqual(together, apart)
                self.assertNotEqual(apart[0], apart[1])

    def test_trainable_tensors_beyond_linear_weights_go_pass_by_pass(self):
        with self.assertRaisesRegex(ValueError, "nn.Linear weights only.*--trainable-patterns"):
            lowrank_trainer(trainable_patterns="")  # every tensor: embeddings and norms too
        self.assertIsNone(lowrank_trainer(trainable_patterns="", population_batch="auto").backend.population)
        self.assertIsNone(lowrank_trainer(population_batch="auto").backend.population)  # teacher-forced: off
        tok = tiny_tokenizer()
        self.assertIsNotNone(lowrank_trainer(None, tok, reward="length=6", population_batch="auto").backend.population)


class TestPopulationExactness(unittest.TestCase):
    def test_learning_rate_zero_is_bit_exact_and_the_export_holds_the_trained_adapter_alone(self):
        """lr = 0 over 6 steps with the population on: the model's every weight bit for bit,
        the exported adapter is the trained one (no slot directories, the same tensors).
        Canary: slots that alias the trained adapter (written in place) move it."""
        batch = lm_batch()
        for canary in (False, True):
            with self.subTest(canary=canary):
                trainer = lora_trainer(population_batch="on", learning_rate=0.0, max_steps=6, num_directions=2)
                before = snapshot(trainer.model)
                if canary:
                    slots = trainer.backend.population
                    slots.adapter_names(trainer.estimator.points(0))
                    copies, swapped, _ = slots._slots[0]
                    for i, t in enumerate(swapped):
                        copies.dsts[i] = t.param.detach()  # slot 0 written over the trained adapter
                trainer.train([batch] * 6)
                changed = [
                    k for k, v in snapshot(trainer.model).items() if k in before and not torch.equal(v, before[k])
                ]
                if canary:
                    self.assertTrue(changed)
                    continue
                self.assertEqual(changed, [])
                with tempfile.TemporaryDirectory() as directory:
                    trainer.backend.export(Path(directory))
                    self.assertEqual(sorted(p.name for p in Path(directory).iterdir() if p.is_dir()), [])
                    saved = load_file(str(Path(directory) / "adapter_model.safetensors"))
                expected = {t.name: t.param.detach() for t in trainer.backend.tensors}
                self.assertEqual(sorted(saved), sorted(expected))
                for name, value in saved.items():
                    self.assertTrue(torch.equal(value, expected[name]), name)


class TestPopulationRun(unittest.TestCase):
    """The main job with the population on: a run stopped after step 2 and resumed equals the
    run in one go (metrics and checkpoint, bit for bit), and replay rebuilds it from the log."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="mezo-population-")
        cls.tmp = Path(cls._tmp.name)
        save_tiny_model(cls.tmp / "model")
        (cls.tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 2))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def argv(self, out: str, steps: int) -> list:
        return [
            "--model", str(self.tmp / "model"), "--train-file", str(self.tmp / "train.jsonl"), "--peft", "lora",
            "--reward", "length=6", "--population-batch", "on", "--max-new-tokens", "6", "--temperature", "1.0",
            "--steps", str(steps), "--batch-size", "4", "--lr", "0.05", "--epsilon", "0.05",
            "--divergence-guard", "off", "--output-dir", str(self.tmp / out), "--disable-tqdm", "--save-steps", "1",
        ]  # fmt: skip

    def test_a_resumed_run_equals_the_run_in_one_go_and_replays(self):
        self.assertEqual(run_cli(main, self.argv("whole", 4))[0], 0)
        self.assertEqual(run_cli(main, self.argv("parts", 2))[0], 0)
        resumed = self.argv("parts", 4) + ["--resume", str(self.tmp / "parts" / "checkpoints")]
        self.assertEqual(run_cli(main, resumed)[0], 0)

        def comparable(path):
            return [{k: v for k, v in json.loads(line).items() if k != "seconds" and not k.startswith("cache/")}
                    for line in path.read_text().splitlines()]  # fmt: skip

        whole, parts = comparable(self.tmp / "whole" / "metrics.jsonl"), comparable(
            self.tmp / "parts" / "metrics.jsonl"
        )
        self.assertEqual([row["step"] for row in whole], [0, 1, 2, 3])
        self.assertEqual(parts, whole)
        self.assertTrue(any(g != 0 for row in whole for _, g in row["directions"]))  # it trained
        a = load_file(str(self.tmp / "whole" / "checkpoints" / "step-4" / "trainable.safetensors"))
        b = load_file(str(self.tmp / "parts" / "checkpoints" / "step-4" / "trainable.safetensors"))
        self.assertEqual(sorted(a), sorted(b))
        for key in a:
            self.assertTrue(torch.equal(a[key], b[key]), key)
        self.assertEqual(run_cli(replay.main, [str(self.tmp / "whole"), "--check"]), (0, ""))


class TestPopulationChoice(unittest.TestCase):
    def test_on_needs_lora_and_auto_picks_generation_where_the_engine_has_room(self):
        for overrides, needs in (
            (dict(population_batch="on"), "--peft lora"),
            (dict(population_batch="on", peft="prefix"), "--peft lora"),
        ):
            with self.subTest(**overrides), self.assertRaisesRegex(ConfigError, f"--population-batch.*{needs}"):
                MeZOConfig(**overrides)
        pool = {  # the engine's LoRA pool: the trained adapter, one free slot, one per perturbed point
            "fzoo q=4 on": (dict(estimator="fzoo", num_directions=4, population_batch="on"), 6),
            "mezo q=2 on": (dict(estimator="mezo", num_directions=2, population_batch="on"), 6),
            "reward auto": (dict(reward="length=6", estimator="mezo", num_directions=1), 4),
            "nll auto": (dict(estimator="mezo", num_directions=1), 2),
        }
        for name, (values, size) in pool.items():
            with self.subTest(name):
                self.assertEqual(lora_engine_args(MeZOConfig(peft="lora", **values))["max_loras_per_batch"], size)
        engine = types.SimpleNamespace(server_args=types.SimpleNamespace(max_loras_per_batch=2))  # the old default
        reward = dict(peft="lora", reward="length=6", estimator="mezo", num_directions=1)
        with self.assertLogs("sglang.srt.mezo.backends.sglang_backend", "WARNING") as logged:
            self.assertEqual(SGLangBackend._population_slots(engine, MeZOConfig(**reward)), [])
        self.assertIn("max_loras_per_batch >= 4", logged.output[0])
        with self.assertRaisesRegex(ValueError, "max_loras_per_batch >= 4"):
            SGLangBackend._population_slots(engine, MeZOConfig(**reward, population_batch="on"))
        engine.server_args.max_loras_per_batch = 4
        self.assertEqual(SGLangBackend._population_slots(engine, MeZOConfig(**reward)), ["mezo_slot_0", "mezo_slot_1"])
        tok = tiny_tokenizer()
        chosen = {
            "reward lora": (dict(reward="length=6", **LORA), True),
            "nll lora": (dict(**LORA), False),
            "reward full-parameter": (dict(reward="length=6", disable_tqdm=True), False),
            "reward lora off": (dict(reward="length=6", population_batch="off", **LORA), False),
        }
        for name, (values, on) in chosen.items():
            with self.subTest(name):
                trainer = MeZOTrainer(tiny_llama(), MeZOConfig(**values), tokenizer=tok)
                self.assertEqual(trainer.backend.population is not None, on)


if __name__ == "__main__":
    unittest.main()
