"""Peak-memory benchmark of one MeZO step (see README.md in this directory).

Each (workload, mode) runs in a FRESH Python process, which loads the model and the batch,
warms the mode up on a 1 x 8 slice of the batch (numba compiles, torch initialises its
kernels; warm-ups that leave state behind run on a throw-away copy of the model), resets
the kernel's peak-RSS counter (writes "5" to /proc/self/clear_refs), runs the measured
operation once and reads VmHWM:

    growth = VmHWM after the operation - VmRSS just before it

Modes: ``forward`` (a no-grad forward of the trainer's loss, the baseline),
``mezo-rademacher`` / ``mezo-gaussian`` (one `MeZOTrainer.step`, trainer built before the
reset, so its scratch buffers count), ``official`` (the official MeZO step pattern, the
reference in `sglang.srt.mezo.official_mezo`), ``sgd`` / ``adamw`` (one backprop step with torch.optim, the
optimizer built before the reset, so its state counts: AdamW allocates it on step one).

Children run with MALLOC_MMAP_THRESHOLD_ fixed (glibc), so every large block is mmap-ed and
given back on free: RSS then follows live tensors instead of the allocator's free lists
(``--no-malloc-tuning`` leaves glibc's adaptive threshold on).

    .venv/bin/python benchmark/mezo/bench_memory.py --workloads smollm2-16x128
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MODES = ("forward", "mezo-rademacher", "mezo-gaussian", "official", "sgd", "adamw", "mezo-lora", "mezo-lora-int8")
MIB = 1 << 20
BUDGET_FIXED_MIB = 16  # design.md: extra <= 16 MiB + the largest trainable tensor
OFFICIAL_ANCHOR_MIB = 412  # the official pattern over a no-grad forward, measured when the target was set
MMAP_THRESHOLD = str(128 * 1024)
RESULT_TAG = "MEMORY_RESULT "


# ---------------------------------------------------------------------------------- child
def proc_status_kib(*fields) -> dict:
    text = Path("/proc/self/status").read_text()
    return {f: int(re.search(rf"^{f}:\s+(\d+)\s+kB", text, re.M).group(1)) for f in fields}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def tiny(batch: dict) -> dict:
    return {k: v[:1, :8].contiguous() for k, v in batch.items()}


def loss_fn(model, batch):
    from sglang.srt.mezo.objectives import CompletionNLL

    total, count = CompletionNLL()(model, batch)
    return total / count


def prepare(mode: str, model, batch: dict):
    """Warm the mode up and return the measured operation (a zero-argument callable)."""
    import torch

    if mode == "forward":

        def op():
            with torch.no_grad():
                loss_fn(model, batch)

        with torch.no_grad():
            loss_fn(model, tiny(batch))
        return op

    if mode.startswith("mezo-lora"):  # the quantized base shows in the resident size after setup
        from sglang.srt.mezo.config import MeZOConfig
        from sglang.srt.mezo.trainer import MeZOTrainer

        config = MeZOConfig(
            peft="lora",
            learning_rate=1e-7,
            epsilon=1e-2,
            perturbation="rademacher",
            quantize_base="int8" if mode.endswith("int8") else "none",
            disable_tqdm=True,
        )
        trainer = MeZOTrainer(model, config)
        trainer.step(tiny(batch))
        return lambda: trainer.step(batch)

    if mode.startswith("mezo-"):
        from bench_step import make_trainer

        kind = mode.split("-", 1)[1]
        warm = make_trainer(copy.deepcopy(model), kind)  # a throw-away copy: its scratch goes with it
        warm.step(tiny(batch))
        del warm
        gc.collect()
        trainer = make_trainer(model, kind)
        return lambda: trainer.step(batch)

    if mode == "official":
        from bench_step import EPSILON, LEARNING_RATE

        from sglang.srt.mezo.objectives import CompletionNLL
        from sglang.srt.mezo.official_mezo import OfficialMeZOReference

        reference = OfficialMeZOReference(model, CompletionNLL(), LEARNING_RATE, EPSILON)
        reference.step(tiny(batch))
        return lambda: reference.step(batch)

    if mode in ("sgd", "adamw"):
        make = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[mode]
        warm_model = copy.deepcopy(model)  # gradients and optimizer state go with the copy
        warm_opt = make(warm_model.parameters(), lr=1e-7)
        loss_fn(warm_model, tiny(batch)).backward()
        warm_opt.step()
        del warm_model, warm_opt
        gc.collect()
        optimizer = make(model.parameters(), lr=1e-7)

        def op():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            optimizer.step()

        return op

    raise ValueError(f"unknown mode {mode!r}")


def child(workload_name: str, mode: str) -> None:
    common.setup_threads()
    warnings.filterwarnings("ignore", message="MeZO update below", category=RuntimeWarning)
    workload = common.build_workload(workload_name)
    op = prepare(mode, workload.model, workload.batch)
    gc.collect()
    before = proc_status_kib("VmRSS")["VmRSS"]
    reset_peak()
    started = time.perf_counter()
    op()
    seconds = time.perf_counter() - started
    after = proc_status_kib("VmRSS", "VmHWM")
    result = {
        "workload": workload_name,
        "mode": mode,
        "rss_before_mib": before / 1024,
        "growth_mib": (after["VmHWM"] - before) / 1024,
        "retained_mib": (after["VmRSS"] - before) / 1024,
        "largest_tensor_mib": workload.largest_tensor_bytes() / MIB,
        "params_mib": sum(p.numel() * p.element_size() for p in workload.model.parameters()) / MIB,
        "op_seconds": seconds,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------- parent
def run_child(workload: str, mode: str, malloc_tuning: bool, timeout: float) -> dict:
    env = dict(os.environ)
    if malloc_tuning:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", workload, mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"{workload}/{mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def report(rows: list, modes: list, malloc_tuning: bool) -> None:
    print()
    print("Peak RSS growth of one operation, fresh process per row, peak reset after loading and warm-up")
    print("  growth   = VmHWM after - VmRSS before the operation (MiB)")
    print("  retained = VmRSS after - VmRSS before (MiB; what the operation keeps, e.g. optimizer state)")
    print("  extra    = growth - growth of the no-grad forward on the same workload (MiB)")
    print(f"  glibc MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD if malloc_tuning else '(adaptive, untouched)'}")
    header = f"{'workload':<16}{'batch':>7}  {'mode':<16}{'growth':>9}{'retained':>10}{'extra':>9}  budget / note"
    print(header)
    print("-" * (len(header) + 24))
    for workload in dict.fromkeys(r["workload"] for r in rows):
        by_mode = {r["mode"]: r for r in rows if r["workload"] == workload}
        base = by_mode.get("forward", {}).get("growth_mib")
        shape = common.WORKLOADS[workload][1:]
        for mode in modes:
            r = by_mode.get(mode)
            if r is None:
                continue
            extra = None if base is None or mode == "forward" else r["growth_mib"] - base
            note = ""
            if mode.startswith("mezo-") and not mode.startswith("mezo-lora") and extra is not None:
                budget = BUDGET_FIXED_MIB + r["largest_tensor_mib"]
                verdict = "MET" if extra <= budget else "MISSED"
                note = f"<= {budget:.0f} MiB (16 + largest tensor {r['largest_tensor_mib']:.1f}): {verdict}"
            elif mode == "official" and workload.startswith("smollm2"):
                note = f"measured +{OFFICIAL_ANCHOR_MIB} MiB when the target was set"
            elif mode == "forward":
                note = f"(weights {r['params_mib']:.0f} MiB, RSS before {r['rss_before_mib']:.0f} MiB)"
            if mode.startswith("mezo-lora"):
                note = f"RSS after setup {r['rss_before_mib']:.0f} MiB (the int8 base's saving shows here)"
            extra_text = "-" if extra is None else f"{extra:+.1f}"
            print(
                f"{workload:<16}{shape[0]:>4}x{shape[1]:<3}  {mode:<16}{r['growth_mib']:>9.1f}"
                f"{r['retained_mib']:>10.1f}{extra_text:>9}  {note}"
            )
    print()
    print("Design target (design.md): a plain ZO-SGD step needs <= 16 MiB + the largest trainable tensor")
    print("(SmolLM2: the tied embedding, 108 MiB) over a no-grad forward of the same loss.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=",".join(common.DEFAULT_WORKLOADS), help=f"of {tuple(common.WORKLOADS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {MODES}")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc's adaptive mmap threshold on")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per child process")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    workloads = common.parse_list(args.workloads, common.WORKLOADS)
    modes = common.parse_list(args.modes, MODES)
    rows = []
    for workload in workloads:
        for mode in modes:
            print(f"[{workload}] {mode}: fresh process...", flush=True)
            rows.append(run_child(workload, mode, not args.no_malloc_tuning, args.timeout))
    report(rows, modes, not args.no_malloc_tuning)


if __name__ == "__main__":
    main()
