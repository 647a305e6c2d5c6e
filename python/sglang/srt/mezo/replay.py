"""Rebuild trained weights from the initial weights and the run's step log.

A MeZO update is a function of (seed, coefficient, lr) per direction, so the
``directions`` and ``lr`` columns of ``metrics.jsonl`` (a few dozen bytes per step) replay
the whole run, bit-identically on the same device type::

    python -m sglang.srt.mezo.replay RUN_DIR [--output-dir DIR] [--check]

``--check`` compares the replayed trainable tensors with the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sglang.srt.mezo.checkpoint import TRAINABLE_FILE, latest_checkpoint
from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.primitives import same_bits
from sglang.srt.mezo.reporting import METRICS_FILE, read_metrics
from sglang.srt.mezo.usage_errors import (
    ParserErrorsAreUsageErrors,
    UsageError,
    reporting_usage_errors,
    split_debug_flag,
)


def read_log(run_dir: Path, up_to_step: int | None = None) -> list:
    rows = read_metrics(run_dir / METRICS_FILE)
    return [r for r in rows if up_to_step is None or r["step"] < up_to_step]


def replay(run_dir: str | Path, model=None, tokenizer=None, up_to_step: int | None = None, device: str = "auto"):
    """A trainer holding the weights the run had after its logged steps, on `device` (any: z
    and every write are bit-identical across devices, so a GPU run replays on a CPU)."""
    from sglang.srt.mezo.model_io import load_model_and_tokenizer
    from sglang.srt.mezo.trainer import MeZOTrainer

    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise UsageError(f"{run_dir} is not a MeZO run directory (no {name}): pass a run's --output-dir")
    recorded = json.loads((run_dir / "config.json").read_text())
    config = MeZOConfig.from_dict({**recorded, "device": device})
    if config.momentum > 0:
        raise UsageError(
            f"{run_dir}: replay rebuilds plain ZO-SGD runs; momentum makes each update depend on all before it "
            "(resume from its checkpoints instead)"
        )
    torch.manual_seed(config.seed)  # the same LoRA initialisation as the run
    if model is None:
        model, tokenizer = load_model_and_tokenizer(config.model, config.dtype)
    trainer = MeZOTrainer(model, config, tokenizer=tokenizer)
    if trainer.guard is not None:
        trainer.snapshot_best_weights()  # the starting weights, as the run kept them before its first step
    for row in read_log(run_dir, up_to_step):
        if not row["skipped"]:
            trainer.backend.apply_update([(int(s), float(g)) for s, g in row["directions"]], float(row["lr"]))
        guard = row.get("guard")  # what the divergence guard did after this step, logged
        if guard is not None and guard.get("action") == "snapshot":
            trainer.snapshot_best_weights()
        elif guard is not None and guard.get("action") == "restore":
            trainer.restore_best_weights()
        trainer.global_step = row["step"] + 1
    return trainer


def differing_tensors(trainer, checkpoint_dir: Path) -> list:
    """Names of trainable tensors that differ (bitwise) from the checkpoint's."""
    saved = load_file(str(checkpoint_dir / TRAINABLE_FILE))
    state = trainer.backend.trainable_state()
    return [name for name, value in state.items() if not same_bits(saved[name], value)]


def log_bytes_per_step(run_dir: Path) -> float:
    """Bytes the replay needs per step: seed, coefficient and lr of each direction."""
    rows = read_log(run_dir)
    needed = [json.dumps({"lr": r["lr"], "directions": r["directions"], "skipped": r["skipped"]}) for r in rows]
    return sum(len(n) + 1 for n in needed) / max(len(rows), 1)


def main(argv=None) -> int:
    """The CLI; a bad input is one line on stderr and exit status 2 (``--debug`` shows the traceback)."""
    argv, debug = split_debug_flag(list(sys.argv[1:] if argv is None else argv))
    return reporting_usage_errors(lambda: _main(argv), debug)


def _main(argv: list) -> int:
    class Parser(ParserErrorsAreUsageErrors, argparse.ArgumentParser):
        pass

    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--output-dir", type=Path, help="save the replayed model here")
    parser.add_argument("--check", action="store_true", help="compare with the run's latest checkpoint")
    parser.add_argument("--device", default="auto", help="where to replay (auto: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    checkpoint = latest_checkpoint(args.run_dir / "checkpoints") if args.check else None
    if args.check and checkpoint is None:
        raise UsageError(f"--check: {args.run_dir / 'checkpoints'} holds no checkpoint to compare with")
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] if checkpoint else None
    trainer = replay(args.run_dir, up_to_step=step, device=args.device)
    print(f"replayed {trainer.global_step} steps; log: {log_bytes_per_step(args.run_dir):.0f} bytes/step")
    if args.output_dir:
        trainer.backend.export(args.output_dir, trainer.tokenizer)
    if checkpoint is not None:
        differ = differing_tensors(trainer, checkpoint)
        print(f"{checkpoint}: {'bit-identical' if not differ else f'{len(differ)} tensors differ: {differ[:3]}'}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
