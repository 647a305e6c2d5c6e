"""The transformers backend: forwards and weight writes on an in-process model."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.kv_cache import CachedRowForward
from sglang.srt.mezo.objectives import RowObjective
from sglang.srt.mezo.perturbation import (
    ModuleScopedPerturbation,
    WeightVersions,
    collect_trainable,
    commit_update,
    prepare_update,
)
from sglang.srt.mezo.trainable import apply_peft, canonical_name, trainable_names

logger = logging.getLogger(__name__)


class TransformersBackend:
    """Runs MeZO's forward passes on any `AutoModelForCausalLM` (optionally peft-wrapped)."""

    name = "transformers"

    def __init__(self, model: nn.Module, config: MeZOConfig):
        model = apply_peft(model, config)
        names = trainable_names(model, config)
        for p in model.parameters():  # MeZO never builds an autograd graph
            p.requires_grad_(False)
        self.model = model.eval()
        self.config = config
        self.versions = WeightVersions()
        self.tensors = collect_trainable(model, names, config.fp32_trainable, canonical_name)
        self.perturbation = ModuleScopedPerturbation(self.tensors, config.perturbation, self.versions)
        # (model, batch, perturbing) -> per-row (sums, counts), with exact KV/hidden reuse
        self.row_forward = CachedRowForward(model, self.tensors, self.versions, config)

    @property
    def cache_stats(self) -> dict:
        return self.row_forward.stats.as_dict()

    def row_logprobs(self, batch: dict, seed: Optional[int] = None, scale: float = 0.0) -> tuple:
        """Per-row completion log-likelihoods under ``w + scale * z(seed)`` (w if seed is None)."""
        self.model.eval()
        with torch.no_grad():
            if seed is None:
                return self.row_forward(self.model, batch)
            with self.perturbation.scope(seed, scale):
                return self.row_forward(self.model, batch, perturbing=True)

    def loss_sum(self, objective, batch: dict, seed: Optional[int] = None, scale: float = 0.0) -> tuple:
        """(sum, count) of `objective` under the perturbed weights; built-ins go through rows."""
        if isinstance(objective, RowObjective):
            sums, counts = self.row_logprobs(batch, seed, scale)
            total, count = objective.reduce(sums, counts, batch)
            return float(total), int(count)
        self.model.eval()
        with torch.no_grad():
            if seed is None:
                total, count = objective(self.model, batch)
            else:
                with self.perturbation.scope(seed, scale):
                    total, count = objective(self.model, batch)
        return float(total), int(count)

    def apply_update(self, directions: list, lr: float) -> None:
        """ZO-SGD update from [(seed, projected_grad)] at the current weights, atomically."""
        c = self.config
        plan = prepare_update(self.tensors, directions, lr, c.weight_decay, c.momentum)
        commit_update(self.tensors, plan, c.perturbation, self.versions)

    def trainable_state(self) -> dict:
        """Canonical name -> trainable tensor (the float32 master where there is one)."""
        return {t.name: t.value for t in self.tensors}

    def load_trainable_state(self, weights: dict) -> None:
        """Copies `weights` (canonical names) into the trainable tensors; every one is required."""
        missing = [t.name for t in self.tensors if t.name not in weights]
        if missing:
            raise ValueError(f"missing trainable tensors {missing[:5]} (of {len(missing)})")
        with torch.no_grad():
            for t in self.tensors:
                t.value.copy_(weights[t.name])
                t.sync_param()
                for m in t.owners:
                    self.versions.bump(m)

    def momentum_state(self) -> dict:
        return {t.name: t.momentum for t in self.tensors if t.momentum is not None}

    def load_momentum_state(self, state: dict) -> None:
        for t in self.tensors:
            if t.name in state:
                t.momentum = state[t.name].clone()
