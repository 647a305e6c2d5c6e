"""`Backend`: everything the trainer and the entry point ask of a forward backend.

Two implementations: `transformers_backend.TransformersBackend` (an in-process model) and
`sglang_backend.SGLangBackend` (an upstream SGLang engine, weights perturbed inside its
processes). The trainer, checkpoints, replay and the main job use only these members.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch


class Backend(Protocol):
    name: str  # "transformers", "sglang": for logs and metrics only, never branched on outside backends
    model: Any  # what the trainer exposes as `trainer.model`: an nn.Module, or the engine

    @property
    def mechanism(self) -> str:
        """The perturbation mechanism running now (it can change once: a restore log that
        overflowed falls back to per-unit copies)."""

    @property
    def cache_stats(self) -> dict:
        """Tokens computed vs reused by each KV / hidden-state mechanism (last pass, cumulative)."""

    def loss_sum(
        self, objective: Callable, batch: dict, seed: Optional[int] = None, scale: float = 0.0
    ) -> tuple[float, int]:
        """(sum, count) of `objective` under ``w + scale * z(seed)`` (w itself if seed is None)."""

    def loss_sums(self, objective: Callable, batch: dict, points: Sequence[tuple]) -> list:
        """[(sum, count)] of `objective` at each (seed, scale) of `points`, in order: one
        pass after another, or where the backend batches a step's population
        (``MeZOConfig.population_batch``) all of them in one call."""

    def row_logprobs(self, batch: dict, seed: Optional[int] = None, scale: float = 0.0) -> tuple:
        """Per-row completion log-likelihood sums (float64) and token counts, on the host."""

    def holding_perturbation(self) -> AbstractContextManager:
        """A block within which perturbed passes and the update may share weight sweeps (an
        update may wait for the next pass); blocks nest, and the weights are exact when the
        outermost exits."""

    def settle_weights(self) -> None:
        """Makes the weights exact now: a waiting update written, no perturbation left in place
        (every read through this backend does it first)."""

    def apply_update(self, directions: Sequence[tuple], lr: float) -> None:
        """The ZO-SGD update from ``[(seed, coefficient)]``, atomically."""

    def vanishing_fraction(self, seed: int, scale: float, update: bool) -> Optional[tuple]:
        """(fraction of sampled weights a write of `scale` along z(seed) leaves unchanged, their
        dtypes), or None where the weights cannot be sampled from here."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Canonical name -> trainable tensor (float32 masters where there are), on the host or
        the backend's device."""

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Name -> every other weight this process holds (for cross-rank agreement checks)."""

    def load_trainable_state(self, weights: dict) -> None:
        """Copies `weights` into the trainable tensors; every one is required."""

    def momentum_state(self) -> dict[str, torch.Tensor]:
        """Name -> momentum buffer (empty without momentum)."""

    def load_momentum_state(self, state: dict) -> None:
        """Restores momentum buffers saved by `momentum_state`."""

    def export(self, directory: Path, tokenizer=None) -> Path:
        """Writes the trained weights where users load them: a peft adapter dir for LoRA and
        prefix tuning, else an HF model dir (config, weights, tokenizer)."""

    def shutdown(self) -> None:
        """Releases what the backend started (the engine's processes); idempotent."""
