"""MeZO on an SGLang engine: step time over two forwards on the same engine, as ratios.

For each workload, t_step / (2 * t_forward), where t_forward is an unperturbed pass of the
same batch through the same engine (radix cache flushed first, as every MeZO pass is) and
t_step is one MeZO step (two perturbed passes, RPCs, flushes, update). Printed beside the
transformers backend's ratio on the same weights. Target on SmolLM2-135M: <= 1.2. On the
tiny Llama the per-step RPC and flush round trips dominate, so there is no target.

    .venv/bin/python benchmark/mezo/bench_sglang.py [--workloads tiny smollm2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import build_tiny_llama

from sglang.srt.mezo.backends.engine_checkpoint import engine_checkpoint
from sglang.srt.mezo.backends.engine_launch import launch_engine
from sglang.srt.mezo.backends.sglang_backend import SGLangBackend
from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.trainer import MeZOTrainer


def lm_batch(vocab: int, batch: int, length: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # completion-only loss over the second half
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def tiny_model_dir(root: Path) -> str:
    path = root / "tiny"
    build_tiny_llama().save_pretrained(path)
    return str(path)


def smollm2_dir() -> str:
    return engine_checkpoint("smollm2-135m", "float32")  # the GGUF, converted once into the shared cache


def measure(trainer: MeZOTrainer, batch: dict, forward, repeats: int) -> float:
    trainer.step(batch)  # warm-up (numba compile, engine graph warm-up)
    forward()
    steps, forwards = [], []
    for _ in range(repeats):  # alternate the two sides so machine noise hits both
        start = time.perf_counter()
        forward()
        forwards.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.step(batch)
        steps.append(time.perf_counter() - start)
    return statistics.median(steps) / (2 * statistics.median(forwards))


def run(name: str, model_dir: str, batch: dict, repeats: int) -> None:
    config = MeZOConfig(learning_rate=0.0, epsilon=1e-3, perturbation="rademacher", disable_tqdm=True)
    engine = launch_engine(model_dir)
    try:
        backend = SGLangBackend(engine, config, model_dir)
        trainer = MeZOTrainer(None, config, backend=backend)

        def engine_forward():
            engine.flush_cache()
            backend.cache_version = backend.weight_version
            backend.row_logprobs(batch)

        sglang_ratio = measure(trainer, batch, engine_forward, repeats)
    finally:
        engine.shutdown()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf_trainer = MeZOTrainer(hf, config)
    hf_ratio = measure(hf_trainer, batch, lambda: hf_trainer.backend.row_logprobs(batch), repeats)
    print(f"{name:10s} sglang t_step/(2 t_forward) = {sglang_ratio:.3f}   transformers = {hf_ratio:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="mezo-bench-") as tmp:
        root = Path(tmp)
        for name in args.workloads:
            if name == "tiny":
                run("tiny 8x64", tiny_model_dir(root), lm_batch(512, 8, 64), args.repeats)
            else:
                run("smollm2 16x128", smollm2_dir(), lm_batch(49152, 16, 128), args.repeats)
    print("target (SmolLM2): sglang ratio <= 1.2")


if __name__ == "__main__":
    main()
