"""A user's mistakes on the command line: one line, exit status 2, nothing touched.

Every bad input below is answered by ``error: <what is wrong and how to fix it>`` on stderr,
exit status 2 (argparse's convention) and no traceback, before any training, and leaves the
output directory as it was (a directory the failed start created is removed again, lock
included). The Python API raises the same messages as `UsageError` (a ValueError).
Canary: with ``--debug`` the same mistake shows its traceback instead.

Run as ``pytest test/srt/test_mezo_cli_errors.py`` or ``python3 test/srt/test_mezo_cli_errors.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from mezo_testing import run_cli, tiny_llama, tiny_tokenizer

from sglang.srt.mezo import replay
from sglang.srt.mezo.usage_errors import UsageError
from sglang.srt.mezo_trainer import MeZOConfig, main, mezo_finetune

PLAIN = [{"prompt": f"Review {i}:", "completion": " yes" if i % 2 else " no"} for i in range(8)]
CANDIDATES = [{**record, "candidates": [" yes", " no"]} for record in PLAIN]

# (flags, the start of the message after "error: "): each one mistake on an otherwise valid run
BAD_INPUTS = {
    "unknown choice of --peft": (["--peft", "lorra"], "argument --peft: invalid choice: 'lorra'"),
    "unknown --estimator": (["--estimator", "spsa"], "argument --estimator: invalid choice: 'spsa'"),
    "unknown --objective": (["--objective", "f1"], "argument --objective: invalid choice: 'f1'"),
    "unknown --perturbation": (["--perturbation", "uniform"], "argument --perturbation: invalid choice"),
    "unknown --backend": (["--backend", "vllm"], "argument --backend: invalid choice: 'vllm'"),
    "unknown --lr-scheduler": (
        ["--lr-scheduler", "step"],
        "argument --lr_scheduler/--lr-scheduler: invalid choice: 'step'",
    ),
    "not a number": (["--steps", "ten"], "argument --max_steps/--max-steps/--steps: invalid int value: 'ten'"),
    "unknown flag": (["--lr-rate", "1e-3"], "unrecognized arguments: --lr-rate 1e-3"),
    "abbreviated flag": (["--learning-rat", "1e-3"], "unrecognized arguments: --learning-rat 1e-3"),
    "not a device": (["--device", "gpu0"], "--device 'gpu0' (MeZOConfig.device): not a torch device"),
    "CUDA on a machine without it": (["--device", "cuda"], "--device cuda: torch sees no CUDA device"),
    "missing --train-file": (["--train-file", "{tmp}/nope.jsonl"], "--train-file {tmp}/nope.jsonl: no such file"),
    "malformed data": (["--train-file", "{tmp}/broken.jsonl"], "{tmp}/broken.jsonl: line 2"),
    "bad --trainable-patterns regex": (["--trainable-patterns", "layers.(0"], "--trainable-patterns 'layers.(0'"),
    "--lora-rank 0": (["--peft", "lora", "--lora-rank", "0"], "--lora-rank 0 (MeZOConfig.lora_rank): must be >= 1"),
    "unknown --lora-target-modules": (
        ["--peft", "lora", "--lora-target-modules", "q_prj"],
        "--lora-target-modules 'q_prj': ['q_prj'] match no module of the model; its linear layers are",
    ),
    "misspelt local --model": (["--model", "./tiny-mdoel"], "--model ./tiny-mdoel: no such directory or file"),
    "near miss of the default --model": (["--model", "smollm2-13m"], "--model smollm2-13m: no such directory"),
    "candidate objective without candidates": (
        ["--objective", "candidate_ce"],
        "--objective candidate_ce scores candidates, and {tmp}/plain.jsonl has none",
    ),
    "nll on candidate data": (
        ["--objective", "nll", "--train-file", "{tmp}/candidates.jsonl"],
        "--objective nll on {tmp}/candidates.jsonl, which holds candidates",
    ),
    "momentum on the engine": (
        ["--backend", "sglang", "--momentum", "0.9"],
        "--momentum 0.9 (MeZOConfig.momentum): not supported with --backend sglang",
    ),
    "fp32 masters on the engine": (["--backend", "sglang", "--fp32-trainable"], "--fp32-trainable True"),
    "micro-batches on the engine": (["--backend", "sglang", "--micro-batch-size", "4"], "--micro-batch-size 4"),
    "--max-length 1": (["--max-length", "1"], "--max-length 1 (MeZOConfig.max_length): must be >= 2"),
    "negative --micro-batch-size": (
        ["--micro-batch-size", "-1"],
        "--micro-batch-size -1 (MeZOConfig.micro_batch_size): must be >= 0",
    ),
    "negative --memory-budget-mb": (
        ["--memory-budget-mb", "-5"],
        "--memory-budget-mb -5.0 (MeZOConfig.memory_budget_mb)",
    ),
    "--save-total-limit 0": (
        ["--save-total-limit", "0"],
        "--save-total-limit 0 (MeZOConfig.save_total_limit): must be >= 1",
    ),
    "--eval-steps without --eval-file": (
        ["--eval-steps", "5"],
        "--eval-steps 5 (MeZOConfig.eval_steps): evaluates on --eval-file",
    ),
    "--overwrite-output-dir with --resume": (
        ["--overwrite-output-dir", "--resume", "{tmp}/checkpoints"],
        "--overwrite-output-dir True (MeZOConfig.overwrite_output_dir): would remove the run --resume continues",
    ),
    "--resume without a checkpoint": (["--resume", "{tmp}"], "--resume {tmp}: no checkpoint found there"),
    "a non-empty --output-dir": (["--output-dir", "{tmp}/occupied"], "output directory {tmp}/occupied is not empty"),
}


def listing(directory: Path) -> list:
    """Every path under `directory` (None when it does not exist)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else None


class TestCommandLineMistakes(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="mezo-cli-errors-")
        cls.tmp = Path(cls._tmp.name)
        model_dir = cls.tmp / "tiny-model"
        tiny_llama().save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        for name, records in (("plain", PLAIN), ("candidates", CANDIDATES)):
            (cls.tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (cls.tmp / "broken.jsonl").write_text(json.dumps(PLAIN[0]) + '\n{"prompt": "x", "completion": \n')
        (cls.tmp / "occupied").mkdir()
        (cls.tmp / "occupied" / "notes.txt").write_text("a user's file")
        cls.base = ["--model", str(model_dir), "--train-file", str(cls.tmp / "plain.jsonl"), "--steps", "2",
                    "--batch-size", "2", "--disable-tqdm", "--lr", "1e-3", "--epsilon", "1e-2"]  # fmt: skip

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_every_bad_input_is_one_line_exit_2_and_leaves_the_output_dir_as_it_was(self):
        for name, (flags, message) in BAD_INPUTS.items():
            with self.subTest(name):
                out_dir = self.tmp / "runs" / name.replace(" ", "_")
                flags = [f.format(tmp=self.tmp) for f in flags]
                argv = [*self.base, "--output-dir", str(out_dir), *flags]
                watched = Path(flags[flags.index("--output-dir") + 1]) if "--output-dir" in flags else out_dir
                before = listing(watched)
                status, stderr = run_cli(main, argv)
                self.assertEqual(status, 2, stderr)
                self.assertEqual(len(stderr.splitlines()), 1, stderr)
                self.assertTrue(stderr.startswith("error: " + message.format(tmp=self.tmp)), stderr)
                self.assertEqual(listing(watched), before)

    def test_a_late_failing_start_removes_what_it_created(self):
        """A start that fails after the output dir was claimed (the backend's construction
        raising here, as an engine's self-test would) removes the directory it created,
        lock file included, and leaves a pre-existing empty directory empty."""
        from sglang.srt.mezo import recipe

        for existed in (False, True):
            with self.subTest(existed=existed):
                out_dir = self.tmp / "runs" / f"late-{existed}"
                if existed:
                    out_dir.mkdir(parents=True)
                before = listing(out_dir)
                argv = [*self.base, "--output-dir", str(out_dir)]
                with mock.patch.object(recipe, "build_trainer", side_effect=RuntimeError("self-test failed")):
                    with self.assertRaisesRegex(RuntimeError, "self-test failed"):
                        main(argv)
                self.assertEqual(listing(out_dir), before)

    def test_help_lists_every_flag(self):
        """--help renders every field's help (argparse %-formats help strings: a bare '%' once
        made it crash)."""
        from dataclasses import fields

        from sglang.srt.mezo.config import MeZOConfig, flag

        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), self.assertRaises(SystemExit) as exit_:
            main(["--help"])
        self.assertEqual(exit_.exception.code, 0)
        for spec in fields(MeZOConfig):
            self.assertIn(flag(spec.name), stdout.getvalue())

    def test_the_api_raises_the_same_messages(self):
        with self.assertRaisesRegex(UsageError, r"^--lora-rank 0 \(MeZOConfig.lora_rank\): must be >= 1"):
            MeZOConfig(peft="lora", lora_rank=0)
        config = MeZOConfig(train_file=str(self.tmp / "nope.jsonl"), output_dir=str(self.tmp / "runs" / "api"))
        with self.assertRaisesRegex(UsageError, "--train-file .*nope.jsonl: no such file"):
            mezo_finetune(config)
        self.assertFalse((self.tmp / "runs" / "api").exists())

    def test_canary_debug_shows_the_traceback(self):
        with self.assertRaisesRegex(UsageError, "must be >= 1"):
            main([*self.base, "--output-dir", str(self.tmp / "runs" / "debug"), "--lora-rank", "0", "--debug"])
        with mock.patch.dict(os.environ, {"MEZO_DEBUG": "1"}), self.assertRaises(UsageError):
            main([*self.base, "--output-dir", str(self.tmp / "runs" / "debug"), "--save-total-limit", "0"])


class TestQuietStart(unittest.TestCase):
    def test_a_plain_run_is_quiet_and_records_the_defaults_it_used(self):
        """A plain CLI run (no hyperparameter set) in a fresh process: its stderr holds the
        run's own INFO lines only, none of the `LIBRARY_NOISE` that transformers' import of
        torchao prints, nor the libraries' loading bars; its metrics.jsonl header records
        the estimator auto chose, fzoo, and the full-parameter defaults filled in. Canary: the
        same import without the CLI's filters prints that noise on this machine (skipped
        where torchao loads quietly)."""
        import subprocess
        import sys

        from sglang.srt.mezo.config import ESTIMATOR_DEFAULTS
        from sglang.srt.mezo_trainer import LIBRARY_NOISE

        with tempfile.TemporaryDirectory() as tmp:
            tiny_llama().save_pretrained(tmp + "/model")
            tiny_tokenizer().save_pretrained(tmp + "/model")
            Path(tmp, "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PLAIN))
            argv = ["--model", tmp + "/model", "--train-file", tmp + "/train.jsonl", "--steps", "1",
                    "--batch-size", "2", "--disable-tqdm", "--output-dir", tmp + "/out"]  # fmt: skip
            run = subprocess.run(
                [sys.executable, "-m", "sglang.srt.mezo_trainer", *argv], capture_output=True, text=True, timeout=300
            )
            self.assertEqual(run.returncode, 0, run.stderr[-2000:])
            header = json.loads(Path(tmp, "out", "metrics.jsonl").read_text().splitlines()[0])
        self.assertEqual(header["estimator"], "fzoo")
        self.assertEqual(header["defaults"], {"estimator": "fzoo", **ESTIMATOR_DEFAULTS["fzoo"]["full"]})
        lines = run.stderr.splitlines()
        self.assertTrue(lines and all(line.startswith("INFO ") for line in lines), run.stderr)
        plain = subprocess.run(
            [sys.executable, "-c", "import transformers.quantizers"], capture_output=True, text=True, timeout=300
        )
        if not any(pattern.search(plain.stderr) for pattern in LIBRARY_NOISE.values()):
            self.skipTest("torchao imports quietly here: no noise for the canary to show")


class TestReplayMistakes(unittest.TestCase):
    def test_replay_refuses_what_it_cannot_do_in_one_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            status, stderr = run_cli(replay.main, [tmp])
            self.assertEqual(status, 2)
            self.assertEqual(
                stderr, f"error: {tmp} is not a MeZO run directory (no config.json): pass a run's --output-dir\n"
            )
            Path(tmp, "config.json").write_text(json.dumps(MeZOConfig().to_dict()))
            Path(tmp, "metrics.jsonl").write_text("")
            status, stderr = run_cli(replay.main, [tmp, "--check"])
            self.assertEqual(status, 2)
            self.assertEqual(
                stderr, f"error: --check: {Path(tmp) / 'checkpoints'} holds no checkpoint to compare with\n"
            )
            status, stderr = run_cli(replay.main, [tmp, "--chek"])
            self.assertEqual((status, stderr), (2, "error: unrecognized arguments: --chek (see --help)\n"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
