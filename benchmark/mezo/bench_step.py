"""Step-time benchmark of the MeZO trainer: ratios only (see README.md in this directory).

For every workload and perturbation kind it prints

* overhead = t_step / (2 * t_forward): a MeZO step against two plain no-grad transformers
  forwards computing the same loss (`CompletionNLL`) on the same batch, with every position
  labelled. 1.00 would mean that perturbing, restoring and updating the weights cost nothing.
* speed-up = t_official / t_step: the same model and batch stepped by a reference of the
  official MeZO step pattern (`sglang.srt.mezo.official_mezo.OfficialMeZOReference`: seeded `torch.normal`,
  out-of-place writes, 4 sweeps per step).

The sides are timed alternately (the order rotates each repeat) in one process, after a
warm-up call each (numba compiles on the first call); ratios of medians are reported, and
ratios of the fastest repeats beside them. Each side owns its model instance, so the
trainer's hooks never touch the forward or the reference. Tiny workloads repeat a call
until a sample lasts MIN_SAMPLE_SECONDS.

Before any MeZO step runs, the forward is also timed alone ("clean"). If running MeZO steps
slows torch down for the rest of the process (as a second OpenMP runtime does), the
interleaved forward is slower than the clean one and only the (clean) column is honest.

    .venv/bin/python benchmark/mezo/bench_step.py --workloads smollm2-16x128 --repeats 3
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from sglang.srt.mezo.official_mezo import OfficialMeZOReference  # noqa: E402

PERTURBATIONS = ("rademacher", "gaussian")
LEARNING_RATE = 1e-7
EPSILON = 1e-3
MIN_SAMPLE_SECONDS = 0.3
CONTAMINATION_WARN = 1.15

# Issue 2, "Targets" (Rademacher directions, SmolLM2-135M fp32 full-parameter, 2 cores).
TARGETS = {"smollm2-16x128": 1.10, "smollm2-8x64": 1.15}
# The official pattern's overhead ratio as measured on this CPU when the targets were set.
OFFICIAL_ANCHOR = {"smollm2-16x128": 1.51, "smollm2-8x64": 2.65}
GAUSSIAN_NOTE = "Gaussian (issue #27): loop <= 1.10 at smollm2-16x128; Rademacher (clean) <= 0.75 (see the README)"


# ---------------------------------------------------------------------------------------
def make_trainer(model, kind: str):
    from sglang.srt.mezo.config import MeZOConfig
    from sglang.srt.mezo.trainer import MeZOTrainer

    config = MeZOConfig(learning_rate=LEARNING_RATE, epsilon=EPSILON, perturbation=kind, disable_tqdm=True)
    return MeZOTrainer(model, config)


def make_forward(model, batch: dict):
    """The baseline: a no-grad transformers forward computing the trainer's loss."""
    import torch

    from sglang.srt.mezo.objectives import CompletionNLL

    objective = CompletionNLL()

    def forward():
        with torch.no_grad():
            objective(model, batch)

    return forward


HELD = contextlib.ExitStack()  # the loop sides' holding blocks, open until the process ends
atexit.register(HELD.close)  # closed (their last updates written) before the interpreter tears modules down


def make_sides(workload, kinds, with_official: bool) -> dict:
    """side name -> zero-argument callable; every side has its own copy of the model.

    ``step:`` the public `MeZOTrainer.step` (the update written before it returns); ``loop:``
    the same inside `train`'s holding block (the update written by the next step's first
    pass); ``copy`` a copy of every weight into a second buffer; ``sweep:`` one perturbed
    write of every weight into that buffer (``round(w + eps z)``, the kernel a pass runs)."""
    import torch

    from sglang.srt.mezo.kernels import axpy_direction_, tensor_key
    from sglang.srt.mezo.objectives import CompletionNLL

    batch = workload.batch
    sides = {"forward": make_forward(copy.deepcopy(workload.model).eval(), batch)}
    if with_official:
        official = OfficialMeZOReference(copy.deepcopy(workload.model), CompletionNLL(), LEARNING_RATE, EPSILON)
        sides["official"] = lambda: official.step(batch)
    for kind in kinds:
        trainer = make_trainer(copy.deepcopy(workload.model), kind)
        sides[f"step:{kind}"] = lambda trainer=trainer: trainer.step(batch)
        # as `train` runs steps: inside one holding block, each update written by the next step's first pass
        looped = make_trainer(copy.deepcopy(workload.model), kind)
        HELD.enter_context(looped.backend.holding_perturbation())
        sides[f"loop:{kind}"] = lambda looped=looped: looped.step(batch)
    weights = [p.detach() for p in copy.deepcopy(workload.model).parameters()]
    copies = [torch.empty_like(w) for w in weights]
    sides["copy"] = lambda: [c.copy_(w) for c, w in zip(copies, weights)]
    for kind in kinds:
        sides[f"sweep:{kind}"] = lambda kind=kind: [
            axpy_direction_(c, w, kind, tensor_key(1, str(i)), EPSILON) for i, (c, w) in enumerate(zip(copies, weights))
        ]
    return sides


def calls_per_sample(seconds: float) -> int:
    """Calls per timed sample so that a sample lasts at least MIN_SAMPLE_SECONDS (tiny models)."""
    return max(1, math.ceil(MIN_SAMPLE_SECONDS / max(seconds, 1e-6)))


def sample(fn, calls: int) -> float:
    """Seconds per call, over `calls` back-to-back calls."""
    return common.timed(lambda: [fn() for _ in range(calls)]) / calls


def measure_interleaved(sides: dict, repeats: int) -> dict:
    """Warm-up per side, then `repeats` rounds in rotating order; side -> [seconds per call]."""
    calls = {}
    for name, fn in sides.items():
        seconds = common.timed(fn)  # numba compiles here on the first call
        if seconds < MIN_SAMPLE_SECONDS:
            seconds = min(seconds, common.timed(fn))
        calls[name] = calls_per_sample(seconds)
    names = list(sides)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(sample(sides[name], calls[name]))
    return times


def clean_forward_times(workload, repeats: int) -> list:
    """The forward alone (seconds per call), timed before any MeZO step ran in this process."""
    forward = make_forward(workload.model, workload.batch)
    forward()  # first call: lazy initialisation
    calls = calls_per_sample(common.timed(forward))
    return [sample(forward, calls) for _ in range(repeats)]


def profile_step(workload, kind: str, top: int = 20) -> None:
    """cProfile of one warm MeZO step, sorted by own time."""
    import cProfile
    import pstats

    trainer = make_trainer(copy.deepcopy(workload.model), kind)
    trainer.step(workload.batch)
    profiler = cProfile.Profile()
    profiler.enable()
    trainer.step(workload.batch)
    profiler.disable()
    print(f"\ncProfile of one warm MeZO step ({workload.name}, {kind}), top {top} by own time:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


# ---------------------------------------------------------------------------------------
def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def ratios(res: dict, kind: str) -> dict:
    """The printed ratios of one (workload, perturbation) row; None where not measured."""
    med, best = res["median"], res["min"]
    step = f"step:{kind}"
    loop = f"loop:{kind}"
    out = {
        "overhead": med[step] / (2 * med["forward"]),
        "overhead_best": best[step] / (2 * best["forward"]),
        "overhead_clean": med[step] / (2 * res["clean_forward"]),
        "loop": med[loop] / (2 * med["forward"]),
        "loop_clean": med[loop] / (2 * res["clean_forward"]),
        "sweep": med["copy"] / med[f"sweep:{kind}"],
        "official": None,
        "speedup": None,
        "speedup_best": None,
    }
    if "official" in med:
        out["official"] = med["official"] / (2 * med["forward"])
        out["speedup"] = med["official"] / med[step]
        out["speedup_best"] = best["official"] / best[step]
    return out


def report(results: list, kinds: list, repeats: int, layer: str) -> None:
    print()
    print(f"MeZO step benchmark: {repeats} alternating repeats after warm-up, {common.NUM_THREADS} torch threads")
    print(f"  {layer}")
    print("  overhead = t_step / (2 t_forward), medians  (1.00 = perturbing, restoring and updating cost nothing)")
    print("  official = t_official / (2 t_forward)      (official MeZO step pattern, reference re-implementation)")
    print("  speed-up = t_official / t_step, medians    (> 1: our step is faster than the official pattern)")
    print("  (best)   = the same ratio from each side's fastest repeat (robust to a busy neighbour)")
    print("  (clean)  = against the forward timed before any MeZO step ran in this process")
    print("  loop     = the overhead of steps as `train` runs them: each update folded into the next step's")
    print("             first pass (overhead: the public step(), which writes its update before returning)")
    print("  sweep    = t_copy / t_sweep: one perturbed write of every weight, as a fraction of a plain copy")
    header = (
        f"{'workload':<16}{'batch':>7}  {'perturbation':<12}{'overhead':>9}{'(best)':>8}{'(clean)':>9}"
        f"{'loop':>7}{'(clean)':>9}{'sweep':>7}{'official':>10}{'speed-up':>10}{'(best)':>8}{'target':>8}  verdict"
    )
    print(header)
    print("-" * len(header))
    notes = []
    for res in results:
        name = res["name"]
        for kind in kinds:
            r = ratios(res, kind)
            target = TARGETS.get(name) if kind == "rademacher" else None
            verdict = ""
            if target is not None:
                verdict = "MET" if max(r["loop"], r["loop_clean"]) <= target else "MISSED"
            print(
                f"{name:<16}{res['shape']:>7}  {kind:<12}{fmt(r['overhead']):>9}{fmt(r['overhead_best']):>8}"
                f"{fmt(r['overhead_clean']):>9}{fmt(r['loop']):>7}{fmt(r['loop_clean']):>9}{fmt(r['sweep']):>7}"
                f"{fmt(r['official']):>10}{fmt(r['speedup']):>10}{fmt(r['speedup_best']):>8}{fmt(target):>8}  {verdict}"
            )
        slowdown = res["median"]["forward"] / res["clean_forward"]
        if slowdown > CONTAMINATION_WARN:
            notes.append(
                f"WARNING: {name}: the forward ran {slowdown:.2f}x slower once MeZO steps had run in this process "
                "(interleaved vs clean median): trust the (clean) column, unless a busy neighbour disturbed the run "
                "(then (best) is closer). numba's 'omp' threading layer loads a second OpenMP runtime beside "
                "torch's, which slows torch down for the rest of the process: compare --numba-threading-layer "
                "workqueue."
            )
    print()
    print("Targets (issue 2): Rademacher overhead <= 1.10 at smollm2-16x128 and <= 1.15 at smollm2-8x64 (the verdict")
    print("uses the worse of loop and its (clean)). The official pattern's overhead measured on this CPU when the")
    print("targets were set: " + ", ".join(f"{k} {v:.2f}" for k, v in OFFICIAL_ANCHOR.items()) + ".")
    print(GAUSSIAN_NOTE + ".")
    for note in notes:
        print(note)


def numba_state() -> str:
    """Whether numba's thread pool started (and which layer), and the OpenMP runtimes loaded."""
    import numba
    import numba.np.ufunc.parallel as numba_parallel

    if numba_parallel._is_initialized:
        state = f"numba threading layer {numba.threading_layer()!r} ({numba.get_num_threads()} threads)"
    else:
        state = "numba thread pool never started: every numba kernel ran single-threaded"
    runtimes = sorted(
        {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if _is_openmp(line)}
    )
    state += f"; OpenMP runtimes loaded: {len(runtimes)} ({', '.join(Path(r).name for r in runtimes)})"
    return state


def _is_openmp(maps_line: str) -> bool:
    name = Path(maps_line.split()[-1]).name if maps_line.split() else ""
    return name.startswith(("libgomp", "libiomp", "libomp"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=",".join(common.DEFAULT_WORKLOADS), help=f"of {tuple(common.WORKLOADS)}")
    parser.add_argument("--perturbations", default=",".join(PERTURBATIONS), help=f"of {PERTURBATIONS}")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds after the warm-up")
    parser.add_argument("--no-official", action="store_true", help="skip the official-pattern reference")
    parser.add_argument(
        "--numba-threading-layer",
        choices=("default", "workqueue", "omp", "tbb"),
        default="default",
        help="set NUMBA_THREADING_LAYER before numba loads (default: leave numba's choice)",
    )
    parser.add_argument(
        "--fresh-numba-cache",
        action="store_true",
        help="compile numba kernels into an empty cache dir (NUMBA_CACHE_DIR) instead of reusing __pycache__",
    )
    parser.add_argument("--profile", action="store_true", help="also cProfile one warm step per workload and kind")
    args = parser.parse_args(argv)
    workloads = common.parse_list(args.workloads, common.WORKLOADS)
    kinds = common.parse_list(args.perturbations, PERTURBATIONS)
    if args.numba_threading_layer != "default":
        os.environ["NUMBA_THREADING_LAYER"] = args.numba_threading_layer
    if args.fresh_numba_cache:
        cache_dir = tempfile.mkdtemp(prefix="mezo-bench-numba-")
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
        os.environ["NUMBA_CACHE_DIR"] = cache_dir
    common.setup_threads()
    # lr 1e-7 is below fp32 resolution for many weights: expected here, not news.
    warnings.filterwarnings("ignore", message="MeZO update below", category=RuntimeWarning)

    meter = common.NeighbourMeter()
    built = [common.build_workload(name) for name in workloads]
    # Every clean forward first: a MeZO step may change how fast torch runs afterwards.
    clean = {w.name: common.median(clean_forward_times(w, args.repeats)) for w in built}
    results = []
    for w in built:
        print(f"[{w.name}] {w.num_params() / 1e6:.1f}M parameters, batch {w.shape}: timing...", flush=True)
        times = measure_interleaved(make_sides(w, kinds, not args.no_official), args.repeats)
        median = {side: common.median(ts) for side, ts in times.items()}
        res = {"name": w.name, "shape": w.shape, "clean_forward": clean[w.name], "median": median}
        res["min"] = {side: min(ts) for side, ts in times.items()}
        results.append(res)
        relative = ", ".join(f"{side} {t / median['forward']:.2f}" for side, t in median.items())
        relative += f", clean forward {clean[w.name] / median['forward']:.2f}"
        spread = ", ".join(f"{side} {max(ts) / min(ts):.2f}" for side, ts in times.items())
        print(f"[{w.name}] median time in units of the interleaved forward: {relative}")
        print(f"[{w.name}] max/min spread over repeats: {spread}", flush=True)
    report(results, kinds, args.repeats, numba_state())
    print("Noise: " + meter.summary())
    if args.profile:
        for w in built:
            for kind in kinds:
                profile_step(w, kind)


if __name__ == "__main__":
    main()
