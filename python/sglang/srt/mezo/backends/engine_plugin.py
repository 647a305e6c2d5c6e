"""MeZO weight operations inside SGLang's scheduler processes.

Registered through SGLang's plugin entry point (``sglang.srt.plugins`` -> `register`), which
every SGLang process runs at start-up: it adds ``mezo_*`` methods to the `Scheduler`, and
the trainer calls them with ``Engine.collective_rpc``. Only seeds and scalars cross the
process boundary; z is regenerated here from (seed, HF parameter name, offset), so the
engine draws exactly the z the transformers backend draws.

The engine's parameters are perturbed in place with the same `UnitScopedPerturbation`
as the transformers backend: a unit's tensors (a decoder layer's, within the scratch
budget) are perturbed just before it runs, in one grouped launch per dtype with their
backups written to scratch in the same pass, and restored from it right after, so weights
are bit-exact after any lr=0 step. Fused
engine tensors (``qkv_proj``, ``gate_up_proj``) are split into row-slice views, one per
logical HF tensor (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``).

Tensor parallelism: every scheduler process (rank) runs each method on its own shards.
Each trainable view carries its `ShardLayout`, its place in the unsharded HF tensor, so
z for a shard element is z of the unsharded tensor at that element's offset: every rank
draws exactly what a single process draws, and a replicated tensor gets the same z and
update on every rank (`shard_maps`). The self-test, loading and saving go through the same
layouts: `engine_protocol.read_gathered` assembles what the ranks save into the unsharded
tensors. Upstream's CPU engine pads heads and intermediate rows that do not divide by the
tp size with zeros (`shard_maps.split_sizes`): the views leave padding out, so it is never
perturbed or updated.

With a LoRA adapter the base stays frozen and MeZO trains the adapter where the forward
reads it: SGLang copies adapters once into its LoRA memory pool (q/k/v and gate/up stacked
per layer), so the trainable tensors are views into the adapter's pool slot, one per peft
tensor, owned by the LoRA-wrapped layer that reads them (`lora_pool`).

``collective_rpc`` returns no value, so every method writes its outcome (its result, or the
error it raised) as JSON into a directory the caller passes, one file per rank
(`_acknowledged`, at `engine_protocol.ack_file`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from typing import Optional

import torch

from sglang.srt.mezo.backends.engine_protocol import ack_file, write_shards
from sglang.srt.mezo.backends.lora_pool import lora_pool_tensors
from sglang.srt.mezo.backends.shard_maps import SINGLE_PROCESS, TensorParallel, logical_tensors, split_sizes
from sglang.srt.mezo.kernels import PairedWrites, tensor_key
from sglang.srt.mezo.perturbation import UnitScopedPerturbation, WeightVersions
from sglang.srt.mezo.primitives import require_all, same_bits, write_json_atomically
from sglang.srt.mezo.sharding import ShardLayout
from sglang.srt.mezo.trainable import TrainableTensor, weight_decay_applies
from sglang.srt.mezo.zo_sgd import commit_update, prepare_update


class EngineMeZO:
    """The MeZO state of one scheduler process (one tensor-parallel rank).

    `tensors` are `EngineTensor`s; `reference` is the safetensors file(s) the views must
    equal at start-up, each its part of the unsharded tensor (the checkpoint, or the adapter).
    """

    def __init__(
        self, tensors: list, kind: str, patterns, reference: list, residency=None, tp=SINGLE_PROCESS, root=None
    ):
        if patterns:
            regexes = [re.compile(p) for p in patterns]
            tensors = [t for t in tensors if any(r.search(t.name) for r in regexes)]
        self.versions = WeightVersions()
        self.kind = kind
        self.tp = tp
        self.tensors = [
            TrainableTensor(t.name, t.view, t.owners, decay=weight_decay_applies(t.name, t.view), layout=t.layout)
            for t in tensors
        ]
        # `root` (the engine's model) merges owner modules into decoder layers, as the
        # transformers path does: one grouped launch per layer and dtype instead of one per tensor
        self.perturbation = UnitScopedPerturbation(self.tensors, kind, self.versions, root=root)
        self.scope = contextlib.ExitStack()
        self.reference = reference
        self.residency = residency  # () -> raises when the trained tensors moved (LoRA eviction)
        self.slots: list = []  # the population's LoRA slots: `PairedWrites` (slot views <- trained views) each

    def check_resident(self) -> None:
        if self.residency is not None:
            self.residency()

    def self_test(self) -> dict:
        """Every trainable tensor must equal its part of the reference file's tensor of that
        name, bit for bit."""
        from safetensors import safe_open

        files = self.reference
        if not files:
            return {"checked": 0, "mismatched": [], "missing": []}
        names = {t.name: t for t in self.tensors}
        checked, mismatched = 0, []
        found = set()
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key not in names:
                        continue
                    found.add(key)
                    checked += 1
                    t = names[key]
                    full_shape = tuple(st.get_slice(key).get_shape())
                    if full_shape != t.layout.full_shape or not same_bits(read_part(st, key, t.layout), t.param):
                        mismatched.append(key)
        return {"checked": checked, "mismatched": mismatched, "missing": sorted(set(names) - found)}


# The only places engine tensors (on whatever device the engine runs) meet host memory:
# `primitives.same_bits` and `primitives.host_bytes`.


def read_part(st, name: str, layout: ShardLayout) -> torch.Tensor:
    """This rank's part of tensor `name` in an open safetensors file (only that part is read)."""
    return st.get_slice(name)[layout.region]


# ----------------------------------------------------------------------------- RPC methods
# The MeZO state of this scheduler process and the backend it belongs to: one backend per
# engine at a time (a second `mezo_setup` takes the engine over; the first backend's calls
# are then refused instead of moving the second one's tensors).
_current: Optional[tuple] = None  # (owner, EngineMeZO)


def _state(owner: str) -> EngineMeZO:
    if _current is None:
        raise RuntimeError("no MeZO state in this engine: mezo_setup has not run")
    if _current[0] != owner:
        raise RuntimeError(
            "another SGLangBackend was set up on this engine since: one MeZO backend per engine at a time"
        )
    return _current[1]


def _acknowledged(method):
    """An RPC method ``method(scheduler, owner, **arguments)`` that reports its outcome to the
    caller: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}`` as JSON in
    `ack_dir`, one file per tensor-parallel rank. Upstream's `collective_rpc` returns
    nothing and signals a failure only by an ``assert`` (gone under ``python -O``): the
    caller reads these instead."""

    @functools.wraps(method)
    def acknowledging(scheduler, ack_dir: str, owner: str, **kwargs):
        path = ack_file(ack_dir, TensorParallel.of_this_process().rank)
        try:
            result = method(scheduler, owner, **kwargs)
        except BaseException as error:
            write_json_atomically(path, {"ok": False, "error": f"{type(error).__name__}: {error}"})
            raise
        write_json_atomically(path, {"ok": True, "result": result})

    return acknowledging


def _on_state(method):
    """``method(state, **arguments)`` as an RPC method on the MeZO state of backend `owner`."""

    @functools.wraps(method)
    def on_state(scheduler, owner: str, **kwargs):
        return method(_state(owner), **kwargs)

    return on_state


def _pool_slot(manager, lora_name: str) -> tuple:
    """(the adapter's id, its slot in SGLang's LoRA memory pool)."""
    lora_id = next(i for i, ref in manager.lora_refs.items() if ref.lora_name == lora_name)
    slot = manager.memory_pool.uid_to_buffer_id.get(lora_id)
    if slot is None:
        raise RuntimeError(f"LoRA adapter {lora_name!r} is not resident in SGLang's LoRA memory pool")
    return lora_id, slot


def mezo_setup(
    scheduler, owner: str, kind: str, patterns, model_path: str, lora_name=None, adapter_path=None, slot_names=()
):
    """Builds this rank's MeZO state for the backend `owner` (the base model's tensors, or the
    adapter's in SGLang's LoRA pool) and self-tests it against the checkpoint or adapter.
    `slot_names`: adapters loaded as the population's slots (`mezo_write_slots`)."""
    global _current
    runner = scheduler.tp_worker.model_runner
    hf_config = runner.model_config.hf_config
    tp = TensorParallel.of_this_process()
    if lora_name is None:
        tensors = logical_tensors(runner.model, hf_config, tp)
        state = EngineMeZO(
            tensors, kind, patterns, sorted(Path(model_path).glob("*.safetensors")), tp=tp, root=runner.model
        )
    else:
        from safetensors import safe_open

        manager = runner.lora_manager
        adapter_file = Path(adapter_path) / "adapter_model.safetensors"
        with safe_open(str(adapter_file), framework="pt") as st:
            shapes = {key: tuple(st.get_slice(key).get_shape()) for key in st.keys()}
        places = {name: _pool_slot(manager, name) for name in (lora_name, *slot_names)}
        tensors = lora_pool_tensors(manager, places[lora_name][1], shapes, hf_config, tp)

        def residency():
            for name, (lora_id, slot) in places.items():
                if manager.memory_pool.uid_to_buffer_id.get(lora_id) != slot:
                    raise RuntimeError(f"LoRA adapter {name!r} left pool slot {slot}: its values are lost")

        state = EngineMeZO(tensors, kind, patterns, [adapter_file], residency, tp, root=runner.model)
        for name in slot_names:
            views = {t.name: t.view for t in lora_pool_tensors(manager, places[name][1], shapes, hf_config, tp)}
            state.slots.append(PairedWrites([views[t.name] for t in state.tensors], [t.param for t in state.tensors],
                                            layouts=[t.layout for t in state.tensors]))  # fmt: skip
    if _current is not None:  # the previous backend's state: weights put back, hooks off
        _current[1].scope.close()
        _current[1].perturbation.remove()
    _current = (owner, state)
    report = state.self_test()
    report["tensors"] = [[t.name, list(t.layout.full_shape)] for t in state.tensors]
    report["tp"] = [tp.rank, tp.size]
    return report


def mezo_split_sizes(scheduler, owner: str):
    """`split_sizes` of the engine's model config (on CPU, upstream's padded counts): the
    sizes an adapter must be padded to before the engine loads it (`engine_adapter`)."""
    return split_sizes(scheduler.tp_worker.model_runner.model_config.hf_config)


def mezo_begin(state: EngineMeZO, seed: int, scale: float):
    """Forward passes from now on see w + scale * z(seed) (each unit while it runs)."""
    state.check_resident()
    state.scope.enter_context(state.perturbation.scope(int(seed), float(scale)))


def mezo_write_slots(state: EngineMeZO, points):
    """Writes slot i with ``round(w + scale_i * z(seed_i))`` of the trained adapter for the
    i-th (seed, scale) of `points` (the bits a perturbed pass reads: the same dense z at the
    same offsets); the trained adapter is not written."""
    state.check_resident()
    if len(points) > len(state.slots):
        raise RuntimeError(f"{len(points)} perturbed points and {len(state.slots)} LoRA slots")
    for writes, (seed, scale) in zip(state.slots, points):
        writes(state.kind, [tensor_key(int(seed), t.name) for t in state.tensors], float(scale))


def mezo_end(state: EngineMeZO):
    """Ends the perturbation scope, if one is open: the weights are exactly as before it."""
    state.scope.close()


def mezo_update(state: EngineMeZO, terms, lr: float, weight_decay: float, momentum: float):
    """The ZO-SGD update of the directions `terms` [(seed, coefficient)] (`commit_update`),
    written before the call returns. It never waits for the next pass here, as the restore
    log's does on the transformers backend: the engine reads its weights outside any hook
    too (a decode replayed from a CUDA graph, SGLang's own weight APIs)."""
    state.check_resident()
    plan = prepare_update(state.tensors, [(int(s), float(g)) for s, g in terms], lr, weight_decay, momentum)
    commit_update(state.tensors, plan, state.kind, state.versions)


def mezo_load(state: EngineMeZO, path: str):
    """Loads trainable tensors (HF or peft names, unsharded) from a safetensors file into the
    engine in place, each rank its part."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as st:
        require_all([t.name for t in state.tensors], set(st.keys()))
        state.check_resident()
        parts = {t.name: read_part(st, t.name, t.layout) for t in state.tensors}
    with torch.no_grad():
        for t in state.tensors:
            t.param.copy_(parts[t.name])
            for m in t.owners:
                state.versions.bump(m)


def mezo_save(state: EngineMeZO, directory: str):
    """Writes this rank's parts of the trainable tensors to its shard file in `directory`
    (`read_gathered` puts them together)."""
    state.check_resident()
    write_shards(state.tensors, directory, state.tp.rank)


RPC_METHODS = {
    "mezo_setup": _acknowledged(mezo_setup),
    "mezo_split_sizes": _acknowledged(mezo_split_sizes),
    **{
        f.__name__: _acknowledged(_on_state(f))
        for f in (mezo_begin, mezo_end, mezo_write_slots, mezo_update, mezo_load, mezo_save)
    },
}


def register() -> None:
    """SGLang plugin entry point: adds the MeZO RPC methods to the Scheduler (each called as
    ``method(scheduler, ack_dir=..., owner=..., **arguments)`` by ``collective_rpc``)."""
    from sglang.srt.managers.scheduler import Scheduler

    for name, fn in RPC_METHODS.items():
        setattr(Scheduler, name, fn)
