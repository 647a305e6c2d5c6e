"""One-command check of MeZO on a GPU: bit-identity, sweep throughput, step overhead, memory, exactness.

    PYTHONPATH=python python benchmark/mezo/gpu_check.py                     # a GPU box (~3-5 min on an H100)
    PYTHONPATH=python python benchmark/mezo/gpu_check.py --device cpu --tiny # every row on a CPU (not targets)

Downloads nothing (models are random-initialised from configs: SmolLM2-135M's shape, a 1B
and a 3B Llama-3 shape, bfloat16) and imports no SGLang, only torch, triton (on a GPU),
transformers and this overlay. Every row is measured side by side in this one run:

* z / writes bit-identical: z of this device's kernels (Triton on a GPU, numba on a CPU)
  against the CPU torch reference for sampled chunks of every tensor; the perturbation and
  the update (momentum, weight decay, q=3) on special values in three dtypes; and a short
  run trained on this device replayed on the CPU, weights compared bit for bit.
* sweep: one in-place perturbation sweep over the model (a launch per tensor), the grouped
  write into scratch, the grouped in-place write with backups (the engine's views; its
  three streams of bytes counted against copy's two) and the update, against ``copy_`` of
  the same bytes, per tensor and as one flat copy. Target (GPU): >= 0.8 of the per-tensor copy.
* overhead = t_step / (2 t_forward), t_forward a no-grad forward of the same loss on the
  same 16 x 256 batch (every position labelled), and speed-up = t_official / t_step against
  the official MeZO step pattern (`sglang.srt.mezo.official_mezo.OfficialMeZOReference`), for the
  public `step()` and for steps as `train` runs them (each update folded into the next
  step's first pass). Targets at 1B and above: overhead <= 1.10, folded <= 1.08
  (Rademacher) and <= 1.12 (Gaussian), speed-up >= 3.
* memory: extra peak of a step over a forward (``torch.cuda.max_memory_allocated``, reset
  after load; peak RSS on a CPU). Target: <= the largest module's trainable bytes + 16 MiB.
* exact: every weight bit-identical after 20 lr=0 steps (held as `train` holds them).
* population: a step's points as LoRA slots of one peft mixed-adapter call against its
  passes one by one (SmolLM2's shape, LoRA r 8 on q/v, fzoo q = 4; teacher-forced and
  greedy generation of 32 tokens), and the largest gap between their losses.
* shards: a tensor-parallel shard's z on this device equals the whole tensor's z at its
  unsharded offsets (this device's fast kernel), and perturbing and updating a shard of
  rows, and one of columns inside an engine tensor with padding columns (a strided view),
  writes the CPU's bits and leaves the padding zero.

A row that fails prints FAILED with its traceback and the check goes on to the next.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from sglang.srt.mezo import kernels  # noqa: E402
from sglang.srt.mezo.config import MeZOConfig  # noqa: E402
from sglang.srt.mezo.kernels import reference as spec  # noqa: E402
from sglang.srt.mezo.objectives import CompletionNLL  # noqa: E402
from sglang.srt.mezo.official_mezo import OfficialMeZOReference  # noqa: E402
from sglang.srt.mezo.perturbation import largest_module_bytes  # noqa: E402
from sglang.srt.mezo.sharding import ShardLayout  # noqa: E402
from sglang.srt.mezo.trainer import MeZOTrainer  # noqa: E402

MIB = 1 << 20
BUDGET_FIXED_MIB = 16
LEARNING_RATE = 1e-7  # as bench_step: small enough that timing runs do not train
EPSILON = 1e-3
TARGETS = dict(sweep=0.8, overhead=1.10, speedup=3.0, folded_rademacher=1.08, folded_gaussian=1.12)

SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
    ),
    "llama3-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0,
    ),
    "llama3-3b": dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_theta=500000.0,
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    ),
}  # fmt: skip
BIG = ("llama3-1b", "llama3-3b")
CHECKS = ("identity", "shards", "replay", "checkpoint", "population", "models")


# ----------------------------------------------------------------------------- helpers
def row(name: str, text: str) -> None:
    print(f"{name:<34} {text}", flush=True)


def guarded(name: str, fn) -> None:
    """Runs one row; a failure prints FAILED and its traceback, and the check goes on."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - reported in full, not hidden: a diagnostic script keeps going
        row(name, "FAILED")
        traceback.print_exc()
        sys.stdout.flush()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def interleaved(sides: dict, device, repeats: int) -> dict:
    """Median seconds per call of each side: one warm-up each, then rounds in rotating order."""
    for fn in sides.values():
        timed(fn, device)
    times = {name: [] for name in sides}
    names = list(sides)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(sides[name], device))
    return {name: median(t) for name, t in times.items()}


def verdict(value: float, target: float, higher_is_better: bool, applies: bool) -> str:
    if not applies:
        return "(no target here)"
    ok = value >= target if higher_is_better else value <= target
    return f"target {'>=' if higher_is_better else '<='} {target}: {'met' if ok else 'MISSED'}"


def build_model(shape: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def make_batch(vocab: int, rows: int, length: int, device) -> dict:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).items()}


def trainer_for(model, device, kind: str, lr: float = LEARNING_RATE) -> MeZOTrainer:
    config = MeZOConfig(
        learning_rate=lr, epsilon=EPSILON, perturbation=kind, device=str(device), disable_tqdm=True,
        prefix_sharing=False, frozen_layer_reuse=False,
    )  # fmt: skip
    return MeZOTrainer(model, config)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bits differ, a NaN matching any NaN (sign and payload are the hardware's)."""
    a, b = a.detach().cpu().contiguous().view(-1), b.detach().cpu().contiguous().view(-1)
    bits = a.view(torch.uint8).view(-1, a.element_size()) != b.view(torch.uint8).view(-1, b.element_size())
    return int((bits.any(-1) & ~(torch.isnan(a) & torch.isnan(b))).sum())


class PeakMemory:
    """Peak bytes above the start of a block: CUDA's allocator counter, or peak RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def measure(self, fn) -> int:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        base = self._status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        fn()
        return self._status("VmHWM") - base

    @staticmethod
    def _status(field: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M).group(1)) * 1024


# ----------------------------------------------------------------------------- rows
def check_identity(device: torch.device, shape: str) -> None:
    """z, perturbation and update of this device's kernels against the CPU reference."""
    model = build_model(shape, torch.bfloat16, device)
    implementation = kernels.implementation(torch.empty(0, device=device))  # float32: what z is drawn with
    chunk = 4099
    for kind in spec.PERTURBATIONS:
        differ = checked = 0
        for name, p in model.named_parameters():
            key = kernels.tensor_key(12345, name)
            n = p.numel()
            for start in sorted({0, max(0, n // 2 - chunk // 2 - 1), max(0, n - chunk)}):
                length = min(chunk, n - start)
                here = kernels.direction_chunk(kind, key, start, length, device).cpu()
                reference = spec.z_chunk(kind, key, start, length, "cpu")
                differ += int((here.view(torch.int32) != reference.view(torch.int32)).sum())
                checked += length
        row(
            f"z bit-identical ({kind})",
            f"{differ} of {checked} sampled elements differ ({implementation} vs reference)",
        )
    del model

    g = torch.Generator().manual_seed(7)
    values = torch.randn(1 << 20, generator=g, dtype=torch.float64) * 0.05
    values[:8] = torch.tensor([0.0, -0.0, 1e-40, -1e-42, 3e38, -3e38, 1e-8, 65504.0], dtype=torch.float64)
    keys = [kernels.tensor_key(s, "w") for s in (1, 2, 3)]
    coefs = [0.37, -1.3, 0.0]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w0 = values.to(dtype)
        results = []
        for kind in spec.PERTURBATIONS:
            alpha = 1e-3
            here, backup = w0.to(device, copy=True), torch.empty_like(w0, device=device)
            kernels.axpy_direction_(here, here, kind, keys[0], alpha, save=backup)
            expected = w0.clone()
            spec.axpy_(expected, expected, kind, keys[0], spec.effective_alpha(kind, dtype, alpha))
            bad = [differing(here, expected), differing(backup, w0)]
            swapped = torch.empty_like(w0, device=device)
            kernels.PairedWrites([swapped], [w0.to(device, copy=True)])(kind, keys[:1], alpha)
            bad.append(differing(swapped, expected))
            m_cpu = torch.randn(w0.shape, generator=g)
            w, m = w0.to(device, copy=True), m_cpu.to(device, copy=True)
            kernels.update_([kernels.UpdateTarget(w, m, keys, 0.1)], kind, coefs, 1e-2, 0.9)
            w_ref = w0.clone()
            spec.update_(w_ref, kind, keys, coefs, 1e-2, 0.1, m_cpu, 0.9)
            bad += [differing(w, w_ref), differing(m, m_cpu)]
            nans = int(torch.isnan(w_ref.float()).sum())
            w = w0.to(device, copy=True)
            kernels.update_([kernels.UpdateTarget(w, None, keys, 0.1)], kind, coefs, 1e-2)
            w_ref = w0.clone()
            spec.update_(w_ref, kind, keys, coefs, 1e-2, 0.1)
            bad.append(differing(w, w_ref))
            results.append(f"{kind} {'identical' if not any(bad) else f'DIFFER {bad}'}")
        row(
            f"writes bit-identical ({str(dtype)[6:]})",
            ", ".join(results) + f" (perturb+backup, grouped, momentum update ({nans} NaN: inf - inf), update)",
        )

    calls = 200
    tiny = torch.zeros(1, device=device, dtype=torch.bfloat16)
    kernels.axpy_direction_(tiny, tiny, "gaussian", keys[0], 0.0)  # compiled outside the timing
    per_axpy = timed(
        lambda: [kernels.axpy_direction_(tiny, tiny, "gaussian", keys[0], 0.0) for _ in range(calls)], device
    )
    per_copy = timed(lambda: [tiny.copy_(tiny) for _ in range(calls)], device)
    row(
        "launch cost",
        f"axpy_direction_ {per_axpy / calls * 1e6:.1f} us, copy_ {per_copy / calls * 1e6:.1f} us per call",
    )


def check_shards(device: torch.device) -> None:
    """Shards on this device against the whole tensor's z and against the CPU's writes."""
    full_shape = (1536, 576)  # SmolLM2's gate_proj
    full = torch.randn(full_shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 0.05
    layouts = {"rows": ShardLayout.rows(full_shape, 700, 500), "columns": ShardLayout.columns(full_shape, 288, 250)}
    keys = [kernels.tensor_key(s, "w") for s in (1, 2)]
    coefs = [0.37, -1.3]

    def engine_tensor(part: torch.Tensor, layout: ShardLayout, where) -> tuple:
        """(storage, the shard's view): columns sit in front of 38 padding columns, as in a
        row-parallel weight whose input size upstream's CPU engine padded."""
        padding = 38 if layout.dim == 1 else 0
        storage = torch.zeros(part.shape[0], part.shape[1] + padding, dtype=part.dtype, device=where)
        view = storage[:, : part.shape[1]]
        view.copy_(part.to(where))
        return storage, view

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        results = []
        for kind in spec.PERTURBATIONS:
            whole_z = kernels.direction_chunk(kind, keys[0], 0, full.numel(), device).view(full_shape)
            bad = []
            for layout in layouts.values():
                part = layout.take(full).to(dtype)
                z = kernels.direction_chunk(kind, keys[0], 0, part.numel(), device, layout).view(layout.shape)
                bad.append(differing(z, layout.take(whole_z)))
                written = []
                for where in (device, torch.device("cpu")):
                    storage, view = engine_tensor(part, layout, where)
                    backup = torch.empty(view.shape, dtype=dtype, device=where)
                    kernels.axpy_direction_(view, view, kind, keys[0], 1e-3, save=backup, layout=layout)
                    updated, target = engine_tensor(part, layout, where)
                    momentum = torch.zeros(target.shape, device=where)
                    kernels.update_([kernels.UpdateTarget(target, momentum, keys, 0.1, layout)], kind, coefs, 1e-2, 0.9)
                    written.append((storage, backup, updated, momentum))
                bad += [differing(here, cpu) for here, cpu in zip(*written)]
                bad.append(int(written[0][0][:, part.shape[1] :].ne(0).sum()))  # padding columns untouched
            results.append(f"{kind} {'identical' if not any(bad) else f'DIFFER {bad}'}")
        row(
            f"shards bit-identical ({str(dtype)[6:]})",
            ", ".join(results) + " (z vs the whole tensor's; perturb+backup, momentum update vs CPU; padding)",
        )

    # what a shard's write costs: the reference kernel at unsharded offsets, against this
    # device's fast kernel on a whole tensor of the shard's size (rank 1 of 2 of Llama-3-1B's gate_proj)
    full_shape, rows = (8192, 2048), 4096
    layout = ShardLayout.rows(full_shape, rows, rows)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # numba serves float32 only
    shard = (torch.randn(rows, full_shape[1], device=device) * 0.05).to(dtype)
    backup = torch.empty_like(shard)
    costs = []
    for kind in spec.PERTURBATIONS:
        times = interleaved(
            {
                "shard": lambda kind=kind: kernels.axpy_direction_(shard, shard, kind, keys[0], 0.0, backup, layout),
                "whole": lambda kind=kind: kernels.axpy_direction_(shard, shard, kind, keys[0], 0.0, backup),
            },
            device,
            5,
        )
        costs.append(f"{kind} {times['shard'] / times['whole']:.1f}x")
    implementation = kernels.implementation(shard)
    row(
        "shard write cost",
        ", ".join(costs) + f" of a whole tensor's ({implementation}; {str(dtype)[6:]} 4096 x 2048, perturb+backup)",
    )


def check_checkpoint(device: torch.device, shape: str) -> None:
    """LoRA (peft) with momentum and weight decay trained here; its checkpoint, written from this
    device, loads into a CPU trainer with the same bits (adapter and momentum)."""
    import tempfile

    from sglang.srt.mezo.checkpoint import load_checkpoint, save_checkpoint

    def lora_trainer(model, where):
        config = MeZOConfig(
            peft="lora", learning_rate=1e-2, epsilon=1e-2, momentum=0.9, weight_decay=0.1, device=str(where),
            disable_tqdm=True,
        )  # fmt: skip
        torch.manual_seed(0)
        return MeZOTrainer(model, config)

    trainer = lora_trainer(build_model(shape, torch.bfloat16, device), device)
    batch = make_batch(trainer.model.config.vocab_size, 4, 64, device)
    for _ in range(2):
        trainer.step(batch)
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(trainer, directory)
        on_cpu = lora_trainer(build_model(shape, torch.bfloat16, torch.device("cpu")), torch.device("cpu"))
        load_checkpoint(on_cpu, directory)
    here, there = trainer.backend.trainable_state(), on_cpu.backend.trainable_state()
    momentum_here, momentum_there = trainer.backend.momentum_state(), on_cpu.backend.momentum_state()
    differ = [n for n in here if not same_bits(here[n], there[n])]
    differ += [n for n in momentum_here if not same_bits(momentum_here[n], momentum_there[n])]
    devices = sorted({str(v.device) for v in here.values()})
    row(
        "checkpoint to the CPU (LoRA)",
        f"{len(here)} adapter tensors on {devices}, {len(momentum_here)} momentum buffers: "
        + ("bit-identical after loading on the CPU" if not differ else f"{len(differ)} DIFFER {differ[:3]}"),
    )


def check_replay(device: torch.device, shape: str) -> None:
    """Three steps trained on this device, replayed on the CPU from (seed, g, lr): same bits."""
    model = build_model(shape, torch.bfloat16, device)
    initial = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    trainer = trainer_for(model, device, "gaussian", lr=1e-3)
    batch = make_batch(model.config.vocab_size, 4, 64, device)
    log = [trainer.step(batch) for _ in range(3)]
    trained = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    del trainer, model
    replica = build_model(shape, torch.bfloat16, torch.device("cpu"))
    with torch.no_grad():
        for n, p in replica.named_parameters():
            p.copy_(initial[n])
    replay = trainer_for(replica, torch.device("cpu"), "gaussian", lr=1e-3)
    for out in log:
        replay.backend.apply_update(out.applied, out.lr)
    differ = [n for n, p in replica.named_parameters() if not same_bits(p, trained[n])]
    moved = sum(not same_bits(trained[n], initial[n]) for n in initial)
    row(
        "replay on the CPU",
        f"{len(differ)} of {len(initial)} tensors differ after 3 steps ({moved} moved); "
        + (str(differ[:3]) if differ else "bit-identical"),
    )


def check_model(device: torch.device, shape: str, rows: int, length: int, repeats: int) -> None:
    print(f"\n== {shape} (bf16, batch {rows}x{length}) ==", flush=True)
    model = build_model(shape, torch.bfloat16, device)
    params = sum(p.numel() for p in model.parameters())
    row("parameters", f"{params / 1e9:.3f} B")
    batch = make_batch(model.config.vocab_size, rows, length, device)
    objective = CompletionNLL()

    def forward():
        with torch.no_grad():
            objective(model, batch)

    big = shape in BIG and device.type == "cuda"

    def memory():
        meter = PeakMemory(device)
        forward()  # lazy initialisation outside the measurement
        warm = trainer_for(model, device, "gaussian")
        warm.step({k: v[:1, :16] for k, v in batch.items()})  # kernels compiled, vanishing check done
        warm.backend.perturbation.remove()
        trainer = trainer_for(model, device, "gaussian")  # fresh: its scratch is allocated inside the step
        base = meter.measure(forward)
        step = meter.measure(lambda: trainer.step(batch))
        budget = largest_module_bytes(trainer.backend.tensors) + BUDGET_FIXED_MIB * MIB
        trainer.backend.perturbation.remove()
        extra = step - base
        row(
            "memory: step - forward",
            f"{extra / MIB:+.1f} MiB (forward peak {base / MIB:.0f} MiB, step {step / MIB:.0f} MiB); budget "
            f"{budget / MIB:.1f} MiB: {'met' if extra <= budget else 'MISSED'}",
        )

    def sweep():
        tensors = [(n, p.detach()) for n, p in model.named_parameters()]
        copies = [torch.empty_like(p) for _, p in tensors]
        total = sum(p.numel() for _, p in tensors)
        flat_src = torch.empty(total, dtype=torch.bfloat16, device=device)
        flat_dst = torch.empty_like(flat_src)
        nbytes = 2 * total * 2  # read and write bf16

        def copy_each():
            for (_, p), c in zip(tensors, copies):
                c.copy_(p)

        for kind in spec.PERTURBATIONS:
            keys = [kernels.tensor_key(99, n) for n, _ in tensors]
            grouped = kernels.PairedWrites(copies, [p for _, p in tensors])
            # the engine's in-place write of views: w itself perturbed (by 0: it stays put), its backup saved
            in_place = kernels.PairedWrites([p for _, p in tensors], [p for _, p in tensors], copies)
            targets = [kernels.UpdateTarget(p, None, [k], 0.0) for (_, p), k in zip(tensors, keys)]

            def per_tensor(kind=kind, keys=keys):
                for (_, p), key in zip(tensors, keys):
                    kernels.axpy_direction_(p, p, kind, key, 0.0)  # in place: w + 0 z = w, the weights stay put

            sides = {
                "per-tensor": per_tensor,
                "grouped": lambda kind=kind, keys=keys, grouped=grouped: grouped(kind, keys, EPSILON),
                "in place": lambda kind=kind, keys=keys, in_place=in_place: in_place(kind, keys, 0.0),
                "update": lambda kind=kind, targets=targets: kernels.update_(targets, kind, [1.0], 0.0),  # lr 0: w kept
                "copy": copy_each,
                "flat": lambda: flat_dst.copy_(flat_src),
            }
            t = interleaved(sides, device, repeats * 2)
            for name in ("grouped", "in place", "update", "per-tensor"):
                fraction = (
                    t["copy"] / t[name] * (1.5 if name == "in place" else 1.0)
                )  # it moves 3 tensors' bytes, not 2
                row(
                    f"sweep ({kind}, {name})",
                    f"{fraction:.2f} of per-tensor copy_, {t['flat'] / t[name]:.2f} of one flat copy_ "
                    f"({nbytes / t[name] / 1e9:.0f} GB/s; copy_ {nbytes / t['copy'] / 1e9:.0f}, flat "
                    f"{nbytes / t['flat'] / 1e9:.0f}); {verdict(fraction, TARGETS['sweep'], True, device.type == 'cuda')}",
                )

    def overhead():
        # every side on its own copy: the forward and the official pattern see no MeZO hooks
        reference = copy.deepcopy(model).requires_grad_(True)  # the official code perturbs requires_grad tensors
        official = OfficialMeZOReference(reference, objective, LEARNING_RATE, EPSILON)
        sides = {"forward": forward, "official": lambda: official.step(batch)}
        held = contextlib.ExitStack()
        for kind in spec.PERTURBATIONS:
            trainer = trainer_for(copy.deepcopy(model), device, kind)
            sides[kind] = lambda trainer=trainer: trainer.step(batch)
            looped = trainer_for(copy.deepcopy(model), device, kind)  # as `train` runs steps: updates folded
            held.enter_context(looped.backend.holding_perturbation())
            sides[f"{kind}, folded"] = lambda looped=looped: looped.step(batch)
        with held:
            t = interleaved(sides, device, repeats)
        for kind in spec.PERTURBATIONS:
            for side in (kind, f"{kind}, folded"):
                ratio, speedup = t[side] / (2 * t["forward"]), t["official"] / t[side]
                target = TARGETS["overhead"] if side == kind else TARGETS[f"folded_{kind}"]
                row(
                    f"step overhead ({side})",
                    f"{ratio:.3f} ({verdict(ratio, target, False, big)}); {speedup:.2f}x faster than the "
                    f"official pattern ({verdict(speedup, TARGETS['speedup'], True, big)})",
                )
        row("official pattern overhead", f"{t['official'] / (2 * t['forward']):.3f}")

    def exact():
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = trainer_for(model, device, "gaussian", lr=0.0)
        with trainer.backend.holding_perturbation():  # as `train` runs them: updates folded (lr 0 writes none)
            outs = [trainer.step(batch) for _ in range(20)]
        differ = [n for n, p in model.named_parameters() if not same_bits(p, before[n])]
        moved = all(o.loss_perturbed != o.loss_baseline for o in outs)
        row(
            "lr=0 x 20 steps",
            f"{'bit-identical' if not differ else f'{len(differ)} tensors DIFFER'} (z reached the forward: {moved})",
        )

    guarded("memory", memory)
    guarded("sweep", sweep)
    guarded("step overhead", overhead)
    guarded("lr=0 exact", exact)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def word_tokenizer(vocab: int):
    """A tokenizer whose tokens are the ids themselves ("t0" ... ), built here (nothing to
    download): the reward objective decodes what it generates."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=f"t{vocab - 1}", pad_token="t0")


def check_population(device: torch.device, shape: str, rows: int, length: int, repeats: int) -> None:
    """A step's population as LoRA slots of one peft mixed-adapter call (`--population-batch on`)
    against its passes one by one (off): LoRA r 8 on q/v over the bf16 base, fzoo q = 4,
    teacher-forced `rows` x `length` and greedy generation of 32 tokens from `rows` prompts
    of 64 (the reward objective); ratio above 1: the population is faster."""
    print(f"\n== population as LoRA slots ({shape}, bf16 base, fzoo q = 4) ==", flush=True)
    base = build_model(shape, torch.bfloat16, device)
    tokenizer = word_tokenizer(base.config.vocab_size)
    for part in ("teacher-forced", "generation"):
        batch = make_batch(base.config.vocab_size, rows, length if part == "teacher-forced" else 64, device)
        batch["labels"] = batch["labels"].clone()  # (make_batch's labels are its input_ids)
        batch["labels"][:, 0] = -100
        generate = {}
        if part == "generation":
            batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
            batch.update(records=[{"answer": "never"}] * rows, prompts=["(random tokens)"] * rows)
            generate = dict(reward="exact_match", max_new_tokens=32, temperature=0.0)
        trainers, first = {}, {}
        for population in ("off", "on"):
            config = MeZOConfig(
                peft="lora", lora_rank=8, lora_alpha=16, lora_target_modules="q_proj,v_proj", estimator="fzoo",
                num_directions=4, learning_rate=LEARNING_RATE, epsilon=EPSILON, population_batch=population,
                divergence_guard="off", device=str(device), disable_tqdm=True, **generate,
            )  # fmt: skip
            trainer = MeZOTrainer(copy.deepcopy(base), config, tokenizer=tokenizer)
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():  # B = 0 would hide the perturbations of A
                for t in trainer.backend.tensors:
                    t.param.copy_(torch.randn(t.param.shape, generator=generator).to(t.param) * 0.02)
            first[population] = trainer.step(batch)
            trainers[population] = trainer
        gap = max(
            abs(a.loss_perturbed - b.loss_perturbed)
            for a, b in zip(first["off"].per_direction, first["on"].per_direction)
        )
        t = interleaved({name: lambda tr=tr, b=batch: tr.step(b) for name, tr in trainers.items()}, device, repeats)
        row(
            f"population ({part})",
            f"{t['off'] / t['on']:.2f}x the speed of passes one by one ({t['off']:.3f} s -> {t['on']:.3f} s a step); "
            f"max |L_slot - L_pass| {gap:.1e}",
        )
    del base
    gc.collect()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="only the tiny model, a small batch (CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=None, help=f"comma-separated subset of {tuple(SHAPES)}")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message="MeZO .* below the weights' resolution")
    shapes = ["tiny"] if args.tiny else (args.shapes.split(",") if args.shapes else ["smollm2-135m", *BIG])
    rows, length = (4, 32) if args.tiny else (16, 256)
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device.type == "cuda":
        import triton

        versions += f", triton {triton.__version__}; {torch.cuda.get_device_name(device)}"
    print(f"MeZO GPU check on {device} ({versions})", flush=True)
    identity_shape = "tiny" if args.tiny else "smollm2-135m"
    checks = args.checks.split(",")
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        parser.error(f"--checks: unknown {unknown}; expected a subset of {CHECKS}")
    if "identity" in checks:
        guarded("bit-identity", lambda: check_identity(device, identity_shape))
    if "shards" in checks:
        guarded("shards", lambda: check_shards(device))
    if "replay" in checks:
        guarded("replay", lambda: check_replay(device, identity_shape))
    if "checkpoint" in checks:
        guarded("checkpoint", lambda: check_checkpoint(device, identity_shape))
    if "population" in checks:
        guarded("population", lambda: check_population(device, identity_shape, rows, length, args.repeats))
    for shape in shapes if "models" in checks else []:
        guarded(shape, lambda shape=shape: check_model(device, shape, rows, length, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
