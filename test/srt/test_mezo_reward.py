"""The reward objective (`--reward`): completions generated under each perturbation, scored,
and their mean reward maximised; on the transformers backend, with a tiny random Llama.

The references are written here: greedy decoding as a plain loop of unpadded forwards
(argmax of the last logit, one prompt at a time) and the rewards computed by hand.
"""

import json
import math
import tempfile
import unittest
from pathlib import Path

import mezo_test_rewards
import torch
from mezo_testing import (
    assert_bit_identical,
    perturbed_weights,
    run_cli,
    save_tiny_model,
    snapshot,
    tiny_llama,
    tiny_tokenizer,
)
from safetensors.torch import load_file

from sglang.srt.mezo import replay
from sglang.srt.mezo.generation import GenerationSettings, transformers_completions
from sglang.srt.mezo.rewards import RewardError, load_reward
from sglang.srt.mezo.sampling import gumbel_choice
from sglang.srt.mezo.usage_errors import ConfigError
from sglang.srt.mezo_trainer import MeZOConfig, MeZODataset, MeZOTrainer, create_dataloader, main

WORDS = ["yes", "no", "cat", "dog", "red", "blue", "seven", "a tree"]
RECORDS = [{"prompt": f"Say {w}:" + " please" * (i % 3), "answer": w, "id": i} for i, w in enumerate(WORDS * 2)]
TARGET = 6  # characters: --reward length=6


def hand_length_reward(text: str) -> float:
    return max(0.0, 1.0 - abs(len(text) - TARGET) / TARGET)


def greedy_reference(model, tokenizer, prompt_ids: list, new_tokens: int) -> str:
    """Greedy decoding of one unpadded prompt: argmax of the last position's logits, token by
    token, until EOS or `new_tokens`; the text without special tokens."""
    ids, generated = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
            generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True)


def reward_config(**overrides) -> MeZOConfig:
    values = dict(reward=f"length={TARGET}", max_new_tokens=8, batch_size=4, disable_tqdm=True, seed=3)
    return MeZOConfig(**{**values, **overrides})


class TestRewardObjective(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tok = tiny_tokenizer()
        cls.data = MeZODataset(RECORDS, cls.tok, **reward_config().dataset_options())

    def loader(self, pad_side="right", shuffle=False):
        return create_dataloader(self.data, 4, shuffle=shuffle, seed=0, pad_side=pad_side)

    def test_prompt_only_data_keeps_every_field_and_renders_chats_to_the_generation_prompt(self):
        self.assertEqual(self.data.kind, "prompts")
        self.assertEqual(self.data[5]["record"], RECORDS[5])
        batch = next(iter(self.loader()))
        self.assertEqual(batch["records"], RECORDS[:4])
        self.assertEqual(batch["prompts"], [r["prompt"] for r in RECORDS[:4]])
        self.assertTrue(bool((batch["labels"] == -100).all()))
        chat = [{"messages": [{"role": "user", "content": "Say yes"}], "answer": "yes"}]
        example = MeZODataset(chat, self.tok, prompt_only=True)[0]
        self.assertEqual(example["prompt_text"], "<|user|>Say yes</s><|assistant|>")
        self.assertEqual(self.tok.decode(example["rows"][0][0]), "<|user|>Say yes</s><|assistant|>")
        ends_with_answer = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
        with self.assertRaisesRegex(ValueError, "ends with the assistant's turn"):
            MeZODataset(ends_with_answer, self.tok, prompt_only=True)

    def test_eval_reward_is_the_hand_computed_reward_of_greedy_completions(self):
        # float64 weights: greedy argmax of a left-padded batch and of an unpadded prompt
        # could only differ at a near-tie of two logits (~1e-15 apart): none in these prompts.
        # sdpa: eager attention in float64 turns a left-padded row's fully masked pad queries
        # into NaN, which leak through the pad keys (transformers' behaviour, not ours)
        model = tiny_llama(dtype=torch.float64, attn_implementation="sdpa")
        trainer = MeZOTrainer(model, reward_config(learning_rate=0.0), tokenizer=self.tok)
        for pad_side in ("right", "left"):
            result = trainer.evaluate(self.loader(pad_side))
            expected = [greedy_reference(model, self.tok, self.data[i]["rows"][0][0], 8) for i in range(len(self.data))]
            rewards = [hand_length_reward(text) for text in expected]
            self.assertAlmostEqual(result["reward"], sum(rewards) / len(rewards), places=12)
            self.assertEqual(result["loss"], -result["reward"])  # minimising the loss maximises the reward
            self.assertEqual([s["completion"] for s in result["samples"]], expected[:4])
            self.assertEqual([s["reward"] for s in result["samples"]], rewards[:4])

    def test_stop_strings_end_the_completion_and_are_not_part_of_it(self):
        model = tiny_llama(dtype=torch.float64, attn_implementation="sdpa")
        batch = next(iter(self.loader()))
        free = transformers_completions(model, self.tok, batch, GenerationSettings(8, 0.0, 1.0, (), 1))
        stop = next(ch for ch in free[0][1:] if ch.strip())  # a character the first completion generates
        cut = transformers_completions(model, self.tok, batch, GenerationSettings(8, 0.0, 1.0, (stop,), 1))
        self.assertEqual(cut, [text[: text.find(stop)] if stop in text else text for text in free])
        self.assertNotEqual(cut[0], free[0])

    def test_common_random_numbers_make_passes_at_eps_zero_generate_the_same_text(self):
        trainer = MeZOTrainer(tiny_llama(), reward_config(learning_rate=0.0, num_samples=2), tokenizer=self.tok)
        batch = next(iter(self.loader()))
        step = trainer.objective.at_step(7)
        passes = [trainer.backend.completions(step, batch, seed, 0.0) for seed in (11, 12, None)]
        self.assertEqual(len(passes[0]), 8)  # two samples per prompt
        self.assertEqual(passes[0], passes[1])
        self.assertEqual(passes[0], passes[2])
        # sampling is on: the two samples of a prompt differ somewhere in the batch
        self.assertTrue(any(a != b for a, b in zip(passes[0][::2], passes[0][1::2])))
        # canary: each pass with its own random numbers (no common seed) generates other text
        other_step = trainer.objective.at_step(8)
        self.assertNotEqual(trainer.backend.completions(other_step, batch, 11, 0.0), passes[0])
        torch.manual_seed(0)  # no common seed at all: sampling from the global RNG
        first = self.sample_unseeded(trainer, batch)
        self.assertNotEqual(self.sample_unseeded(trainer, batch), first)

    @staticmethod
    def sample_unseeded(trainer, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = trainer.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=8, top_k=None, pad_token_id=0
        )
        return out[:, ids.shape[1] :].tolist()

    def test_lora_generation_under_a_perturbation_is_generation_from_the_perturbed_weights(self):
        """A pass generates from w + eps z: the same text as a model whose LoRA tensors hold
        w + eps z written as plain weights (`perturbed_weights`); canary: per-unit hooks on
        peft's wrapper (which generate() bypasses) generate from w instead."""
        from sglang.srt.mezo.perturbation import UnitScopedPerturbation

        config = reward_config(peft="lora", learning_rate=0.0, epsilon=1e-1, perturbation="gaussian")
        trainer = MeZOTrainer(tiny_llama(), config, tokenizer=self.tok)
        with torch.no_grad():  # B = 0 would make the first perturbation of A invisible
            for t in trainer.backend.tensors:
                if ".lora_B." in t.name:
                    t.param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
        batch, at, seed = next(iter(self.loader())), trainer.objective.at_step(4), 99
        passed = trainer.backend.completions(at, batch, seed, 0.5)
        with perturbed_weights(trainer, seed, 0.5):
            written = trainer.backend.completions(at, batch)
        self.assertEqual(passed, written)
        self.assertNotEqual(passed, trainer.backend.completions(at, batch))
        backend = trainer.backend
        backend.perturbation.remove()
        backend.perturbation = UnitScopedPerturbation(backend.tensors, "gaussian", backend.versions, root=trainer.model)
        self.assertEqual(backend.completions(at, batch, seed, 0.5), backend.completions(at, batch))

    def test_learning_rate_zero_leaves_the_weights_bit_exact_with_generation_in_the_loop(self):
        cases = {  # the restore log, per-unit copies, then structured directions (masked, low-rank)
            "fzoo rademacher": dict(estimator="fzoo", num_directions=2, perturbation="rademacher"),
            "fzoo gaussian": dict(estimator="fzoo", num_directions=2, perturbation="gaussian"),
            "sparse": dict(estimator="sparse"),
            "lowrank": dict(estimator="lowrank"),
        }
        for name, estimator in cases.items():
            with self.subTest(name):
                model = tiny_llama()
                before = snapshot(model)
                config = reward_config(learning_rate=0.0, max_steps=4, **estimator)
                trainer = MeZOTrainer(model, config, tokenizer=self.tok)
                trainer.train(self.loader(shuffle=True))
                self.assertEqual(trainer.global_step, 4)
                assert_bit_identical(self, model, before)

    def test_a_batch_without_prompts_is_refused_by_name(self):
        trainer = MeZOTrainer(tiny_llama(), reward_config(learning_rate=0.0), tokenizer=self.tok)
        plain = MeZODataset([{"prompt": "Say yes:", "completion": " yes"}], self.tok)
        with self.assertRaisesRegex(ValueError, "prompt_only=True"):
            trainer.step(next(iter(create_dataloader(plain, 1))))

    def test_each_bad_reward_output_is_a_one_line_error_naming_the_reward(self):
        cases = {
            "raise": "--reward mezo_test_rewards:scripted raised KeyError: 'answer'",
            "nan": "--reward mezo_test_rewards:scripted returned nan for completion 0",
            "count": "--reward mezo_test_rewards:scripted returned 5 values for 4 completions",
        }
        batch = next(iter(self.loader()))
        for kind, message in cases.items():
            with self.subTest(kind=kind):
                config = reward_config(reward="mezo_test_rewards:scripted", learning_rate=1e-3, epsilon=1e-2)
                trainer = MeZOTrainer(tiny_llama(), config, tokenizer=self.tok)
                mezo_test_rewards.FAULT.update(at_call=mezo_test_rewards.CALLS["n"] + 2, kind=kind)
                with self.assertRaises(RewardError) as caught:
                    trainer.step(batch)
                self.assertIn(message, str(caught.exception))
                self.assertNotIn("\n", str(caught.exception))
        mezo_test_rewards.FAULT.update(at_call=None, kind=None)


class TestSeededSampling(unittest.TestCase):
    """The shared sampling rule draws from softmax(logits / T) over the top-p nucleus."""

    LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    DRAWS = 4000
    # Pearson's statistic over k categories is chi-square with k - 1 degrees of freedom for
    # a correct sampler; its 1 - 1e-6 quantile (scipy.stats.chi2.ppf): 4 dof 33.38, 2 dof
    # 27.63. A correct rule fails with probability 1e-6 (the seeds are fixed: it passes
    # or fails the same way every run).
    CHI2_LIMIT = {4: 33.38, 2: 27.63}

    @staticmethod
    def pearson(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
        expected = probabilities * counts.sum()
        return float(((counts - expected) ** 2 / expected).sum())

    def draws(self, temperature, top_p, rule=gumbel_choice) -> torch.Tensor:
        logits = self.LOGITS.expand(self.DRAWS, -1)
        choices = rule(logits, list(range(self.DRAWS)), [3] * self.DRAWS, temperature, top_p)
        return torch.bincount(torch.tensor(choices), minlength=5).double()

    def test_frequencies_follow_the_tempered_softmax_and_the_nucleus(self):
        expected = torch.softmax(self.LOGITS.double() / 0.7, -1)
        self.assertLess(self.pearson(self.draws(0.7, 1.0), expected), self.CHI2_LIMIT[4])
        # top-p 0.8 at T = 1: probabilities .61, .22, .14, ...: the nucleus is the first three
        full = torch.softmax(self.LOGITS.double(), -1)
        counts = self.draws(1.0, 0.8)
        self.assertEqual(counts[3:].tolist(), [0.0, 0.0])
        self.assertLess(self.pearson(counts[:3], full[:3] / full[:3].sum()), self.CHI2_LIMIT[2])

    def test_canary_uniform_noise_is_not_a_sample_of_the_softmax(self):
        def uniform_noise_rule(logits, seeds, positions, temperature, top_p):
            generator = torch.Generator().manual_seed(0)
            return (logits / temperature + torch.rand(logits.shape, generator=generator)).argmax(-1).tolist()

        expected = torch.softmax(self.LOGITS.double() / 0.7, -1)
        self.assertGreater(self.pearson(self.draws(0.7, 1.0, uniform_noise_rule), expected), 10 * self.CHI2_LIMIT[4])


class TestBuiltinRewards(unittest.TestCase):
    def score(self, spec, completions, examples):
        return load_reward(spec)([""] * len(completions), completions, examples)

    def test_each_built_in_scores_by_its_rule(self):
        answers = [{"answer": "yes"}] * 3
        self.assertEqual(self.score("exact_match", [" yes\n", "Yes", "yes  no"], answers), [1.0, 0.0, 0.0])
        math_answers = [{"answer": "42"}, {"answer": "\\frac{1}{2}"}, {"answer": "7"}]
        self.assertEqual(self.score("math", ["The answer is 42.", "0.5", "I think 8"], math_answers), [1.0, 1.0, 0.0])
        self.assertEqual(self.score("length=4", ["abcd", "ab", "abcdefghij"], answers), [1.0, 0.5, 0.0])
        self.assertEqual(self.score("regex=[0-9]+", [" 12 ", "12a", ""], answers), [1.0, 0.0, 0.0])
        import reasoning_gym

        entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=1)[0]
        self.assertEqual(self.score("reasoning_gym", [f" {entry['answer']}", "nope"], [entry, entry]), [1.0, 0.0])

    def test_a_bad_reward_name_is_a_config_error_naming_it(self):
        cases = {
            "exact": "not a built-in reward",
            "length=abc": "length=N needs a whole number",
            "regex=(": "is not a regular expression",
            "no_such_module_here:f": "cannot import module 'no_such_module_here'",
            "mezo_test_rewards:missing": "module 'mezo_test_rewards' has no callable 'missing'",
            "exact_match=1": "takes no argument",
        }
        for spec, message in cases.items():
            with self.subTest(spec=spec), self.assertRaisesRegex(ConfigError, message):
                load_reward(spec)


class TestRewardConfig(unittest.TestCase):
    def test_reward_sets_the_objective_and_contradictions_are_refused(self):
        self.assertEqual(MeZOConfig(reward="exact_match").objective, "reward")
        self.assertTrue(MeZOConfig(reward="exact_match").dataset_options()["prompt_only"])
        refused = {
            "needs a reward function": dict(objective="reward"),
            "--objective nll does not generate": dict(objective="nll", reward="exact_match"),
            "--temperature -1.0": dict(reward="exact_match", temperature=-1.0),
            "--top-p 0.0": dict(reward="exact_match", top_p=0.0),
            "--num-samples 0": dict(reward="exact_match", num_samples=0),
            "--stop": dict(reward="exact_match", stop=[""]),
        }
        for message, values in refused.items():
            with self.subTest(values=values), self.assertRaisesRegex(ConfigError, message):
                MeZOConfig(**values)


class TestRewardCommandLine(unittest.TestCase):
    """A reward run from the command line: its outputs, a failing reward's checkpoint, and a
    resume that continues it bit for bit."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="mezo-reward-")
        cls.tmp = Path(cls._tmp.name)
        save_tiny_model(cls.tmp / "model")
        for split, records in (("train", RECORDS), ("eval", RECORDS[:4])):
            (cls.tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def argv(self, out: str) -> list:
        return [
            "--model", str(self.tmp / "model"), "--train-file", str(self.tmp / "train.jsonl"),
            "--eval-file", str(self.tmp / "eval.jsonl"), "--reward", "mezo_test_rewards:scripted",
            "--max-new-tokens", "6", "--steps", "4", "--batch-size", "4", "--lr", "0.05", "--epsilon", "0.05",
            "--output-dir", str(self.tmp / out), "--disable-tqdm", "--save-steps", "1",
        ]  # fmt: skip

    def test_a_failing_reward_stops_with_one_line_and_a_checkpoint_that_resumes_bit_for_bit(self):
        mezo_test_rewards.FAULT.update(at_call=None, kind=None)
        self.assertEqual(run_cli(main, self.argv("whole"))[0], 0)
        whole = self.tmp / "whole"
        rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
        self.assertEqual([r["step"] for r in rows], [0, 1, 2, 3])
        for row in rows:  # two passes per step (mezo, q = 1), four completions each
            self.assertEqual(row["reward"]["samples"], 8)
            self.assertAlmostEqual(row["reward"]["mean"], -(row["loss_perturbed"] + row["loss_baseline"]) / 2)
        results = json.loads((whole / "eval.json").read_text())
        self.assertEqual(results["after"]["objective"], "reward")
        self.assertEqual(len(results["after"]["samples"]), 4)
        self.assertTrue((whole / "loss.png").is_file())
        # replay needs no generation: the log's (seed, coefficient) pairs rebuild the weights
        self.assertEqual(run_cli(replay.main, [str(whole), "--check"]), (0, ""))

        # eval before (1 call), steps 0 and 1 (2 calls each): the 6th call fails, in step 2
        mezo_test_rewards.FAULT.update(at_call=mezo_test_rewards.CALLS["n"] + 6, kind="nan")
        status, stderr = run_cli(main, self.argv("broken"))
        self.assertEqual(status, 2)
        self.assertIn("error: --reward mezo_test_rewards:scripted returned nan for completion 0", stderr)
        self.assertIn("RewardError after step 2; step 2 is checkpointed", stderr)
        broken = self.tmp / "broken"
        self.assertTrue((broken / "checkpoints" / "step-2").is_dir())
        status, _ = run_cli(main, self.argv("broken") + ["--resume", str(broken / "checkpoints")])
        self.assertEqual(status, 0)

        def comparable(path):
            return [{k: v for k, v in json.loads(line).items() if k != "seconds" and not k.startswith("cache/")}
                    for line in path.read_text().splitlines()]  # fmt: skip

        self.assertEqual(comparable(broken / "metrics.jsonl"), comparable(whole / "metrics.jsonl"))
        for name in ("trainable.safetensors",):
            a = load_file(str(whole / "checkpoints" / "step-4" / name))
            b = load_file(str(broken / "checkpoints" / "step-4" / name))
            self.assertEqual(sorted(a), sorted(b))
            for key in a:
                self.assertTrue(torch.equal(a[key], b[key]), key)
        self.assertFalse(math.isnan(json.loads((broken / "eval.json").read_text())["after"]["reward"]))


if __name__ == "__main__":
    unittest.main()
