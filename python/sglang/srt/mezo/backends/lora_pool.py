"""Where a peft LoRA adapter lives in SGLang's LoRA memory pool, per tensor-parallel rank:
q/k/v and gate/up stacked per layer (`lora_placement`), the pool-slot views MeZO trains
(`lora_pool_tensors`), and the adapter padded as the engine's LoRA loader must receive it
on a CPU engine that pads heads and rows (`engine_adapter`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from sglang.srt.mezo.backends.shard_maps import (
    INPUT_BLOCK,
    OUTPUT_BLOCK,
    SINGLE_PROCESS,
    EngineTensor,
    TensorParallel,
    part_layout,
    split_sizes,
)
from sglang.srt.mezo.sharding import ShardLayout

LORA_STACKS = {
    "q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "k_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "v_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    "up_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    "o_proj": ("o_proj", ("o_proj",)),
    "down_proj": ("down_proj", ("down_proj",)),
}
LORA_WEIGHT = re.compile(r"\.layers\.(\d+)\..*\b(" + "|".join(LORA_STACKS) + r")\.lora_([AB])\.weight$")


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


def lora_placement(name: str, shape, config, tp: TensorParallel = SINGLE_PROCESS) -> LoRAPlacement:
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
        return LoRAPlacement(module_name, layer, which, index * shape[0], part_layout(name, shape, 1, part))
    if row_parallel:
        return LoRAPlacement(module_name, layer, which, 0, ShardLayout.whole(shape))
    part = tp.block(sizes, OUTPUT_BLOCK[projection])
    first_row = sum(tp.block(sizes, OUTPUT_BLOCK[p]).held for p in stack[:index])
    return LoRAPlacement(module_name, layer, which, first_row, part_layout(name, shape, 0, part))


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


def lora_pool_tensors(lora_manager, slot: int, shapes: dict, config, tp: TensorParallel = SINGLE_PROCESS) -> list:
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
