"""The HF checkpoint dir an SGLang engine serves, and the trained model written from it.

The engine loads the model itself, so the trainer process keeps no host copy:

* `engine_checkpoint`: a local dir or a Hub snapshot with safetensors weights is served as
  it is; anything else (the offline GGUF default, a dir of ``.bin`` weights) is converted
  once into a cache shared by runs (`default_cache_dir`), keyed by the source's identity
  and the dtype. Safetensors because the engine's self-test and `write_trained_model`
  read the checkpoint tensor by tensor.
* `write_trained_model`: the served checkpoint, shard by shard, with the engine's trained
  tensors in place of the originals, in the run's dtype, plus its config: the model
  `save_pretrained` would have written from a host copy holding the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from sglang.srt.mezo.model_io import DEFAULT_MODEL, load_model_and_tokenizer, smollm2_location

# What a served checkpoint dir needs besides weights (the Hub snapshot is fetched with these).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
INDEX_FILE = "model.safetensors.index.json"


def default_cache_dir() -> Path:
    """Where converted checkpoints live unless `model_cache_dir` says otherwise."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sglang-mezo" / "engine-checkpoints"


def has_safetensors(directory: Path) -> bool:
    return directory.is_dir() and any(directory.glob("*.safetensors"))


def engine_checkpoint(model: str, dtype: str, cache_dir: Optional[str] = None, loaded: Optional[tuple] = None) -> str:
    """A safetensors HF dir of `model` for the engine: `model` itself when it is one (a local
    dir, or a Hub id's snapshot in the Hub cache), else its conversion, made once into
    `cache_dir` (default `default_cache_dir`) from `loaded` when given ((model, tokenizer)
    as loaded in `dtype` for the run), else from a fresh load."""
    source = _source_dir(model)
    if source is not None and has_safetensors(source):
        return str(source)
    target = Path(cache_dir or default_cache_dir()) / _cache_key(model, source, dtype)
    if not (target / "config.json").is_file():
        _convert(loaded or load_model_and_tokenizer(model, dtype), target)
    return str(target)


def _source_dir(model: str) -> Optional[Path]:
    """The local dir holding `model` (None for the GGUF default)."""
    if model == DEFAULT_MODEL:
        return None
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=CHECKPOINT_FILES))


def _cache_key(model: str, source: Optional[Path], dtype: str) -> str:
    """<name>-<dtype>-<digest of the source files' paths, sizes and modification times>."""
    if source is None:
        directory, name = smollm2_location()
        files = [Path(directory) / name]
    else:
        files = sorted(f for f in source.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    name = Path(model.rstrip("/")).name or "model"
    return f"{name}-{dtype}-{digest.hexdigest()[:16]}"


def _convert(loaded: tuple, target: Path) -> None:
    """Writes the converted checkpoint next to `target` and renames it into place, so that a
    reader never sees half of one (runs converting at the same time: the first rename wins)."""
    lm, tokenizer = loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        lm.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion's finished dir
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_trained_model(source: str, trained: dict, dtype: str, directory: Path) -> Path:
    """`source`'s checkpoint with `trained` (name -> tensor, every name one of the
    checkpoint's) in place of those tensors, every tensor in `dtype`, and its config."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    source, directory = Path(source), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    written, total_bytes = set(), 0
    for shard in sorted(source.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(shard), framework="pt") as st:
            for name in st.keys():
                tensor = trained[name] if name in trained else st.get_tensor(name)
                tensors[name] = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(directory / shard.name), metadata={"format": "pt"}
        )
        written.update(tensors)
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
    unknown = sorted(set(trained) - written)
    if unknown:
        raise RuntimeError(f"trained tensors that {source} does not hold: {unknown[:5]}")
    if (source / INDEX_FILE).is_file():
        index = json.loads((source / INDEX_FILE).read_text())
        index.setdefault("metadata", {})["total_size"] = total_bytes
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = AutoConfig.from_pretrained(source)
    config.dtype = torch_dtype
    config.save_pretrained(directory)
    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(directory)
    return directory
