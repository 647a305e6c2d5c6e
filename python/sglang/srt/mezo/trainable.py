"""Which tensors MeZO trains (all of them, a name-pattern subset, or a peft adapter), and
each one as the perturbation and the update see it (`TrainableTensor`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional

import torch
from torch import nn

from sglang.srt.mezo.sharding import ShardLayout
from sglang.srt.mezo.usage_errors import ConfigError

if TYPE_CHECKING:  # the engine's processes import this module: config (and data) stay out of them
    from sglang.srt.mezo.config import MeZOConfig

ADAPTER_NAME = "default"


def apply_peft(model: nn.Module, config: MeZOConfig) -> nn.Module:
    """Wrap `model` in a peft LoRA / prefix-tuning model when the config asks for one."""
    if config.peft == "none":
        return model
    import peft

    from sglang.srt.mezo.config import split_list

    if config.peft == "lora":
        check_lora_targets(model, split_list(config.lora_target_modules))
        peft_config = peft.LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=split_list(config.lora_target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
    else:
        peft_config = peft.PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type="CAUSAL_LM")
    # autocast_adapter_dtype keeps adapter weights in float32 over a half-precision base.
    return peft.get_peft_model(model, peft_config, autocast_adapter_dtype=True)


def unit_root(model: nn.Module) -> nn.Module:
    """The module below which perturbation units may be chosen (`perturbation.perturbation_units`):
    the transformers model itself. A unit's hooks fire only when it is called, and peft's
    wrappers are not called on every path: peft runs the base model with ``.forward`` in a
    plain pass, and ``generate`` calls the base model directly, past the wrappers. Below the
    base model every module is called (``__call__``) on both paths."""
    import peft

    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def check_lora_targets(model: nn.Module, targets: list) -> None:
    """Every LoRA target names a module of `model` (as peft matches them: the whole name or
    its last dotted parts), or the flag is refused with the model's linear layers listed."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not targets:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"--lora-target-modules {','.join(targets)!r}: {missing or 'empty'} match no module of the model; "
            f"its linear layers are {linears}"
        )


def trainable_names(model: nn.Module, config: MeZOConfig) -> list:
    """Names (as in ``model.named_parameters()``) of the tensors MeZO perturbs and updates."""
    from sglang.srt.mezo.config import split_list

    if config.peft != "none":
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        names = [n for n, _ in model.named_parameters()]
    if config.trainable_patterns:
        patterns = [re.compile(p) for p in split_list(config.trainable_patterns)]
        names = [n for n in names if any(p.search(n) for p in patterns)]
        if not names:
            raise ConfigError(f"--trainable-patterns {config.trainable_patterns!r} matches no parameter of the model")
    if not names:
        raise ValueError("the trainable set is empty")
    return names


def quantize_frozen_linears(model: nn.Module, trainable: list, method: str) -> list:
    """Weight-only quantizes (torchao) every nn.Linear whose weight is not trainable.

    The LM head stays in floating point (it may be tied to the input embedding). Returns
    the names of the quantized modules. Quantized weights are frozen: MeZO never perturbs
    them, and trains float tensors (LoRA, norms, a named subset) on top.
    """
    if method == "none":
        return []
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    trainable = set(trainable)
    names = {id(p): n for n, p in model.named_parameters()}
    head = model.get_output_embeddings()
    chosen = []

    def frozen_linear(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or module is head or fqn.endswith("lm_head"):
            return False
        if names.get(id(module.weight)) in trainable:
            return False
        chosen.append(fqn)
        return True

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=frozen_linear)
    return chosen


def canonical_name(name: str) -> str:
    """The name a tensor has in saved weights: peft's adapter segment removed.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` becomes
    ``...q_proj.lora_A.weight``, the key of peft's saved adapter, so the SGLang backend
    and a reloaded adapter draw the same direction z for it.
    """
    return name.replace(f".{ADAPTER_NAME}.", ".").replace(f".{ADAPTER_NAME}", "")


@dataclass
class TrainableTensor:
    """One trainable tensor: its canonical (HF) name keys its direction z; a tensor-parallel
    shard's `layout` places it in the unsharded tensor (z at the unsharded offsets)."""

    name: str
    param: nn.Parameter
    owners: list  # modules that hold it directly (several when tied)
    decay: bool  # weight decay applies (not bias / norm)
    master: Optional[torch.Tensor] = None  # float32 master copy over a half-precision param
    momentum: Optional[torch.Tensor] = field(default=None, repr=False)
    layout: Optional[ShardLayout] = None  # None: a whole tensor

    @property
    def value(self) -> torch.Tensor:
        """The tensor the optimizer updates (the master copy when there is one)."""
        return self.master if self.master is not None else self.param.detach()

    def sync_param(self) -> None:
        if self.master is not None:
            self.param.detach().copy_(self.master)


def weight_decay_applies(name: str, tensor: torch.Tensor) -> bool:
    """Weight decay applies to matrices, not to biases and normalisation weights: a tensor of
    two or more dimensions whose name does not contain "norm" in any case (LayerNorm,
    layernorm, post_attention_layernorm, RMSNorm)."""
    return tensor.dim() >= 2 and "norm" not in name.lower()


def collect_trainable(model: nn.Module, selected: Iterable[str], fp32_master: bool, canonical=lambda n: n) -> list:
    """TrainableTensors for the selected parameter names (first name of a tied tensor wins).

    `canonical` maps a parameter's module path to the name that keys its direction.
    """
    selected = set(selected)
    owners: dict[int, list] = {}
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    tensors, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if name not in selected or id(p) in seen:
            continue
        seen.add(id(p))
        if not p.is_contiguous():
            raise ValueError(f"trainable parameter {name} is not contiguous")
        if type(p.data) is not torch.Tensor or not p.is_floating_point():
            raise ValueError(
                f"trainable parameter {name} is {type(p.data).__name__} {p.dtype}: MeZO perturbs plain float tensors"
            )
        decay = weight_decay_applies(name, p)
        master = p.detach().float().clone() if fp32_master and p.dtype != torch.float32 else None
        tensors.append(TrainableTensor(canonical(name), p, owners[id(p)], decay, master))
    return tensors
