"""The main job as a recipe: `setup` (model, data, output dir, backend, resume), `train`
(the loop, with metrics, evaluations and checkpoints as it goes), `evaluate` (before and
after) and `save` (the final checkpoint, eval.json, the loss plot, the trained weights);
`mezo_finetune` runs them in that order. `sglang.srt.mezo_trainer` is its public face.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

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
from sglang.srt.mezo.data.dataset import hold_back
from sglang.srt.mezo.distributed import agreement_callback, assert_ranks_agree, init_distributed, is_main_process
from sglang.srt.mezo.model_io import load_model_and_tokenizer, load_tokenizer
from sglang.srt.mezo.objectives import check_objective_fits
from sglang.srt.mezo.output_dir import OutputDirClaim, OutputDirLock
from sglang.srt.mezo.preflight import check_inputs
from sglang.srt.mezo.primitives import write_json_atomically
from sglang.srt.mezo.reporting import CONFIG_FILE, EVAL_FILE, StepLog, format_eval, plot_losses
from sglang.srt.mezo.signals import StopRequests
from sglang.srt.mezo.trainer import MeZOTrainer, StepOutput
from sglang.srt.mezo.usage_errors import ConfigError

logger = logging.getLogger("sglang.srt.mezo_trainer")


def load_model_for(config: MeZOConfig) -> tuple:
    """(host model or None, tokenizer). The transformers backend trains a host model; the
    engine loads its own, and the host loads one only to initialise a LoRA adapter exactly
    as the transformers backend would (`build_trainer` lets it go once that is written)."""
    if config.backend == "transformers" or config.peft == "lora":
        return load_model_and_tokenizer(config.model, config.dtype)
    return None, load_tokenizer(config.model)


def build_trainer(config: MeZOConfig, model, tokenizer, out_dir: Path) -> MeZOTrainer:
    """The trainer on the configured backend (the SGLang engine starts here for --backend sglang)."""
    if config.backend == "transformers":
        return MeZOTrainer(model, config, tokenizer=tokenizer)
    from sglang.srt.mezo.backends.engine_checkpoint import engine_checkpoint
    from sglang.srt.mezo.backends.engine_launch import (
        EngineCrashWatch,
        generation_engine_args,
        launch_engine,
        lora_engine_args,
    )
    from sglang.srt.mezo.backends.sglang_backend import SGLangBackend
    from sglang.srt.mezo.trainable import apply_peft

    loaded = None if model is None else (model, tokenizer)
    model_dir = engine_checkpoint(config.model, config.dtype, config.model_cache_dir, loaded=loaded)
    adapter_dir = None
    if config.peft == "lora":
        # initialised on the host exactly as the transformers backend would (same seed),
        # then served by the engine's LoRA path; the host model is not used afterwards
        adapter_dir = out_dir / "initial_adapter"
        apply_peft(model, config).save_pretrained(adapter_dir)
    del model, loaded  # the engine serves the model from here on: no host copy is kept
    with contextlib.ExitStack() as started:  # an engine whose backend fails to set up is shut down
        engine = launch_engine(
            model_dir, dtype=config.dtype, device=config.device, tp_size=config.tp_size,
            **lora_engine_args(config), **generation_engine_args(config),
        )  # fmt: skip
        started.callback(engine.shutdown)
        crash_watch = EngineCrashWatch(engine)
        backend = SGLangBackend(engine, config, model_dir, adapter_path=adapter_dir, crash_watch=crash_watch)
        started.pop_all()
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
    held_back: Optional[list] = None  # batches kept out of training for --lr auto and the divergence guard
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
            self.lock.release()


def load_data(config: MeZOConfig, tokenizer) -> tuple:
    """(train loader, eval loader or None, held-back batches or None: what ``--lr auto``
    probes and the divergence guard checks, never trained on); the objective must fit the
    data (`check_objective_fits`)."""
    train_set = MeZODataset(config.train_file, tokenizer, **config.dataset_options())
    check_objective_fits(config.objective, train_set.has_candidates, config.train_file)
    held_back = None
    wanted = config.held_back_batches()
    if wanted:
        count = min(wanted * config.batch_size, len(train_set) // 10)  # at most a tenth
        if count:
            train_set, probe_set = hold_back(train_set, count, config.seed)
            loader = {**config.loader_options(), "group_by_length": False, "drop_last": False}
            held_back = list(
                create_dataloader(probe_set, config.batch_size, shuffle=False, distributed=False, **loader)
            )
        else:  # (toy data: the searches and checks then read training batches)
            logger.info(
                "%s: %d examples, too few to hold a tenth back; --lr auto, --epsilon auto and the divergence guard "
                "read the first training batches", config.train_file, len(train_set),
            )  # fmt: skip
    train_loader = create_dataloader(train_set, config.batch_size, shuffle=True, **config.loader_options())
    if not config.eval_file:
        return train_loader, None, held_back
    eval_set = MeZODataset(config.eval_file, tokenizer, **config.dataset_options())
    check_objective_fits(config.objective, eval_set.has_candidates, config.eval_file)
    # every rank evaluates the whole eval set: identical results, no gather needed
    loader = {**config.loader_options(), "group_by_length": False, "drop_last": False}
    eval_loader = create_dataloader(eval_set, config.batch_size, shuffle=False, distributed=False, **loader)
    return train_loader, eval_loader, held_back


def setup(config: MeZOConfig, model=None, tokenizer=None) -> Run:
    """Process group, seed, model, data, output dir, backend; resumes from ``config.resume``.

    Every input is checked before any work (`preflight.check_inputs`), the model and data
    are loaded before the output dir is touched, and everything this start does is undone
    if any later part of it fails (an `ExitStack`: the engine shut down, the output dir
    left as it was found, `OutputDirClaim`)."""
    check_inputs(config)
    context = init_distributed()
    main_process = is_main_process()
    if not main_process:
        config = MeZOConfig.from_dict({**config.to_dict(), "disable_tqdm": True})
    torch.manual_seed(config.seed)
    out_dir = Path(config.output_dir)
    identity = run_identity(config)
    if config.resume:
        check_identity(latest_checkpoint(config.resume), identity)
    if model is None:
        model, tokenizer = load_model_for(config)
    elif config.backend == "sglang":
        raise ConfigError(
            "--backend sglang: the engine loads the model itself from config.model (a path or an HF id); "
            "pass the model by name, not as an object"
        )
    train_loader, eval_loader, held_back = load_data(config, tokenizer)
    with contextlib.ExitStack() as started:
        claim = None
        if main_process:  # the only writer of the output dir
            claim = OutputDirClaim(out_dir, resume=config.resume is not None, overwrite=config.overwrite_output_dir)
            started.callback(claim.rollback)
        trainer = build_trainer(config, model, tokenizer, out_dir)
        # The engine path holds no host model from here on. Explicitly: importing SGLang's
        # engine keeps the frames that first started one alive, and with them their locals.
        del model
        started.callback(trainer.backend.shutdown)
        run = Run(
            config, trainer, tokenizer, train_loader, eval_loader, out_dir, main_process, context.world_size, None,
            identity, claim.lock if claim else None, held_back,
        )  # fmt: skip
        resume(run)
        if main_process:
            write_json_atomically(out_dir / CONFIG_FILE, config.to_dict(), indent=2)
            run.log = StepLog(
                out_dir, config.tensorboard, trainer.backend.mechanism, config.estimator, config.defaults_applied
            )
            run.log.start_over(trainer.global_step if config.resume else None)
        started.pop_all()  # the run owns its resources now (`Run.close`)
    if claim is not None:
        claim.commit()
    logger.info("perturbation mechanism: %s", trainer.backend.mechanism)
    logger.info(
        "estimator %s: lr %s, epsilon %s, q %d%s", config.estimator, config.learning_rate, config.epsilon,
        config.num_directions, f" (defaults applied: {config.defaults_applied})" if config.defaults_applied else "",
    )  # fmt: skip
    return run


def resume(run: Run) -> None:
    """Loads ``config.resume`` into the trainer (and eval.json's results so far), drops the
    abandoned continuation's checkpoints, and checks data-parallel ranks agree."""
    config, trainer = run.config, run.trainer
    if config.resume:
        eval_path = run.out_dir / EVAL_FILE
        run.results = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
        resumed = load_checkpoint(trainer, config.resume, identity=run.identity)
        logger.info("resumed from %s at step %d", resumed, trainer.global_step)
        if run.main_process:
            dropped = drop_checkpoints_after(run.out_dir / "checkpoints", trainer.global_step, run.identity)
            if dropped:
                logger.info("removed the abandoned continuation's checkpoints %s", [p.name for p in dropped])
    if run.world_size > 1:
        assert_ranks_agree(trainer, trainer.global_step, include_frozen=True)


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
        trainer.train(
            run.train_loader, on_step=on_step, should_stop=lambda: stop.requested is not None,
            held_back=run.held_back, on_step_reads_weights=False,  # it reads them through the trainer only
        )  # fmt: skip
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


def keep_resumable(run: Run, error: Exception) -> None:
    """After a failure past step 0: a checkpoint of the last completed step (a failed pass
    leaves the weights exact, so it is that step's) and the command that continues the run."""
    step, checkpoints = run.trainer.global_step, run.out_dir / "checkpoints"
    if not run.main_process or step == 0:
        return
    try:
        run.checkpoint(checkpoints, keep=run.config.save_total_limit)
    except Exception as checkpoint_error:  # the failure may have taken the weights with it (a dead engine)
        print(
            f"{type(error).__name__} after step {step}; step {step} could not be checkpointed ({checkpoint_error}): "
            f"resume from the latest checkpoint in {checkpoints}, if there is one",
            file=sys.stderr,
            flush=True,
        )
        return
    print(
        f"{type(error).__name__} after step {step}; step {step} is checkpointed: once the cause is fixed, continue "
        f"with the same command and --resume {checkpoints}",
        file=sys.stderr,
        flush=True,
    )


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
    except Exception as error:
        keep_resumable(run, error)
        raise
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
