"""What a run writes besides weights: metrics.jsonl (a line per step), eval results, the loss
plot and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
CONFIG_FILE = "config.json"
# metrics.jsonl's names in logs of earlier versions (two-point names that misnamed fzoo's
# values) -> today's estimator-neutral ones; `read_metrics` reads both.
EARLIER_METRIC_NAMES = {"loss_plus": "loss_perturbed", "loss_minus": "loss_baseline", "projected_grad": "coefficient"}


def read_metrics(path: Path) -> list:
    """The rows of a metrics.jsonl, earlier versions' names given today's (`EARLIER_METRIC_NAMES`)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return [{EARLIER_METRIC_NAMES.get(k, k): v for k, v in row.items()} for row in rows]


class StepLog:
    """Appends one JSON line per step to ``OUTPUT_DIR/metrics.jsonl`` (and TensorBoard scalars).

    A line holds the step's `StepOutput` fields (means over directions), ``q``,
    ``directions`` (``[seed, applied coefficient]``: all replay needs), ``seconds`` and
    the ``cache/*`` token counts; when the perturbation mechanism changes during a run (a
    restore log that overflowed), that step's line also names the new one. The first line
    written also holds ``estimator`` and, under ``defaults``, what the config filled in
    (`MeZOConfig.defaults_applied`: the auto-chosen estimator, unset hyperparameters).
    """

    def __init__(self, out_dir: Path, tensorboard: bool, mechanism: str, estimator: str, defaults: dict):
        self.path = out_dir / METRICS_FILE
        self.mechanism = mechanism
        self.header: Optional[dict] = {"estimator": estimator, **({"defaults": defaults} if defaults else {})}
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, out, seconds: float, cache_stats: dict, mechanism: str) -> None:
        record = {k: v for k, v in out.metrics().items() if k not in ("per_direction", "applied")}
        for occasional in ("guard", "lr_search", "epsilon_search", "reward"):  # only where they happened / apply
            if record[occasional] is None:
                del record[occasional]
        record["q"] = len(out.per_direction)
        record["directions"] = [[seed, grad] for seed, grad in out.applied]
        record["seconds"] = round(seconds, 4)
        record.update({f"cache/{k}": v for k, v in cache_stats.items()})
        if mechanism != self.mechanism:
            record["perturbation_mechanism"] = self.mechanism = mechanism
        if self.header is not None:
            record.update(self.header)
            self.header = None
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key in ("loss_perturbed", "loss_baseline", "coefficient", "lr", "seconds"):
                self.writer.add_scalar(f"mezo/{key}", record[key], out.step)
            for key, value in (out.reward or {}).items():
                self.writer.add_scalar(f"mezo/reward_{key}", value, out.step)

    def start_over(self, resumed_step: Optional[int]) -> None:
        """A fresh run starts an empty log; a resumed one drops lines the checkpoint does not contain."""
        if resumed_step is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_metrics(self.path, resumed_step)
            if resumed_step > 0:
                self.header = None  # the kept first line holds it

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_metrics(path: Path, before_step: int) -> None:
    """On resume, drop lines of steps the checkpoint does not contain (written after it)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < before_step]
    path.write_text("".join(line + "\n" for line in kept))


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Loss curve (mean of the perturbed and baseline losses per step) as a PNG; for the
    reward objective, the mean reward of the step's completions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if not r["skipped"]]
    steps = [r["step"] for r in rows]
    rewarded = bool(rows) and "reward" in rows[0]
    if rewarded:
        losses, label, axis = [r["reward"]["mean"] for r in rows], "mean reward of the step's completions", "reward"
    else:
        losses, label = [(r["loss_perturbed"] + r["loss_baseline"]) / 2 for r in rows], "(perturbed + baseline) / 2"
        axis = "training loss"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label=label)
    if len(losses) >= 10:
        window = max(5, len(losses) // 20)
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(steps[window - 1 :], smooth, lw=1.6, label=f"moving mean ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel(axis)
    ax.set_title("MeZO")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def format_eval(result: dict) -> str:
    """One line of an evaluation: loss, and accuracy over the examples when there is one."""
    text = f"reward {result['reward']:.4f}" if "reward" in result else f"loss {result['loss']:.4f}"
    if "accuracy" in result:
        text += f", accuracy {result['accuracy']:.3f} ({result['examples']} examples)"
    return text
