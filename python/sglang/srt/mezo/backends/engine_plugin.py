"""MeZO weight operations inside SGLang's scheduler processes.

Registered through SGLang's plugin entry point (``sglang.srt.plugins`` -> `register`), which
every SGLang process runs at start-up: it adds ``mezo_*`` methods to the `Scheduler`, and
the trainer calls them with ``Engine.collective_rpc``. Only seeds and scalars cross the
process boundary; z is regenerated here from (seed, HF parameter name, offset), so the
engine draws exactly the z the transformers backend draws.

The engine's parameters are perturbed in place with the same `UnitScopedPerturbation`
as the transformers backend: a module's tensors are perturbed just before it runs and
restored from a backup right after, so weights are bit-exact after any lr=0 step. Fused
engine tensors (``qkv_proj``, ``gate_up_proj``) are split into row-slice views, one per
logical HF tensor (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``).

Tensor parallelism: every scheduler process (rank) runs each method on its own shards.
Each trainable view carries its `ShardLayout`, its place in the unsharded HF tensor, so
z for a shard element is z of the unsharded tensor at that element's offset: every rank
draws exactly what a single process draws, and a replicated tensor gets the same z and
update on every rank. The self-test, loading and saving go through the same layouts:
`read_gathered` assembles what the ranks save into the unsharded tensors. Upstream's CPU
engine pads heads and intermediate rows that do not divide by the tp size with zeros
(`split_sizes`): the views leave padding out, so it is never perturbed or updated.

With a LoRA adapter the base stays frozen and MeZO trains the adapter where the forward
reads it: SGLang copies adapters once into its LoRA memory pool (q/k/v and gate/up stacked
per layer), so the trainable tensors are views into the adapter's pool slot, one per peft
tensor, owned by the LoRA-wrapped layer that reads them.

``collective_rpc`` returns no value, so every method writes its outcome (its result, or the
error it raised) as JSON into a directory the caller passes, one file per rank (`_acknowledged`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from sglang.srt.mezo.perturbation import (
    TrainableTensor,
    UnitScopedPerturbation,
    WeightVersions,
    weight_decay_applies,
)
from sglang.srt.mezo.primitives import require_all, same_bits, write_json_atomically
from sglang.srt.mezo.sharding import ShardLayout, gather
from sglang.srt.mezo.zo_sgd import commit_update, prepare_update

# engine tensor suffix -> [(HF tensor suffix, which block of rows)] in row order
FUSED = {
    ".qkv_proj.weight": [(".q_proj.weight", "q"), (".k_proj.weight", "kv"), (".v_proj.weight", "kv")],
    ".qkv_proj.bias": [(".q_proj.bias", "q"), (".k_proj.bias", "kv"), (".v_proj.bias", "kv")],
    ".gate_up_proj.weight": [(".gate_proj.weight", "ffn"), (".up_proj.weight", "ffn")],
}


# peft LoRA projection -> (SGLang's LoRA module, the projections stacked in it, in order)
LORA_STACKS = {
    "q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "k_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "v_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    "up_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    "o_proj": ("o_proj", ("o_proj",)),
    "down_proj": ("down_proj", ("down_proj",)),
}
OUTPUT_BLOCK = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "ffn", "up_proj": "ffn"}
# row-parallel projection -> the block its input columns follow
INPUT_BLOCK = {"o_proj": "q", "down_proj": "ffn"}
LORA_WEIGHT = re.compile(r"\.layers\.(\d+)\..*\b(" + "|".join(LORA_STACKS) + r")\.lora_([AB])\.weight$")


def split_sizes(config) -> dict:
    """block ("q", "kv", "ffn") -> [heads or rows in the checkpoint, in the engine over all
    ranks, rows per unit], for the blocks the config has. Upstream's CPU engine pads
    attention heads, KV heads and the intermediate size that do not divide by tp_size
    (``adjust_config_with_unaligned_cpu_tp``: each rank's part first, zeros after it) and
    keeps the checkpoint's counts as ``original_*``; elsewhere both counts are equal."""
    sizes = {}
    heads = getattr(config, "num_attention_heads", None)
    if heads is not None:
        checkpoint_heads = getattr(config, "original_num_attention_heads", heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // checkpoint_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads  # multi-head configs may omit it
        sizes["q"] = [checkpoint_heads, heads, head_dim]
        sizes["kv"] = [getattr(config, "original_total_num_kv_heads", kv_heads), kv_heads, head_dim]
    intermediate = getattr(config, "intermediate_size", None)
    if intermediate is not None:
        sizes["ffn"] = [getattr(config, "original_intermediate_size", intermediate), intermediate, 1]
    return sizes


class Part(NamedTuple):
    """This rank's part of a split dimension: checkpoint rows (or columns) [first, first +
    count) of `total`, held in the first `count` of the `held` rows the engine keeps for it
    on this rank (the rest is padding)."""

    total: int
    first: int
    count: int
    held: int

    def layout(self, shape, dim: int) -> ShardLayout:
        """The part as a shard of a tensor of `shape` split along `dim` (there `total` long)."""
        full = tuple(self.total if d == dim else n for d, n in enumerate(shape))
        return ShardLayout(full, dim, self.first, self.count)


@dataclass(frozen=True)
class TensorParallel:
    """This scheduler's rank among the engine's `size` tensor-parallel ranks, and how SGLang
    splits a logical tensor among them."""

    rank: int = 0
    size: int = 1

    @classmethod
    def of_this_process(cls) -> "TensorParallel":
        from sglang.srt.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return cls(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())

    def block(self, sizes: dict, block: str) -> Part:
        """This rank's `Part` of a block (`split_sizes`): whole heads for q and k/v, rows of
        the intermediate size, split evenly over the engine's (padded) count; with fewer KV
        heads than ranks each KV head is replicated on size / heads consecutive ranks
        (SGLang's QKVParallelLinear on GPUs; its CPU engine pads them instead)."""
        if block not in sizes:
            count = "intermediate_size" if block == "ffn" else "num_attention_heads"
            raise RuntimeError(f"the model config has no {count}: MeZO cannot split its {block!r} rows over ranks")
        checkpoint, engine, unit = sizes[block]
        what = "intermediate rows" if block == "ffn" else f"{block} heads"
        parts, index = self.size, self.rank
        if block == "kv" and self.size > engine:
            if self.size % engine:
                raise ValueError(f"{engine} KV heads cannot be replicated evenly over tp_size={self.size}")
            parts, index = engine, self.rank // (self.size // engine)
        if engine % parts:
            raise ValueError(f"{engine} {what} do not split evenly over tp_size={self.size}")
        held = engine // parts
        first = min(index * held, checkpoint)  # a rank past the checkpoint's count holds padding only
        count = min(held, checkpoint - first)
        return Part(checkpoint * unit, first * unit, count * unit, held * unit)

    def even_part(self, local: int) -> Part:
        """This rank's part when every rank holds `local` unpadded rows or columns (an
        unfused column-parallel layer's rows, a row-parallel one's columns outside
        `INPUT_BLOCK`)."""
        return Part(local * self.size, self.rank * local, local, local)


class EngineTensor(NamedTuple):
    """A trainable tensor as the engine holds it: its HF (or peft) name, the view the forward
    reads, the modules that read it, and its place in the unsharded tensor."""

    name: str
    view: torch.Tensor
    owners: list
    layout: ShardLayout


def logical_tensors(model: torch.nn.Module, config, tp: TensorParallel = TensorParallel()) -> list:
    """[EngineTensor] for every parameter of an SGLang model, on tensor-parallel rank `tp`.

    A fused tensor (``qkv_proj``, ``gate_up_proj``) holds one contiguous block of rows per
    logical HF tensor, each this rank's rows of it; a row-parallel weight (``o_proj``,
    ``down_proj``) holds a block of input columns; a vocabulary-parallel embedding or LM head
    holds a block of vocabulary rows. Padding (vocabulary rows; on CPU heads and
    intermediate rows, `split_sizes`) follows each rank's part and is left out: never
    perturbed or updated. Everything else is replicated. `config` is the engine's model
    config (on CPU it carries upstream's padded counts). The LM head's weight is read by
    the logits processor (not by calling the head), so the logits processor owns it too;
    with tied embeddings that is the embedding matrix.
    """
    from sglang.srt.distributed.utils import get_group_rank_size
    from sglang.srt.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from sglang.srt.lora.layers import unwrap_lora_layer

    modules = dict(model.named_modules())
    sizes = split_sizes(config)
    logits_processor = getattr(model, "logits_processor", None)
    lm_head_weight = getattr(getattr(model, "lm_head", None), "weight", None)
    out = []
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        module_name, _, _ = name.rpartition(".")
        module = modules[module_name]
        owners = [module]  # a LoRA wrapper, where there is one: its forward runs the layer's
        layer = unwrap_lora_layer(module)  # how the layer splits its weight
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            groups = [layer.tp_group] + ([layer.kv_tp_group] if isinstance(layer, QKVParallelLinear) else [])
            if any(get_group_rank_size(group) != (tp.rank, tp.size) for group in groups):
                raise RuntimeError(
                    f"{module_name} is split over other ranks than the engine's {tp.size} tensor-parallel ranks "
                    "(attention data parallelism?): MeZO's shard maps follow the tensor-parallel ranks"
                )
        if logits_processor is not None and param is lm_head_weight:
            owners.append(logits_processor)
        data = param.data
        suffix = next((s for s in FUSED if name.endswith(s)), None)
        if suffix is not None:
            row = 0
            for hf_suffix, block in FUSED[suffix]:
                part = tp.block(sizes, block)
                view = data[row : row + part.count]
                out.append(EngineTensor(name[: -len(suffix)] + hf_suffix, view, owners, part.layout(data.shape, 0)))
                row += part.held
            if row != data.shape[0]:
                raise RuntimeError(f"engine tensor {name} has {data.shape[0]} rows, the HF split gives {row}")
            continue
        if isinstance(layer, VocabParallelEmbedding) and name.endswith(".weight"):
            first, end = layer.shard_indices.org_vocab_start_index, layer.shard_indices.org_vocab_end_index
            layout = ShardLayout.rows((layer.org_vocab_size, *data.shape[1:]), first, end - first)
            out.append(EngineTensor(name, data[: end - first], owners, layout))
        elif isinstance(layer, RowParallelLinear) and name.endswith(".weight"):
            block = INPUT_BLOCK.get(module_name.rpartition(".")[2])
            part = tp.block(sizes, block) if block else tp.even_part(data.shape[1])
            if part.held != data.shape[1]:
                raise RuntimeError(f"engine tensor {name} has {data.shape[1]} columns, the HF split gives {part.held}")
            out.append(EngineTensor(name, data[:, : part.count], owners, part.layout(data.shape, 1)))
        elif isinstance(layer, ColumnParallelLinear):  # an unfused one: weight and bias split by rows
            out.append(EngineTensor(name, data, owners, tp.even_part(data.shape[0]).layout(data.shape, 0)))
        else:  # replicated on every rank (norms; a row-parallel layer's bias)
            out.append(EngineTensor(name, data, owners, ShardLayout.whole(data.shape)))
    return out


def _row_parallel_lora_modules() -> list:
    """SGLang's LoRA modules whose A it splits by input columns (and keeps B whole)."""
    from sglang.srt.lora.utils import ROW_PARALLELISM_LINEAR_LORA_NAMES

    return ROW_PARALLELISM_LINEAR_LORA_NAMES


class LoRAPlacement(NamedTuple):
    """Where a peft LoRA tensor lives in SGLang's LoRA memory pool on one rank: the pool's
    module and layer, ``"A"`` or ``"B"``, its first row in the slot's stacked matrix, and
    its `ShardLayout` (this rank's part of the peft tensor)."""

    module: str
    layer: int
    which: str
    first_row: int
    layout: ShardLayout


def lora_placement(name: str, shape, config, tp: TensorParallel = TensorParallel()) -> LoRAPlacement:
    """The placement of peft tensor `name` (unsharded `shape`) on rank `tp`.

    Within a stacked module the A matrices sit one below the other (rank rows each) and the
    B matrices one below the other along the output rows, exactly as SGLang's pool loader
    writes them. Under tensor parallelism SGLang splits B of a column-parallel module by
    this rank's output rows (as the base weight) and keeps its A whole, and splits A of a
    row-parallel module by input columns and keeps its B whole.
    """
    match = LORA_WEIGHT.search(name)
    if match is None:
        raise RuntimeError(f"adapter tensor {name}: not a LoRA weight of a supported projection")
    layer, projection, which = int(match[1]), match[2], match[3]
    module_name, stack = LORA_STACKS[projection]
    index = stack.index(projection)
    shape = tuple(shape)
    row_parallel = module_name in _row_parallel_lora_modules()
    sizes = split_sizes(config)
    if which == "A":
        if not row_parallel:
            return LoRAPlacement(module_name, layer, which, index * shape[0], ShardLayout.whole(shape))
        part = tp.block(sizes, INPUT_BLOCK[projection])
        return LoRAPlacement(module_name, layer, which, index * shape[0], _part_layout(name, shape, 1, part))
    if row_parallel:
        return LoRAPlacement(module_name, layer, which, 0, ShardLayout.whole(shape))
    part = tp.block(sizes, OUTPUT_BLOCK[projection])
    first_row = sum(tp.block(sizes, OUTPUT_BLOCK[p]).held for p in stack[:index])
    return LoRAPlacement(module_name, layer, which, first_row, _part_layout(name, shape, 0, part))


def _part_layout(name: str, shape: tuple, dim: int, part: Part) -> ShardLayout:
    if shape[dim] != part.total:
        raise RuntimeError(f"adapter tensor {name} {shape}: the model's split has {part.total} along dimension {dim}")
    return part.layout(shape, dim)


def engine_adapter(tensors: dict, sizes: dict) -> dict:
    """The peft adapter `tensors` as the engine's LoRA loader must receive them: B of q/k/v
    and gate/up (output rows) and A of o/down (input columns) zero-padded to the engine's
    padded sizes (`split_sizes`), so that upstream's slicing, which assumes the engine's
    counts, gives each rank its part followed by zeros. Unchanged where nothing is padded."""
    out = {}
    for name, value in tensors.items():
        match = LORA_WEIGHT.search(name)
        projection, which = (match[2], match[3]) if match else (None, None)
        block, dim = (OUTPUT_BLOCK.get(projection), 0) if which == "B" else (INPUT_BLOCK.get(projection), 1)
        if block is None:
            out[name] = value
            continue
        checkpoint, engine, unit = sizes[block]
        pad = [0, 0] * (value.dim() - 1 - dim) + [0, (engine - checkpoint) * unit]
        out[name] = torch.nn.functional.pad(value, pad) if engine != checkpoint else value
    return out


def lora_pool_tensors(lora_manager, slot: int, shapes: dict, config, tp: TensorParallel = TensorParallel()) -> list:
    """[EngineTensor] (peft names) for a resident adapter: views into its pool slot
    (`lora_placement`). `shapes` maps the adapter's peft tensor names to their shapes."""
    pool = lora_manager.memory_pool
    out = []
    for name, shape in shapes.items():
        place = lora_placement(name, shape, config, tp)
        rows = slice(place.first_row, place.first_row + place.layout.shape[0])
        buffers = pool.A_buffer if place.which == "A" else pool.B_buffer
        view = buffers[place.module][place.layer][slot, rows, : place.layout.shape[1]]  # no padding columns
        owner = [m for key, m in lora_manager.lora_modules[place.layer].items() if key.endswith("." + place.module)]
        if len(owner) != 1 or tuple(view.shape) != place.layout.shape:
            raise RuntimeError(
                f"adapter tensor {name} {tuple(shape)}: this rank's part is {place.layout.shape}, "
                f"SGLang's pool has {tuple(view.shape)} there"
            )
        out.append(EngineTensor(name, view, owner, place.layout))
    return out


class EngineMeZO:
    """The MeZO state of one scheduler process (one tensor-parallel rank).

    `tensors` are `EngineTensor`s; `reference` is the safetensors file(s) the views must
    equal at start-up, each its part of the unsharded tensor (the checkpoint, or the adapter).
    """

    def __init__(self, tensors: list, kind: str, patterns, reference: list, residency=None, tp=TensorParallel()):
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
        self.perturbation = UnitScopedPerturbation(self.tensors, kind, self.versions)
        self.scope = contextlib.ExitStack()
        self.reference = reference
        self.residency = residency  # () -> raises when the trained tensors moved (LoRA eviction)

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


# ----------------------------------------------------------------------------- shard files
def read_part(st, name: str, layout: ShardLayout) -> torch.Tensor:
    """This rank's part of tensor `name` in an open safetensors file (only that part is read)."""
    return st.get_slice(name)[layout.region]


def shard_file(directory, rank: int) -> Path:
    """Where tensor-parallel rank `rank` writes its parts of the trainable tensors."""
    return Path(directory) / f"tp{rank}.safetensors"


def write_shards(tensors: list, directory, rank: int) -> None:
    """This rank's part of every trainable tensor, copied to the host, with its layout in the
    file's metadata."""
    from safetensors.torch import save_file

    values = {t.name: t.param.detach().to("cpu", copy=True).contiguous() for t in tensors}
    layouts = {t.name: t.layout.as_json() for t in tensors}
    save_file(values, str(shard_file(directory, rank)), metadata={"layouts": json.dumps(layouts)})


def read_gathered(directory, tp_size: int) -> dict:
    """name -> the unsharded tensor, gathered from the `tp_size` ranks' shard files
    (`sharding.gather`: every element held, replicas bit-identical)."""
    from safetensors import safe_open

    pieces: dict = {}
    for rank in range(tp_size):
        with safe_open(str(shard_file(directory, rank)), framework="pt") as st:
            layouts = json.loads(st.metadata()["layouts"])
            for name in st.keys():
                pieces.setdefault(name, []).append((ShardLayout.from_json(layouts[name]), st.get_tensor(name)))
    return {name: gather(name, parts) for name, parts in pieces.items()}


# ----------------------------------------------------------------------------- RPC methods
def ack_file(directory, rank: int) -> Path:
    """Where tensor-parallel rank `rank` acknowledges an RPC call (`_acknowledged`)."""
    return Path(directory) / f"tp{rank}.json"


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


def mezo_setup(scheduler, owner: str, kind: str, patterns, model_path: str, lora_name=None, adapter_path=None):
    """Builds this rank's MeZO state for the backend `owner` (the base model's tensors, or the
    adapter's in SGLang's LoRA pool) and self-tests it against the checkpoint or adapter."""
    global _current
    runner = scheduler.tp_worker.model_runner
    hf_config = runner.model_config.hf_config
    tp = TensorParallel.of_this_process()
    if lora_name is None:
        tensors = logical_tensors(runner.model, hf_config, tp)
        state = EngineMeZO(tensors, kind, patterns, sorted(Path(model_path).glob("*.safetensors")), tp=tp)
    else:
        from safetensors import safe_open

        manager = runner.lora_manager
        lora_id = next(i for i, ref in manager.lora_refs.items() if ref.lora_name == lora_name)
        adapter_file = Path(adapter_path) / "adapter_model.safetensors"
        with safe_open(str(adapter_file), framework="pt") as st:
            shapes = {key: tuple(st.get_slice(key).get_shape()) for key in st.keys()}
        slot = manager.memory_pool.uid_to_buffer_id.get(lora_id)
        if slot is None:
            raise RuntimeError(f"LoRA adapter {lora_name!r} is not resident in SGLang's LoRA memory pool")
        tensors = lora_pool_tensors(manager, slot, shapes, hf_config, tp)

        def residency():
            if manager.memory_pool.uid_to_buffer_id.get(lora_id) != slot:
                raise RuntimeError(f"LoRA adapter {lora_name!r} left pool slot {slot}: its trained values are lost")

        state = EngineMeZO(tensors, kind, patterns, [adapter_file], residency, tp)
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


def mezo_end(state: EngineMeZO):
    """Ends the perturbation scope, if one is open: the weights are exactly as before it."""
    state.scope.close()


def mezo_update(state: EngineMeZO, terms, lr: float, weight_decay: float, momentum: float):
    """The ZO-SGD update of the directions `terms` [(seed, projected gradient)] (`commit_update`)."""
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
    **{f.__name__: _acknowledged(_on_state(f)) for f in (mezo_begin, mezo_end, mezo_update, mezo_load, mezo_save)},
}


def register() -> None:
    """SGLang plugin entry point: adds the MeZO RPC methods to the Scheduler (each called as
    ``method(scheduler, ack_dir=..., owner=..., **arguments)`` by ``collective_rpc``)."""
    from sglang.srt.managers.scheduler import Scheduler

    for name, fn in RPC_METHODS.items():
        setattr(Scheduler, name, fn)
