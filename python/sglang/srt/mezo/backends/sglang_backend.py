"""The SGLang backend: MeZO's forward passes on an upstream `sglang.Engine`.

* Loss: the engine's input-token log-probs over completion tokens, requested with
  ``logprob_start_len = prompt length - 1`` so the prompt's KV stays shareable in the
  radix cache (SGLang reuses KV only up to ``logprob_start_len``).
* Weights: perturbed, restored and updated inside the engine's scheduler processes by
  the ``mezo_*`` RPC methods of `engine_plugin` (registered as an SGLang plugin); only
  seeds and scalars are sent.
* LoRA: the base stays frozen in the engine; the adapter is loaded into SGLang's LoRA path
  (pinned, so it is never evicted), every request names it, and the RPC methods perturb
  and update its tensors in SGLang's LoRA memory pool, where the forward reads them.
* Radix cache: kept on. Every weight change (scope begin/end, update, load) advances
  `weight_version`; before a pass, a cache last flushed at another version is flushed, so
  KV computed under other weights is never served. `cached_tokens` is reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Optional

import torch

from sglang.srt.mezo.backends.engine_launch import EngineCrashWatch
from sglang.srt.mezo.backends.lora_population import SLOT_PREFIX, runs_population, slots_per_step
from sglang.srt.mezo.config import MeZOConfig, split_list
from sglang.srt.mezo.kv_cache import CacheStats
from sglang.srt.mezo.objectives import IGNORE_INDEX, RowObjective, example_groups
from sglang.srt.mezo.primitives import require_all, tensor_digest
from sglang.srt.mezo.rewards.objective import RewardObjective
from sglang.srt.mezo.structured_directions import STRUCTURED_ESTIMATORS

logger = logging.getLogger(__name__)

LORA_NAME = "mezo"


class EngineRPCError(RuntimeError):
    """A MeZO RPC method raised inside the engine (the engine itself keeps running)."""


def check_engine_layout(server_args) -> None:
    """Refuses, naming the setting, an engine whose processes MeZO cannot all reach or map:
    data-parallel replicas (upstream's collective_rpc reaches none of them: each has its
    own RPC socket, so they could not be perturbed identically), attention data
    parallelism (layers split over other ranks than the TP ranks), pipeline stages and
    several nodes (acknowledgements and shard files are per TP rank, in this host's
    temporary directory)."""
    refused = {
        "dp_size": (server_args.dp_size, 1),
        "enable_dp_attention": (server_args.enable_dp_attention, False),
        "pp_size": (server_args.pp_size, 1),
        "nnodes": (server_args.nnodes, 1),
    }
    for name, (value, supported) in refused.items():
        if value != supported:
            raise ValueError(
                f"an SGLang engine with {name}={value}: MeZO drives engines of tensor-parallel ranks on one host "
                f"only ({name}={supported}). For data parallelism, run torchrun with one engine per process."
            )


class SGLangBackend:
    """Drives an `sglang.Engine` as MeZO's forward backend.

    Trains full parameters, a name subset, or (``peft="lora"``) a LoRA adapter served by
    the engine's LoRA path: `adapter_path` is then the initial adapter in peft format, and
    the engine must have been launched with `lora_engine_args`. `model_path` is the HF
    checkpoint dir the engine serves (`engine_checkpoint.engine_checkpoint`): its self-test
    reference, and what `export` writes the trained full parameters into.
    """

    name = "sglang"

    def __init__(
        self,
        engine,
        config: MeZOConfig,
        model_path: str,
        flush_on_version_change: bool = True,
        adapter_path: Optional[str] = None,
        crash_watch: Optional[EngineCrashWatch] = None,
    ):
        if config.peft == "prefix":
            raise NotImplementedError("prefix tuning has no SGLang serving path: use the transformers backend")
        if config.estimator in STRUCTURED_ESTIMATORS:
            raise ValueError(
                f"estimator={config.estimator!r}: structured directions run on the transformers backend; "
                "the engine draws dense z (use mezo or fzoo)"
            )
        if config.perturbation_mechanism == "restore_log":
            raise ValueError(
                "perturbation_mechanism='restore_log' is a CPU-process mechanism: the SGLang engine "
                "perturbs unit by unit inside its processes ('unit_scoped' or 'auto')"
            )
        self.engine = engine
        self.crash_watch = crash_watch
        self.config = config
        self.model = engine
        self.model_path = model_path
        self.weight_version = 0
        self.cache_version = -1  # unknown: whatever the engine cached before this backend is flushed
        self.flush_on_version_change = flush_on_version_change
        self.stats = CacheStats()
        check_engine_layout(engine.server_args)
        self.tp_size = int(engine.server_args.tp_size)
        self._owner = uuid.uuid4().hex  # the engine serves the last backend set up on it
        self._tmp = tempfile.TemporaryDirectory(prefix="mezo-rpc-")
        self.lora_name = None
        self.adapter_path = None
        self.slot_names: list = []  # LoRA adapters in the engine that hold a step's perturbed points
        lora = {}
        if config.peft == "lora":
            if adapter_path is None:
                raise ValueError("peft='lora' on the SGLang backend needs adapter_path (the initial peft adapter)")
            self.adapter_path = Path(adapter_path)
            for_engine = self._adapter_for_engine()
            self.slot_names = self._population_slots(engine, config)
            pool = int(engine.server_args.max_loras_per_batch)
            for name in (LORA_NAME, *(f"{SLOT_PREFIX}{i}" for i in range(pool))):
                engine.unload_lora_adapter(name)  # a previous backend's on this engine (none: a refusal, ignored)
            loaded = []
            for name in (LORA_NAME, *self.slot_names):
                outcome = engine.load_lora_adapter(name, str(for_engine), pinned=True)
                if not outcome.success:
                    for done in loaded:  # nothing of this backend left pinned in the pool
                        engine.unload_lora_adapter(done)
                    raise RuntimeError(
                        f"SGLang could not load the adapter {self.adapter_path} as {name!r}: {outcome.error_message}"
                    )
                loaded.append(name)
            self.lora_name = LORA_NAME
            names = [LORA_NAME, *self.slot_names]
            self._generate([[0, 0]] * len(names), [0] * len(names), names)  # a first request puts them in the pool
            lora = dict(lora_name=LORA_NAME, adapter_path=str(self.adapter_path), slot_names=self.slot_names)
        patterns = split_list(config.trainable_patterns)
        reports = self._rpc(
            "mezo_setup", kind=config.perturbation, patterns=patterns, model_path=str(model_path), **lora
        )
        for rank, report in enumerate(reports):
            if report["tp"] != [rank, self.tp_size]:
                raise RuntimeError(f"tensor-parallel rank {rank} of {self.tp_size} reported itself as {report['tp']}")
            if report["mismatched"] or report["missing"] or not report["tensors"]:
                raise RuntimeError(
                    f"SGLang engine self-test failed on tensor-parallel rank {rank} of {self.tp_size}: the engine's "
                    "tensors do not match the HF checkpoint (or adapter) "
                    f"(mismatched {report['mismatched'][:5]}, missing {report['missing'][:5]}); the engine's "
                    "internals may have moved (this backend was written against sglang 0.5.23)"
                )
        if any(report["tensors"] != reports[0]["tensors"] for report in reports):
            raise RuntimeError("the SGLang engine's tensor-parallel ranks train different tensors")
        self.tensor_names = [name for name, _ in reports[0]["tensors"]]
        self._stopped = False

    @staticmethod
    def _population_slots(engine, config: MeZOConfig) -> list:
        """The LoRA slots of a step's population (`lora_population`) where the config runs
        it and the engine's pool has room (2 + slots: `engine_launch.lora_engine_args`);
        ``auto`` on an engine launched without room goes pass by pass (logged), ``on`` is refused."""
        if not runs_population(config):
            return []
        slots, pool = slots_per_step(config), int(engine.server_args.max_loras_per_batch)
        if 2 + slots > pool:
            why = (
                f"the population's {slots} LoRA slots need max_loras_per_batch >= {2 + slots} (the trained adapter, "
                f"one free slot, the slots); this engine has {pool}: launch it with engine_launch.lora_engine_args(config)"
            )
            if config.population_batch == "on":
                raise ValueError(f"population_batch='on': {why}")
            logger.warning("population_batch='auto': pass by pass, since %s", why)
            return []
        logger.info("a step's perturbed adapters run as %d LoRA slots of one engine call", slots)
        return [f"{SLOT_PREFIX}{i}" for i in range(slots)]

    def _adapter_for_engine(self) -> Path:
        """The adapter dir to hand the engine's LoRA loader: `adapter_path`, or a copy padded
        to the engine's padded heads and rows where its CPU path padded them
        (`lora_pool.engine_adapter`); MeZO trains and saves the unpadded parts."""
        from safetensors.torch import load_file, save_file

        from sglang.srt.mezo.backends.lora_pool import engine_adapter

        sizes = self._rpc("mezo_split_sizes")[0]
        if all(checkpoint == engine for checkpoint, engine, _ in sizes.values()):
            return self.adapter_path
        padded = Path(self._tmp.name) / "engine-adapter"
        shutil.copytree(self.adapter_path, padded, ignore=shutil.ignore_patterns("*.safetensors"))
        weights = self.adapter_path / "adapter_model.safetensors"
        save_file(engine_adapter(load_file(str(weights)), sizes), str(padded / weights.name))
        return padded

    # -- RPC ---------------------------------------------------------------------------
    def _rpc(self, method: str, **kwargs) -> list:
        """Calls `method` in every scheduler process and returns each tensor-parallel rank's
        result (JSON), in rank order, checking the outcome every rank acknowledged
        (`engine_plugin._acknowledged`): a failure raises `EngineRPCError` naming the method
        and the rank, also under ``python -O``."""
        from sglang.srt.mezo.backends.engine_protocol import ack_file

        acks = Path(tempfile.mkdtemp(prefix=f"{method}-", dir=self._tmp.name))
        try:
            try:
                self.engine.collective_rpc(method, ack_dir=str(acks), owner=self._owner, **kwargs)
            except AssertionError as error:  # upstream's report of a failed RPC (absent under python -O)
                raise EngineRPCError(f"{method} failed inside the SGLang engine: {error}") from error
            results = []
            for rank in range(self.tp_size):
                path = ack_file(acks, rank)
                if not path.is_file():
                    raise EngineRPCError(
                        f"{method}: tensor-parallel rank {rank} of the SGLang engine did not acknowledge the call"
                    )
                outcome = json.loads(path.read_text())
                if not outcome["ok"]:
                    raise EngineRPCError(f"{method} failed inside the SGLang engine (rank {rank}): {outcome['error']}")
                results.append(outcome["result"])
            return results
        finally:
            shutil.rmtree(acks, ignore_errors=True)

    def _weights_changed(self) -> None:
        self.weight_version += 1

    def _ensure_fresh_cache(self) -> None:
        if self.flush_on_version_change and self.cache_version != self.weight_version:
            with self._engine_call():
                self.engine.flush_cache()
            self.cache_version = self.weight_version

    # -- backend interface ---------------------------------------------------------------
    @property
    def mechanism(self) -> str:
        return "unit_scoped (inside the engine)"

    @property
    def cache_stats(self) -> dict:
        return self.stats.as_dict()

    def vanishing_fraction(self, seed: int, scale: float, update: bool) -> Optional[tuple]:
        """None: the weights live in the engine's processes, not sampled from here."""
        return None

    def frozen_state(self) -> dict:
        """{}: the engine's frozen weights live in its processes."""
        return {}

    @contextlib.contextmanager
    def _pass(self, seed: Optional[int], scale: float):
        """One engine pass under ``w + scale * z(seed)`` (w if seed is None), on a radix cache
        that holds nothing of other weights."""
        try:
            if seed is not None:
                self._weights_changed()
                # inside the try: if some ranks fail to begin, the others still end their scope
                self._rpc("mezo_begin", seed=int(seed), scale=float(scale))
            self._ensure_fresh_cache()
            yield
        finally:
            if seed is not None:
                self._rpc("mezo_end")
                self._weights_changed()

    def row_logprobs(self, batch: dict, seed: Optional[int] = None, scale: float = 0.0) -> tuple:
        with self._pass(seed, scale):
            return self._generate_rows(batch, [self.lora_name])[0]

    def completions(self, objective: RewardObjective, batch: dict, seed: Optional[int] = None, scale: float = 0.0):
        """The batch's completions generated by the engine under ``w + scale * z(seed)`` as
        `objective`'s settings say (`engine_sampling.generation_requests`), decoded here and
        cut at the first stop string (the engine runs without a tokenizer)."""
        with self._pass(seed, scale):
            return self._completions(objective, batch, [self.lora_name])[0]

    def _completions(self, objective: RewardObjective, batch: dict, adapters: list) -> list:
        """The batch's completions through each of `adapters` (None: the base model), all in
        one engine call: a list of completions per adapter."""
        from sglang.srt.mezo.backends.engine_sampling import generation_requests
        from sglang.srt.mezo.generation import cut_at_stop, prompt_token_lists

        settings, tokenizer = objective.settings, objective.tokenizer
        prompts = prompt_token_lists(batch)
        requests = generation_requests(settings, prompts)
        per_adapter = len(requests["input_ids"])
        call = {key: value * len(adapters) for key, value in requests.items()}
        calls = [{**call, **self._lora_paths(adapters, per_adapter)}]
        if settings.num_samples > 1:  # each prompt prefilled once first: its samples then reuse its KV
            prefill = dict(
                input_ids=prompts * len(adapters),
                sampling_params={"max_new_tokens": 0},
                **self._lora_paths(adapters, len(prompts)),
            )
            calls.insert(0, prefill)
        self.stats.begin_pass()
        with self._engine_call():
            for call in calls:
                outputs = self.engine.generate(**call)
                cached = sum(int(out["meta_info"].get("cached_tokens", 0)) for out in outputs)
                self.stats.add("radix_cache", sum(len(ids) for ids in call["input_ids"]) - cached, cached)
        texts = [tokenizer.decode(out["output_ids"], skip_special_tokens=True) for out in outputs]
        texts = [cut_at_stop(text, settings.stop) for text in texts]
        return [texts[i * per_adapter : (i + 1) * per_adapter] for i in range(len(adapters))]

    def loss_sums(self, objective, batch: dict, points: list) -> list:
        """(sum, count) at each point: with LoRA slots (``population_batch``), the built-in
        and reward objectives in one engine call over every slot (SGLang's multi-LoRA batch),
        else pass by pass."""
        if not self.slot_names or len(points) < 2 or not isinstance(objective, (RowObjective, RewardObjective)):
            return [self.loss_sum(objective, batch, seed, scale) for seed, scale in points]
        adapters = self._write_slots(points)
        if isinstance(objective, RowObjective):
            totals = [objective.reduce(sums, counts, batch) for sums, counts in self._generate_rows(batch, adapters)]
        else:
            totals = [objective.reduce(batch, texts) for texts in self._completions(objective, batch, adapters)]
        return [(float(total), int(count)) for total, count in totals]

    def _write_slots(self, points: list) -> list:
        """Writes a slot per perturbed point (`engine_plugin.mezo_write_slots`) and names the
        adapter each point runs on (the trained one for the unperturbed point); the radix
        cache keeps nothing computed under the slots' earlier values."""
        perturbed = [[int(seed), float(scale)] for seed, scale in points if seed is not None]
        self._weights_changed()
        self._rpc("mezo_write_slots", points=perturbed)
        self._ensure_fresh_cache()
        slots = iter(self.slot_names)
        return [self.lora_name if seed is None else next(slots) for seed, _ in points]

    def loss_sum(self, objective, batch: dict, seed: Optional[int] = None, scale: float = 0.0) -> tuple:
        if isinstance(objective, RewardObjective):
            total, count = objective.reduce(batch, self.completions(objective, batch, seed, scale))
            return float(total), int(count)
        if not isinstance(objective, RowObjective):
            raise TypeError(
                "the SGLang backend computes built-in objectives (nll, candidate_ce, accuracy, reward) only"
            )
        sums, counts = self.row_logprobs(batch, seed, scale)
        total, count = objective.reduce(sums, counts, batch)
        return float(total), int(count)

    def holding_perturbation(self):
        """Every engine pass perturbs and restores within its own RPC: nothing to hold."""
        return contextlib.nullcontext()

    def settle_weights(self) -> None:
        """Every update RPC writes the engine's weights before it returns: nothing waits."""

    def apply_update(self, directions: list, lr: float) -> None:
        c = self.config
        terms = [[int(s), float(g)] for s, g in directions]
        self._rpc("mezo_update", terms=terms, lr=float(lr), weight_decay=c.weight_decay, momentum=c.momentum)
        self._weights_changed()

    def checksum(self) -> dict:
        """name -> digest of each trainable tensor, unsharded (`primitives.tensor_digest`): the
        transformers backend's digests of the same weights."""
        return {name: tensor_digest(t) for name, t in self.trainable_state().items()}

    def load_trainable(self, safetensors_path: str) -> None:
        self._rpc("mezo_load", path=str(safetensors_path))
        self._weights_changed()

    def trainable_state(self) -> dict:
        """HF (or peft) name -> the engine's current trainable tensor, unsharded: every rank
        saves its parts, gathered here (`engine_protocol.read_gathered`)."""
        from sglang.srt.mezo.backends.engine_protocol import read_gathered

        shards = Path(tempfile.mkdtemp(prefix="trainable-", dir=self._tmp.name))
        try:
            self._rpc("mezo_save", directory=str(shards))
            return read_gathered(shards, self.tp_size)
        finally:
            shutil.rmtree(shards, ignore_errors=True)

    def load_trainable_state(self, weights: dict) -> None:
        """Copies `weights` (HF or peft names) into the engine's trainable tensors; every one is
        required (`primitives.require_all`, checked here and again inside the engine)."""
        from safetensors.torch import save_file

        require_all(self.tensor_names, weights)
        path = Path(self._tmp.name) / "load.safetensors"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
        self.load_trainable(str(path))

    def momentum_state(self) -> dict:
        if self.config.momentum > 0:
            raise NotImplementedError("momentum buffers live in the engine and are not checkpointed")
        return {}

    def load_momentum_state(self, state: dict) -> None:
        if state:
            raise NotImplementedError("momentum buffers live in the engine and are not checkpointed")

    def _generate_rows(self, batch: dict, adapters: list) -> list:
        """Per-row completion log-likelihood from the engine's input-token log-probs, through
        each of `adapters` (None: the base model) in the same calls: [(sums, counts)] per adapter.

        The radix cache inserts a request's prefix only once the request is done, so rows
        sent together share nothing. The first row of each example goes first; the other
        rows (the rest of its candidates) follow and reuse its prompt's KV (keyed by adapter).
        """
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        requests, starts, targets = [], [], []
        for r in range(ids.shape[0]):
            real = mask[r].bool()
            tokens, lab = ids[r][real].tolist(), labels[r][real].tolist()
            labelled = [i for i, v in enumerate(lab) if v != IGNORE_INDEX]
            if not labelled or labelled[0] == 0:
                raise ValueError(f"row {r}: needs at least one labelled token after the first position")
            requests.append(tokens)
            starts.append(labelled[0] - 1)  # the entry at logprob_start_len is None
            targets.append([(i, lab[i]) for i in labelled])
        groups = example_groups(batch)
        first = [rows[0] for rows in groups]
        rest = [r for rows in groups for r in rows[1:]]
        outputs = {}
        for wave in (first, rest):
            if wave:
                keys = [(a, r) for a in range(len(adapters)) for r in wave]
                names = [adapters[a] for a, _ in keys]
                results = self._generate([requests[r] for _, r in keys], [starts[r] for _, r in keys], names)
                outputs.update(zip(keys, results))
        per_adapter, cached = [], 0
        for a in range(len(adapters)):
            sums = torch.zeros(len(requests), dtype=torch.float64)
            counts = torch.zeros(len(requests), dtype=torch.long)
            for r in range(len(requests)):
                meta = outputs[a, r]["meta_info"]
                entries = meta["input_token_logprobs"]
                for position, token in targets[r]:
                    logprob, token_id, _ = entries[position - starts[r]]
                    if token_id != token:
                        raise RuntimeError(f"row {r}: engine scored token {token_id} at {position}, expected {token}")
                    sums[r] += logprob
                    counts[r] += 1
                cached += int(meta.get("cached_tokens", 0))
            per_adapter.append((sums, counts))
        self.stats.begin_pass()
        self.stats.add("radix_cache", len(adapters) * int(mask.sum()) - cached, cached)
        return per_adapter

    @staticmethod
    def _lora_paths(adapters: list, requests: int) -> dict:
        """`Engine.generate`'s argument that serves `requests` requests through each of
        `adapters` in turn ({} when every one is None: the base model)."""
        if all(name is None for name in adapters):
            return {}
        return {"lora_path": [name for name in adapters for _ in range(requests)]}

    def _generate(self, input_ids: list, starts: list, adapters: list) -> list:
        """One scoring call; `adapters`: each request's adapter (None: the base model)."""
        lora = self._lora_paths(adapters, 1)
        with self._engine_call():
            return self.engine.generate(
                input_ids=input_ids,
                sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                return_logprob=True,
                logprob_start_len=starts,
                **lora,
            )

    def _engine_call(self):
        """The context of a call to the engine: `EngineCrashWatch.calls` when watched."""
        return contextlib.nullcontext() if self.crash_watch is None else self.crash_watch.calls()

    def save_adapter(self, directory) -> Path:
        """The trained LoRA adapter in peft format (the initial adapter's config, trained weights)."""
        from safetensors.torch import save_file

        if self.adapter_path is None:
            raise ValueError("save_adapter needs a LoRA adapter (peft='lora')")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state(), str(directory / "adapter_model.safetensors"))
        shutil.copyfile(self.adapter_path / "adapter_config.json", directory / "adapter_config.json")
        return directory

    def export(self, directory: Path, tokenizer=None) -> Path:
        """LoRA: the adapter in peft format, written from the engine's pool. Full parameters:
        the served checkpoint with the engine's trained tensors (`write_trained_model`)."""
        from sglang.srt.mezo.backends.engine_checkpoint import write_trained_model

        directory = Path(directory)
        if self.adapter_path is not None:
            self.save_adapter(directory)
        else:
            write_trained_model(self.model_path, self.trainable_state(), self.config.dtype, directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory

    def shutdown(self) -> None:
        """Stops the engine (once). Upstream's `Engine.shutdown` kills every child process of
        the caller, so other engines started from this process stop too."""
        if self._stopped:
            return
        self._stopped = True
        self.engine.shutdown()
        self._tmp.cleanup()
