"""`MeZOTrainer`: one zeroth-order step (an `estimators` estimate, one update) and the loop."""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from sglang.srt.mezo.backends.base import Backend
from sglang.srt.mezo.config import AUTO, MeZOConfig, estimator_default
from sglang.srt.mezo.distributed import reduce_sum_count
from sglang.srt.mezo.epsilon_search import EpsilonSearch, search_epsilon
from sglang.srt.mezo.estimators import direction_seed, make_estimator
from sglang.srt.mezo.guard import BEST_WEIGHTS_FILE, RESTORE, SNAPSHOT, DivergenceGuard, describe
from sglang.srt.mezo.lr_search import BUDGET_FRACTION, LearningRateSearch, probe_plan, search_learning_rate
from sglang.srt.mezo.objectives import RowObjective, accuracy_counts, has_candidates, make_objective
from sglang.srt.mezo.rewards.objective import RewardObjective

logger = logging.getLogger(__name__)

VANISHING_THRESHOLD = 0.5  # warn when over half the sampled elements would not move
EVAL_SAMPLES = 4  # reward objective: the first eval completions kept in the evaluation's result


def learning_rate_at(config: MeZOConfig, step: int, base: Optional[float] = None) -> float:
    """Learning rate of `step` (0-based): linear warm-up, then constant/linear/cosine decay
    of `base` (default: ``config.learning_rate``)."""
    base = config.learning_rate if base is None else base
    warmup, total = config.warmup_steps, max(config.max_steps, 1)
    if step < warmup:
        return base * (step + 1) / warmup
    if config.lr_scheduler == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if config.lr_scheduler == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainOutput:
    """What one `MeZOTrainer.train` call did (per-step values go to its `on_step` callback:
    the run's outputs are not kept, so a long run's memory stays flat)."""

    steps: int  # steps taken by this call
    global_step: int  # the trainer's step count after it
    mean_loss: float  # mean of (L+ + L-) / 2 over the steps that were not skipped (nan: none)
    skipped_steps: int  # of this call's steps, skipped for a non-finite loss


@dataclass
class StepOutput:
    """What one MeZO step measured, in names every estimator shares (`estimators.DirectionEstimate`);
    the losses and the coefficient are means over directions."""

    step: int
    seed: int
    loss_perturbed: float
    loss_baseline: float
    coefficient: float
    lr: float
    per_direction: list = field(default_factory=list)
    skipped: bool = False  # a non-finite loss: no update was applied
    applied: list = field(default_factory=list)  # [(seed, clipped coefficient)] of the update
    guard: Optional[dict] = None  # what the divergence guard did after this step, if anything
    lr_search: Optional[dict] = None  # --lr auto's probes and choice, on the run's first step
    epsilon_search: Optional[dict] = None  # --epsilon auto's probes and choice, on the run's first step
    reward: Optional[dict] = None  # reward objective: mean/std of the rewards of every pass of the step

    @classmethod
    def from_estimates(cls, step: int, lr: float, estimates: list) -> "StepOutput":
        def mean(values):
            return sum(values) / len(values)

        return cls(
            step=step,
            seed=estimates[0].seed,
            loss_perturbed=mean([e.loss_perturbed for e in estimates]),
            loss_baseline=mean([e.loss_baseline for e in estimates]),
            coefficient=mean([e.coefficient for e in estimates]),
            lr=lr,
            per_direction=estimates,
        )

    def metrics(self) -> dict:
        out = asdict(self)
        out["per_direction"] = [asdict(d) for d in self.per_direction]
        return out


class MeZOTrainer:
    """Fine-tunes a causal LM with MeZO (Malladi et al. 2023) using forward passes only.

    Args:
        model: a transformers causal LM (wrapped in peft here when ``config.peft`` says so),
            or, with ``backend=``, whatever that backend drives.
        config: the run's `MeZOConfig`.
        tokenizer: optional; only saving and text utilities need it.
        objective: optional callable ``(model, batch) -> (sum, count)``; by default the
            configured one: the reward of generated completions (``config.reward``), the
            completion NLL, or candidate cross-entropy when batches carry candidates.
        backend: optional prebuilt backend (e.g. an SGLang engine backend); by default a
            `TransformersBackend` over `model`.
    """

    def __init__(
        self,
        model,
        config: MeZOConfig,
        tokenizer=None,
        objective: Optional[Callable] = None,
        backend: Optional[Backend] = None,
    ):
        if backend is None:
            from sglang.srt.mezo.backends.transformers_backend import TransformersBackend

            backend = TransformersBackend(model, config)
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        if objective is None and config.objective == "reward":
            objective = RewardObjective.from_config(config, tokenizer)
        self.objective = objective
        self._epsilon_found: Optional[float] = None
        self.estimator = make_estimator(config, epsilon=None if config.epsilon == AUTO else config.epsilon)
        self._epsilon_search: Optional[EpsilonSearch] = None  # logged with the next step
        self.global_step = 0
        self.epoch = 0
        self.batches_seen_in_epoch = 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self.warnings_issued: set = set()
        self._update_checked_at_lr: Optional[float] = None
        self.learning_rate_found: Optional[float] = None  # --lr auto's choice (checkpointed)
        self._lr_search: Optional[LearningRateSearch] = None  # logged with the next step
        self.guard = (
            DivergenceGuard(config.guard_window, config.guard_tolerance) if config.divergence_guard == "on" else None
        )
        self._best_weights: Optional[tempfile.TemporaryDirectory] = None  # the guard's snapshot

    @property
    def model(self):
        return self.backend.model

    @property
    def base_learning_rate(self) -> float:
        """The learning rate before warm-up, decay and the guard: the configured one, or
        what `find_learning_rate` chose for ``learning_rate="auto"``."""
        return self._configured_or_found("learning_rate", self.learning_rate_found, "find_learning_rate")

    @property
    def epsilon(self) -> float:
        """The perturbation scale: the configured one, or what `find_epsilon` chose for ``epsilon="auto"``."""
        return self._configured_or_found("epsilon", self.epsilon_found, "find_epsilon")

    def _configured_or_found(self, name: str, found: Optional[float], finder: str) -> float:
        value = getattr(self.config, name)
        if value != AUTO:
            return value
        if found is None:
            raise RuntimeError(f"{name}='auto': call {finder}(batches) first (train() does)")
        return found

    @property
    def epsilon_found(self) -> Optional[float]:
        """--epsilon auto's choice (checkpointed); setting it rebuilds the estimator at that scale."""
        return self._epsilon_found

    @epsilon_found.setter
    def epsilon_found(self, value: Optional[float]) -> None:
        self._epsilon_found = value
        if value is not None:
            self.estimator = make_estimator(self.config, epsilon=value)

    def _search_budget(self) -> float:
        """Forward passes the searches may take together: BUDGET_FRACTION of the run's."""
        return BUDGET_FRACTION * self.estimator.passes_per_step() * self.config.max_steps

    def find_epsilon(self, batch: dict) -> EpsilonSearch:
        """``--epsilon auto``: the largest scale at which the loss is linear along seeded
        directions on `batch` (held back from training; `epsilon_search`), or the estimator's
        default where no scale is (logged). The weights are left bit for bit as they were."""
        c = self.config
        default = estimator_default(c, "epsilon")
        share = 0.5 if c.learning_rate == AUTO else 1.0  # --lr auto probes after it, at this scale

        def loss_at(seed: Optional[int], scale: float) -> float:
            return self._loss(self._objective_for(batch, self.global_step), batch, seed, scale)

        search = search_epsilon(loss_at, run_seed=c.seed, default=default, max_passes=share * self._search_budget())
        if search.epsilon is None:
            search.epsilon = default
            logger.warning("--epsilon auto: the loss is linear at no probed scale; the estimator's default %g is used",
                           default)  # fmt: skip
        logger.info("--epsilon auto: %g (%d passes)", search.epsilon, search.passes)
        self.epsilon_found = search.epsilon
        self._epsilon_search = search
        return search

    def find_learning_rate(self, batches: list) -> LearningRateSearch:
        """``--lr auto``: probes the loss's curvature and the gradient's noise at the current
        weights on `batches` (held back from training; `lr_search`) and keeps the rate it
        picks, or, where no curvature is measurable, the estimator's default (logged). The
        weights are left bit for bit as they were."""
        c = self.config
        batches, directions = batches[: c.lr_search_batches], c.lr_search_directions
        spent = self._epsilon_search.passes if self._epsilon_search is not None else 0
        count, directions = probe_plan(self._search_budget() - spent, len(batches), directions)

        def loss_at(b: int, seed: Optional[int], scale: float) -> float:
            batch = batches[b]  # (a reward's probes sample as step 0's passes do)
            return self._loss(self._objective_for(batch, self.global_step), batch, seed, scale)

        search = search_learning_rate(
            loss_at, run_seed=c.seed, epsilon=self.epsilon, num_directions=c.num_directions, estimator=c.estimator,
            batches=count, directions=directions,
        )  # fmt: skip
        if search.learning_rate is None:
            search.learning_rate = estimator_default(c, "learning_rate")
            logger.warning(
                "--lr auto: no measurable curvature (mean |z^T H z| %s); the estimator's default %g is used",
                search.kappa,
                search.learning_rate,
            )
        logger.info(
            "--lr auto: %g (mean |z^T H z| %s, signal %s, %d passes)",
            search.learning_rate, search.kappa, search.signal, search.passes,
        )  # fmt: skip
        self.learning_rate_found = search.learning_rate
        self._lr_search = search
        return search

    @property
    def cache_stats(self) -> dict:
        """Tokens computed vs reused by each KV/hidden-state mechanism (last pass, cumulative)."""
        return dict(self.backend.cache_stats)

    # ------------------------------------------------------------------------- one step
    def step(self, batch: dict) -> StepOutput:
        """One step on `batch`: the estimator's passes at seeded perturbations of the same
        weights (MeZO: L(w + eps z), L(w - eps z), g = their difference / 2 eps, for q seeds),
        then one update along the regenerated z. The weights are the updated ones when it
        returns (inside `train`, the update may be written by the next step's first pass)."""
        c = self.config
        self._check_batch(batch)
        objective = self._objective_for(batch, self.global_step)
        if self.global_step == 0:
            self._warn_if_vanishing("perturbation", direction_seed(c.seed, 0, 0), self.epsilon)
        lr = learning_rate_at(c, self.global_step, self.base_learning_rate)
        if self.guard is not None:
            lr *= self.guard.lr_scale

        with self.backend.holding_perturbation():  # the passes and the update may share sweeps
            points = self.estimator.points(self.global_step)  # (seed, scale) of every pass
            losses = self._losses(objective, batch, points)  # one by one, or the population in one call
            estimates = self.estimator.combine(self.global_step, losses)
            out = StepOutput.from_estimates(self.global_step, lr, estimates)
            if isinstance(objective, RewardObjective):
                out.reward = objective.summary()
            if self._lr_search is not None:
                out.lr_search, self._lr_search = self._lr_search.record(), None
            if self._epsilon_search is not None:
                out.epsilon_search, self._epsilon_search = self._epsilon_search.record(), None
            if not all(math.isfinite(e.loss_perturbed) and math.isfinite(e.loss_baseline) for e in estimates):
                return self._skip(out)
            self.nonfinite_in_a_row = 0
            clip = c.grad_clip or math.inf
            directions = [(e.seed, max(-clip, min(clip, e.coefficient))) for e in estimates]
            checked = self._update_checked_at_lr
            if checked is None or not checked / 2 <= lr <= 2 * checked:  # resolution: a matter of 2x, not of 1%
                self._update_checked_at_lr = lr  # (a sampled check on exact weights: a schedule costs ~log2 of them)
                self._warn_if_vanishing("update", directions[0][0], -lr * directions[0][1] / len(directions))
            self.backend.apply_update(directions, lr)  # in a train() loop it may wait for the next pass
        out.applied = directions
        self.global_step += 1
        return out

    def _objective_for(self, batch: dict, step: Optional[int] = None):
        """The trainer's objective, or the configured one for this batch's kind; a reward
        objective samples with `step`'s seed in every pass (None: greedy, for evaluation)."""
        objective = self.objective or make_objective(self.config.objective, batch)
        return objective.at_step(step) if isinstance(objective, RewardObjective) else objective

    def _loss(self, objective, batch: dict, seed: Optional[int], scale: float) -> float:
        """Mean objective under ``w + scale * z(seed)``, combined exactly across ranks."""
        return self._losses(objective, batch, [(seed, scale)])[0]

    def _losses(self, objective, batch: dict, points: list) -> list:
        """Mean objective at each (seed, scale) of `points`, combined exactly across ranks."""
        reduced = [reduce_sum_count(*pair) for pair in self.backend.loss_sums(objective, batch, points)]
        return [total / count if count else math.nan for total, count in reduced]

    # ------------------------------------------------------------------------- the guard
    def _guard_check(self, batches: list) -> dict:
        """The held-back check of the current weights: their loss (and accuracy) on `batches`."""
        result = self.evaluate(batches)
        self.guard.check_passes += len(batches)
        return {"loss": result["loss"], "accuracy": result.get("accuracy")}

    def _guard_after(self, out: StepOutput, batches: list) -> Optional[dict]:
        """The divergence guard's verdict after this step, when a held-back check is due, acted on."""
        last = self.global_step >= self.config.max_steps
        if not self.guard.due(self.estimator.passes_per_step(), last):
            return None
        check = self._guard_check(batches)
        action = self.guard.judge(self.global_step, check, last)
        record = {"check": check}
        if action == SNAPSHOT:
            self.snapshot_best_weights()
        elif action == RESTORE:
            self.restore_best_weights()
            logger.warning(self.guard.explain(out.step, check, last))
            record.update(to_step=self.guard.best_step, lr_scale=self.guard.lr_scale)
        return {"action": action, **record}

    @property
    def best_weights_path(self) -> Optional[Path]:
        """The divergence guard's snapshot of the best weights (None before the first)."""
        return None if self._best_weights is None else Path(self._best_weights.name) / BEST_WEIGHTS_FILE

    def snapshot_best_weights(self, source: Optional[Path] = None) -> None:
        """Keeps the trainable weights (and momentum) bit for bit on disk, no second copy in
        memory: the ones the divergence guard comes back to. `source`: a snapshot file to
        keep instead (a checkpoint's, on resume)."""
        from safetensors.torch import save_file

        if self._best_weights is None:
            self._best_weights = tempfile.TemporaryDirectory(prefix="mezo-guard-")
        if source is not None:
            shutil.copyfile(source, self.best_weights_path)
            return
        state = {f"weights/{k}": v.contiguous() for k, v in self.backend.trainable_state().items()}
        state.update({f"momentum/{k}": v.contiguous() for k, v in self.backend.momentum_state().items()})
        save_file(state, str(self.best_weights_path))

    def restore_best_weights(self) -> None:
        """The weights (and momentum) of the last `snapshot_best_weights`, bit for bit."""
        from safetensors.torch import load_file

        state = load_file(str(self.best_weights_path))
        self.backend.load_trainable_state({k[8:]: v for k, v in state.items() if k.startswith("weights/")})
        self.backend.load_momentum_state({k[9:]: v for k, v in state.items() if k.startswith("momentum/")})

    def _check_batch(self, batch: dict) -> None:
        if not batch or any(torch.is_tensor(v) and v.shape[:1] == (0,) for v in batch.values()):
            raise ValueError("empty batch: no examples to estimate a gradient from")
        if isinstance(self.objective, RewardObjective) and not {"records", "prompts"} <= set(batch):
            raise ValueError(
                "the reward objective generates from prompt batches (with 'records' and 'prompts'): build the "
                "dataset with MeZODataset(..., prompt_only=True), as MeZOConfig.dataset_options() does for it"
            )
        if self.objective is not None:
            return  # a custom objective defines its own batch
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in batch:
                raise ValueError(f"batch is missing {key!r} (has {sorted(batch)})")
        if batch["input_ids"].numel() == 0:
            raise ValueError("empty batch: no tokens to estimate a gradient from")
        if not bool((batch["labels"] != -100).any()):
            raise ValueError("batch has no labelled tokens (every label is -100): the loss is undefined")

    def _skip(self, out: StepOutput) -> StepOutput:
        self.nonfinite_in_a_row += 1
        self.skipped_steps += 1
        out.skipped = True
        logger.warning(
            "step %d: non-finite loss (%s, %s); update skipped", out.step, out.loss_perturbed, out.loss_baseline
        )
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} consecutive steps with non-finite loss "
                f"(max_nonfinite_steps={self.config.max_nonfinite_steps}); last L+={out.loss_perturbed}, "
                f"L-={out.loss_baseline}. Lower epsilon or learning_rate, or check the data."
            )
        self.global_step += 1
        return out

    def _warn_if_vanishing(self, what: str, seed: int, scale: float) -> None:
        """Warn (once per kind) when ``w + scale*z`` rounds back to w for most sampled elements."""
        if what in self.warnings_issued or scale == 0:
            return
        sampled = self.backend.vanishing_fraction(seed, scale, update=what == "update")
        if sampled is None:  # the weights are not in this process
            return
        fraction, dtypes = sampled
        if fraction > VANISHING_THRESHOLD:
            self.warnings_issued.add(what)
            warnings.warn(
                f"MeZO {what} below the weights' resolution: {fraction:.0%} of sampled elements "
                f"({dtypes}) are unchanged by a write of scale {scale:.3g} (criterion: more than "
                f"{VANISHING_THRESHOLD:.0%}). Raise epsilon/learning_rate or set fp32_trainable=True.",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------------- loops
    def train(
        self,
        dataloader: Iterable,
        on_step: Optional[Callable[[StepOutput, float], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        held_back: Optional[list] = None,
        on_step_reads_weights: bool = True,
    ) -> TrainOutput:
        """Runs until ``config.max_steps``, cycling epochs; returns a `TrainOutput`.

        `on_step(output, seconds)` is called after each step (logging, checkpoints, keeping
        the outputs if you want them); `should_stop()`, asked after each step, ends the loop
        early (a signal, say). `held_back`: training batches kept out of `dataloader`, which
        ``epsilon="auto"`` and ``learning_rate="auto"`` probe first (in that order) and the
        divergence guard checks the weights on (`guard`); default: the loader's first batches
        (then not held back).

        Between steps a step's update may wait for the next step's first pass, which writes
        it in the same sweep as its perturbation (the restore log: one sweep of the weights
        fewer per step). Whatever reads the weights through the trainer (`evaluate`,
        checkpoints, export) writes it first; so do the loop's end and an exception leaving
        it. `on_step` sees the updated weights unless `on_step_reads_weights` is False (a
        callback that reads them only through the trainer, as the main job's does).
        """
        c = self.config
        if held_back is None and c.held_back_batches():
            held_back = list(itertools.islice(dataloader, c.held_back_batches()))
        if c.epsilon == AUTO and self.epsilon_found is None:
            self.find_epsilon(held_back[0])
        if c.learning_rate == AUTO and self.learning_rate_found is None:
            self.find_learning_rate(held_back[: c.lr_search_batches])
        guard_batches = None if self.guard is None else held_back[: c.guard_batches]
        guard_note = None
        if self.guard is not None and self.guard.start is None:
            self.guard.begin(self._guard_check(guard_batches))
            self.snapshot_best_weights()  # the weights the guard comes back to until a check beats them
            logger.info("divergence guard: the start scores %s on %d batches", describe(self.guard.start),
                        len(guard_batches))  # fmt: skip
            guard_note = {"start": self.guard.start}
        bar = tqdm(
            total=self.config.max_steps,
            initial=self.global_step,
            desc="MeZO",
            disable=self.config.disable_tqdm,
            dynamic_ncols=True,
        )
        steps = skipped = 0
        loss_sum = 0.0
        with self.backend.holding_perturbation():  # the weights are exact when the loop ends, however it ends
            while self.global_step < self.config.max_steps:
                sampler = getattr(dataloader, "sampler", None)  # a DataLoader, or a wrapper that exposes its sampler
                if isinstance(sampler, DistributedSampler):
                    sampler.set_epoch(self.epoch)  # a new seeded order per epoch
                yielded = False
                for index, batch in enumerate(dataloader):
                    yielded = True
                    if index < self.batches_seen_in_epoch:
                        continue  # resuming mid-epoch: these batches were used before the save
                    started = time.perf_counter()
                    out = self.step(batch)
                    if self.guard is not None:
                        out.guard = self._guard_after(out, guard_batches)
                    if guard_note is not None:  # logged with the run's first step
                        out.guard, guard_note = {**guard_note, **(out.guard or {})}, None
                    self.batches_seen_in_epoch = index + 1
                    seconds = time.perf_counter() - started
                    steps += 1
                    if out.skipped:
                        skipped += 1
                    else:
                        loss_sum += (out.loss_perturbed + out.loss_baseline) / 2
                    bar.update(1)
                    if out.reward is not None:
                        bar.set_postfix(reward=f"{out.reward['mean']:.4f}", std=f"{out.reward['std']:.3g}")
                    else:
                        loss = (out.loss_perturbed + out.loss_baseline) / 2
                        bar.set_postfix(loss=f"{loss:.4f}", g=f"{out.coefficient:.3g}")
                    if on_step is not None:
                        if on_step_reads_weights:
                            self.backend.settle_weights()
                        on_step(out, seconds)
                    if self.global_step >= self.config.max_steps or (should_stop is not None and should_stop()):
                        break
                else:
                    self.epoch += 1
                    self.batches_seen_in_epoch = 0
                if not yielded:  # (a resume at an epoch's end skips all of that epoch's batches)
                    raise ValueError("the training dataloader yielded no batches")
                if should_stop is not None and should_stop():
                    break
        bar.close()
        mean_loss = loss_sum / (steps - skipped) if steps > skipped else math.nan
        return TrainOutput(steps, self.global_step, mean_loss, skipped)

    def evaluate(self, dataloader: Iterable) -> dict:
        """Unperturbed loss (and candidate accuracy when batches carry candidates; for the
        reward objective the mean greedy reward, and a few sample completions)."""
        total = count = correct = examples = 0
        objective_name, samples = None, []
        for batch in tqdm(dataloader, desc="eval", disable=self.config.disable_tqdm, leave=False):
            objective = self._objective_for(batch)
            named = isinstance(objective, (RowObjective, RewardObjective))
            objective_name = objective.name if named else type(objective).__name__
            if self.objective is None:
                sums, counts = self.backend.row_logprobs(batch)
                t, n = objective.reduce(sums, counts, batch)
                if has_candidates(batch):
                    batch_correct, batch_examples = accuracy_counts(sums, counts, batch)
                    correct += batch_correct
                    examples += batch_examples
            else:
                t, n = self.backend.loss_sum(objective, batch)
                if isinstance(objective, RewardObjective) and len(samples) < EVAL_SAMPLES:
                    samples += [dict(zip(("prompt", "completion", "reward"), s)) for s in objective.samples]
            total += float(t)
            count += int(n)
        result = {"loss": total / count if count else math.nan, "objective": objective_name}
        if objective_name == RewardObjective.name:
            result["reward"] = -result["loss"]
            result["samples"] = samples[:EVAL_SAMPLES]
        if examples:
            result["accuracy"] = correct / examples
            result["examples"] = examples
        return result
