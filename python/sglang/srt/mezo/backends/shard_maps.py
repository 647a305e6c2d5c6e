"""Where the engine keeps each logical HF tensor, per tensor-parallel rank: fused tensors
(``qkv_proj``, ``gate_up_proj``) split into row blocks, the blocks a rank holds of the
unsharded tensor (`TensorParallel`, `Part`), upstream's CPU padding of heads and
intermediate rows that do not divide by the tp size (`split_sizes`), and the engine
tensors MeZO trains as views with their `ShardLayout` (`logical_tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sglang.srt.mezo.sharding import ShardLayout

# engine tensor suffix -> [(HF tensor suffix, which block of rows)] in row order
FUSED = {
    ".qkv_proj.weight": [(".q_proj.weight", "q"), (".k_proj.weight", "kv"), (".v_proj.weight", "kv")],
    ".qkv_proj.bias": [(".q_proj.bias", "q"), (".k_proj.bias", "kv"), (".v_proj.bias", "kv")],
    ".gate_up_proj.weight": [(".gate_proj.weight", "ffn"), (".up_proj.weight", "ffn")],
}


# peft LoRA projection -> (SGLang's LoRA module, the projections stacked in it, in order)

OUTPUT_BLOCK = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "ffn", "up_proj": "ffn"}
# row-parallel projection -> the block its input columns follow
INPUT_BLOCK = {"o_proj": "q", "down_proj": "ffn"}


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


SINGLE_PROCESS = TensorParallel()  # rank 0 of 1: no tensor parallelism


class EngineTensor(NamedTuple):
    """A trainable tensor as the engine holds it: its HF (or peft) name, the view the forward
    reads, the modules that read it, and its place in the unsharded tensor."""

    name: str
    view: torch.Tensor
    owners: list
    layout: ShardLayout


def logical_tensors(model: torch.nn.Module, config, tp: TensorParallel = SINGLE_PROCESS) -> list:
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


def part_layout(name: str, shape: tuple, dim: int, part: Part) -> ShardLayout:
    if shape[dim] != part.total:
        raise RuntimeError(f"adapter tensor {name} {shape}: the model's split has {part.total} along dimension {dim}")
    return part.layout(shape, dim)
