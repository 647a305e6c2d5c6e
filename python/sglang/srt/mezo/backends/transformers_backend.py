"""The transformers backend: forwards and weight writes on an in-process model."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from sglang.srt.mezo.backends.lora_population import LoRASlots, Population, runs_population
from sglang.srt.mezo.backends.lora_population import unsupported_reason as lora_unsupported_reason
from sglang.srt.mezo.backends.lowrank_population import LowRankDeltas
from sglang.srt.mezo.backends.lowrank_population import unsupported_reason as lowrank_unsupported_reason
from sglang.srt.mezo.config import MeZOConfig, population_form
from sglang.srt.mezo.generation import transformers_completions
from sglang.srt.mezo.kv_cache import CachedRowForward
from sglang.srt.mezo.objectives import RowObjective, example_groups, kept_logits, row_logprobs
from sglang.srt.mezo.perturbation import (
    UnitScopedPerturbation,
    WeightVersions,
    vanishing_fraction,
)
from sglang.srt.mezo.primitives import require_all
from sglang.srt.mezo.restore_log import RestoreLogPerturbation
from sglang.srt.mezo.rewards.objective import RewardObjective
from sglang.srt.mezo.structured_directions import direction_family
from sglang.srt.mezo.trainable import (
    apply_peft,
    canonical_name,
    collect_trainable,
    quantize_frozen_linears,
    trainable_names,
    unit_root,
)
from sglang.srt.mezo.zo_sgd import prepare_update

logger = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """By type: torch.OutOfMemoryError (CUDA and other accelerators) and MemoryError; the CPU
    allocator's failure, which torch raises as a plain RuntimeError, is the one case told by
    its text."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)


def halving_on_out_of_memory(attempt, size: int, floor: int, retrying: str, too_big=None) -> tuple:
    """(`attempt(size)`, the size it took), the size halved (never below `floor`) after each
    out-of-memory error and logged with `retrying` % the new size; out of memory at `floor`
    re-raises, or raises `too_big(size)` where given (a message saying what to change)."""
    while True:
        try:
            return attempt(size), size
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            if size <= floor:
                if too_big is None:
                    raise
                raise too_big(size) from error
            size = max(floor, size // 2)
            logger.warning("out of memory " + retrying, size)


def split_rows(batch: dict, size: int) -> list:
    """Sub-batches of at most `size` rows (more when one example has more candidates)."""
    rows = batch["input_ids"].shape[0]
    if size >= rows:
        return [batch]
    chunks, current = [], []
    for group in example_groups(batch):
        if current and len(current) + len(group) > size:
            chunks.append(current)
            current = []
        current = current + group
    chunks.append(current)
    return [{k: v[c[0] : c[-1] + 1] if torch.is_tensor(v) and v.dim() else v for k, v in batch.items()} for c in chunks]


def stack_copies(batch: dict, copies: int) -> dict:
    """`copies` copies of the batch's rows one after another, with ``copy_index`` naming each
    row's copy; example ids are kept apart per copy (each copy's examples its own groups)."""
    rows = batch["input_ids"].shape[0]
    out = {}
    for key, value in batch.items():
        per_row = torch.is_tensor(value) and value.dim() and value.shape[0] == rows
        out[key] = value.repeat(copies, *([1] * (value.dim() - 1))) if per_row else value
    index = torch.arange(copies, device=batch["input_ids"].device).repeat_interleave(rows)
    out["copy_index"] = index
    if "example_id" in batch:
        out["example_id"] = out["example_id"] + index * (int(batch["example_id"].max()) + 1)
    return out


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`, unless accelerate already spread it over several devices
    (``hf_device_map``): then every module stays where it is and MeZO perturbs and updates
    each tensor on its own device."""
    placement = getattr(model, "hf_device_map", None) or {}
    if len(set(placement.values())) > 1:
        logger.info("the model is spread over %s by its device_map: not moved", sorted(map(str, placement.values())))
        return model
    return model.to(device)


def input_device(model: nn.Module) -> torch.device:
    """Where a batch must be for `model`'s first layer (the input embedding)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None:
        return weight.device
    return next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class TransformersBackend:
    """Runs MeZO's forward passes on any `AutoModelForCausalLM` (optionally peft-wrapped).

    The model is moved to ``config.device`` (see `place_model`); batches are moved to its
    input device; per-row results come back to the CPU (a few float64 values per row).
    """

    name = "transformers"

    def __init__(self, model: nn.Module, config: MeZOConfig):
        model = place_model(model, config.torch_device())
        model = apply_peft(model, config)
        names = trainable_names(model, config)
        self.quantized = quantize_frozen_linears(model, names, config.quantize_base)
        for p in model.parameters():  # MeZO never builds an autograd graph
            p.requires_grad_(False)
        self.model = model.eval()
        self.config = config
        self.versions = WeightVersions()
        self.tensors = collect_trainable(model, names, config.fp32_trainable, canonical_name)
        self.family = direction_family(
            config.estimator, config.perturbation, config.sparse_fraction, config.lowrank_rank
        )
        self.perturbation = self._mechanism(config.perturbation_mechanism)
        # (model, batch, perturbing) -> per-row (sums, counts), with exact KV/hidden reuse
        self.row_forward = CachedRowForward(model, self.tensors, self.versions, config)
        self.micro_batch_rows = config.micro_batch_size  # 0: whole batches until memory runs out
        self.device = input_device(model)
        self.population = self._population(config.population_batch)
        self.population_group = 0  # adapters per generation call (0: all; halved on out of memory)

    def _population(self, requested: str) -> Optional[Population]:
        """How a step's points run in one call where ``population_batch`` asks for it
        (`runs_population`): LoRA slots (`lora_population`), or low-rank deltas for the
        full-parameter ``lowrank`` estimator (`lowrank_population`); None: pass by pass."""
        c = self.config
        if not runs_population(c):  # (the config refuses "on" where no form exists)
            return None
        if population_form(c) == "lora":
            reason = lora_unsupported_reason(self.model, self.tensors)
        else:
            reason = lowrank_unsupported_reason(self.tensors)
        if reason is not None:
            if requested == "on":
                raise ValueError(f"population_batch='on': {reason}")
            logger.info("population_batch=auto: pass by pass, since %s", reason)
            return None
        logger.info("a step's points run in one call (population_batch=%s)", requested)
        if population_form(c) == "lora":
            return LoRASlots(self.model, self.tensors, c.perturbation, self.family)
        return LowRankDeltas(self.tensors, self.family)

    def _mechanism(self, requested: str):
        """The perturbation mechanism: `requested`, or for ``auto`` the restore log where it
        applies (Rademacher z is free to regenerate, so whole-model moves beat per-unit copies
        on float32 CPU weights) and per-unit scratch copies elsewhere (structured directions
        always: the restore log subtracts dense z; and an all-zero tensor)."""
        kind = self.config.perturbation
        logged = self.family is None and RestoreLogPerturbation.supports(self.tensors, kind)
        if requested == "restore_log" and not logged:
            raise ValueError(
                "perturbation_mechanism='restore_log' needs dense Rademacher directions over float32 CPU tensors "
                f"without float32 masters (here: estimator={self.config.estimator!r}, perturbation={kind!r}, "
                f"dtypes {sorted({str(t.param.dtype) for t in self.tensors})}, devices "
                f"{sorted({str(t.param.device) for t in self.tensors})}); use 'unit_scoped' or 'auto'"
            )
        # A tensor of zeros (LoRA's B before training) has every element below eps: all of it
        # would be logged, overflowing the log on the first step; auto leaves such runs to
        # per-unit copies (LoRA tensors are small, so the copies cost little).
        if requested == "restore_log" or (
            requested == "auto" and logged and all(bool(t.value.any()) for t in self.tensors)
        ):
            return RestoreLogPerturbation(self.tensors, kind, self.versions)
        root = unit_root(self.model)
        return UnitScopedPerturbation(self.tensors, kind, self.versions, root=root, family=self.family)

    @property
    def mechanism(self) -> str:
        return self.perturbation.name

    @property
    def cache_stats(self) -> dict:
        return self.row_forward.stats.as_dict()

    def vanishing_fraction(self, seed: int, scale: float, update: bool) -> Optional[tuple]:
        self.perturbation.settle()
        fraction = vanishing_fraction(self.tensors, self.config.perturbation, seed, scale, update=update)
        return fraction, sorted({str(t.param.dtype) for t in self.tensors})

    @contextlib.contextmanager
    def _pass(self, seed: Optional[int], scale: float):
        """One pass's context: no autograd, the model in eval mode, its weights ``w + scale *
        z(seed)`` (the perturbation's scope), or exactly w if seed is None."""
        self.model.eval()
        with torch.no_grad():
            if seed is None:
                self.perturbation.settle()
                yield
            else:
                with self.perturbation.scope(seed, scale):
                    yield

    def row_logprobs(self, batch: dict, seed: Optional[int] = None, scale: float = 0.0) -> tuple:
        """Per-row completion log-likelihoods under ``w + scale * z(seed)`` (w if seed is None)."""
        batch = to_device(batch, self.device)
        perturbing = seed is not None
        with self._pass(seed, scale):
            return self._in_micro_batches(batch, lambda part: self.row_forward(self.model, part, perturbing))

    def _population_row_logprobs(self, batch: dict, points: list) -> list:
        """Per-row log-likelihoods at every point of `points`, in one call over the batch's
        rows once per point, each copy on its point's adapter (`lora_population`)."""
        batch = to_device(batch, self.device)
        with self._pass(None, 0.0):  # the trained adapter exact: slots are written from it
            names = self.population.adapter_names(points)
            stacked = stack_copies(batch, len(names))

            def forward(model, part: dict, keep: torch.Tensor) -> torch.Tensor:
                with self.population.routed([names[i] for i in part["copy_index"].tolist()]) as options:
                    return kept_logits(model, part, keep, **options)

            sums, counts = self._in_micro_batches(stacked, lambda part: row_logprobs(self.model, part, forward))
        return list(zip(sums.chunk(len(names)), counts.chunk(len(names))))

    def _in_micro_batches(self, batch: dict, run) -> tuple:
        """`run(part)` -> per-row (sums, counts) over the batch's rows in micro-batches under
        the same weights; on out-of-memory, halve and retry.

        MeZO needs only per-row sums, so any split gives the same result up to the rounding
        of differently shaped GEMMs. The size that worked is kept for later passes.
        """
        rows = batch["input_ids"].shape[0]
        size = min(rows, self.micro_batch_rows or self._budget_rows(batch) or rows)
        smallest = max(len(g) for g in example_groups(batch))

        def too_big(size: int) -> MemoryError:
            return MemoryError(
                f"out of memory with a micro-batch of {size} rows (one example): shorten max_length, "
                "train LoRA (--peft lora) or use a quantized/half-precision base"
            )

        parts, size = halving_on_out_of_memory(
            lambda size: [run(part) for part in split_rows(batch, size)], size, smallest,
            "in a forward: retrying with micro-batches of %d rows", too_big,
        )  # fmt: skip
        self.micro_batch_rows = size if size < rows else self.micro_batch_rows
        return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()

    def _budget_rows(self, batch: dict) -> int:
        """Rows whose activations fit ``memory_budget_mb``: per token the logits (vocab floats,
        at most every position) plus ~16 hidden-size floats of live layer activations."""
        if not self.config.memory_budget_mb:
            return 0
        cfg = self.model.config
        per_row = batch["input_ids"].shape[1] * (cfg.vocab_size + 16 * cfg.hidden_size) * 4
        return max(1, int(self.config.memory_budget_mb * 2**20 // per_row))

    def completions(self, objective: RewardObjective, batch: dict, seed: Optional[int] = None, scale: float = 0.0):
        """The batch's completions under ``w + scale * z(seed)``, generated as `objective`'s
        settings say (`generation.transformers_completions`)."""
        prompts = to_device({key: batch[key] for key in ("input_ids", "attention_mask")}, self.device)
        with self._pass(seed, scale):
            return transformers_completions(self.model, objective.tokenizer, prompts, objective.settings)

    def loss_sums(self, objective, batch: dict, points: list) -> list:
        """(sum, count) of `objective` at each (seed, scale) of `points`: with a population
        (``population_batch``: LoRA slots or low-rank deltas) the built-in and reward
        objectives in one call, else (and for a custom objective) pass by pass."""
        if self.population is None or len(points) < 2 or not isinstance(objective, (RowObjective, RewardObjective)):
            return [self.loss_sum(objective, batch, seed, scale) for seed, scale in points]
        if isinstance(objective, RowObjective):
            rows = self._population_row_logprobs(batch, points)
            totals = [objective.reduce(sums, counts, batch) for sums, counts in rows]
        else:
            totals = [
                objective.reduce(batch, texts) for texts in self._population_completions(objective, batch, points)
            ]
        return [(float(total), int(count)) for total, count in totals]

    def _population_completions(self, objective: RewardObjective, batch: dict, points: list) -> list:
        """The batch's completions at every point of `points` (a list per point), generated
        together on the points' adapters; under out of memory, fewer adapters per call."""
        prompts = to_device({key: batch[key] for key in ("input_ids", "attention_mask")}, self.device)
        rows = prompts["input_ids"].shape[0] * objective.settings.num_samples

        def generate(chunk: list) -> list:
            with self.population.routed([name for name in chunk for _ in range(rows)]) as options:
                return transformers_completions(
                    self.model, objective.tokenizer, prompts, objective.settings, len(chunk), **options
                )

        with self._pass(None, 0.0):
            names = self.population.adapter_names(points)
            group = min(len(names), self.population_group or len(names))
            parts, group = halving_on_out_of_memory(
                lambda group: [generate(names[i : i + group]) for i in range(0, len(names), group)], group, 1,
                "generating the population: %d adapters per call",
            )  # fmt: skip
        self.population_group = group if group < len(names) else self.population_group  # kept for later steps
        return [texts for part in parts for texts in part]

    def loss_sum(self, objective, batch: dict, seed: Optional[int] = None, scale: float = 0.0) -> tuple:
        """(sum, count) of `objective` under the perturbed weights; built-ins go through rows,
        the reward through generated completions."""
        if isinstance(objective, RowObjective):
            sums, counts = self.row_logprobs(batch, seed, scale)
            total, count = objective.reduce(sums, counts, batch)
            return float(total), int(count)
        if isinstance(objective, RewardObjective):
            total, count = objective.reduce(batch, self.completions(objective, batch, seed, scale))
            return float(total), int(count)
        batch = to_device(batch, self.device)
        with self._pass(seed, scale):
            total, count = objective(self.model, batch)
        return float(total), int(count)

    def holding_perturbation(self):
        """Context: perturbed passes and the update inside may share weight sweeps (the
        weights can rest at the last pass's offset between calls); exact when it exits."""
        return self.perturbation.holding()

    def settle_weights(self) -> None:
        self.perturbation.settle()

    def apply_update(self, directions: list, lr: float) -> None:
        """ZO-SGD update from [(seed, coefficient)] at the current weights, atomically."""
        c = self.config
        plan = prepare_update(self.tensors, directions, lr, c.weight_decay, c.momentum)
        self.perturbation.commit(plan)

    def trainable_state(self) -> dict:
        """Canonical name -> trainable tensor (the float32 master where there is one)."""
        self.perturbation.settle()
        return {t.name: t.value for t in self.tensors}

    def load_trainable_state(self, weights: dict) -> None:
        """Copies `weights` (canonical names) into the trainable tensors; every one is required."""
        require_all([t.name for t in self.tensors], weights)
        self.perturbation.settle()
        with torch.no_grad():
            for t in self.tensors:
                t.value.copy_(weights[t.name])
                t.sync_param()
                for m in t.owners:
                    self.versions.bump(m)

    def frozen_state(self) -> dict:
        trainable = {id(t.param) for t in self.tensors}
        if self.population is not None:
            trainable |= self.population.parameter_ids()  # scratch
        return {name: p for name, p in self.model.named_parameters() if id(p) not in trainable}

    def momentum_state(self) -> dict:
        return {t.name: t.momentum for t in self.tensors if t.momentum is not None}

    def load_momentum_state(self, state: dict) -> None:
        for t in self.tensors:
            if t.name in state:
                t.momentum = state[t.name].to(t.value.device, torch.float32, copy=True)

    def export(self, directory: Path, tokenizer=None) -> Path:
        """A peft adapter dir for LoRA / prefix tuning, else an HF model dir (config, weights,
        tokenizer): written from wherever the model lives, loadable onto any device."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.perturbation.settle()
        for t in self.tensors:
            t.sync_param()
        self.model.save_pretrained(directory, **(self.population.export_options() if self.population else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory

    def shutdown(self) -> None:
        """Nothing to release: the model lives in this process."""
