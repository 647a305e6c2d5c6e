"""Exact KV / hidden-state reuse for MeZO's forward passes.

MeZO's two passes run under different weights, so anything computed under +eps z is
wrong under -eps z: L+ - L- lives entirely in O(eps) activation differences. Reuse here
is therefore keyed on weight versions, never on eps:

* `VersionedStore`: an LRU, byte-bounded store whose entries record the version of every
  module they were computed from, *as observed while that module ran*. An entry is
  served only while each of those modules still has that version and is not about to be
  perturbed; perturb, restore, update and load all advance versions, so a + pass entry is
  never served in the - pass, and an entry from before an update is never served after.
* Prompt-prefix sharing (`SharedPrefixForward`): rows that share a prompt (an example's
  candidates, few-shot demonstrations) run the prompt once per pass and continue from its
  KV (``past_key_values`` expanded per row): C*(P+T) tokens become P + C*T.
* Frozen-layer reuse (`FrozenPrefixForward`): when every trainable tensor sits in decoder
  layer k or above, the hidden states entering layer k depend only on frozen weights; they
  are computed once per batch and reused by both passes (and across steps, within a byte
  budget, by the cross-step store).

Both are mathematically exact; they differ from a full recompute only by the rounding of
differently shaped GEMMs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from sglang.srt.mezo.objectives import IGNORE_INDEX, positions, row_logprobs, target_logprobs
from sglang.srt.mezo.perturbation import WeightVersions
from sglang.srt.mezo.primitives import tensor_digest

logger = logging.getLogger(__name__)

SUPPORTED_DECODERS = ("LlamaModel", "Qwen2Model", "Qwen3Model", "MistralModel")


# --------------------------------------------------------------------------- statistics
@dataclass
class MechanismStats:
    tokens_computed: int = 0
    tokens_reused: int = 0

    def add(self, computed: int, reused: int) -> None:
        self.tokens_computed += int(computed)
        self.tokens_reused += int(reused)


@dataclass
class CacheStats:
    """Tokens computed vs reused, per mechanism, for the last pass and cumulatively."""

    last_pass: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)
    passes: int = 0

    def begin_pass(self) -> None:
        self.passes += 1
        self.last_pass = {}

    def add(self, mechanism: str, computed: int, reused: int) -> None:
        self.last_pass.setdefault(mechanism, MechanismStats()).add(computed, reused)
        self.total.setdefault(mechanism, MechanismStats()).add(computed, reused)

    def as_dict(self) -> dict:
        def flat(d):
            return {f"{m}/{k}": v for m, s in sorted(d.items()) for k, v in vars(s).items()}

        return {"passes": self.passes, **{f"pass/{k}": v for k, v in flat(self.last_pass).items()}, **flat(self.total)}


# --------------------------------------------------------------------------- the store
def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if hasattr(value, "layers"):  # a transformers Cache
        return sum(_nbytes([layer.keys, layer.values]) for layer in value.layers if layer.keys is not None)
    return 0


class VersionedStore:
    """LRU store of computed states, each served only under the weight versions it was made with."""

    def __init__(self, versions: WeightVersions, budget_bytes: int, max_entries: Optional[int] = None):
        self.versions = versions
        self.budget_bytes = int(budget_bytes)
        self.max_entries = max_entries
        self._entries: "OrderedDict[object, tuple]" = OrderedDict()
        self.bytes = 0
        self.stale = 0  # entries found but computed under other weight versions
        self.about_to_change: set = set()  # modules the current pass will perturb

    @contextlib.contextmanager
    def recording(self, modules: list):
        """Collects {module: version observed when it ran} over the block (after perturb hooks)."""
        observed: dict = {}

        def hook(module, args):
            observed[module] = self.versions.get(module)

        handles = [m.register_forward_pre_hook(hook) for m in modules]
        try:
            yield observed
        finally:
            for h in handles:
                h.remove()

    def is_valid(self, deps: dict) -> bool:
        return all(m not in self.about_to_change and self.versions.get(m) == v for m, v in deps.items())

    def get(self, key):
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, deps, nbytes = entry
        if not self.is_valid(deps):
            self.stale += 1
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key, value, deps: dict) -> None:
        nbytes = _nbytes(value)
        if key in self._entries:
            self._drop(key)
        if nbytes > self.budget_bytes:
            return
        while self._entries and (
            self.bytes + nbytes > self.budget_bytes
            or (self.max_entries is not None and len(self._entries) >= self.max_entries)
        ):
            self._drop(next(iter(self._entries)))
        self._entries[key] = (value, dict(deps), nbytes)
        self.bytes += nbytes

    def _drop(self, key) -> None:
        _, _, nbytes = self._entries.pop(key)
        self.bytes -= nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def find_decoder(model: nn.Module) -> Optional[nn.Module]:
    """The transformer body (the module holding ``layers`` and ``embed_tokens``)."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "embed_tokens"):
            return module
    return None


# --------------------------------------------------------------------------- prefix sharing
class SharedPrefixForward:
    """Per-row completion log-likelihoods with each distinct prompt computed once per pass."""

    name = "prefix_sharing"

    def __init__(self, store: VersionedStore, stats: CacheStats, param_modules: list):
        self.store = store
        self.stats = stats
        self.param_modules = param_modules

    @staticmethod
    def applies(batch: dict) -> bool:
        return "prompt_length" in batch and "example_id" in batch

    def __call__(self, model: nn.Module, batch: dict) -> tuple:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        plen = batch["prompt_length"]
        rows = ids.shape[0]
        starts = (mask.long().cumsum(-1) == 1).long().argmax(-1)  # first real token (any pad side)
        lengths = mask.sum(-1)
        # distinct prompts, in order of first appearance
        prompt_of_row, prompts, index = [], [], {}
        for r in range(rows):
            p = tuple(ids[r, starts[r] : starts[r] + plen[r]].tolist())
            if p not in index:
                index[p] = len(prompts)
                prompts.append(p)
            prompt_of_row.append(index[p])
        if min(len(p) for p in prompts) == 0:
            return row_logprobs(model, batch)
        key = ("prompt_kv", tuple(prompts))
        cached = self.store.get(key)
        if cached is None:
            with self.store.recording(self.param_modules) as deps:
                cached = self._run_prompts(model, prompts, ids.device)
            self.store.put(key, cached, deps)
            prompt_tokens_computed = sum(len(p) for p in prompts)
        else:
            prompt_tokens_computed = 0
        kv, last_logits, pmask = cached
        select = torch.tensor(prompt_of_row, device=ids.device)
        # continuation: each row's completion tokens after its prompt
        cont_len = lengths - plen
        tmax = int(cont_len.max())
        cont_ids = torch.zeros(rows, max(tmax, 1), dtype=ids.dtype, device=ids.device)
        cont_lab = torch.full_like(cont_ids, IGNORE_INDEX)
        cont_mask = torch.zeros_like(cont_ids)
        for r in range(rows):
            s, n = int(starts[r] + plen[r]), int(cont_len[r])
            cont_ids[r, :n] = ids[r, s : s + n]
            cont_lab[r, :n] = labels[r, s : s + n]
            cont_mask[r, :n] = 1
        if bool((labels != IGNORE_INDEX).sum() != (cont_lab != IGNORE_INDEX).sum()):
            raise ValueError("prefix sharing needs labels on completion tokens only (none inside the prompt)")
        pl = torch.tensor([len(p) for p in prompts], device=ids.device)[select]
        expanded = _select_cache(kv, select)
        out = model(
            input_ids=cont_ids,
            attention_mask=torch.cat([pmask[select], cont_mask], dim=1),
            position_ids=pl.unsqueeze(1) + torch.arange(cont_ids.shape[1], device=ids.device),
            past_key_values=expanded,
            use_cache=True,
        )
        # token j of a continuation is predicted by the prompt's last logit (j=0) or continuation logit j-1
        logits = torch.cat([last_logits[select], out.logits[:, :-1]], dim=1)
        valid = cont_lab != IGNORE_INDEX
        picked = target_logprobs(logits, cont_lab)
        total_plain = int(lengths.sum())
        computed = prompt_tokens_computed + int(cont_len.sum())
        self.stats.add(self.name, computed, total_plain - computed)
        return (picked.double() * valid).sum(-1), valid.sum(-1)

    def _run_prompts(self, model, prompts: list, device) -> tuple:
        """Prompts right-padded (no query row is fully masked): KV, last-token logits, mask."""
        pmax = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), pmax, dtype=torch.long, device=device)
        pmask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, device=device)
            pmask[i, : len(p)] = 1
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        keep, column = torch.unique(last, return_inverse=True)  # logits only at prompts' last tokens
        out = model(
            input_ids=ids,
            attention_mask=pmask,
            position_ids=positions({"attention_mask": pmask}),
            use_cache=True,
            logits_to_keep=keep,
        )
        last_logits = out.logits[torch.arange(len(prompts), device=device), column].unsqueeze(1)
        return out.past_key_values, last_logits, pmask


def _select_cache(cache, index: torch.Tensor):
    """A copy of a DynamicCache whose batch rows are ``cache[index]`` (repeats allowed)."""
    expanded = copy.copy(cache)
    expanded.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        new.keys = layer.keys.index_select(0, index)
        new.values = layer.values.index_select(0, index)
        expanded.layers.append(new)
    return expanded


# --------------------------------------------------------------------------- frozen layers
class _Captured(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


class FrozenPrefixForward:
    """Runs layers below the lowest trainable layer once per batch; both passes reuse them."""

    name = "frozen_layers"

    def __init__(self, decoder: nn.Module, first_trainable: int, store: VersionedStore, stats: CacheStats):
        self.decoder = decoder
        self.k = first_trainable
        self.store = store
        self.stats = stats
        layers = list(decoder.layers)
        self.below = [decoder.embed_tokens] + [m for layer in layers[: self.k] for m in layer.modules()]
        self.below = [m for m in self.below if any(True for _ in m.parameters(recurse=False))]

    def __call__(self, model: nn.Module, batch: dict, keep: torch.Tensor) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pos = positions(batch)
        key = ("hidden", self.k, tensor_digest(ids, mask))
        hidden = self.store.get(key)
        tokens = int(mask.sum())
        if hidden is None:
            with self.store.recording(self.below) as deps:
                hidden = self._capture(model, ids, mask, pos)
            self.store.put(key, hidden, deps)
            self.stats.add(self.name, tokens, 0)
        else:
            self.stats.add(self.name, 0, tokens)
        full = self.decoder.layers
        self.decoder.layers = nn.ModuleList(list(full)[self.k :])
        try:
            return model(
                inputs_embeds=hidden,
                attention_mask=mask,
                position_ids=pos,
                logits_to_keep=keep,
                use_cache=False,
            ).logits
        finally:
            self.decoder.layers = full

    def _capture(self, model, ids, mask, pos) -> torch.Tensor:
        layers = self.decoder.layers
        target = layers[self.k] if self.k < len(layers) else self.decoder.norm

        def stop(module, args, kwargs):
            raise _Captured(args[0] if args else kwargs["hidden_states"])

        handle = target.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        except _Captured as captured:
            return captured.hidden.detach()
        finally:
            handle.remove()
        raise RuntimeError("the decoder never reached the first trainable layer")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def first_trainable_layer(model: nn.Module, decoder: nn.Module, trainable: list) -> tuple:
    """(k, reason): the lowest decoder layer holding a trainable tensor; k=0 disables reuse."""
    layer_index = {id(m): i for i, layer in enumerate(decoder.layers) for m in layer.modules()}
    embed = decoder.embed_tokens
    k = len(decoder.layers)
    for t in trainable:
        for owner in t.owners:
            if owner is embed or any(p is embed.weight for p in owner.parameters(recurse=False)):
                return 0, f"{t.name} is (tied to) the input embedding"
            if id(owner) in layer_index:
                k = min(k, layer_index[id(owner)])
            elif not any(owner is m for m in (getattr(decoder, "norm", None), model.get_output_embeddings())):
                return 0, f"{t.name} is outside the decoder layers, final norm and lm_head"
    return k, "" if k else "layer 0 is trainable"


class CachedRowForward:
    """The backend's row forward with prefix sharing and frozen-layer reuse where they are exact."""

    def __init__(self, model: nn.Module, trainable: list, versions: WeightVersions, config):
        self.stats = CacheStats()
        param_modules = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        budget = max(int(config.frozen_store_mb * 2**20), 0)
        # Within a step only the current batch's entries are needed; a budget keeps more across steps.
        self.store = VersionedStore(versions, budget_bytes=budget or 2**62, max_entries=None if budget else 2)
        self.trainable_modules = {m for t in trainable for m in t.owners}
        self.prefix = None
        if config.prefix_sharing and config.peft != "prefix":  # prefix tuning owns past_key_values
            self.prefix = SharedPrefixForward(self.store, self.stats, param_modules)
        self.frozen, self.frozen_reason = None, "disabled by config"
        if config.frozen_layer_reuse:
            self.frozen, self.frozen_reason = self._frozen_path(model, trainable, config)
            if self.frozen is None:
                logger.info("frozen-layer reuse off: %s", self.frozen_reason)

    def _frozen_path(self, model, trainable, config):
        if config.peft == "prefix":
            return None, "prefix tuning injects KV into every layer"
        decoder = find_decoder(model)
        if decoder is None or type(decoder).__name__ not in SUPPORTED_DECODERS:
            name = type(decoder).__name__ if decoder is not None else type(model).__name__
            return None, f"{name} is not a supported decoder ({', '.join(SUPPORTED_DECODERS)})"
        k, reason = first_trainable_layer(model, decoder, trainable)
        if k == 0:
            return None, reason
        return FrozenPrefixForward(decoder, k, self.store, self.stats), ""

    def __call__(self, model: nn.Module, batch: dict, perturbing: bool = False) -> tuple:
        self.stats.begin_pass()
        self.store.about_to_change = self.trainable_modules if perturbing else set()
        if self.prefix is not None and SharedPrefixForward.applies(batch):
            return self.prefix(model, batch)
        return row_logprobs(model, batch, forward=self.frozen)
