"""MeZO: fine-tune a language model with forward passes only, inside SGLang.

Python API::

    from sglang.srt.mezo_trainer import MeZOConfig, MeZOTrainer, MeZODataset, create_dataloader
    cfg = MeZOConfig(learning_rate=1e-6, epsilon=1e-3, seed=0)
    trainer = MeZOTrainer(model, cfg)
    out = trainer.step(batch)            # out.loss_plus, out.loss_minus, out.projected_grad, out.seed
    trainer.train(create_dataloader(MeZODataset("train.jsonl", tokenizer), 16))

CLI (every `MeZOConfig` field is a flag; with no --lr / --epsilon the estimator and its
hyperparameters are the benchmarked defaults, see `sglang.srt.mezo.config.ESTIMATOR_DEFAULTS`)::

    python -m sglang.srt.mezo_trainer --peft lora --train-file train.jsonl --eval-file eval.jsonl --steps 200

The main job, `mezo_finetune`, reads as a recipe: `setup` (model, data, backend, resume),
`train` (the loop, with metrics, evaluations and checkpoints as it goes), `evaluate`
(before and after) and `save` (the final checkpoint, eval.json, the loss plot, the
trained weights). Where things live: `sglang.srt.mezo` (see its package docstring).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from sglang.srt.mezo.backends import cpu_standins
from sglang.srt.mezo.checkpoint import (
    check_identity,
    drop_checkpoints_after,
    latest_checkpoint,
    load_checkpoint,
    run_identity,
    save_checkpoint,
)
from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.data import MeZODataset, create_dataloader
from sglang.srt.mezo.distributed import agreement_callback, assert_ranks_agree, init_distributed, is_main_process
from sglang.srt.mezo.model_io import engine_model_dir, load_model_and_tokenizer
from sglang.srt.mezo.output_dir import OutputDirError, OutputDirLock, StopRequests, prepare_output_dir
from sglang.srt.mezo.primitives import write_json_atomically
from sglang.srt.mezo.reporting import CONFIG_FILE, EVAL_FILE, StepLog, format_eval, plot_losses
from sglang.srt.mezo.trainer import MeZOTrainer, StepOutput

__all__ = [
    "MeZOConfig",
    "MeZOTrainer",
    "MeZODataset",
    "StepOutput",
    "create_dataloader",
    "load_model_and_tokenizer",
    "mezo_finetune",
    "main",
]

# Upstream's engine imports torchvision / vllm at module level; on a CPU-only install they
# are absent, and import-only stand-ins let `import sglang.srt.entrypoints.engine` work.
cpu_standins.install()

logger = logging.getLogger("sglang.srt.mezo_trainer")


def build_trainer(config: MeZOConfig, model, tokenizer, out_dir: Path) -> MeZOTrainer:
    """The trainer on the configured backend (the SGLang engine starts here for --backend sglang)."""
    if config.backend == "transformers":
        return MeZOTrainer(model, config, tokenizer=tokenizer)
    from sglang.srt.mezo.backends.sglang_backend import SGLangBackend, launch_engine, lora_engine_args
    from sglang.srt.mezo.trainable import apply_peft

    model_dir = engine_model_dir(config.model, model, tokenizer, out_dir)
    adapter_dir = None
    if config.peft == "lora":
        # initialised on the host exactly as the transformers backend would (same seed),
        # then served by the engine's LoRA path; the host copy is not used afterwards
        adapter_dir = out_dir / "initial_adapter"
        apply_peft(model, config).save_pretrained(adapter_dir)
    engine = launch_engine(
        model_dir, dtype=config.dtype, device=config.device, tp_size=config.tp_size, **lora_engine_args(config)
    )
    backend = SGLangBackend(engine, config, model_dir, adapter_path=adapter_dir, host_model=model)
    return MeZOTrainer(None, config, tokenizer=tokenizer, backend=backend)


@dataclass
class Run:
    """What `setup` builds for one main job."""

    config: MeZOConfig
    trainer: MeZOTrainer
    tokenizer: object
    train_loader: object
    eval_loader: Optional[object]
    out_dir: Path
    main_process: bool  # rank 0 (or no torchrun): the only writer of the output dir
    world_size: int
    log: Optional[StepLog]
    identity: dict  # recorded in every checkpoint (`checkpoint.run_identity`)
    lock: Optional[OutputDirLock]  # held by the writer for the whole run
    results: dict = field(default_factory=dict)  # eval.json
    stopped_by: Optional[str] = None  # the signal that ended training early, and its number
    stop_signal: Optional[int] = None

    def write_results(self) -> None:
        if self.main_process:
            write_json_atomically(self.out_dir / EVAL_FILE, self.results, indent=2)

    def checkpoint(self, directory: Path, keep: int) -> Path:
        return save_checkpoint(self.trainer, directory, keep=keep, identity=self.identity)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        self.trainer.backend.shutdown()
        if self.lock is not None:
            self.lock.__exit__(None, None, None)


def claim_output_dir(config: MeZOConfig) -> OutputDirLock:
    """The output dir, locked for this process, refused if it holds another run (unless
    resuming), emptied of a previous run's artifacts with ``overwrite_output_dir``."""
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = OutputDirLock(out_dir).__enter__()
    try:
        prepare_output_dir(out_dir, resume=config.resume is not None, overwrite=config.overwrite_output_dir)
    except OutputDirError:
        lock.__exit__(None, None, None)
        raise
    return lock


def setup(config: MeZOConfig, model=None, tokenizer=None) -> Run:
    """Process group, seed, output dir, model, data, backend; resumes from ``config.resume``.

    Nothing is written before the output dir is claimed and a resumed checkpoint is known
    to be of this run."""
    if config.train_file is None:
        raise ValueError("train_file is required (see --train-file)")
    context = init_distributed()
    main_process = is_main_process()
    if not main_process:
        config = MeZOConfig.from_dict({**config.to_dict(), "disable_tqdm": True})
    torch.manual_seed(config.seed)
    out_dir = Path(config.output_dir)
    lock = claim_output_dir(config) if main_process else None  # released by Run.close (or at exit)
    try:
        identity = run_identity(config)
        if config.resume:
            checkpoint = latest_checkpoint(config.resume)
            if checkpoint is None:
                raise FileNotFoundError(f"--resume {config.resume}: no checkpoint found there")
            check_identity(checkpoint, identity)
        if main_process:
            write_json_atomically(out_dir / CONFIG_FILE, config.to_dict(), indent=2)
        if model is None:
            model, tokenizer = load_model_and_tokenizer(config.model, config.dtype)
        train_set = MeZODataset(config.train_file, tokenizer, **config.dataset_options())
        train_loader = create_dataloader(train_set, config.batch_size, shuffle=True, **config.loader_options())
        eval_loader = None
        if config.eval_file:
            eval_set = MeZODataset(config.eval_file, tokenizer, **config.dataset_options())
            # every rank evaluates the whole eval set: identical results, no gather needed
            loader = {**config.loader_options(), "group_by_length": False, "drop_last": False}
            eval_loader = create_dataloader(eval_set, config.batch_size, shuffle=False, distributed=False, **loader)
        trainer = build_trainer(config, model, tokenizer, out_dir)
    except BaseException:
        if lock is not None:
            lock.__exit__(None, None, None)
        raise
    logger.info("perturbation mechanism: %s", trainer.backend.mechanism)
    logger.info(
        "estimator %s: lr %g, epsilon %g, q %d%s", config.estimator, config.learning_rate, config.epsilon,
        config.num_directions, f" (defaults applied: {config.defaults_applied})" if config.defaults_applied else "",
    )  # fmt: skip
    log = None
    if main_process:
        log = StepLog(out_dir, config.tensorboard, trainer.backend.mechanism, config.estimator, config.defaults_applied)
    run = Run(
        config, trainer, tokenizer, train_loader, eval_loader, out_dir, main_process, context.world_size, log,
        identity, lock,
    )  # fmt: skip
    try:
        eval_path = out_dir / EVAL_FILE
        if config.resume:
            run.results = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
            resumed = load_checkpoint(trainer, config.resume, identity=identity)
            logger.info("resumed from %s at step %d", resumed, trainer.global_step)
            if main_process:
                dropped = drop_checkpoints_after(out_dir / "checkpoints", trainer.global_step, identity)
                if dropped:
                    logger.info("removed the abandoned continuation's checkpoints %s", [p.name for p in dropped])
        if log is not None:
            log.start_over(trainer.global_step if config.resume else None)
        if context.world_size > 1:
            assert_ranks_agree(trainer, trainer.global_step, include_frozen=True)
    except BaseException:
        run.close()
        raise
    return run


def evaluate(run: Run, when: str) -> None:
    """Evaluates on the eval set (if any) into ``results[when]`` ("before" once per run, "after")."""
    if run.eval_loader is None or (when == "before" and when in run.results):
        return
    run.results[when] = run.trainer.evaluate(run.eval_loader)
    if run.main_process:
        print(f"eval {when + ':':<7} {format_eval(run.results[when])}", flush=True)
    run.write_results()


def train(run: Run) -> None:
    """The MeZO loop; after each step: rank agreement, periodic evaluation (best checkpoint),
    the step's metrics line and periodic checkpoints."""
    config, trainer = run.config, run.trainer
    check_ranks = agreement_callback(trainer, config.check_ranks_every) if run.world_size > 1 else None
    checkpoints = run.out_dir / "checkpoints"

    def on_step(out: StepOutput, seconds: float) -> None:
        step = trainer.global_step
        if check_ranks is not None:
            check_ranks(out, seconds)
        if config.eval_steps and run.eval_loader is not None and step % config.eval_steps == 0:
            evaluation = trainer.evaluate(run.eval_loader)
            run.results.setdefault("during", []).append({"step": step, **evaluation})
            if run.main_process and evaluation["loss"] < run.results.get("best", {}).get("loss", math.inf):
                run.results["best"] = {"step": step, "loss": evaluation["loss"]}
                run.checkpoint(run.out_dir / "best", keep=1)
            run.write_results()
        if not run.main_process:
            return
        run.log.write(out, seconds, trainer.cache_stats, trainer.backend.mechanism)
        if config.save_steps and step % config.save_steps == 0:
            run.checkpoint(checkpoints, keep=config.save_total_limit)

    started = time.perf_counter()
    with StopRequests() as stop:  # Ctrl-C / SIGTERM: finish the step in flight, then stop
        trainer.train(run.train_loader, on_step=on_step, should_stop=lambda: stop.requested is not None)
    run.stopped_by, run.stop_signal = stop.requested, stop.signum
    run.results["train_seconds"] = round(time.perf_counter() - started, 2)
    run.results["steps"] = trainer.global_step
    run.results["skipped_steps"] = trainer.skipped_steps


def save(run: Run) -> None:
    """The final checkpoint, eval.json, the loss plot and the trained weights (``model/``)."""
    if not run.main_process:
        return
    run.checkpoint(run.out_dir / "checkpoints", keep=run.config.save_total_limit)
    run.write_results()
    if run.stopped_by is not None:
        return  # a checkpoint and the metrics so far; no final model of an unfinished run
    if run.log.path.is_file():
        plot_losses(run.log.path, run.out_dir / "loss.png")
    run.trainer.backend.export(run.out_dir / "model", run.tokenizer)


def mezo_finetune(config: MeZOConfig, model=None, tokenizer=None) -> dict:
    """The main job: evaluate, fine-tune with MeZO, evaluate again, save everything.

    Writes to ``config.output_dir`` (rank 0 only under torchrun): config.json,
    metrics.jsonl, eval.json, loss.png, the trained weights (``model/``) and resumable
    checkpoints (``checkpoints/step-N``). Returns ``{"before": ..., "after": ...}``.
    """
    run = setup(config, model, tokenizer)
    try:
        evaluate(run, "before")
        train(run)
        if run.stopped_by is None:
            evaluate(run, "after")
        save(run)
    finally:
        run.close()
    if run.stopped_by is not None:
        print(
            f"stopped by {run.stopped_by} after step {run.trainer.global_step}; continue with: the same command and "
            f"--resume {run.out_dir / 'checkpoints'}",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(128 + run.stop_signal)
    return run.results


def parse_args(argv: Optional[list] = None) -> MeZOConfig:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(MeZOConfig, description=__doc__.split("\n\n")[0])
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config


def main(argv: Optional[list] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    if config.resume and latest_checkpoint(config.resume) is None:
        raise SystemExit(f"--resume {config.resume}: no checkpoint found there")
    return mezo_finetune(config)


if __name__ == "__main__":
    main(sys.argv[1:])
