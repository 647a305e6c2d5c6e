"""A step's population as LoRA slots: every perturbed adapter of one step in one batched call.

A step evaluates its points (`estimators.Estimator.points`): w + eps z_i for its q or 2q
directions, and w itself for one-sided estimators. With LoRA each perturbed adapter is
small, so instead of perturbing the trained adapter pass after pass, each point's adapter
is written into a slot of its own (an extra peft adapter, ``mezo_slot_<i>``) and the batch
runs once per slot in one call: peft's mixed-adapter batches (``adapter_names``), where the
frozen base's GEMMs read every weight once for all slots and each slot's LoRA product runs
on its own rows (S-LoRA/Punica's scheme; EGGROLL's for ES populations). The unperturbed
point runs on the trained adapter itself.

Exactness: a slot holds the bits the one-by-one perturbation writes
(`perturbation.write_perturbed`, from the same values), and no population pass writes the
trained adapter, so lr = 0 stays bit-exact; per-slot losses differ from one-by-one passes
only by the rounding of differently shaped GEMMs (the base's over K x B rows). Slots are
scratch: not trained, not saved, not compared across ranks, and they consume no random
numbers of the run (peft initialises a new adapter from torch's generator: forked here).

Memory: the slots (K adapters) and the activations of K x B rows, which the backend's
micro-batching bounds (under out of memory it halves a call's rows, a slot's rows may span
calls; generation halves the slots per call).
"""

from __future__ import annotations

import contextlib
import copy
import re
from contextlib import AbstractContextManager
from typing import Iterator, Optional, Protocol

import torch

from sglang.srt.mezo.config import population_form
from sglang.srt.mezo.estimators import make_estimator
from sglang.srt.mezo.kernels import PairedWrites, tensor_key
from sglang.srt.mezo.perturbation import swappable, write_perturbed
from sglang.srt.mezo.structured_directions import DirectionFamily
from sglang.srt.mezo.trainable import ADAPTER_NAME

SLOT_PREFIX = "mezo_slot_"
# the adapter's segment of a peft parameter name: "...q_proj.lora_A.default.weight"
_ADAPTER_IN_NAME = re.compile(r"(\.lora_[A-Za-z_]+)\." + ADAPTER_NAME + r"(?=\.|$)")


def unsupported_reason(model, tensors: list) -> Optional[str]:
    """Why `model`'s step cannot run as LoRA slots (None: it can): a peft LoRA model whose
    trainable tensors are all its adapter's."""
    import peft

    if not isinstance(model, peft.PeftModel) or not isinstance(model.peft_config.get(ADAPTER_NAME), peft.LoraConfig):
        return "the population runs as LoRA slots: train with --peft lora"
    names = {id(p): name for name, p in model.named_parameters()}
    outside = [t.name for t in tensors if not _ADAPTER_IN_NAME.search(names.get(id(t.param), ""))]
    if outside:
        return f"trainable tensors outside the LoRA adapter ({', '.join(outside[:3])}) have no slots"
    return None


def population_pays(config) -> bool:
    """``population_batch="auto"``'s rule: where one call was measured to pay on every q
    measured (benchmark/mezo/bench_population.py, SmolLM2-135M, 2 CPU cores): generation,
    the reward objective (LoRA slots 1.3-1.6x, low-rank deltas 9.8-11x), where decoding a
    few rows per token reads every weight for little arithmetic. Teacher-forced passes are
    compute-bound on a CPU and one large batch is slower than its parts (a plain forward of
    80 rows takes 1.18x five of 16): LoRA slots 0.54-0.84x, the engine's 1.01-1.21x,
    low-rank deltas 1.38x at q = 1 but 0.91x from q = 2. Unmeasured on a GPU."""
    return config.objective == "reward"


def runs_population(config) -> bool:
    """Whether `config` asks for its steps' points in one call (``on``, or ``auto`` where it
    pays) in a form it has (`config.population_form`); a backend then serves it where it can."""
    wanted = config.population_batch == "on" or (config.population_batch == "auto" and population_pays(config))
    return population_form(config) is not None and wanted


def slots_per_step(config) -> int:
    """LoRA slots a step of `config`'s estimator fills: its perturbed points (2q two-point, q fzoo)."""
    return sum(seed is not None for seed, _ in make_estimator(config, epsilon=1.0).points(0))


class Population(Protocol):
    """A step's points evaluated in one call: what each point runs on (`adapter_names`,
    which writes what it needs) and how one call routes its rows to them (`routed`)."""

    def adapter_names(self, points: list) -> list:
        """A name per (seed, scale) of `points`: what that point's rows run on."""

    def routed(self, row_names: list) -> AbstractContextManager:
        """Within the block, a call whose i-th row runs on ``row_names[i]``; it yields the
        call's extra keyword arguments."""

    def parameter_ids(self) -> set:
        """ids of the parameters it adds to the model (scratch)."""

    def export_options(self) -> dict:
        """Keyword arguments of ``save_pretrained`` that leave its scratch out."""


class LoRASlots:
    """Extra peft adapters holding a step's perturbed copies of the trained one.

    `adapter_names(points)` writes one slot per perturbed point and names the adapter each
    point runs on; the forward then passes those names per row (peft's ``adapter_names``).
    For a model `unsupported_reason` accepts (the backend checks it first).
    """

    def __init__(self, model, tensors: list, kind: str, family: Optional[DirectionFamily] = None):
        self.model, self.tensors, self.kind, self.family = model, tensors, kind, family
        self._slots: list = []  # per slot: (PairedWrites of its dense copies, their tensors, [(tensor, dst)] others)
        self._slot_params: list = []  # every slot's parameters

    @property
    def count(self) -> int:
        return len(self._slots)

    @contextlib.contextmanager
    def routed(self, row_names: list) -> Iterator[dict]:
        yield {"adapter_names": row_names}

    def export_options(self) -> dict:
        return {"selected_adapters": [ADAPTER_NAME]} if self._slots else {}

    def parameter_ids(self) -> set:
        """ids of every slot's parameters (scratch: excluded from the model's frozen state)."""
        return {id(p) for p in self._slot_params}

    def adapter_names(self, points: list) -> list:
        """The adapter each (seed, scale) of `points` runs on: the trained one for seed None,
        else a slot, written now with ``round(w + scale * z(seed))``."""
        self._grow(sum(seed is not None for seed, _ in points))
        names, slot = [], 0
        for seed, scale in points:
            if seed is None:
                names.append(ADAPTER_NAME)
                continue
            self._write(slot, seed, scale)
            names.append(f"{SLOT_PREFIX}{slot}")
            slot += 1
        return names

    def _write(self, slot: int, seed: int, scale: float) -> None:
        copies, swapped, others = self._slots[slot]
        if swapped:
            copies(self.kind, [tensor_key(seed, t.name) for t in swapped], scale)
        for t, dst in others:
            write_perturbed(dst, t.value, t, self.kind, seed, scale, self.family)

    def _grow(self, count: int) -> None:
        """At least `count` slots: new peft adapters configured as the trained one, each
        holding a copy of every tensor of it (those not trained stay equal to it: frozen)."""
        devices = sorted({t.param.device for t in self.tensors if t.param.device.type != "cpu"}, key=str)
        while len(self._slots) < count:
            name = f"{SLOT_PREFIX}{len(self._slots)}"
            with torch.random.fork_rng(devices=devices, device_type=devices[0].type if devices else "cuda"):
                self.model.add_adapter(name, copy.deepcopy(self.model.peft_config[ADAPTER_NAME]))
            params = dict(self.model.named_parameters())
            slot_of = {}  # id(trained adapter parameter) -> the slot's
            with torch.no_grad():
                for trained_name, trained in list(params.items()):
                    slot_name = _ADAPTER_IN_NAME.sub(r"\1." + name, trained_name)
                    if slot_name == trained_name:
                        continue  # not the trained adapter's
                    dst = params[slot_name]
                    dst.requires_grad_(False)
                    dst.data = trained.detach().clone()  # its values and dtype (peft may autocast a new adapter)
                    self._slot_params.append(dst)
                    slot_of[id(trained)] = dst
            dense, swapped, others = [], [], []
            for t in self.tensors:
                dst = slot_of[id(t.param)]
                if self.family is None and swappable(t):
                    dense.append(dst)
                    swapped.append(t)
                else:
                    others.append((t, dst))
            copies = PairedWrites([d.detach() for d in dense], [t.param.detach() for t in swapped])
            self._slots.append((copies, swapped, others))
