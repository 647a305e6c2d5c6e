"""Defaults and ``--lr auto`` against zero-shot and a tuned MeZO grid, on tasks they were
never chosen on (see README.md in this directory; the tasks are in tasks.py).

SmolLM2-135M-Instruct, each run through the main job's recipe (`recipe.setup` and
`recipe.train`: the held-back batches of ``--lr auto``, the divergence guard), batch 16,
one budget of forward passes for every row (MeZO: 2 per step, fzoo with q = 4: 5):

* ``zero-shot``: the model before training;
* ``defaults``: no hyperparameter set (``MeZOConfig(peft=...)``: what a user gets);
* ``auto``: ``--lr auto`` with every other field at its default;
* ``grid best``: MeZO at each learning rate of the trainable set's grid (epsilon and the
  rest at MeZO's defaults), the best on eval (optimistic for the grid: the table's bar).

Rows report the eval split's accuracy (candidate tasks) and loss after the budget, mean
+- std over ``--seeds`` seeds (the grid: one seed per point, its best point then on the
other seeds too). Results are written as they come (``--out``/defaults.json), so an
interrupted run keeps what it finished.

    .venv/bin/python benchmark/mezo/bench_defaults.py                      # the table (hours on 2 cores)
    .venv/bin/python benchmark/mezo/bench_defaults.py --seeds 1            # one seed per row
    .venv/bin/python benchmark/mezo/bench_defaults.py --quick              # < 5 min: 2 tasks, 60 passes
    .venv/bin/python benchmark/mezo/bench_defaults.py --rows grid --grid-points 1 --seeds 1   # one grid point
    .venv/bin/python benchmark/mezo/bench_defaults.py --rows defaults --seeds 2 --first-seed 1  # more seeds
    .venv/bin/python benchmark/mezo/bench_defaults.py --rows grid --seeds 2 --first-seed 1 \
        --grid-best demo=1e-3,vader=3e-3,emotion=1e-3,demo_full=1e-6,names=3e-3,continent=1e-3,past_tense=3e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import setup_threads
from tasks import TASKS

from sglang.srt.mezo import recipe
from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.data import MeZODataset, create_dataloader
from sglang.srt.mezo.estimators import make_estimator
from sglang.srt.mezo.model_io import load_model_and_tokenizer
from sglang.srt.mezo.trainer import MeZOTrainer

BATCH_SIZE = 16
GRIDS = {"lora": (3e-4, 1e-3, 3e-3), "full": (1e-7, 3e-7, 1e-6)}  # MeZO's learning rates per trainable set
PEFT = {"lora": "lora", "full": "none"}


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def steps_for(config: MeZOConfig, passes: int) -> int:
    return max(1, passes // make_estimator(config, epsilon=None).passes_per_step())


def evaluate(trainer, eval_file: str, tokenizer) -> dict:
    data = MeZODataset(eval_file, tokenizer, **trainer.config.dataset_options())
    loader = create_dataloader(data, BATCH_SIZE, shuffle=False, distributed=False, pad_token_id=data.pad_token_id)
    return trainer.evaluate(loader)


def train_and_evaluate(base, tokenizer, files: dict, fields: dict, passes: int, work: Path) -> dict:
    """One run of the main job on a copy of `base`; its eval after `passes` forward passes."""
    probe = MeZOConfig(**fields)
    config = MeZOConfig(
        **fields, train_file=files["train"], output_dir=str(work / f"run-{time.monotonic_ns()}"),
        batch_size=BATCH_SIZE, max_steps=steps_for(probe, passes), disable_tqdm=True, save_total_limit=1,
    )  # fmt: skip
    started = time.perf_counter()
    run = recipe.setup(config, copy.deepcopy(base), tokenizer)
    try:
        recipe.train(run)
        result = evaluate(run.trainer, files["eval"], tokenizer)
    finally:
        run.close()
    guard = run.trainer.guard
    return {
        **result, "seconds": round(time.perf_counter() - started, 1), "learning_rate": run.trainer.base_learning_rate,
        "estimator": config.estimator, "steps": config.max_steps, "guard_trips": guard.trips if guard else None,
        "guard_check_passes": guard.check_passes if guard else None,
        "guard_best_step": guard.best_step if guard else None,
    }  # fmt: skip


def summary(results: list) -> dict:
    out = {}
    for key in ("accuracy", "loss"):
        values = [r[key] for r in results if key in r]
        if values:
            out[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the defaults and auto rows run seeds first-seed .. first-seed + seeds - 1",
    )
    parser.add_argument("--passes", type=int, default=300, help="forward passes per run")
    parser.add_argument("--rows", default="zero-shot,defaults,auto,grid", help="which rows to run")
    parser.add_argument("--grid-points", default="0,1,2", help="which learning rates of each grid (indices)")
    parser.add_argument(
        "--grid-best",
        default=None,
        help="task=lr,...: the grid's best rates found before; the grid row then runs only these, on the seeds given",
    )
    parser.add_argument("--quick", action="store_true", help="2 tasks, 60 passes, one seed, no grid")
    parser.add_argument("--out", type=Path, default=Path("mezo_output/bench_defaults"))
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.seeds, args.passes, args.rows = "demo,names", 1, 60, "zero-shot,defaults,auto"
    setup_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_model_and_tokenizer("smollm2-135m")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    report = {"passes": args.passes, "seeds": list(seeds), "batch_size": BATCH_SIZE, "tasks": {}}
    started = time.perf_counter()

    def save():
        (args.out / "defaults.json").write_text(json.dumps(report, indent=1))

    rows = args.rows.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-defaults-") as tmp:
        work = Path(tmp)
        files = {}
        for name in args.tasks.split(","):  # zero-shot first, then each row over every task
            load, trainable, held_out = TASKS[name]
            train, evaluation = load(tokenizer)
            files[name] = {"train": write_jsonl(work / f"{name}-train.jsonl", train),
                           "eval": write_jsonl(work / f"{name}-eval.jsonl", evaluation)}  # fmt: skip
            table = report["tasks"][name] = {"trainable": trainable, "held_out": held_out, "eval": len(evaluation)}
            if "zero-shot" not in rows:
                continue
            zero_shot = MeZOTrainer(copy.deepcopy(base), MeZOConfig(learning_rate=0.0, disable_tqdm=True))
            table["zero-shot"] = summary([evaluate(zero_shot, files[name]["eval"], tokenizer)])
            print(f"[{time.perf_counter() - started:6.0f} s] {name}: zero-shot {table['zero-shot']}", flush=True)
            save()
        for row in ("defaults", "auto"):
            for name in args.tasks.split(",") if row in rows else ():
                table, peft = report["tasks"][name], PEFT[TASKS[name][1]]
                fields = dict(peft=peft) if row == "defaults" else dict(peft=peft, learning_rate="auto")
                runs = [
                    train_and_evaluate(base, tokenizer, files[name], {**fields, "seed": s}, args.passes, work)
                    for s in seeds
                ]
                table[row] = {**summary(runs), "runs": runs}
                print(f"[{time.perf_counter() - started:6.0f} s] {name}: {row} {summary(runs)} "
                      f"(lr {[r['learning_rate'] for r in runs]}, guard trips {[r['guard_trips'] for r in runs]}, "
                      f"ended on step {[r['guard_best_step'] for r in runs]} of {runs[0]['steps']}, "
                      f"check passes {[r['guard_check_passes'] for r in runs]})",
                      flush=True)  # fmt: skip
                save()
        known_best = dict(item.split("=") for item in args.grid_best.split(",")) if args.grid_best else {}
        for name in args.tasks.split(",") if "grid" in rows else ():
            table, trainable = report["tasks"][name], TASKS[name][1]
            peft, grid = PEFT[trainable], {}

            def mezo_at(lr: float, seed: int, peft=peft, task=files[name]) -> dict:
                fields = dict(peft=peft, estimator="mezo", learning_rate=lr, seed=seed)
                return train_and_evaluate(base, tokenizer, task, fields, args.passes, work)

            if known_best:  # the scan ran before: its best rate on these seeds
                best = float(known_best[name])
                runs = [mezo_at(best, s) for s in seeds]
                table["grid"] = {"lr": best, **summary(runs), "runs": runs}
                print(f"[{time.perf_counter() - started:6.0f} s] {name}: mezo lr {best:g} {summary(runs)}", flush=True)
                save()
                continue
            for lr in [GRIDS[trainable][int(i)] for i in args.grid_points.split(",")]:
                grid[lr] = mezo_at(lr, 0)
                print(f"[{time.perf_counter() - started:6.0f} s] {name}: mezo lr {lr:g}: {grid[lr]}", flush=True)
            best = max(grid, key=lambda lr: (grid[lr].get("accuracy", 0.0), -grid[lr]["loss"]))
            runs = [grid[best]] + [mezo_at(best, s) for s in range(1, args.seeds)]
            table["grid"] = {"lr": best, "points": {str(k): v for k, v in grid.items()}, **summary(runs), "runs": runs}
            save()
    report["seconds"] = round(time.perf_counter() - started, 1)
    save()
    print_table(report)


def print_table(report: dict) -> None:
    def cell(entry: dict, key: str) -> str:
        if key not in entry:
            return "–"
        mean, std = entry[key]
        return f"{mean:.3f} ± {std:.3f}" if std else f"{mean:.3f}"

    print(f"\n{report['passes']} forward passes per run, batch {report['batch_size']}, {report['seeds']} seed(s)")
    print("| task | held out | zero-shot acc / loss | defaults | auto | grid best (lr) |")
    print("|---|---|---|---|---|---|")
    for name, table in report["tasks"].items():
        cells = []
        for row in ("zero-shot", "defaults", "auto", "grid"):
            entry = table.get(row, {})
            cells.append(
                f"{cell(entry, 'accuracy')} / {cell(entry, 'loss')}" + (f" ({entry['lr']:g})" if "lr" in entry else "")
            )
        print(f"| {name} ({table['trainable']}, {table['eval']} eval) | {'yes' if table['held_out'] else 'no'} | "
              + " | ".join(cells) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
