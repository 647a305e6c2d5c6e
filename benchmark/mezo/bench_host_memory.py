"""Host memory of the trainer process on the SGLang engine path (see README.md here).

Runs the main job in this process (`recipe.setup`, `train`, `save`) on an SGLang engine,
full-parameter MeZO, and samples this process's resident set (VmRSS, every 20 ms) apart
from the engine's scheduler processes, which hold the served weights:

* ``baseline``: VmRSS once the libraries are imported (torch, transformers, SGLang's client);
* ``setup peak``: VmHWM when setup returns (loading, conversion, engine start);
* ``training``: the largest VmRSS sampled while `train` runs, and the same after the
  garbage collector ran, against the model's parameter bytes (a host copy of the model
  would add about 1x);
* ``output dir``: bytes the run wrote into its output dir (the trained model excluded):
  a converted engine model in there would add about 1x the model again.

    .venv/bin/python benchmark/mezo/bench_host_memory.py [--steps 10] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import threading
from pathlib import Path

import common

from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.recipe import save, setup, train

DEMO_TRAIN = Path(__file__).resolve().parents[2] / "python/sglang/srt/mezo/demo_data/train.jsonl"


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class RssSampler(threading.Thread):
    """The largest VmRSS of this process seen while running (sampled every 20 ms)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kib = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.02):
            self.peak_kib = max(self.peak_kib, status_kib("VmRSS"))

    def __exit__(self, *exc):
        self.done.set()
        self.join()

    def __enter__(self):
        self.start()
        return self


def tree_bytes(root: Path, skip: str) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and skip not in f.relative_to(root).parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    common.setup_threads()
    import sglang.srt.mezo.backends.sglang_backend  # noqa: F401 - the engine client's libraries count in the baseline

    baseline = status_kib("VmRSS") / 1024
    with tempfile.TemporaryDirectory(prefix="bench-host-memory-") as tmp:
        out_dir = Path(tmp) / "run"
        config = MeZOConfig(
            model=args.model, backend="sglang", train_file=str(DEMO_TRAIN), output_dir=str(out_dir),
            estimator="mezo", learning_rate=1e-6, epsilon=1e-3, max_steps=args.steps, batch_size=4,
            disable_tqdm=True,
        )  # fmt: skip
        run = setup(config)
        setup_peak = status_kib("VmHWM") / 1024
        try:
            with RssSampler() as during:
                train(run)
            gc.collect()
            after_gc = status_kib("VmRSS") / 1024
            save(run)
        finally:
            run.close()
        written = tree_bytes(out_dir, skip="model") / 2**20
        model_mib = sum(f.stat().st_size for f in (out_dir / "model").glob("*.safetensors")) / 2**20
    print(f"the trained model: {model_mib:.0f} MiB of safetensors (the size of one host copy)")
    print(f"baseline (libraries imported): {baseline:.0f} MiB")
    print(f"setup peak (VmHWM): {setup_peak:.0f} MiB")
    peak = during.peak_kib / 1024
    print(f"training, peak VmRSS: {peak:.0f} MiB; above the baseline: {(peak - baseline) / model_mib:.2f}x the model")
    print(f"after training, after gc: {after_gc:.0f} MiB; above the baseline: {(after_gc - baseline) / model_mib:.2f}x")
    print(f"output dir without model/: {written:.1f} MiB = {written / model_mib:.2f}x the model")
    print(f"engine processes not counted (pid {os.getpid()} only)")


if __name__ == "__main__":
    main()
