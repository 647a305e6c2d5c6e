"""MeZO on an upstream SGLang Engine: a mocked engine for the protocol, a real one on CPU.

Run as ``pytest test/srt/test_mezo_sglang.py`` or ``python3 test/srt/test_mezo_sglang.py``.
"""

from __future__ import annotations

import json
import math
import tempfile
import unittest
from pathlib import Path

import psutil
import torch
from mezo_testing import follow_in_order, tiny_llama, tiny_tokenizer
from test_mezo_trainer import candidate_batch

from sglang.srt.mezo.backends.sglang_backend import (
    EngineCrashed,
    EngineRPCError,
    SGLangBackend,
    launch_engine,
    lora_engine_args,
)
from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.objectives import CompletionNLL
from sglang.srt.mezo.primitives import tensor_digest
from sglang.srt.mezo.trainer import MeZOTrainer

# Per-token log-prob agreement between SGLang's CPU forward and transformers' (fp32, vocab
# 384 so |log p| < 8): one float32 ulp at magnitude 8 (2^-20). Observed: 4.8e-7.
LOGPROB_TOL = 2.0**-20


class FakeEngine:
    """Stands in for `sglang.Engine` (the heavy loader): records RPCs and cache flushes.

    Its log-prob of token t is -(t % 7)/10 + scale, where `scale` is the perturbation the
    last ``mezo_begin`` set, so L+ - L- reveals what was sent.
    """

    def __init__(self, mismatched=()):
        self.calls = []
        self.scale = 0.0
        self.mismatched = list(mismatched)

    def collective_rpc(self, method, ack_path, **kwargs):
        """Records the call and acknowledges it as the plugin does (`engine_plugin._acknowledged`)."""
        self.calls.append((method, kwargs))
        result = None
        if method == "mezo_setup":
            result = {"checked": 2, "mismatched": self.mismatched, "missing": [], "tensors": [["w", [2]]]}
        elif method == "mezo_begin":
            self.scale = kwargs["scale"]
        elif method == "mezo_end":
            self.scale = 0.0
        Path(ack_path).write_text(json.dumps({"ok": True, "result": result}))

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
        self.assertAlmostEqual(out.projected_grad, -1.0, places=9)
        update = engine.calls[-1][1]
        self.assertEqual(update["terms"], [[out.seed, out.projected_grad]])
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


class TestRPCOutcomes(unittest.TestCase):
    def test_a_failed_rpc_is_an_error_without_upstream_asserts(self):
        """Under python -O upstream's collective_rpc reports nothing: the method's own
        acknowledgement carries the failure (and a missing acknowledgement is one too)."""

        class QuietFailure(FakeEngine):
            def collective_rpc(self, method, ack_path, **kwargs):
                super().collective_rpc(method, ack_path, **kwargs)
                if method == "mezo_update":
                    Path(ack_path).write_text(json.dumps({"ok": False, "error": "RuntimeError: slot 1 lost"}))
                if method == "mezo_end":
                    Path(ack_path).unlink()  # never ran it

        backend = SGLangBackend(QuietFailure(), MeZOConfig(disable_tqdm=True), "unused")
        with self.assertRaisesRegex(EngineRPCError, "mezo_update failed inside the SGLang engine: RuntimeError: slot"):
            backend.apply_update([(1, 0.5)], lr=0.1)
        with self.assertRaisesRegex(EngineRPCError, "mezo_end: the SGLang engine did not acknowledge"):
            backend.row_logprobs(plain_batch(), seed=1, scale=1e-3)


class TestEnginePluginDeviceHandling(unittest.TestCase):
    def test_engine_tensors_compare_and_hash_bit_for_bit_through_the_host(self):
        """The plugin meets engine tensors (on whatever device SGLang runs) only through
        `same_bits` (compared on the tensor's device) and `host_bytes` (an explicit copy to the
        host). Canary: torch.equal calls -0.0 and +0.0 equal and a NaN unequal to itself."""
        from sglang.srt.mezo.backends.engine_plugin import same_bits
        from sglang.srt.mezo.primitives import host_bytes

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


class TestSGLangEngine(unittest.TestCase):
    """A real upstream SGLang Engine on CPU serving a tiny Llama built from a config."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="mezo-engine-")
        cls.model_dir = str(Path(cls.tmp.name) / "tiny-llama")
        tiny_llama(hidden=64, attn_implementation="sdpa").save_pretrained(cls.model_dir)
        tiny_tokenizer().save_pretrained(cls.model_dir)
        cls.engine = launch_engine(cls.model_dir)

    @classmethod
    def tearDownClass(cls):
        cls.engine.shutdown()
        cls.tmp.cleanup()

    def setUp(self):
        self.config = MeZOConfig(learning_rate=0.0, epsilon=1e-3, seed=4, disable_tqdm=True)
        self.backend = SGLangBackend(self.engine, self.config, self.model_dir)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.reference = MeZOTrainer(hf, self.config)

    def test_parity_with_transformers_backend(self):
        """Per-token log-probs within 2^-20 of transformers; losses of both passes too (the
        projected gradients then agree to (|dL+| + |dL-|) / (2 eps) by their definition, so
        that is not checked again), with a gradient signal far above that tolerance."""
        batch = candidate_batch()
        engine_sums, counts = self.backend.row_logprobs(batch)
        hf_sums, hf_counts = self.reference.backend.row_logprobs(batch)
        self.assertTrue(torch.equal(counts, hf_counts))
        self.assertLessEqual(float(((engine_sums - hf_sums).abs() / counts).max()), LOGPROB_TOL)
        trainer = MeZOTrainer(None, self.config, backend=self.backend)
        for _ in range(2):
            a, b = trainer.step(batch), self.reference.step(batch)
            self.assertEqual(a.seed, b.seed)
            d_plus, d_minus = abs(a.loss_plus - b.loss_plus), abs(a.loss_minus - b.loss_minus)
            self.assertLessEqual(max(d_plus, d_minus), LOGPROB_TOL)
            self.assertGreater(abs(b.projected_grad), 100 * LOGPROB_TOL / 1e-3)  # a real signal, not noise

    def test_lr0_steps_leave_engine_weights_bit_identical_and_updates_match(self):
        before = self.backend.checksum()
        trainer = MeZOTrainer(None, self.config, backend=self.backend)
        for _ in range(2):
            trainer.step(candidate_batch())
        self.assertEqual(self.backend.checksum(), before)
        assert_same_update(self, self.backend, self.reference, (123, 0.5), lr=1e-2)
        self.backend.load_trainable(str(Path(self.model_dir) / "model.safetensors"))  # back to the checkpoint
        self.assertEqual(self.backend.checksum(), before)

    def test_radix_cache_shares_prompts_within_a_pass(self):
        batch = candidate_batch()
        self.backend.row_logprobs(batch)
        stats = self.backend.cache_stats
        # every candidate after an example's first reuses its prompt up to logprob_start_len
        shared = sum(2 * (5 + 2 * e - 1) for e in range(4))
        self.assertEqual(stats["pass/radix_cache/tokens_reused"], shared)
        self.assertEqual(stats["pass/radix_cache/tokens_computed"], int(batch["attention_mask"].sum()) - shared)

    def test_canary_without_flush_the_estimate_changes(self):
        """Without the flush, the - pass reuses prompt KV computed under +eps z: the projected
        gradient moves far outside the parity bound of the correct backend."""
        batch = candidate_batch()
        correct = MeZOTrainer(None, self.config, backend=self.backend).step(batch)
        stale_backend = SGLangBackend(self.engine, self.config, self.model_dir, flush_on_version_change=False)
        self.engine.flush_cache()
        stale = MeZOTrainer(None, self.config, backend=stale_backend).step(batch)
        self.engine.flush_cache()
        self.assertEqual(correct.seed, stale.seed)
        self.assertLessEqual(abs(stale.loss_plus - correct.loss_plus), LOGPROB_TOL)
        self.assertGreater(abs(stale.projected_grad - correct.projected_grad), 100 * LOGPROB_TOL / 1e-3)
        self.assertTrue(math.isfinite(stale.projected_grad))

    def test_every_call_order_matches_the_transformers_backend(self):
        """The radix cache in the orders eval -> step, step -> eval -> step and step -> step on
        the same prompts (lr > 0, so steps change the engine's weights): every eval loss, L+
        and L- within the per-token tolerance of the transformers backend on a separate copy
        that applies the same (seed, g) updates. Canary, each order: without the flush on a
        weight-version change, some loss is off by far more."""
        from transformers import AutoModelForCausalLM

        batch = candidate_batch()
        config = MeZOConfig(learning_rate=1e-1, epsilon=1e-2, seed=6, disable_tqdm=True)

        def mismatch(order: str, flush: bool) -> float:
            backend = SGLangBackend(self.engine, config, self.model_dir, flush_on_version_change=flush)
            self.engine.flush_cache()
            trainer = MeZOTrainer(None, config, backend=backend)
            reference = MeZOTrainer(AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32), config)
            try:
                return max(abs(a - b) for a, b in follow_in_order(trainer, reference, batch, order))
            finally:
                backend.load_trainable(str(Path(self.model_dir) / "model.safetensors"))  # the class shares the engine
                self.engine.flush_cache()

        for order in ("es", "ses", "ss"):
            with self.subTest(order=order):
                self.assertLessEqual(mismatch(order, flush=True), LOGPROB_TOL)
                self.assertGreater(mismatch(order, flush=False), 100 * LOGPROB_TOL)

    def test_objective_values_match(self):
        batch = candidate_batch()
        total, count = self.backend.loss_sum(CompletionNLL(), batch)
        ref_total, ref_count = self.reference.backend.loss_sum(CompletionNLL(), batch)
        self.assertEqual(count, ref_count)
        self.assertLessEqual(abs(total - ref_total) / count, LOGPROB_TOL)


class TestSGLangLoRA(unittest.TestCase):
    """A LoRA adapter (q_proj, v_proj) trained inside SGLang's LoRA memory pool."""

    @classmethod
    def setUpClass(cls):
        from transformers import AutoModelForCausalLM

        cls.tmp = tempfile.TemporaryDirectory(prefix="mezo-engine-lora-")
        root = Path(cls.tmp.name)
        cls.model_dir = str(root / "tiny-llama")
        tiny_llama(hidden=64, attn_implementation="sdpa").save_pretrained(cls.model_dir)
        tiny_tokenizer().save_pretrained(cls.model_dir)
        cls.config = MeZOConfig(
            peft="lora", lora_rank=4, lora_alpha=8, learning_rate=0.0, epsilon=1e-3, seed=4, disable_tqdm=True
        )
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_pretrained(cls.model_dir, dtype=torch.float32)
        cls.reference = MeZOTrainer(hf, cls.config)
        with torch.no_grad():  # peft starts B at zero; a random B makes the adapter matter from step 0
            for t in cls.reference.backend.tensors:
                if ".lora_B." in t.name:
                    t.param.normal_(0.0, 0.2)
        cls.adapter_dir = root / "initial-adapter"
        cls.reference.model.save_pretrained(cls.adapter_dir)
        cls.engine = launch_engine(cls.model_dir, **lora_engine_args(cls.config))
        cls.backend = SGLangBackend(cls.engine, cls.config, cls.model_dir, adapter_path=str(cls.adapter_dir))

    @classmethod
    def tearDownClass(cls):
        cls.engine.shutdown()
        cls.tmp.cleanup()

    def test_perturbations_reach_the_pool_and_match_transformers(self):
        """q and v adapters only: k's stacked slot is never a trainable tensor. The adapter
        changes the log-probs, the perturbed passes move them, and both equal transformers'
        (2^-20 per token); lr=0 steps leave the pool bit-identical; an update writes the same
        bits as the transformers backend's."""
        names = [t.name for t in self.reference.backend.tensors]
        self.assertEqual(self.backend.tensor_names, names)
        self.assertFalse(any("k_proj" in n for n in names))
        batch = candidate_batch()
        engine_sums, counts = self.backend.row_logprobs(batch)
        hf_sums, _ = self.reference.backend.row_logprobs(batch)
        self.assertLessEqual(float(((engine_sums - hf_sums).abs() / counts).max()), LOGPROB_TOL)
        with self.reference.model.disable_adapter():
            base_sums, _ = self.reference.backend.row_logprobs(batch)
        self.assertGreater(float(((engine_sums - base_sums).abs() / counts).max()), 1000 * LOGPROB_TOL)
        before = self.backend.checksum()
        self.assertEqual(before, digests(self.reference.backend.trainable_state()))
        trainer = MeZOTrainer(None, self.config, backend=self.backend)
        for _ in range(2):
            a, b = trainer.step(batch), self.reference.step(batch)
            d_plus, d_minus = abs(a.loss_plus - b.loss_plus), abs(a.loss_minus - b.loss_minus)
            self.assertLessEqual(max(d_plus, d_minus), LOGPROB_TOL)
            # z reached the forward (else L+ == L-)
            self.assertGreater(abs(a.loss_plus - a.loss_minus), 100 * LOGPROB_TOL)
        self.assertEqual(self.backend.checksum(), before)
        assert_same_update(self, self.backend, self.reference, (77, 0.5), lr=1e-1)
        engine_sums, _ = self.backend.row_logprobs(batch)
        hf_sums, _ = self.reference.backend.row_logprobs(batch)
        self.assertLessEqual(float(((engine_sums - hf_sums).abs() / counts).max()), LOGPROB_TOL)

    def test_trained_adapter_serves_in_a_fresh_engine(self):
        """Saved in peft format, the trained adapter loads into a new Engine with
        `load_lora_adapter` and gives the trainer's log-probs; peft reloads it too. Runs
        last in its class (it shuts the class's engine down)."""
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        self.backend.apply_update([(91, -0.8), (92, 0.3)], lr=1e-1)
        batch = candidate_batch(seed=3)
        trained_sums, counts = self.backend.row_logprobs(batch)
        saved = self.backend.save_adapter(Path(self.tmp.name) / "trained-adapter")
        # loading weights (a checkpoint resume) writes the pool slot too
        initial = load_file(str(self.adapter_dir / "adapter_model.safetensors"))
        self.backend.load_trainable_state(initial)
        self.assertEqual(self.backend.checksum(), digests(initial))
        # upstream's Engine.shutdown kills every child process of the caller: one engine at a time
        self.engine.shutdown()
        fresh = launch_engine(self.model_dir, **lora_engine_args(self.config))
        try:
            self.assertTrue(fresh.load_lora_adapter("trained", str(saved)).success)
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            requests = [ids[r][mask[r]].tolist() for r in range(ids.shape[0])]
            starts = [int(batch["prompt_length"][r]) - 1 for r in range(ids.shape[0])]
            outputs = fresh.generate(
                input_ids=requests,
                sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                return_logprob=True,
                logprob_start_len=starts,
                lora_path=["trained"] * len(requests),
            )
        finally:
            fresh.shutdown()
        fresh_sums = torch.tensor(
            [sum(e[0] for e in out["meta_info"]["input_token_logprobs"][1:]) for out in outputs], dtype=torch.float64
        )
        self.assertLessEqual(float(((fresh_sums - trained_sums).abs() / counts).max()), LOGPROB_TOL)
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        reloaded = MeZOTrainer(PeftModel.from_pretrained(base, str(saved)), MeZOConfig(disable_tqdm=True))
        peft_sums, _ = reloaded.backend.row_logprobs(batch)
        self.assertLessEqual(float(((peft_sums - trained_sums).abs() / counts).max()), LOGPROB_TOL)


class TestSGLangEngineCrash(unittest.TestCase):
    def test_a_crashing_engine_raises_instead_of_killing_the_caller(self):
        """The scheduler process dies loading a truncated checkpoint: the caller gets
        `EngineCrashed` (upstream would SIGQUIT, i.e. kill, its parent) and goes on."""
        with tempfile.TemporaryDirectory(prefix="mezo-engine-crash-") as root:
            tiny_llama(hidden=64, attn_implementation="sdpa").save_pretrained(root)
            tiny_tokenizer().save_pretrained(root)
            weights = Path(root) / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:4096])
            with self.assertRaises(EngineCrashed):
                launch_engine(root)
        engine_processes = [c for c in psutil.Process().children(recursive=True) if c.name().startswith("sglang::")]
        self.assertEqual(engine_processes, [])  # none left running, none left a zombie


class TestSGLangMainJob(unittest.TestCase):
    """``--backend sglang`` end to end: the engine trains, the saved HF dir holds its weights."""

    def run_cli(self, root: Path, *extra) -> tuple:
        from sglang.srt.mezo_trainer import main

        model_dir = str(root / "tiny")
        tiny_llama(hidden=64, attn_implementation="sdpa").save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        data = root / "train.jsonl"
        records = [
            {"prompt": f"Review: {w}", "completion": c, "candidates": [" yes", " no"]}
            for w, c in (("great", " yes"), ("dull", " no"), ("good", " yes"), ("cold", " no"))
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        out = root / "out"
        results = main(
            ["--backend", "sglang", "--model", model_dir, "--train-file", str(data), "--eval-file", str(data)]
            + ["--steps", "3", "--epsilon", "1e-2", "--batch-size", "2", "--output-dir", str(out)]
            + ["--disable-tqdm", *extra]
        )
        self.assertEqual(results["steps"], 3)
        self.assertEqual(results["before"]["examples"], 4)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        self.assertEqual(len(rows), 3)
        self.assertGreater(sum(r["cache/pass/radix_cache/tokens_reused"] for r in rows), 0)
        return model_dir, out

    def test_cli_on_the_engine(self):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory(prefix="mezo-engine-cli-") as root:
            model_dir, out = self.run_cli(Path(root), "--lr", "1e-1")
            trained = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).state_dict()
            final = load_file(str(out / "checkpoints" / "step-3" / "trainable.safetensors"))
            start = load_file(str(Path(model_dir) / "model.safetensors"))
            changed = [name for name in final if not torch.equal(final[name], start[name])]
            self.assertTrue(changed)
            for name, value in final.items():
                self.assertTrue(torch.equal(trained[name], value), name)

    def test_cli_lora_on_the_engine(self):
        """``--peft lora --backend sglang``: the engine trains the adapter; ``model/`` is a
        peft adapter holding the last checkpoint's weights, and peft loads it."""
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory(prefix="mezo-engine-cli-lora-") as root:
            model_dir, out = self.run_cli(Path(root), "--peft", "lora", "--lora-rank", "4", "--lr", "1.0")
            saved = load_file(str(out / "model" / "adapter_model.safetensors"))
            final = load_file(str(out / "checkpoints" / "step-3" / "trainable.safetensors"))
            initial = load_file(str(out / "initial_adapter" / "adapter_model.safetensors"))
            self.assertEqual(sorted(saved), sorted(initial))
            self.assertTrue(any(not torch.equal(saved[n], initial[n]) for n in saved))
            for name, value in final.items():
                self.assertTrue(torch.equal(saved[name], value), name)
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            reloaded = PeftModel.from_pretrained(base, str(out / "model"))
            for name, p in reloaded.named_parameters():
                if ".lora_" in name:
                    key = name.replace(".default", "")
                    self.assertTrue(torch.equal(p.detach(), saved[key]), key)


if __name__ == "__main__":
    unittest.main(verbosity=2)
