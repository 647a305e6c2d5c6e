"""``--backend sglang`` end to end, and an engine that crashes: each test starts and stops its
own engine (upstream's Engine.shutdown stops every engine of the process, so these live
apart from `test_mezo_sglang`'s shared engines).

Run as ``pytest test/srt/test_mezo_sglang_cli.py`` or ``python3 test/srt/test_mezo_sglang_cli.py``.
"""

from __future__ import annotations

import gc
import json
import tempfile
import unittest
import weakref
from pathlib import Path
from unittest import mock

import psutil
import torch
from mezo_testing import tiny_llama, tiny_tokenizer

from sglang.srt.mezo.backends.engine_launch import EngineCrashed, launch_engine


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

    def test_a_scheduler_dying_after_start_up_raises_in_the_trainer(self):
        """A request the scheduler cannot serve (a token id past the vocabulary: its
        embedding raises and the scheduler dies, SIGQUITting this process) ends in
        `EngineCrashed` at the backend's call, the engine's processes stopped, and this
        process goes on. (Without the watch, upstream's running-phase handler kills this
        process's whole tree, the test runner included, so that canary is not run here:
        it is what the TP failure under ATEN_CPU_CAPABILITY=avx2 did to the suite.)"""
        from sglang.srt.mezo.backends.engine_launch import EngineCrashWatch
        from sglang.srt.mezo.backends.sglang_backend import SGLangBackend
        from sglang.srt.mezo.config import MeZOConfig

        with tempfile.TemporaryDirectory(prefix="mezo-engine-dies-") as root:
            tiny_llama(hidden=64, attn_implementation="sdpa").save_pretrained(root)
            tiny_tokenizer().save_pretrained(root)
            engine = launch_engine(root)
            config = MeZOConfig(learning_rate=0.0, epsilon=1e-3, disable_tqdm=True)
            backend = SGLangBackend(engine, config, root, crash_watch=EngineCrashWatch(engine))
            ids = torch.tensor([[5, 6, 7, 10**6]])  # the vocabulary has 384 tokens
            batch = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([[-100, -100, 7, 8]]),
            }
            with self.assertRaisesRegex(EngineCrashed, "scheduler process died while serving a request"):
                backend.row_logprobs(batch)
        engine_processes = [c for c in psutil.Process().children(recursive=True) if c.name().startswith("sglang::")]
        self.assertEqual(engine_processes, [])


class TestSGLangMainJob(unittest.TestCase):
    """``--backend sglang`` end to end: the engine trains, the saved HF dir holds its weights,
    and the trainer process holds no host copy of the model while training."""

    def run_cli(self, root: Path, *extra) -> tuple:
        """Runs the CLI; `self.host_models` are weak references to every model the host loaded,
        and `self.alive_in_training` those still alive (after a collection) when training starts."""
        from sglang.srt.mezo import recipe
        from sglang.srt.mezo_trainer import main

        self.host_models, self.alive_in_training = [], None
        load, train = recipe.load_model_and_tokenizer, recipe.train

        def watched_load(*args, **kwargs):
            model, tokenizer = load(*args, **kwargs)
            self.host_models.append(weakref.ref(model))
            return model, tokenizer

        def watched_train(run):
            gc.collect()
            self.alive_in_training = [ref for ref in self.host_models if ref() is not None]
            return train(run)

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
        with mock.patch.object(recipe, "load_model_and_tokenizer", watched_load):
            with mock.patch.object(recipe, "train", watched_train):
                results = main(
                    ["--backend", "sglang", "--model", model_dir, "--train-file", str(data), "--eval-file", str(data)]
                    + ["--steps", "3", "--epsilon", "1e-2", "--batch-size", "2", "--output-dir", str(out)]
                    + ["--disable-tqdm", *extra]
                )
        self.assertEqual(self.alive_in_training, [])
        self.assertFalse((out / "engine_model").exists())  # the engine served model_dir itself
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
            self.assertEqual(self.host_models, [])  # the host loads only the tokenizer
            trained = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).state_dict()
            final = load_file(str(out / "checkpoints" / "step-3" / "trainable.safetensors"))
            start = load_file(str(Path(model_dir) / "model.safetensors"))
            changed = [name for name in final if not torch.equal(final[name], start[name])]
            self.assertTrue(changed)
            for name in start:
                self.assertTrue(torch.equal(trained[name], final.get(name, start[name])), name)

    def test_cli_lora_on_the_engine(self):
        """``--peft lora --backend sglang``: the engine trains the adapter; ``model/`` is a
        peft adapter holding the last checkpoint's weights, and peft loads it."""
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory(prefix="mezo-engine-cli-lora-") as root:
            model_dir, out = self.run_cli(Path(root), "--peft", "lora", "--lora-rank", "4", "--lr", "1.0")
            self.assertEqual(len(self.host_models), 1)  # loaded to initialise the adapter, released since
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

    def test_cli_reward_on_the_engine(self):
        """``--reward`` with ``--backend sglang``: the engine (started with the sampling
        processor) generates every pass's completions; the reward reaches metrics.jsonl and
        eval.json as on the transformers backend."""
        from sglang.srt.mezo_trainer import main

        with tempfile.TemporaryDirectory(prefix="mezo-engine-cli-reward-") as root:
            root = Path(root)
            tiny_llama(hidden=64, attn_implementation="sdpa").save_pretrained(root / "tiny")
            tiny_tokenizer().save_pretrained(root / "tiny")
            prompts = [{"prompt": f"Say {w}:", "answer": w} for w in ("yes", "no", "cat", "dog")]
            (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
            results = main(
                ["--backend", "sglang", "--model", str(root / "tiny"), "--train-file", str(root / "prompts.jsonl")]
                + ["--eval-file", str(root / "prompts.jsonl"), "--reward", "mezo_test_rewards:short"]
                + ["--max-new-tokens", "4", "--steps", "2", "--batch-size", "2", "--lr", "1e-1", "--epsilon", "1e-2"]
                + ["--output-dir", str(root / "out"), "--disable-tqdm"]
            )
            self.assertEqual(results["steps"], 2)
            self.assertEqual(results["after"]["objective"], "reward")
            self.assertEqual(len(results["after"]["samples"]), 4)
            rows = [json.loads(x) for x in (root / "out" / "metrics.jsonl").read_text().splitlines()]
            self.assertEqual([r["reward"]["samples"] for r in rows], [4, 4])  # mezo: 2 passes x 2 prompts


if __name__ == "__main__":
    unittest.main(verbosity=2)
