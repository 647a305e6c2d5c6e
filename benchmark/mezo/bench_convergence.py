"""Forward passes to a good model: every estimator against tuned MeZO at equal budgets.

SmolLM2-135M-Instruct with LoRA (rank 8 on q/v, the CLI's default targets) on two
prompt-based binary tasks answered by words the model knows:

* ``demo``: the shipped review sentiment task (python/sglang/srt/mezo/demo_data/); the last
  64 training examples are the validation split, eval.jsonl's first 128 the test split.
* ``vader``: word polarity from the human ratings of the VADER lexicon (the
  ``vaderSentiment`` package's vader_lexicon.txt: ten raters per word, -4..+4):
  words of four or more letters that the tokenizer holds as one token (words the model
  knows, not slang acronyms)
  whose mean rating is at least 1.5 from neutral and whose raters all agree on the sign,
  asked "Is the word ... positive or negative?".

Protocol: for each estimator, a grid of the same size (2 learning rates at the epsilon,
q and z of its LoRA default) is run with seed 0; the grid point with the best validation
accuracy at the budget (ties: lower validation loss) is then run with seeds 1 and 2; the
table reports test accuracy mean +- std over the 3 seeds at fixed forward-pass budgets
and the passes each seed needed to reach a target test accuracy ('-': not within the
budget). Budgets count forward passes over a training batch of 8 (MeZO: 2 per step,
FZOO with q directions: q + 1), never steps. The rows "defaults" run what a user gets
with no hyperparameter set: ``MeZOConfig(peft="lora")`` (``--peft lora``) and
``MeZOConfig()`` (full-parameter), 3 seeds. ``--quick`` runs the two defaults rows and
MeZO at its grid's first learning rate, one seed each.

    python benchmark/mezo/bench_convergence.py            # full: ~30 min on 2 cores
    python benchmark/mezo/bench_convergence.py --quick    # < 5 min

Writes convergence.json and convergence.png (accuracy vs forward passes) to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import setup_threads
from tasks import vader_words

from sglang.srt.mezo.config import ESTIMATOR_DEFAULTS, MeZOConfig
from sglang.srt.mezo.data import MeZODataset, create_dataloader
from sglang.srt.mezo.estimators import ESTIMATORS
from sglang.srt.mezo.model_io import load_model_and_tokenizer
from sglang.srt.mezo.trainer import MeZOTrainer

DEMO_DIR = Path(__file__).resolve().parents[2] / "python/sglang/srt/mezo/demo_data"
BATCH_SIZE = 8
SEEDS = (0, 1, 2)  # of the chosen grid point and the defaults rows (full mode)

# Each estimator's grid: 2 learning rates (the same count for every method, what a 30
# minute budget allows) at the epsilon, q and z of its LoRA default (ESTIMATOR_DEFAULTS).
# Chosen from a coarse scan at 60-120 passes: larger rates diverge within the budget.
GRIDS = {
    "mezo": (1e-3, 3e-3),
    "fzoo": (1e-2, 2e-2),
    "sparse": (3e-3, 1e-2),
    "lowrank": (1e-3, 3e-3),
}
MODES = {
    # evaluation points (the last is the budget), estimators compared (quick: MeZO only, as the
    # baseline of the defaults), the whole grid or its first point, seeds of the chosen
    # point, examples in the validation / test splits
    "full": dict(points=(0, 50, 100), estimators=ESTIMATORS, grid=True, seeds=SEEDS, val=32, test=64),
    "quick": dict(points=(0, 50, 100), estimators=("mezo",), grid=False, seeds=(0,), val=32, test=64),
}
TARGET = {"demo": 0.6, "vader": 0.7}


# ----------------------------------------------------------------------------- tasks
def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def demo_task(work: Path, val: int, test: int, tokenizer=None) -> dict:
    train = [json.loads(line) for line in (DEMO_DIR / "train.jsonl").read_text().splitlines()]
    evaluation = [json.loads(line) for line in (DEMO_DIR / "eval.jsonl").read_text().splitlines()]
    return {
        "train": write_jsonl(work / "demo_train.jsonl", train[:-64]),
        "val": write_jsonl(work / "demo_val.jsonl", train[-64:][:val]),
        "test": write_jsonl(work / "demo_test.jsonl", evaluation[:test]),
    }


def vader_task(work: Path, val: int, test: int, tokenizer) -> dict:
    words = vader_words(tokenizer)
    random.Random(0).shuffle(words)
    records = [
        {
            "prompt": f"Is the word '{word}' positive or negative?\nAnswer:",
            "completion": f" {label}",
            "candidates": [" positive", " negative"],
        }
        for word, label in words
    ]
    return {
        "train": write_jsonl(work / "vader_train.jsonl", records[val + test :]),
        "val": write_jsonl(work / "vader_val.jsonl", records[:val]),
        "test": write_jsonl(work / "vader_test.jsonl", records[val : val + test]),
    }


# ----------------------------------------------------------------------------- runs
@dataclass
class Curve:
    estimator: str
    learning_rate: float
    epsilon: float
    num_directions: int
    seed: int
    points: list  # [(passes, val accuracy, val loss, test accuracy)]
    seconds: float


def run(base, tokenizer, datasets: dict, config: MeZOConfig, points: tuple, initial=None) -> Curve:
    """Trains a copy of `base` (with a fresh LoRA), evaluating at each budget in `points`;
    `initial`, if given, is the evaluation at 0 passes (the base model's: a fresh LoRA's B
    is zero), else it is measured."""
    loaders = {
        split: create_dataloader(data, BATCH_SIZE, shuffle=split == "train", seed=config.seed)
        for split, data in datasets.items()
    }
    torch.manual_seed(config.seed)  # the LoRA initialisation of this seed
    trainer = MeZOTrainer(copy.deepcopy(base), config, tokenizer=tokenizer)
    per_step = trainer.estimator.passes_per_step()
    started, passes, curve = time.perf_counter(), 0, []

    def record():
        val, test = trainer.evaluate(loaders["val"]), trainer.evaluate(loaders["test"])
        curve.append((passes, val["accuracy"], val["loss"], test["accuracy"]))

    if initial is None:
        record()
    else:
        curve.append(initial)
    budget = max(points)
    while passes + per_step <= budget:
        for batch in loaders["train"]:
            trainer.step(batch)
            passes += per_step
            if any(passes - per_step < p <= passes for p in points[1:]):
                record()
            if passes + per_step > budget:
                break
    if curve[-1][0] != passes:
        record()
    return Curve(
        config.estimator, config.learning_rate, config.epsilon, config.num_directions, config.seed, curve,
        time.perf_counter() - started,
    )  # fmt: skip


class Runs:
    """The runs of one task, each config once (the defaults are also a grid point)."""

    def __init__(self, base, tokenizer, files: dict, points: tuple):
        self.base, self.tokenizer, self.points = base, tokenizer, points
        options = MeZOConfig().dataset_options()  # the data options are not estimator settings
        self.datasets = {split: MeZODataset(str(path), tokenizer, **options) for split, path in files.items()}
        self.done: dict = {}
        self.initial = None  # the base model's evaluation, shared by every run

    def get(self, config: MeZOConfig) -> Curve:
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in self.done:
            self.done[key] = run(self.base, self.tokenizer, self.datasets, config, self.points, self.initial)
            self.initial = self.done[key].points[0]
        return self.done[key]


def at_budget(curve: Curve, budget: int) -> tuple:
    """The last evaluation at or before `budget` passes."""
    return [p for p in curve.points if p[0] <= budget][-1]


def passes_to(curve: Curve, target: float):
    return next((p[0] for p in curve.points if p[3] >= target), None)


def summarise(curves: list, points: tuple, target: float) -> dict:
    row = {}
    for budget in points:
        accs = [at_budget(c, budget)[3] for c in curves]
        row[budget] = (statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0)
    reached = [passes_to(c, target) for c in curves]
    row["to_target"] = reached
    return row


def config_for(estimator: str, lr: float, seed: int) -> MeZOConfig:
    """LoRA at learning rate `lr` with the rest of `estimator`'s LoRA defaults (epsilon, q, z)."""
    defaults = {**ESTIMATOR_DEFAULTS[estimator]["lora"], "learning_rate": lr}
    return MeZOConfig(estimator=estimator, peft="lora", seed=seed, batch_size=BATCH_SIZE, disable_tqdm=True, **defaults)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="< 5 minutes: fewer passes, defaults only, one seed")
    parser.add_argument("--tasks", default="demo,vader")
    parser.add_argument("--estimators", help="comma-separated (default: the mode's)")
    parser.add_argument("--out", type=Path, default=Path("mezo_output/bench_convergence"))
    args = parser.parse_args()
    setup_threads()
    mode = MODES["quick" if args.quick else "full"]
    points = mode["points"]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, tokenizer = load_model_and_tokenizer("smollm2-135m")
    results = {"mode": "quick" if args.quick else "full", "points": points, "tasks": {}}
    with tempfile.TemporaryDirectory() as work:
        for task in args.tasks.split(","):
            files = (demo_task if task == "demo" else vader_task)(Path(work), mode["val"], mode["test"], tokenizer)
            runs = Runs(base, tokenizer, files, points)

            table = {}
            for estimator in args.estimators.split(",") if args.estimators else mode["estimators"]:
                grid = GRIDS[estimator] if mode["grid"] else GRIDS[estimator][:1]
                tried = [runs.get(config_for(estimator, lr, 0)) for lr in grid]
                best = max(tried, key=lambda c: (c.points[-1][1], -c.points[-1][2]))  # val accuracy, then loss
                seeds = [runs.get(config_for(estimator, best.learning_rate, s)) for s in mode["seeds"]]
                table[estimator] = {
                    "lr": best.learning_rate,
                    "grid_val_accuracy": {c.learning_rate: c.points[-1][1] for c in tried},
                    "summary": summarise(seeds, points, TARGET[task]),
                    "curves": [c.__dict__ for c in seeds],
                }
                print(f"[{time.perf_counter() - started:5.0f} s] {task} {estimator}: lr {best.learning_rate:g} "
                      f"(val accuracy {table[estimator]['grid_val_accuracy']}), test accuracy at {points[-1]} passes "
                      f"{table[estimator]['summary'][points[-1]][0]:.3f}", flush=True)  # fmt: skip
            # what the CLI runs with no hyperparameter set: --peft lora, and full-parameter
            for name, peft in (("defaults, lora", "lora"), ("defaults, full", "none")):
                configs = [
                    MeZOConfig(peft=peft, seed=s, batch_size=BATCH_SIZE, disable_tqdm=True) for s in mode["seeds"]
                ]
                curves = [runs.get(config) for config in configs]
                table[name] = {
                    "lr": configs[0].learning_rate,
                    "config": configs[0].defaults_applied,
                    "summary": summarise(curves, points, TARGET[task]),
                    "curves": [c.__dict__ for c in curves],
                }
                print(f"[{time.perf_counter() - started:5.0f} s] {task} {name} {configs[0].defaults_applied}: test "
                      f"accuracy {table[name]['summary'][points[-1]][0]:.3f}", flush=True)  # fmt: skip
            results["tasks"][task] = table
    results["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "convergence.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    plot(results, args.out / "convergence.png")
    print(f"total {results['seconds']:.0f} s; wrote {args.out / 'convergence.json'} and convergence.png")


def print_table(results: dict) -> None:
    points = results["points"]
    for task, table in results["tasks"].items():
        print(f"\n{task}: test accuracy, mean +- std over seeds; passes to reach {TARGET[task]:.2f} per seed")
        header = "| estimator | lr | " + " | ".join(f"{p} passes" for p in points) + " | passes to target |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for name, entry in table.items():
            s = entry["summary"]
            lr = entry["lr"]
            cells = [f"{s[p][0]:.3f} +- {s[p][1]:.3f}" for p in points]
            reached = ", ".join("-" if r is None else str(r) for r in s["to_target"])
            print(f"| {name} | {lr:g} | " + " | ".join(cells) + f" | {reached} |")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, (task, table) in zip(axes[0], tasks.items()):
        for name, entry in table.items():
            curves = entry["curves"]
            xs = [p[0] for p in curves[0]["points"]]
            ys = [statistics.mean(c["points"][i][3] for c in curves) for i in range(len(xs))]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_title(f"{task}: test accuracy (mean over seeds)")
        ax.set_xlabel("forward passes")
        ax.set_ylabel("accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
