"""MeZO on an upstream SGLang Engine: a mocked engine for the protocol, a real one on CPU.

Run as ``pytest test/srt/test_mezo_sglang.py`` or ``python3 test/srt/test_mezo_sglang.py``.
"""

from __future__ import annotations

import json
import math
import tempfile
import unittest
from pathlib import Path

import torch
from mezo_testing import tiny_llama, tiny_tokenizer
from test_mezo_trainer import candidate_batch

from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.objectives import CompletionNLL
from sglang.srt.mezo.sglang_backend import SGLangBackend, launch_engine
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

    def collective_rpc(self, method, **kwargs):
        self.calls.append((method, kwargs))
        if method == "mezo_setup":
            report = {"checked": 2, "mismatched": self.mismatched, "missing": [], "tensors": [["w", [2]]]}
            Path(kwargs["result_path"]).write_text(json.dumps(report))
        elif method == "mezo_begin":
            self.scale = kwargs["scale"]
        elif method == "mezo_end":
            self.scale = 0.0

    def flush_cache(self):
        self.calls.append(("flush_cache", {}))

    def generate(self, input_ids, sampling_params, return_logprob, logprob_start_len):
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
        with self.assertRaisesRegex(NotImplementedError, "peft"):
            SGLangBackend(FakeEngine(), MeZOConfig(peft="lora"), "unused")


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
        """Per-token log-probs within 2^-20 of transformers; losses of both passes too; the
        projected gradients then differ by at most (|dL+| + |dL-|) / (2 eps)."""
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
            self.assertLessEqual(abs(a.projected_grad - b.projected_grad), (d_plus + d_minus) / (2 * 1e-3) + 1e-12)
            self.assertGreater(abs(b.projected_grad), 100 * LOGPROB_TOL / 1e-3)  # a real signal, not noise

    def test_lr0_steps_leave_engine_weights_bit_identical_and_updates_match(self):
        before = self.backend.checksum()
        trainer = MeZOTrainer(None, self.config, backend=self.backend)
        for _ in range(2):
            trainer.step(candidate_batch())
        self.assertEqual(self.backend.checksum(), before)
        # one explicit update in both backends: same kernel, same z -> same bits
        self.backend.apply_update([(123, 0.5)], lr=1e-2)
        self.reference.backend.apply_update([(123, 0.5)], lr=1e-2)
        after = self.backend.checksum()
        self.assertNotEqual(after, before)
        import hashlib

        hf_digest = {
            name: hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
            for name, t in self.reference.backend.trainable_state().items()
        }
        self.assertEqual(after, hf_digest)
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

    def test_objective_values_match(self):
        batch = candidate_batch()
        total, count = self.backend.loss_sum(CompletionNLL(), batch)
        ref_total, ref_count = self.reference.backend.loss_sum(CompletionNLL(), batch)
        self.assertEqual(count, ref_count)
        self.assertLessEqual(abs(total - ref_total) / count, LOGPROB_TOL)


class TestSGLangMainJob(unittest.TestCase):
    """``--backend sglang`` end to end: the engine trains, the saved HF dir holds its weights."""

    def test_cli_on_the_engine(self):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        from sglang.srt.mezo_trainer import main

        with tempfile.TemporaryDirectory(prefix="mezo-engine-cli-") as root:
            model_dir = str(Path(root) / "tiny")
            tiny_llama(hidden=64, attn_implementation="sdpa").save_pretrained(model_dir)
            tiny_tokenizer().save_pretrained(model_dir)
            data = Path(root) / "train.jsonl"
            records = [
                {"prompt": f"Review: {w}", "completion": c, "candidates": [" yes", " no"]}
                for w, c in (("great", " yes"), ("dull", " no"), ("good", " yes"), ("cold", " no"))
            ]
            data.write_text("".join(json.dumps(r) + "\n" for r in records))
            out = Path(root) / "out"
            results = main(
                ["--backend", "sglang", "--model", model_dir, "--train-file", str(data), "--eval-file", str(data)]
                + ["--steps", "3", "--lr", "1e-1", "--epsilon", "1e-2", "--batch-size", "2", "--output-dir", str(out)]
                + ["--disable-tqdm"]
            )
            self.assertEqual(results["steps"], 3)
            self.assertEqual(results["before"]["examples"], 4)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            self.assertEqual(len(rows), 3)
            self.assertGreater(sum(r["cache/pass/radix_cache/tokens_reused"] for r in rows), 0)
            trained = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).state_dict()
            final = load_file(str(out / "checkpoints" / "step-3" / "trainable.safetensors"))
            start = load_file(str(Path(model_dir) / "model.safetensors"))
            changed = [name for name in final if not torch.equal(final[name], start[name])]
            self.assertTrue(changed)
            for name, value in final.items():
                self.assertTrue(torch.equal(trained[name], value), name)


if __name__ == "__main__":
    unittest.main(verbosity=2)
