"""Data-parallel MeZO: a real 2-process gloo run on CPU, launched with torchrun by the test.

The worker (this module run as ``python -m test_mezo_distributed --worker OUT``) trains a
tiny Llama on its shard of the data for K steps in three phases:

A. the default objective in float32, checking rank agreement after every step;
B. a float64 token-weighted NLL evaluated one row at a time (see `RowByRowNLL`), saving the
   weights after every step (rank 0) and the per-step estimates;
C. one rank flips the last bit of one weight: `assert_ranks_agree` must raise on both ranks.

The parent then checks that both ranks hold bit-identical weights after A and B, and that
every step of B matches a single-process step on the union of the two ranks' batches at
the same weights (token weighting) to within the summation-order bound derived in
`TestDataParallelMeZO.test_two_ranks_match_one_process`.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import torch
from mezo_testing import snapshot, tiny_llama, tiny_tokenizer

from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.data import MeZOCollator, MeZODataset, create_dataloader
from sglang.srt.mezo.trainer import MeZOTrainer, direction_seed

WORLD_SIZE = 2
BATCH_SIZE = 2  # examples per rank and step
STEPS = 4  # 8 examples / (2 ranks x 2) = 2 steps per epoch: the run crosses an epoch boundary
DATA_SEED = 11
EPSILON = 1e-3
TIMEOUT_S = 150

RECORDS = [  # completions of 2 to 8 tokens, so token and example weighting differ
    {"prompt": "Question: is the sky blue? Answer:", "completion": " yes"},
    {"prompt": "Question: is fire cold? Answer:", "completion": " no"},
    {"prompt": "Review: a wonderful, moving story. Sentiment:", "completion": " positive"},
    {"prompt": "Review: dull and far too long. Sentiment:", "completion": " negative"},
    {"prompt": "one two three", "completion": " four five six seven eight nine ten"},
    {"prompt": "red green", "completion": " blue yellow black white orange purple"},
    {"prompt": "The movie was", "completion": " great and I loved it."},
    {"prompt": "The film was", "completion": " terrible, I hated every minute."},
]


def _config(**overrides):
    values = {"learning_rate": 1e-3, "epsilon": EPSILON, "seed": 1234, "max_steps": STEPS, "disable_tqdm": True}
    values.update(overrides)
    return MeZOConfig(**values)


class RowByRowNLL:
    """Token-weighted completion NLL ``(sum, count)`` in float64, one unpadded row per forward.

    Each row's log-probs then come from a forward of the same shape whatever batch the row
    is in, so at bitwise-equal weights every token's log-prob is bitwise equal in the
    distributed and the single-process run, and the two losses differ only by the order
    in which the same float64 terms are summed. (The built-in objective forwards padded
    batches, sharing prompt prefixes, whose shapes differ between the two runs: its
    per-token values would also differ by rounding inside the forward.)
    """

    def __call__(self, model, batch):
        total, count = torch.zeros((), dtype=torch.float64), 0
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            keep = mask.bool()
            ids, labels = ids[keep][None], labels[keep][None]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
            targets = labels[0, 1:]
            valid = targets != -100
            logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[:, None])[:, 0]
            total = total - (logp * valid).sum()
            count += int(valid.sum())
        return total, count


class _Recording:
    """A dataloader wrapper recording each batch's input_ids (keeps `sampler` for set_epoch)."""

    def __init__(self, loader):
        self.loader, self.sampler, self.batches = loader, loader.sampler, []

    def __iter__(self):
        for batch in self.loader:
            self.batches.append(batch["input_ids"].tolist())
            yield batch


def _worker(out_dir):
    from sglang.srt.mezo.distributed import (
        agreement_callback,
        assert_ranks_agree,
        destroy_distributed,
        init_distributed,
    )

    torch.set_num_threads(1)
    context = init_distributed(timeout_s=60)
    rank, report = context.rank, {"rank": context.rank, "world_size": context.world_size, "backend": context.backend}
    dataset = MeZODataset(RECORDS, tiny_tokenizer())

    # A: the default objective, float32, agreement checked at the start and after every step.
    loader = _Recording(create_dataloader(dataset, BATCH_SIZE, seed=DATA_SEED))
    trainer = MeZOTrainer(tiny_llama(seed=3), _config())
    report["checksum_start"] = assert_ranks_agree(trainer, 0, include_frozen=True)
    history, check = [], agreement_callback(trainer, every=1)

    def keep_and_check(out, seconds):
        history.append(out.metrics())
        check(out, seconds)

    trainer.train(loader, on_step=keep_and_check)
    report["A"] = {"history": history, "batches": loader.batches}
    torch.save(snapshot(trainer.model), os.path.join(out_dir, f"A_rank{rank}.pt"))

    # B: the float64 row-by-row objective; rank 0 keeps the weights after every step.
    loader = _Recording(create_dataloader(dataset, BATCH_SIZE, seed=DATA_SEED))
    model = tiny_llama(seed=4, dtype=torch.float64)
    trainer = MeZOTrainer(model, _config(dtype="float64"), objective=RowByRowNLL())
    snapshots = [snapshot(model)]
    history = []

    def keep_with_weights(out, seconds):
        history.append(out.metrics())
        snapshots.append(snapshot(model))

    trainer.train(loader, on_step=keep_with_weights)
    report["B"] = {"history": history, "batches": loader.batches}
    report["checksum_end"] = assert_ranks_agree(trainer, trainer.global_step)
    torch.save(snapshot(model), os.path.join(out_dir, f"B_rank{rank}.pt"))
    if rank == 0:
        torch.save(snapshots, os.path.join(out_dir, "B_snapshots.pt"))

    # C: a one-bit difference on rank 1 must make every rank fail loudly.
    if rank == 1:
        weight = model.model.layers[1].mlp.down_proj.weight.data
        bits = weight.view(torch.int64)
        bits[3, 5] ^= 1
    try:
        assert_ranks_agree(trainer, trainer.global_step)
        report["C"] = None
    except RuntimeError as e:
        report["C"] = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    destroy_distributed()


def _gamma(n):
    """Higham's gamma_n = n u / (1 - n u) for float64 (u = 2^-53)."""
    u = 2.0**-53
    return n * u / (1 - n * u)


class TestDataParallelMeZO(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.out = tempfile.mkdtemp(prefix="mezo_dist_")
        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={WORLD_SIZE}",
            "-m",
            "test_mezo_distributed",
            "--worker",
            cls.out,
        ]
        try:
            cls.launch = subprocess.run(
                command, check=False, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"torchrun did not finish in {TIMEOUT_S}s:\n{e.stdout}\n{e.stderr}") from e
        if cls.launch.returncode != 0:
            raise AssertionError(
                f"torchrun failed ({cls.launch.returncode}):\n{cls.launch.stdout[-4000:]}\n{cls.launch.stderr[-8000:]}"
            )
        cls.reports = []
        for rank in range(WORLD_SIZE):
            with open(os.path.join(cls.out, f"rank{rank}.json")) as f:
                cls.reports.append(json.load(f))
        cls.dataset = MeZODataset(RECORDS, tiny_tokenizer())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.out, ignore_errors=True)

    def load(self, name):
        return torch.load(os.path.join(self.out, name), weights_only=True)

    def shard_batches(self, rank):
        """The examples of each step on `rank`, rebuilt from the seeded sampler."""
        loader = create_dataloader(self.dataset, BATCH_SIZE, seed=DATA_SEED, distributed=True, rank=rank, world_size=2)
        steps = []
        for epoch in range(STEPS):
            loader.sampler.set_epoch(epoch)
            order = list(loader.sampler)
            steps += [order[i : i + BATCH_SIZE] for i in range(0, len(order), BATCH_SIZE)]
        return steps[:STEPS]

    def test_ranks_hold_bit_identical_weights(self):
        self.assertEqual([r["world_size"] for r in self.reports], [2, 2])
        self.assertEqual([r["backend"] for r in self.reports], ["gloo", "gloo"])
        self.assertEqual(self.reports[0]["checksum_start"], self.reports[1]["checksum_start"])
        self.assertEqual(self.reports[0]["checksum_end"], self.reports[1]["checksum_end"])
        for phase in ("A", "B"):
            weights = [self.load(f"{phase}_rank{rank}.pt") for rank in range(2)]
            start = snapshot(tiny_llama(seed=3 if phase == "A" else 4, dtype=weights[0]["lm_head.weight"].dtype))
            for name, w0 in weights[0].items():
                w1 = weights[1][name]
                self.assertTrue(torch.equal(w0.view(torch.uint8), w1.view(torch.uint8)), f"{phase}: {name} differs")
            self.assertFalse(all(torch.equal(w, start[n]) for n, w in weights[0].items()), "training changed nothing")
            steps = [r[phase]["history"] for r in self.reports]
            self.assertEqual(len(steps[0]), STEPS)
            self.assertEqual(steps[0], steps[1])  # same all-reduced losses, seeds and gradients on both ranks

    def test_ranks_saw_disjoint_shards_of_each_global_batch(self):
        collate = MeZOCollator(self.dataset.pad_token_id)
        seen = []
        for rank in range(2):
            expected = [
                collate([self.dataset[i] for i in ids])["input_ids"].tolist() for ids in self.shard_batches(rank)
            ]
            self.assertEqual(self.reports[rank]["B"]["batches"], expected)
            self.assertEqual(self.reports[rank]["A"]["batches"], expected)
            seen.append(self.shard_batches(rank))
        for step in range(STEPS):
            self.assertFalse(set(seen[0][step]) & set(seen[1][step]))
        self.assertEqual(sorted(i for s in seen for ids in s[:2] for i in ids), list(range(8)))  # epoch 0 covers all

    def test_divergence_fails_loudly_on_every_rank(self):
        for report in self.reports:
            message = report["C"]
            self.assertIsNotNone(message, f"rank {report['rank']} did not detect the flipped bit")
            self.assertIn(f"disagree at step {STEPS}", message)
            self.assertIn("rank 1 differs from rank 0 in 1 of", message)
            self.assertIn("model.layers.1.mlp.down_proj.weight", message)

    def test_two_ranks_match_one_process(self):
        """Projected gradients equal a single-process step on the union batch, up to summation order.

        Bound. At step s both runs start from the same weights (bitwise: rank 0's saved
        weights) and perturb them with the same seed, and `RowByRowNLL` forwards each row
        alone, so every token's log-prob l_t is bitwise the same in both runs. Each run's
        loss sum T is then a float64 summation tree over the same n terms -- per-rank sums
        followed by the all-reduce, or one sum over the union batch -- and any such tree
        is within gamma_{n-1} * sum|l_t| of the exact sum (Higham, Accuracy and Stability
        of Numerical Algorithms, eq. 4.4), so |T_dist - T_single| <= 2 gamma_{n-1} sum|l_t|.
        The token count N is an exact integer in both. With l_t <= 0, sum|l_t| = N*L, and
        the division by N adds at most one rounding to each, so
            |L_dist - L_single| <= (2 gamma_{n-1} + 2u) |L| <= 2 gamma_{n+1} |L|.
        g = (L+ - L-) / (2 eps) then differs by at most (|dL+| + |dL-|) / (2 eps), plus
        one rounding of the subtraction and one of the division in each run (2u |g| each):
            |g_dist - g_single| <= gamma_{n+1} (|L+| + |L-|) / eps + 4u |g|.
        With n ~ 30 tokens, L ~ 6, eps = 1e-3 this is ~ 1e-11, while averaging the two
        ranks' mean losses instead (example-weighted shards) is off by far more.
        """
        snapshots = self.load("B_snapshots.pt")
        history = self.reports[0]["B"]["history"]
        config = _config(dtype="float64")
        collate = MeZOCollator(self.dataset.pad_token_id)
        shards = [self.shard_batches(rank) for rank in range(2)]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the workers: same kernels, same bits per row
        self.addCleanup(torch.set_num_threads, threads)
        u = 2.0**-53
        weighting_gaps = []
        for step in range(STEPS):
            model = tiny_llama(seed=4, dtype=torch.float64)
            model.load_state_dict(snapshots[step])
            trainer = MeZOTrainer(model, config, objective=RowByRowNLL())
            trainer.global_step = step
            union = collate([self.dataset[i] for i in shards[0][step] + shards[1][step]])
            n = int((union["labels"][:, 1:] != -100).sum())
            # The per-rank means, to show the bound separates token from example weighting.
            seed = direction_seed(config.seed, step, 0)
            means = {}
            for sign in (+1, -1):
                parts = [
                    trainer.backend.loss_sum(
                        trainer.objective, collate([self.dataset[i] for i in s[step]]), seed, sign * EPSILON
                    )
                    for s in shards
                ]
                means[sign] = sum(total / count for total, count in parts) / 2
                self.assertEqual(sum(count for _, count in parts), n)
            single = trainer.step(union)
            dist_out = history[step]
            self.assertEqual(single.seed, dist_out["seed"])
            bound_l = 2 * _gamma(n + 1)
            for key in ("loss_perturbed", "loss_baseline"):
                self.assertLessEqual(abs(getattr(single, key) - dist_out[key]), bound_l * abs(dist_out[key]), key)
            bound_g = _gamma(n + 1) * (abs(dist_out["loss_perturbed"]) + abs(dist_out["loss_baseline"])) / EPSILON
            bound_g += 4 * u * abs(dist_out["coefficient"])
            self.assertLessEqual(abs(single.coefficient - dist_out["coefficient"]), bound_g, f"step {step}")
            g_examples = (means[+1] - means[-1]) / (2 * EPSILON)
            weighting_gaps.append(abs(g_examples - dist_out["coefficient"]) / bound_g)
        self.assertGreater(max(weighting_gaps), 1e3)  # example weighting would fail the bound by far


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker(sys.argv[sys.argv.index("--worker") + 1])
    else:
        unittest.main()
