"""MeZO on an upstream SGLang Engine: a mocked engine for the protocol, real ones on CPU
(tp_size 1 and 2, shared by the classes: `SharedEngines`).

Run as ``pytest test/srt/test_mezo_sglang.py`` or ``python3 test/srt/test_mezo_sglang.py``.
"""

from __future__ import annotations

import json
import math
import tempfile
import types
import unittest
from pathlib import Path

import torch
from mezo_testing import (
    candidate_batch,
    candidate_loss_tolerance,
    follow_in_order,
    logprob_tolerance,
    loss_tolerance,
    smollm2_shaped,
    tiny_tokenizer,
    tolerance_at,
)

from sglang.srt.mezo.backends.engine_launch import generation_engine_args, launch_engine, lora_engine_args
from sglang.srt.mezo.backends.engine_protocol import ack_file
from sglang.srt.mezo.backends.sglang_backend import EngineRPCError, SGLangBackend
from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.data import MeZODataset, create_dataloader
from sglang.srt.mezo.objectives import CompletionNLL, make_objective
from sglang.srt.mezo.primitives import tensor_digest
from sglang.srt.mezo.trainer import MeZOTrainer


def tolerances(model, batch) -> tuple:
    """(per-token log-prob, candidate loss) tolerances between two float32 forwards of
    `model`'s weights as they are now (`mezo_testing.logprob_tolerance`: derived from the
    reduction lengths and the logits' scale, relative as training moves it)."""
    token = logprob_tolerance(model, batch)
    return token, candidate_loss_tolerance(token)


def pass_tolerances(reference: MeZOTrainer, batch, seed: int, scales=None) -> tuple:
    """`tolerances` at the weights of a step's passes (the larger over ``w + s z(seed)`` for
    each s of `scales`, default +-eps): a perturbation moves the logits' scale too."""
    eps = reference.config.epsilon
    found = [tolerance_at(tolerances, reference, batch, seed, s) for s in (scales or (eps, -eps))]
    return max(t[0] for t in found), max(t[1] for t in found)


def per_token_gap(sums: torch.Tensor, other: torch.Tensor, counts: torch.Tensor) -> float:
    """The largest mean per-token gap between two sets of row log-likelihoods."""
    return float(((sums - other).abs() / counts).max())


class FakeEngine:
    """Stands in for `sglang.Engine` (the heavy loader): records RPCs and cache flushes.

    Its log-prob of token t is -(t % 7)/10 + scale, where `scale` is the perturbation the
    last ``mezo_begin`` set, so L+ - L- reveals what was sent.
    """

    server_args = types.SimpleNamespace(tp_size=1, dp_size=1, enable_dp_attention=False, pp_size=1, nnodes=1)

    def __init__(self, mismatched=()):
        self.calls = []
        self.scale = 0.0
        self.mismatched = list(mismatched)

    def collective_rpc(self, method, ack_dir, owner, **kwargs):
        """Records the call and acknowledges it as the plugin's one rank does (`engine_plugin._acknowledged`)."""
        self.calls.append((method, kwargs))
        result = None
        if method == "mezo_setup":
            result = {"checked": 2, "mismatched": self.mismatched, "missing": [], "tensors": [["w", [2]]], "tp": [0, 1]}
        elif method == "mezo_begin":
            self.scale = kwargs["scale"]
        elif method == "mezo_end":
            self.scale = 0.0
        ack_file(ack_dir, 0).write_text(json.dumps({"ok": True, "result": result}))

    def flush_cache(self):
        self.calls.append(("flush_cache", {}))

    def generate(self, input_ids, sampling_params, return_logprob, logprob_start_len, lora_path=None):
        self.calls.append(("generate", {"n": len(input_ids)}))
        out = []
        for tokens, start in zip(input_ids, logprob_start_len):
            entries = [(None, tokens[start], None)] + [
                (-(t % 7) / 10 + self.scale, t, None) for t in tokens[start + 1 :]
            ]
            out.append({"meta_info": {"input_token_logprobs": entries, "cached_tokens": 0}})
        return out


def plain_batch():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 10, 11, 12]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def digests(state: dict) -> dict:
    """name -> digest of the tensor's bits, as the engine plugin's checksum computes it."""
    return {name: tensor_digest(t) for name, t in state.items()}


def assert_same_update(testcase, backend, reference, direction: tuple, lr: float) -> None:
    """One explicit update in both backends: same kernel, same z, so the same bits."""
    before = backend.checksum()
    backend.apply_update([direction], lr=lr)
    reference.backend.apply_update([direction], lr=lr)
    after = backend.checksum()
    testcase.assertNotEqual(after, before)
    testcase.assertEqual(after, digests(reference.backend.trainable_state()))


def assert_lr0_steps_keep_weights_then_update_matches(testcase, backend, reference, model_dir: str, steps: int):
    """`steps` lr=0 steps leave the engine's trainable weights bit-identical (and equal to
    the transformers backend's), then one update writes the transformers backend's bits;
    the checkpoint is loaded back after (the module's tests share the engine)."""
    checkpoint = str(Path(model_dir) / "model.safetensors")
    testcase.addCleanup(backend.load_trainable, checkpoint)  # also when an assertion fails
    before = backend.checksum()
    testcase.assertEqual(before, digests(reference.backend.trainable_state()))
    trainer = MeZOTrainer(None, backend.config, backend=backend)
    for _ in range(steps):
        trainer.step(candidate_batch())
    testcase.assertEqual(backend.checksum(), before)
    assert_same_update(testcase, backend, reference, (123, 0.5), lr=1e-2)
    backend.load_trainable(checkpoint)
    testcase.assertEqual(backend.checksum(), before)


class TestSGLangBackendProtocol(unittest.TestCase):
    """Seeds and scalars sent, the version-flush protocol and error paths, engine mocked."""

    def test_step_sends_seeds_scalars_and_flushes_on_every_version(self):
        engine = FakeEngine()
        config = MeZOConfig(learning_rate=0.5, epsilon=1e-2, disable_tqdm=True)
        backend = SGLangBackend(engine, config, "unused")
        trainer = MeZOTrainer(None, config, backend=backend)
        engine.calls.clear()
        out = trainer.step(plain_batch())
        methods = [m for m, _ in engine.calls]
        self.assertEqual(
            methods,
            ["mezo_begin", "flush_cache", "generate", "mezo_end"] * 2 + ["mezo_update"],
        )
        begin_plus, begin_minus = engine.calls[0][1], engine.calls[4][1]
        self.assertEqual(begin_plus, {"seed": out.seed, "scale": 1e-2})
        self.assertEqual(begin_minus, {"seed": out.seed, "scale": -1e-2})
        # every labelled token's log-prob moved by +-eps, so the mean NLL by -+eps: g = -1
        self.assertAlmostEqual(out.coefficient, -1.0, places=9)
        update = engine.calls[-1][1]
        self.assertEqual(update["terms"], [[out.seed, out.coefficient]])
        self.assertEqual((update["lr"], update["weight_decay"], update["momentum"]), (0.5, 0.0, 0.0))
        # an unperturbed pass right after the update flushes once, a second one reuses the cache
        engine.calls.clear()
        backend.row_logprobs(plain_batch())
        backend.row_logprobs(plain_batch())
        self.assertEqual([m for m, _ in engine.calls], ["flush_cache", "generate", "generate"])

    def test_self_test_failure_and_bad_requests_are_errors(self):
        config = MeZOConfig(disable_tqdm=True)
        with self.assertRaisesRegex(RuntimeError, "self-test failed.*w"):
            SGLangBackend(FakeEngine(mismatched=["w"]), config, "unused")
        backend = SGLangBackend(FakeEngine(), config, "unused")
        with self.assertRaisesRegex(TypeError, "built-in objectives"):
            backend.loss_sum(lambda model, batch: (0.0, 1), plain_batch())
        bad = plain_batch()
        bad["labels"][0] = torch.tensor([5, -100, -100, -100])
        with self.assertRaisesRegex(ValueError, "row 0"):
            backend.row_logprobs(bad)
        with self.assertRaisesRegex(NotImplementedError, "prefix"):
            SGLangBackend(FakeEngine(), MeZOConfig(peft="prefix"), "unused")
        with self.assertRaisesRegex(ValueError, "adapter_path"):
            SGLangBackend(FakeEngine(), MeZOConfig(peft="lora"), "unused")

    def test_failed_rpc_names_the_method(self):
        class FailingEngine(FakeEngine):
            def collective_rpc(self, method, **kwargs):
                super().collective_rpc(method, **kwargs)  # acknowledged: only the assert reports the failure
                if method == "mezo_update":  # how upstream's Engine.collective_rpc reports failure
                    raise AssertionError("LoRA adapter 'mezo' left pool slot 1")

        backend = SGLangBackend(FailingEngine(), MeZOConfig(disable_tqdm=True), "unused")
        with self.assertRaisesRegex(EngineRPCError, "mezo_update failed inside the SGLang engine: LoRA adapter"):
            backend.apply_update([(1, 0.5)], lr=0.1)


class TestSGLangBackendPolicies(unittest.TestCase):
    def test_missing_tensors_and_host_only_mechanisms_are_errors(self):
        backend = SGLangBackend(FakeEngine(), MeZOConfig(disable_tqdm=True), "unused")
        with self.assertRaisesRegex(ValueError, r"missing trainable tensors: \['w'\]"):
            backend.load_trainable_state({})
        with self.assertRaisesRegex(ValueError, "restore_log.*unit by unit"):
            SGLangBackend(FakeEngine(), MeZOConfig(perturbation_mechanism="restore_log"), "unused")
        for estimator in ("sparse", "lowrank"):  # a config built for another backend, handed to this one
            config = MeZOConfig(estimator=estimator, learning_rate=1e-3, disable_tqdm=True)
            with self.assertRaisesRegex(ValueError, f"estimator='{estimator}'.*transformers backend"):
                SGLangBackend(FakeEngine(), config, "unused")


class TestRPCOutcomes(unittest.TestCase):
    def test_a_failed_rpc_is_an_error_without_upstream_asserts(self):
        """Under python -O upstream's collective_rpc reports nothing: the method's own
        acknowledgement carries the failure (and a missing acknowledgement is one too)."""

        class QuietFailure(FakeEngine):
            def collective_rpc(self, method, ack_dir, owner, **kwargs):
                super().collective_rpc(method, ack_dir, owner, **kwargs)
                if method == "mezo_update":
                    ack_file(ack_dir, 0).write_text(json.dumps({"ok": False, "error": "RuntimeError: slot 1 lost"}))
                if method == "mezo_end":
                    ack_file(ack_dir, 0).unlink()  # never ran it

        backend = SGLangBackend(QuietFailure(), MeZOConfig(disable_tqdm=True), "unused")
        with self.assertRaisesRegex(
            EngineRPCError, r"mezo_update failed inside the SGLang engine \(rank 0\): RuntimeError: slot"
        ):
            backend.apply_update([(1, 0.5)], lr=0.1)
        with self.assertRaisesRegex(
            EngineRPCError, "mezo_end: tensor-parallel rank 0 of the SGLang engine did not acknowledge"
        ):
            backend.row_logprobs(plain_batch(), seed=1, scale=1e-3)


class TestEnginePluginDeviceHandling(unittest.TestCase):
    def test_engine_tensors_compare_and_hash_bit_for_bit_through_the_host(self):
        """The plugin meets engine tensors (on whatever device SGLang runs) only through
        `same_bits` (compared on the tensor's device) and `host_bytes` (an explicit copy to the
        host). Canary: torch.equal calls -0.0 and +0.0 equal and a NaN unequal to itself."""
        from sglang.srt.mezo.primitives import host_bytes, same_bits

        reference = torch.tensor([1.5, -0.0, float("nan"), 3.0])
        engine = reference.clone().to(torch.bfloat16)[1:]  # a view with a storage offset
        self.assertTrue(same_bits(reference[1:], engine))
        flipped = engine.clone()
        flipped[0] = 0.0
        self.assertTrue(torch.equal(flipped[:1], engine[:1]))  # the canary: torch.equal sees -0.0 == +0.0
        self.assertFalse(torch.equal(engine, engine))  # ... and a NaN unequal to itself
        self.assertFalse(same_bits(reference[1:], flipped))
        self.assertFalse(same_bits(reference, engine))  # shape
        self.assertEqual(host_bytes(engine), engine.contiguous().view(torch.uint8).numpy().tobytes())
        self.assertNotEqual(host_bytes(engine), host_bytes(flipped))


# ----------------------------------------------------------------------------- real engines
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


class SharedEngines:
    """This module's real engines on one tiny Llama with SmolLM2's head layout
    (`mezo_testing.smollm2_shaped`: at tp_size=2 upstream's CPU engine pads its heads,
    intermediate rows and vocabulary), one per tensor-parallel size, started on first use
    and stopped together when the module ends: upstream's Engine.shutdown stops every
    engine process of its caller, so no class can stop its engine without stopping the
    others. Each serves LoRA adapters on every projection, and the base model to requests
    without one, and runs the reward objective's sampling processor."""

    LORA = MeZOConfig(peft="lora", lora_rank=4, lora_target_modules=ALL_PROJECTIONS)

    def __init__(self):
        self._tmp = None
        self._engines: dict = {}

    @property
    def model_dir(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mezo-engines-")
            smollm2_shaped(attn_implementation="sdpa").save_pretrained(self._tmp.name)
            tiny_tokenizer().save_pretrained(self._tmp.name)
        return self._tmp.name

    def engine(self, tp_size: int = 1):
        if tp_size not in self._engines:
            lora = {**lora_engine_args(self.LORA), "max_loras_per_batch": 4}  # room for a second adapter
            generation = generation_engine_args(MeZOConfig(reward="exact_match"))
            self._engines[tp_size] = launch_engine(self.model_dir, tp_size=tp_size, **lora, **generation)
        return self._engines[tp_size]

    def stop(self) -> None:
        for engine in self._engines.values():
            engine.shutdown()
        self._engines.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


ENGINES = SharedEngines()


def tearDownModule():
    ENGINES.stop()


def served_row_logprobs(engine, batch: dict, lora_name: str) -> torch.Tensor:
    """Each row's completion log-likelihood as SGLang's own serving path gives it for adapter
    `lora_name` (plain ``Engine.generate``, no MeZO code)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    requests = [ids[r][mask[r]].tolist() for r in range(ids.shape[0])]
    starts = [int(batch["prompt_length"][r]) - 1 for r in range(ids.shape[0])]
    outputs = engine.generate(
        input_ids=requests,
        sampling_params={"max_new_tokens": 1, "temperature": 0.0},
        return_logprob=True,
        logprob_start_len=starts,
        lora_path=[lora_name] * len(requests),
    )
    return torch.tensor(
        [sum(e[0] for e in out["meta_info"]["input_token_logprobs"][1:]) for out in outputs], dtype=torch.float64
    )


GENERATION_PROMPTS = [
    {"prompt": f"Say {w}:" + " please" * (i % 3), "answer": w} for i, w in enumerate(["yes", "cat", "a tree"])
]


def generation_case() -> tuple:
    """(a reward objective generating 2 samples of 8 tokens per prompt, a batch of 3 prompts of
    different lengths) for the engine-vs-transformers generation tests."""
    from sglang.srt.mezo.rewards.objective import RewardObjective

    tokenizer = tiny_tokenizer()
    config = MeZOConfig(reward="length=6", max_new_tokens=8, num_samples=2, seed=4)
    data = MeZODataset(GENERATION_PROMPTS, tokenizer, **config.dataset_options())
    return RewardObjective.from_config(config, tokenizer), next(iter(create_dataloader(data, 3, shuffle=False)))


def assert_same_completions(test, backend, reference, cases: dict) -> None:
    """`backend`'s completions equal `reference`'s for each case ``name: (step, seed, scale)``
    (step None: greedy; seed None: unperturbed)."""
    objective, batch = generation_case()
    for name, (step, seed, scale) in cases.items():
        with test.subTest(name):
            at = objective.at_step(step)
            test.assertEqual(backend.completions(at, batch, seed, scale), reference.completions(at, batch, seed, scale))


def lora_reference(config: MeZOConfig, model_dir: str, adapter_dir: Path) -> MeZOTrainer:
    """The transformers-backend trainer of `config`'s adapter, with B drawn at random (peft
    starts B at zero: a random B makes the adapter matter from step 0), saved to `adapter_dir`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = MeZOTrainer(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config)
    with torch.no_grad():
        for t in reference.backend.tensors:
            if ".lora_B." in t.name:
                t.param.normal_(0.0, 0.2)
    reference.model.save_pretrained(adapter_dir)
    return reference


class TestSGLangEngine(unittest.TestCase):
    """A real upstream SGLang Engine on CPU serving a tiny Llama built from a config
    (`SharedEngines`; full-parameter MeZO on the base model)."""

    @classmethod
    def setUpClass(cls):
        cls.model_dir = ENGINES.model_dir
        cls.engine = ENGINES.engine(tp_size=1)

    def setUp(self):
        # eps and seed: the stale-cache canary's L- stands 400 tolerances off (seed 4: 99)
        self.config = MeZOConfig(learning_rate=0.0, epsilon=2e-2, seed=0, disable_tqdm=True)
        self.backend = SGLangBackend(self.engine, self.config, self.model_dir)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.reference = MeZOTrainer(hf, self.config)

    def test_parity_with_transformers_backend(self):
        """Per-token log-probs within the derived tolerance of transformers; losses of both
        passes too (the projected gradients then agree to (|dL+| + |dL-|) / (2 eps) by their
        definition, so that is not checked again), with a gradient signal far above that.
        """
        batch = candidate_batch()
        token_tol, loss_tol = tolerances(self.reference.model, batch)
        engine_sums, counts = self.backend.row_logprobs(batch)
        hf_sums, hf_counts = self.reference.backend.row_logprobs(batch)
        self.assertTrue(torch.equal(counts, hf_counts))
        self.assertLessEqual(per_token_gap(engine_sums, hf_sums, counts), token_tol)
        trainer = MeZOTrainer(None, self.config, backend=self.backend)
        for _ in range(2):
            a, b = trainer.step(batch), self.reference.step(batch)
            self.assertEqual(a.seed, b.seed)
            _, loss_tol = pass_tolerances(self.reference, batch, a.seed)
            d_plus, d_minus = abs(a.loss_perturbed - b.loss_perturbed), abs(a.loss_baseline - b.loss_baseline)
            self.assertLessEqual(max(d_plus, d_minus), loss_tol)
            # a real signal, not noise: g 10x beyond the (|dL+| + |dL-|) / (2 eps) it may differ by
            self.assertGreater(abs(b.coefficient), 10 * loss_tol / self.config.epsilon)

    def test_lr0_steps_leave_engine_weights_bit_identical_and_updates_match(self):
        assert_lr0_steps_keep_weights_then_update_matches(self, self.backend, self.reference, self.model_dir, 2)

    def test_fzoo_passes_match_the_transformers_backend(self):
        """FZOO on the engine: its unperturbed pass and q one-sided passes equal the
        transformers backend's within the derived loss tolerance (same seeds), and lr = 0 steps leave
        the engine's weights bit-identical (the extra unperturbed pass included)."""
        from transformers import AutoModelForCausalLM

        config = MeZOConfig(
            estimator="fzoo", num_directions=3, learning_rate=0.0, epsilon=1e-3, seed=4, disable_tqdm=True
        )
        backend = SGLangBackend(self.engine, config, self.model_dir)
        before = backend.checksum()
        trainer = MeZOTrainer(None, config, backend=backend)
        reference = MeZOTrainer(AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32), config)
        for _ in range(2):
            a, b = trainer.step(candidate_batch()), reference.step(candidate_batch())
            self.assertEqual([d.seed for d in a.per_direction], [d.seed for d in b.per_direction])
            for x, y in zip(a.per_direction, b.per_direction):
                _, loss_tol = pass_tolerances(reference, candidate_batch(), x.seed, scales=(config.epsilon, 0.0))
                self.assertLessEqual(abs(x.loss_perturbed - y.loss_perturbed), loss_tol)
                self.assertLessEqual(abs(x.loss_baseline - y.loss_baseline), loss_tol)
        self.assertEqual(backend.checksum(), before)

    def test_radix_cache_shares_prompts_within_a_pass(self):
        batch = candidate_batch()
        self.backend.row_logprobs(batch)
        stats = self.backend.cache_stats
        # every candidate after an example's first reuses its prompt up to logprob_start_len
        shared = sum(2 * (5 + 2 * e - 1) for e in range(4))
        self.assertEqual(stats["pass/radix_cache/tokens_reused"], shared)
        self.assertEqual(stats["pass/radix_cache/tokens_computed"], int(batch["attention_mask"].sum()) - shared)

    def test_canary_without_flush_the_estimate_changes(self):
        """Without the flush, the - pass reuses prompt KV computed under +eps z: L- (and so the
        projected gradient) moves 100 tolerances or more away from the correct backend's."""
        batch = candidate_batch()
        config = self.config
        correct = MeZOTrainer(None, config, backend=self.backend).step(batch)
        stale_backend = SGLangBackend(self.engine, config, self.model_dir, flush_on_version_change=False)
        self.engine.flush_cache()
        stale = MeZOTrainer(None, config, backend=stale_backend).step(batch)
        self.engine.flush_cache()
        self.assertEqual(correct.seed, stale.seed)
        _, loss_tol = pass_tolerances(self.reference, batch, correct.seed)
        self.assertLessEqual(abs(stale.loss_perturbed - correct.loss_perturbed), loss_tol)
        self.assertGreater(abs(stale.loss_baseline - correct.loss_baseline), 100 * loss_tol)
        self.assertTrue(math.isfinite(stale.coefficient))

    def test_every_call_order_matches_the_transformers_backend(self):
        """The radix cache in the orders eval -> step, step -> eval -> step and step -> step on
        the same prompts (lr > 0, so steps change the engine's weights): every eval loss, L+
        and L- within the derived loss tolerance of the transformers backend on a separate copy
        that applies the same (seed, g) updates; the tolerance is relative: taken at the
        weights each pass read (the steps move them far). Canary,
        each order: without the flush on a weight-version change, some loss is off by 100
        tolerances or more."""
        from transformers import AutoModelForCausalLM

        batch = candidate_batch()
        config = MeZOConfig(learning_rate=1e-1, epsilon=1e-2, seed=6, disable_tqdm=True)

        def mismatch(order: str, flush: bool) -> float:
            backend = SGLangBackend(self.engine, config, self.model_dir, flush_on_version_change=flush)
            self.engine.flush_cache()
            trainer = MeZOTrainer(None, config, backend=backend)
            reference = MeZOTrainer(AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32), config)
            try:
                triples = follow_in_order(trainer, reference, batch, order, tolerance=loss_tolerance)
                return max(abs(a - b) / tolerance for a, b, tolerance in triples)
            finally:
                backend.load_trainable(str(Path(self.model_dir) / "model.safetensors"))  # the class shares the engine
                self.engine.flush_cache()

        for order in ("es", "ses", "ss"):
            with self.subTest(order=order):
                self.assertLessEqual(mismatch(order, flush=True), 1.0)
                self.assertGreater(mismatch(order, flush=False), 100.0)

    def test_a_second_backend_takes_the_engine_over(self):
        """One MeZO backend per engine: once another is set up, the first one's calls are
        refused (they would move the second one's tensors)."""
        second = SGLangBackend(self.engine, self.config, self.model_dir)
        with self.assertRaisesRegex(EngineRPCError, "another SGLangBackend was set up on this engine"):
            self.backend.row_logprobs(candidate_batch(), seed=1, scale=1e-3)
        second.row_logprobs(candidate_batch(), seed=1, scale=1e-3)

    def test_objective_values_match(self):
        batch = candidate_batch()
        total, count = self.backend.loss_sum(CompletionNLL(), batch)
        ref_total, ref_count = self.reference.backend.loss_sum(CompletionNLL(), batch)
        self.assertEqual(count, ref_count)
        token_tol, _ = tolerances(self.reference.model, batch)
        self.assertLessEqual(abs(total - ref_total) / count, token_tol)


class TestSGLangGeneration(unittest.TestCase):
    """The reward objective on the engine: completions generated by SGLang under each
    perturbation, against the transformers backend's on the same tiny model."""

    PROMPTS = [
        {"prompt": f"Say {w}:" + " please" * (i % 3), "answer": w} for i, w in enumerate(["yes", "cat", "a tree"])
    ]

    @classmethod
    def setUpClass(cls):
        cls.model_dir = ENGINES.model_dir
        cls.engine = ENGINES.engine(tp_size=1)
        cls.tokenizer = tiny_tokenizer()

    def setUp(self):
        from transformers import AutoModelForCausalLM

        self.config = MeZOConfig(
            reward="length=6", max_new_tokens=8, num_samples=2, estimator="fzoo", num_directions=2,
            learning_rate=0.0, epsilon=2e-2, seed=1, disable_tqdm=True,
        )  # fmt: skip
        self.engine_trainer = MeZOTrainer(
            None, self.config, tokenizer=self.tokenizer, backend=SGLangBackend(self.engine, self.config, self.model_dir)
        )
        hf = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.reference = MeZOTrainer(hf, self.config, tokenizer=self.tokenizer)
        data = MeZODataset(GENERATION_PROMPTS, self.tokenizer, **self.config.dataset_options())
        self.batch = next(iter(create_dataloader(data, 3, shuffle=False)))

    def test_greedy_sampled_and_perturbed_completions_equal_the_transformers_backends(self):
        """Token for token: greedy (eval), sampled by the shared seeded rule, and sampled under
        a perturbation. Both sides pick argmaxes of logits that agree to ~1e-6 (the parity
        tolerance of this module): only a near-tie of two scores could split them."""
        objective = self.engine_trainer.objective
        cases = {"greedy": (None, None, 0.0), "sampled": (5, None, 0.0), "perturbed": (5, 123, 2e-2)}
        for name, (step, seed, scale) in cases.items():
            with self.subTest(name):
                at = objective.at_step(step)
                engine = self.engine_trainer.backend.completions(at, self.batch, seed, scale)
                reference = self.reference.backend.completions(at, self.batch, seed, scale)
                self.assertEqual(len(engine), 3 if step is None else 6)
                self.assertEqual(engine, reference)
        sampled = objective.at_step(5)
        self.assertNotEqual(  # sampling is on: the two samples of some prompt differ
            self.engine_trainer.backend.completions(sampled, self.batch)[::2],
            self.engine_trainer.backend.completions(sampled, self.batch)[1::2],
        )

    def test_common_random_numbers_prompt_reuse_and_lr0_steps_on_the_engine(self):
        """Passes at eps = 0 under different directions generate the same text as the
        unperturbed pass; a prompt's samples reuse its KV within a pass; lr = 0 steps leave
        the engine's weights bit-identical."""
        at = self.engine_trainer.objective.at_step(2)
        passes = [self.engine_trainer.backend.completions(at, self.batch, seed, 0.0) for seed in (7, 8, None)]
        # a prompt's two samples share its KV: the prompts are prefilled once (with the cache
        # flushed before the pass), each of the 6 requests then recomputes only its last token
        # (measured without the prefill call: 66 computed, 0 reused)
        lengths = [int(n) for n in self.batch["attention_mask"].sum(1)]
        stats = self.engine_trainer.backend.cache_stats
        self.assertEqual(stats["pass/radix_cache/tokens_reused"], 2 * sum(n - 1 for n in lengths))
        self.assertEqual(stats["pass/radix_cache/tokens_computed"], sum(lengths) + 2 * len(lengths))
        self.assertEqual(passes[0], passes[1])
        self.assertEqual(passes[0], passes[2])
        before = self.engine_trainer.backend.checksum()
        for _ in range(2):
            out = self.engine_trainer.step(self.batch)
            self.assertEqual(out.reward["samples"], 3 * 6)  # q + 1 passes of 3 prompts x 2 samples
        self.assertEqual(self.engine_trainer.backend.checksum(), before)


class TestSGLangLoRA(unittest.TestCase):
    """A LoRA adapter (q_proj, v_proj) trained inside SGLang's LoRA memory pool."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="mezo-engine-lora-")
        cls.model_dir = ENGINES.model_dir
        cls.config = MeZOConfig(
            peft="lora", lora_rank=4, lora_alpha=8, learning_rate=0.0, epsilon=1e-2, seed=4, disable_tqdm=True
        )  # epsilon: the LoRA preset's, so that L+ - L- stands 100 tolerances clear
        cls.adapter_dir = Path(cls.tmp.name) / "initial-adapter"
        cls.reference = lora_reference(cls.config, cls.model_dir, cls.adapter_dir)
        cls.engine = ENGINES.engine(tp_size=1)
        cls.backend = SGLangBackend(cls.engine, cls.config, cls.model_dir, adapter_path=str(cls.adapter_dir))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_generation_with_the_pooled_adapter_equals_transformers(self):
        """The reward objective's completions through the adapter in the pool: greedy, sampled
        and under a perturbation of the adapter, token for token those of the transformers
        backend's peft model; the adapter matters (the base model generates other text)."""
        cases = {"greedy": (None, None, 0.0), "perturbed": (5, 9, 1e-1)}
        assert_same_completions(self, self.backend, self.reference.backend, cases)
        objective, batch = generation_case()
        with self.reference.model.disable_adapter():
            base = self.reference.backend.completions(objective.at_step(None), batch)
        self.assertNotEqual(self.backend.completions(objective.at_step(None), batch), base)

    def test_perturbations_reach_the_pool_and_match_transformers(self):
        """q and v adapters only: k's stacked slot is never a trainable tensor. The adapter
        changes the log-probs, the perturbed passes move them, and both equal transformers'
        (within the derived tolerances); lr=0 steps leave the pool bit-identical; an update
        writes the same bits as the transformers backend's."""
        names = [t.name for t in self.reference.backend.tensors]
        self.assertEqual(self.backend.tensor_names, names)
        self.assertFalse(any("k_proj" in n for n in names))
        batch = candidate_batch()
        token_tol, loss_tol = tolerances(self.reference.model, batch)
        engine_sums, counts = self.backend.row_logprobs(batch)
        hf_sums, _ = self.reference.backend.row_logprobs(batch)
        self.assertLessEqual(per_token_gap(engine_sums, hf_sums, counts), token_tol)
        with self.reference.model.disable_adapter():
            base_sums, _ = self.reference.backend.row_logprobs(batch)
        self.assertGreater(per_token_gap(engine_sums, base_sums, counts), 100 * token_tol)
        before = self.backend.checksum()
        self.assertEqual(before, digests(self.reference.backend.trainable_state()))
        trainer = MeZOTrainer(None, self.config, backend=self.backend)
        for _ in range(2):
            a, b = trainer.step(batch), self.reference.step(batch)
            _, loss_tol = pass_tolerances(self.reference, batch, a.seed)
            d_plus, d_minus = abs(a.loss_perturbed - b.loss_perturbed), abs(a.loss_baseline - b.loss_baseline)
            self.assertLessEqual(max(d_plus, d_minus), loss_tol)
            # z reached the forward (else L+ == L-): 10 tolerances, more than rounding explains
            self.assertGreater(abs(a.loss_perturbed - a.loss_baseline), 10 * loss_tol)
        self.assertEqual(self.backend.checksum(), before)
        assert_same_update(self, self.backend, self.reference, (77, 0.5), lr=1e-1)
        token_tol, _ = tolerances(self.reference.model, batch)  # at the updated weights
        engine_sums, _ = self.backend.row_logprobs(batch)
        hf_sums, _ = self.reference.backend.row_logprobs(batch)
        self.assertLessEqual(per_token_gap(engine_sums, hf_sums, counts), token_tol)

    def test_trained_adapter_serves_through_sglangs_own_loader(self):
        """Saved in peft format, the trained adapter loads with ``load_lora_adapter`` (a slot
        of its own, SGLang's loader, no MeZO code) and gives the trainer's log-probs; peft
        reloads it too; loading weights (a checkpoint resume) writes the pool slot."""
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        self.backend.apply_update([(91, -0.8), (92, 0.3)], lr=1e-1)
        batch = candidate_batch(seed=3)
        trained_sums, counts = self.backend.row_logprobs(batch)
        saved = self.backend.save_adapter(Path(self.tmp.name) / "trained-adapter")
        initial = load_file(str(self.adapter_dir / "adapter_model.safetensors"))
        self.backend.load_trainable_state(initial)
        self.assertEqual(self.backend.checksum(), digests(initial))
        self.assertTrue(self.engine.load_lora_adapter("trained", str(saved)).success)
        try:
            served = served_row_logprobs(self.engine, batch, "trained")
        finally:
            self.engine.unload_lora_adapter("trained")
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        reloaded = MeZOTrainer(PeftModel.from_pretrained(base, str(saved)), MeZOConfig(disable_tqdm=True))
        token_tol, _ = tolerances(reloaded.model, batch)  # at the trained adapter's weights
        self.assertLessEqual(per_token_gap(served, trained_sums, counts), token_tol)
        peft_sums, _ = reloaded.backend.row_logprobs(batch)
        self.assertLessEqual(per_token_gap(peft_sums, trained_sums, counts), token_tol)


class TestSGLangLoRAPopulation(unittest.TestCase):
    """A step's perturbed adapters as slots of SGLang's LoRA pool (`population_batch`), every
    point in one engine call, against the same points pass by pass on the engine and on the
    transformers backend."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="mezo-engine-population-")
        cls.model_dir = ENGINES.model_dir
        values = dict(
            peft="lora", lora_rank=4, lora_alpha=8, learning_rate=0.0, epsilon=1e-2, seed=6, disable_tqdm=True,
            estimator="mezo", num_directions=1,
        )  # fmt: skip
        cls.config = MeZOConfig(**values, population_batch="on")
        cls.adapter_dir = Path(cls.tmp.name) / "initial-adapter"
        cls.reference = lora_reference(MeZOConfig(**values, population_batch="off"), cls.model_dir, cls.adapter_dir)
        cls.engine = ENGINES.engine(tp_size=1)  # its pool: 4 adapters (trained + 2 slots pinned)
        cls.backend = SGLangBackend(cls.engine, cls.config, cls.model_dir, adapter_path=str(cls.adapter_dir))

    @classmethod
    def tearDownClass(cls):
        for name in cls.backend.slot_names:  # the shared engine's pool has room for other classes' adapters
            cls.engine.unload_lora_adapter(name)
        cls.tmp.cleanup()

    def test_one_call_over_the_slots_equals_the_passes_and_lr0_steps_keep_the_adapter(self):
        """L(w + eps z) and L(w - eps z) from two slots in one call equal the engine's passes
        one by one and the transformers backend's (within the derived tolerance); z reached
        the slots (L+ - L- stands 10 tolerances clear: a slot left unperturbed, or both
        given one perturbation, would not); lr = 0 steps leave the trained adapter bit for bit."""
        self.assertEqual(self.backend.slot_names, ["mezo_slot_0", "mezo_slot_1"])
        batch, seed = candidate_batch(seed=5), 101
        objective = make_objective("auto", batch)
        points = [(seed, self.config.epsilon), (seed, -self.config.epsilon)]
        before = self.backend.checksum()
        together = [total / count for total, count in self.backend.loss_sums(objective, batch, points)]
        apart = [total / count for total, count in (self.backend.loss_sum(objective, batch, *p) for p in points)]
        hf = [total / count for total, count in self.reference.backend.loss_sums(objective, batch, points)]
        _, loss_tol = pass_tolerances(self.reference, batch, seed)
        for t, a, h in zip(together, apart, hf):
            self.assertLessEqual(abs(t - a), loss_tol)
            self.assertLessEqual(abs(t - h), loss_tol)
        self.assertGreater(abs(together[0] - together[1]), 10 * loss_tol)
        trainer = MeZOTrainer(None, self.config, backend=self.backend)
        for _ in range(2):
            a, b = trainer.step(batch), self.reference.step(batch)
            _, loss_tol = pass_tolerances(self.reference, batch, a.seed)
            self.assertLessEqual(abs(a.loss_perturbed - b.loss_perturbed), loss_tol)
            self.assertLessEqual(abs(a.loss_baseline - b.loss_baseline), loss_tol)
        self.assertEqual(self.backend.checksum(), before)

    def test_generation_over_the_slots_equals_each_points_passes(self):
        """Completions through both slots in one call (sampled, two per prompt, the step's
        common seeds) equal, point by point, the transformers backend's passes; the points
        generate different text (a slot mix-up would show)."""
        objective, batch = generation_case()
        at, points = objective.at_step(3), [(9, 1e-1), (9, -1e-1)]
        adapters = self.backend._write_slots(points)
        together = self.backend._completions(at, batch, adapters)
        apart = [self.reference.backend.completions(at, batch, seed, scale) for seed, scale in points]
        self.assertEqual(together, apart)
        self.assertNotEqual(apart[0], apart[1])


class TestTensorParallelEngine(unittest.TestCase):
    """A tensor-parallel engine (tp_size=2, one core per rank) against the tp_size=1 engine and
    the transformers backend on the same weights: every rank perturbs and updates its own
    shards with z drawn at the unsharded offsets (`ShardLayout`), leaving upstream's CPU
    padding (rank 1's padded heads, intermediate and vocabulary rows) out. The shard maps of
    other shapes (KV heads replicated as on GPUs, tp 4, biases, tied embeddings) are checked
    against upstream's loaders in `test_mezo_tensor_parallel`."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="mezo-engine-tp-")
        cls.model_dir = ENGINES.model_dir
        cls.config = MeZOConfig(learning_rate=0.0, epsilon=1e-2, seed=4, disable_tqdm=True)
        cls.single_engine = ENGINES.engine(tp_size=1)
        cls.tp2_engine = ENGINES.engine(tp_size=2)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):  # an engine serves the last backend set up on it
        from transformers import AutoModelForCausalLM

        self.single = SGLangBackend(self.single_engine, self.config, self.model_dir)
        self.backend = SGLangBackend(self.tp2_engine, self.config, self.model_dir)
        hf = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.reference = MeZOTrainer(hf, self.config)

    def test_generation_equals_transformers(self):
        """The reward objective's completions on two ranks (each samples from the gathered
        logits by the shared seeded rule, so the ranks agree): greedy, sampled and perturbed,
        token for token the transformers backend's."""
        cases = {"greedy": (None, None, 0.0), "perturbed": (5, 9, 2e-2)}
        assert_same_completions(self, self.backend, self.reference.backend, cases)

    def test_passes_equal_the_single_rank_engine_and_transformers(self):
        """Per-token log-probs, L+ and L- of two steps within the derived tolerances of the
        tp_size=1 engine's and of transformers', with a gradient signal far above them. (Each
        rank's partial sums and their all-reduce are one more ordering of the same reductions:
        the bound covers them as it covers any other blocking.)"""
        batch = candidate_batch()
        token_tol, loss_tol = tolerances(self.reference.model, batch)
        sums, counts = self.backend.row_logprobs(batch)
        for other in (self.single, self.reference.backend):
            other_sums, other_counts = other.row_logprobs(batch)
            self.assertTrue(torch.equal(counts, other_counts))
            self.assertLessEqual(per_token_gap(sums, other_sums, counts), token_tol)
        trainers = [MeZOTrainer(None, self.config, backend=b) for b in (self.backend, self.single)]
        for _ in range(2):
            tp2, tp1, hf = (t.step(batch) for t in (*trainers, self.reference))
            self.assertEqual({tp2.seed, tp1.seed}, {hf.seed})
            _, loss_tol = pass_tolerances(self.reference, batch, hf.seed)
            for other in (tp1, hf):
                d_plus, d_minus = abs(tp2.loss_perturbed - other.loss_perturbed), abs(
                    tp2.loss_baseline - other.loss_baseline
                )
                self.assertLessEqual(max(d_plus, d_minus), loss_tol)
            self.assertGreater(abs(hf.coefficient), 10 * loss_tol / self.config.epsilon)

    def test_lr0_steps_keep_every_shard_and_an_update_gathers_to_transformers(self):
        """Ten lr=0 steps leave the gathered weights bit-identical (gathering also requires
        every replicated element to have the same bits on both ranks, so every shard is
        unchanged); one update gathers to the transformers backend's bits, including the
        vocabulary rows beside rank 1's padding."""
        assert_lr0_steps_keep_weights_then_update_matches(self, self.backend, self.reference, self.model_dir, 10)

    def test_lora_adapter_round_trip(self):
        """An adapter on every projection (B split by output rows on q/k/v/gate/up, A by input
        columns on o/down): perturbed passes equal peft's, lr=0 steps leave it bit-identical,
        an update gathers to the transformers backend's bits; saved from the tp_size=2
        engine, it serves in the tp_size=1 engine and in peft with the trainer's log-probs.
        (The engine's LoRA loader receives the adapter padded to its padded heads and rows.)"""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        config = MeZOConfig(
            peft="lora", lora_rank=4, lora_alpha=8, lora_target_modules=ALL_PROJECTIONS,
            learning_rate=0.0, epsilon=1e-2, seed=5, disable_tqdm=True,
        )  # fmt: skip
        adapter_dir = Path(self.tmp.name) / "initial-adapter"
        reference = lora_reference(config, self.model_dir, adapter_dir)
        backend = SGLangBackend(self.tp2_engine, config, self.model_dir, adapter_path=str(adapter_dir))
        self.assertEqual(sorted(backend.tensor_names), sorted(t.name for t in reference.backend.tensors))
        before = backend.checksum()
        self.assertEqual(before, digests(reference.backend.trainable_state()))
        batch = candidate_batch()
        trainer = MeZOTrainer(None, config, backend=backend)
        for _ in range(2):
            a, b = trainer.step(batch), reference.step(batch)
            _, loss_tol = pass_tolerances(reference, batch, a.seed)
            self.assertLessEqual(
                max(abs(a.loss_perturbed - b.loss_perturbed), abs(a.loss_baseline - b.loss_baseline)), loss_tol
            )
            self.assertGreater(abs(a.loss_perturbed - a.loss_baseline), 10 * loss_tol)
        self.assertEqual(backend.checksum(), before)
        assert_same_update(self, backend, reference, (78, 0.5), lr=1e-1)
        trained_sums, counts = backend.row_logprobs(batch)
        saved = backend.save_adapter(Path(self.tmp.name) / "trained-adapter")
        single = self.single_engine
        self.assertTrue(single.load_lora_adapter("trained-tp2", str(saved)).success)
        try:
            served = served_row_logprobs(single, batch, "trained-tp2")
        finally:
            single.unload_lora_adapter("trained-tp2")
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        reloaded = MeZOTrainer(PeftModel.from_pretrained(base, str(saved)), MeZOConfig(disable_tqdm=True))
        token_tol, _ = tolerances(reloaded.model, batch)  # at the trained adapter's weights
        self.assertLessEqual(per_token_gap(served, trained_sums, counts), token_tol)
        peft_sums, _ = reloaded.backend.row_logprobs(batch)
        self.assertLessEqual(per_token_gap(peft_sums, trained_sums, counts), token_tol)


if __name__ == "__main__":
    unittest.main(verbosity=2)
