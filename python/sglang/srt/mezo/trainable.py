"""Which tensors MeZO trains: all of them, a name-pattern subset, or a peft adapter."""

from __future__ import annotations

import re

from torch import nn

from sglang.srt.mezo.config import MeZOConfig, split_list
from sglang.srt.mezo.usage_errors import ConfigError

ADAPTER_NAME = "default"


def apply_peft(model: nn.Module, config: MeZOConfig) -> nn.Module:
    """Wrap `model` in a peft LoRA / prefix-tuning model when the config asks for one."""
    if config.peft == "none":
        return model
    import peft

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
