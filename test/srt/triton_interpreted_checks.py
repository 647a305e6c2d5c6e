"""The Triton kernels, run on CPU tensors by Triton's interpreter, against the torch reference.

Needs ``TRITON_INTERPRET=1`` in the environment before triton is first imported, so it runs
in a process of its own: `test_mezo_triton.py` starts it (the suite's entry point), or::

    TRITON_INTERPRET=1 python -m pytest test/srt/triton_interpreted_checks.py

The interpreter evaluates every operation with numpy (never an FMA, IEEE division and
sqrt), so bit-identity here checks the kernels' arithmetic, op for op; the same kernels on a
GPU are bit-identical too only because they ask for exactly these operations (no fp fusion,
``sqrt_rn``, no division): `benchmark/mezo/gpu_check.py` confirms it on a real GPU.

Canary: a variant whose polynomials contract ``a*b + c`` into an FMA (what a compiler does
by default) fails the bit-identity test.
"""

from __future__ import annotations

import contextlib
import unittest
from unittest import mock

import torch
import triton
import triton.language as tl
from mezo_testing import lm_batch, snapshot, tiny_llama

import sglang.srt.mezo.kernels.reference as spec
from sglang.srt.mezo import kernels
from sglang.srt.mezo.kernels import UpdateTarget, numba_kernels, tensor_key, triton_kernels
from sglang.srt.mezo_trainer import MeZOConfig, MeZOTrainer


def setUpModule():
    if not triton_kernels.INTERPRETED:
        raise RuntimeError("run with TRITON_INTERPRET=1 set before triton is imported (see the module docstring)")


KEY = tensor_key(7, "model.layers.0.mlp.up_proj.weight")
HALF_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


class _Counting:
    """A Triton kernel whose launches (``kernel[grid](...)``) are counted in `counts[name]`."""

    def __init__(self, kernel, counts: dict, name: str):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counts[self.name] += 1
            return launch(*args, **kwargs)

        return counted


@triton.jit
def _fused_mul_add(a, b, c):
    return tl.fma(a, b, c)


class TestTritonKernelsInterpreted(unittest.TestCase):
    def test_z_is_bit_identical_to_reference_and_numba(self):
        """z from the Triton fill kernel equals the torch reference and numba, bit for bit, for
        both kinds, over lengths around a 64-element word and a tile, at odd start offsets
        (a chunk that starts inside a pair or a word), and over long tensors (3M + 5 elements
        from element 64: every element compared, as the numba test does)."""
        cases = [(0, 1), (0, 63), (0, 64), (0, 65), (1, 64), (63, 65), (131, 5000), (0, (1 << 20) + 3), (64, 3_000_005)]
        for kind in spec.PERTURBATIONS:
            for start, n in cases:
                with self.subTest(kind=kind, start=start, n=n):
                    reference = spec.z_chunk(kind, KEY, start, n)
                    self.assertTrue(same_bits(triton_kernels.fill(kind, KEY, start, n, "cpu"), reference))
                    self.assertTrue(same_bits(numba_kernels.fill(kind, KEY, start, n), reference))

    def test_canary_fused_multiply_add_breaks_bit_identity(self):
        """The Gaussian polynomials contracted into FMAs (one rounding per a*b + c instead of
        two) give other bits: the identity above rests on never fusing."""
        n = 1 << 14
        reference = spec.z_chunk("gaussian", KEY, 0, n)
        with mock.patch.object(triton_kernels, "_mul_add", _fused_mul_add):
            fused = triton_kernels.fill("gaussian", KEY, 0, n, "cpu")
        differing = int((fused != reference).sum())
        self.assertGreater(differing, 0)  # about 1% of the values move by an ulp or two
        self.assertLess(float((fused - reference).abs().max()), 1e-5)  # close, not identical

    def test_axpy_matches_reference_in_every_dtype_on_offset_views(self):
        """w = round(src + alpha z) with the backup in the same pass, on views that start at
        an odd storage offset and end in a partial tile; in place and out of place."""
        for dtype in (*HALF_DTYPES, torch.float64):
            for kind in spec.PERTURBATIONS:
                with self.subTest(dtype=dtype, kind=kind):
                    generator = torch.Generator().manual_seed(11)
                    buffer = torch.randn(3 + 70001, dtype=torch.float64, generator=generator).to(dtype)
                    w, head = buffer[3:], buffer[:3].clone()  # w's data_ptr is not 16-byte aligned
                    alpha = spec.effective_alpha(kind, dtype, 1e-2)
                    expected = w.clone()
                    spec.axpy_(expected, expected, kind, KEY, alpha)
                    original, backup = w.clone(), torch.empty_like(w)
                    triton_kernels.axpy_(w, w, kind, KEY, alpha, save=backup)
                    self.assertTrue(same_bits(w, expected))
                    self.assertTrue(same_bits(backup, original))
                    self.assertTrue(same_bits(buffer[:3], head))  # nothing outside the view moved
                    out = torch.empty_like(w)
                    triton_kernels.axpy_(out, original, kind, KEY, alpha)
                    self.assertTrue(same_bits(out, expected))
                    w.copy_(backup)  # the in-place mechanism's restore
                    self.assertTrue(same_bits(w, original))

    def test_exact_ties_round_to_nearest_even_in_every_dtype(self):
        """Crafted ties: Rademacher z is +-1, so with alpha half an ulp of w every w + alpha z
        lies exactly halfway between two neighbours in w's dtype. Weights 1 + k ulp (k =
        1..63) alternate the parity of the last mantissa bit; two binades, both signs. The
        expected bits are derived here from the two neighbours: the one whose mantissa is
        even. Triton, the torch reference and (float32) numba all write it. Canary: rounding
        half away from zero misses a quarter or more of them."""
        bits_of = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
        k = torch.arange(1, 64, dtype=torch.float64)
        for dtype, int_dtype in bits_of.items():
            ulp = torch.finfo(dtype).eps  # the spacing in [1, 2)
            for binade, sign in ((1.0, 1.0), (1.0, -1.0), (0.5, 1.0), (0.5, -1.0)):
                with self.subTest(dtype=dtype, binade=binade, sign=sign):
                    exact_src = sign * binade * (1 + k * ulp)
                    src = exact_src.to(dtype)
                    self.assertTrue(torch.equal(src.double(), exact_src))
                    alpha = binade * ulp / 2  # half an ulp in this binade (a power of two: exact)
                    key = tensor_key(int(binade * 4 + sign), "tie")
                    z = spec.z_chunk("rademacher", key, 0, k.numel()).double()
                    tie = src.double() + alpha * z
                    lo, hi = (tie - alpha).to(dtype), (tie + alpha).to(dtype)  # the neighbours, exactly
                    self.assertTrue(torch.equal(lo.double(), tie - alpha) and torch.equal(hi.double(), tie + alpha))
                    want = torch.where((lo.view(int_dtype) & 1) == 0, lo, hi)
                    implementations = {"reference": spec.axpy_, "triton": triton_kernels.axpy_}
                    if dtype == torch.float32:
                        implementations["numba"] = numba_kernels.axpy_
                    for name, axpy in implementations.items():
                        written = torch.empty_like(src)
                        axpy(written, src, "rademacher", key, spec.effective_alpha("rademacher", dtype, alpha))
                        self.assertTrue(same_bits(written, want), name)
                    away_from_zero = torch.where(tie > 0, hi, lo)
                    self.assertGreaterEqual(int((away_from_zero != want).sum()), k.numel() // 4)

    def test_update_with_momentum_and_weight_decay_matches_reference(self):
        """One update with q=3 terms (one of them zero), weight decay and momentum, and one
        without momentum, equal the reference's in every dtype, weights and buffers."""
        keys = [tensor_key(seed, "w") for seed in (1, 2, 3)]
        coefs = [0.3, -1.7, 0.0]
        for dtype in (*HALF_DTYPES, torch.float64):
            for kind in spec.PERTURBATIONS:
                with self.subTest(dtype=dtype, kind=kind):
                    generator = torch.Generator().manual_seed(12)
                    w0 = torch.randn(9000, dtype=torch.float64, generator=generator).to(dtype)
                    m0 = torch.randn(9000, generator=generator)
                    w, m = w0.clone(), m0.clone()
                    triton_kernels.update_([UpdateTarget(w, m, keys, 0.1)], kind, coefs, 1e-2, 0.9)
                    w_ref, m_ref = w0.clone(), m0.clone()
                    spec.update_(w_ref, kind, keys, coefs, 1e-2, 0.1, m_ref, 0.9)
                    self.assertTrue(same_bits(w, w_ref) and same_bits(m, m_ref))
                    self.assertFalse(same_bits(w, w0))
                    w = w0.clone()
                    with kernels.forced("triton"):
                        kernels.update_([UpdateTarget(w, None, keys, 0.1)], kind, coefs, 1e-2)
                    w_ref = w0.clone()
                    spec.update_(w_ref, kind, keys, coefs, 1e-2, 0.1)
                    self.assertTrue(same_bits(w, w_ref))

    def test_engine_views_take_one_launch_per_unit_and_dtype(self):
        """Engine-shaped tensors: row-block shards (rank 1 of 2) viewed out of fused buffers
        (as `shard_maps` builds them for qkv_proj), in two dtypes, owned by one module. The
        unit's in-place perturbation takes one grouped launch per dtype (the backups in its
        scratch), its restore none; the update of all of them one launch per dtype. Every
        value inside the pass and after the update equals the torch reference drawing z at
        each shard's unsharded offsets (`ShardLayout`); after the pass, the buffers are
        their start bit for bit. Canary: z from each view's element 0 (the layouts dropped)
        gives other values."""
        from sglang.srt.mezo.perturbation import UnitScopedPerturbation, WeightVersions
        from sglang.srt.mezo.sharding import ShardLayout
        from sglang.srt.mezo.trainable import TrainableTensor
        from sglang.srt.mezo.zo_sgd import commit_update, prepare_update

        class Fused(torch.nn.Module):
            def __init__(self):
                super().__init__()
                generator = torch.Generator().manual_seed(3)
                self.qkv = torch.nn.Parameter(torch.randn(96, 40, generator=generator), requires_grad=False)
                self.norm = torch.nn.Parameter(torch.randn(3, 40, generator=generator).bfloat16(), requires_grad=False)

            def forward(self, seen):
                seen.append((self.qkv.detach().clone(), self.norm.detach().clone()))

        def views(module, keep_layouts=True):
            rows = {"q": (0, 64, 128), "k": (64, 16, 32), "v": (80, 16, 32)}  # (start, count, unsharded rows)
            tensors = []
            for name, (start, count, full) in rows.items():  # this rank holds the second half of each
                layout = ShardLayout.rows((full, 40), full - count, count)
                tensors.append(TrainableTensor(f"{name}_proj.weight", module.qkv.data[start : start + count],
                                               [module], True, layout=layout if keep_layouts else None))  # fmt: skip
            layout = ShardLayout.rows((6, 40), 3, 3)  # 120 elements in: z from element 120 (not a multiple of 64)
            tensors.append(TrainableTensor("norm.weight", module.norm.data, [module], False, layout=layout))
            return tensors

        def run(name, keep_layouts=True):
            module = Fused()
            start = (module.qkv.detach().clone(), module.norm.detach().clone())
            tensors = views(module, keep_layouts)
            mechanism = UnitScopedPerturbation(tensors, "gaussian", WeightVersions())
            seen, launches = [], {"axpy": 0, "update": 0}
            counting = {
                kind: mock.patch.object(triton_kernels, f"_{kind}_group_kernel", _Counting(
                    getattr(triton_kernels, f"_{kind}_group_kernel"), launches, kind))
                for kind in launches
            }  # fmt: skip
            with kernels.forced(name), counting["axpy"], counting["update"]:
                with mechanism.scope(5, 1e-2):
                    module(seen)
                after_pass = (module.qkv.detach().clone(), module.norm.detach().clone())
                plan = prepare_update(tensors, [(5, 0.7), (6, -0.2)], 1e-2, 0.1, 0.0)
                commit_update(tensors, plan, "gaussian", WeightVersions())
            return seen[0], start, after_pass, (module.qkv.detach(), module.norm.detach()), launches

        pass_t, start_t, after_t, updated_t, launches = run("triton")
        pass_r, start_r, _, updated_r, _ = run("reference")
        for a, b in zip((*pass_t, *updated_t), (*pass_r, *updated_r)):
            self.assertTrue(same_bits(a, b))
        for a, b in zip(after_t, start_t):
            self.assertTrue(same_bits(a, b))
        self.assertFalse(same_bits(pass_t[0], start_t[0]))  # the pass saw perturbed values
        # q, k, v: one float32 group; the bf16 norm starts z at element 120: the reference writes it
        self.assertEqual(launches, {"axpy": 1, "update": 1})
        canary, *_ = run("triton", keep_layouts=False)
        self.assertFalse(same_bits(canary[0], pass_r[0]))

    def test_a_failing_launch_after_a_written_group_leaves_every_view_as_it_was(self):
        """A unit's in-place views in two dtypes take two grouped launches; the second fails
        (after the first wrote its views and their backups): the exception leaves both
        buffers bit for bit as they were. Canary: the same failure with the written groups
        recorded only after every launch (the write's old bookkeeping) leaves the first
        group perturbed."""
        from sglang.srt.mezo.perturbation import UnitScopedPerturbation, WeightVersions
        from sglang.srt.mezo.sharding import ShardLayout
        from sglang.srt.mezo.trainable import TrainableTensor

        class Reads(torch.nn.Module):
            def forward(self):
                return None

        def attempt(record_each_launch: bool) -> bool:
            module = Reads()
            generator = torch.Generator().manual_seed(4)
            module.a = torch.nn.Parameter(torch.randn(8, 64, generator=generator), requires_grad=False)
            module.b = torch.nn.Parameter(torch.randn(8, 64, generator=generator).bfloat16(), requires_grad=False)
            start = [module.a.detach().clone(), module.b.detach().clone()]
            tensors = [
                TrainableTensor(f"{name}.weight", getattr(module, name).data[4:], [module], True,
                                layout=ShardLayout.rows((8, 64), 4, 4))
                for name in ("a", "b")
            ]  # fmt: skip
            mechanism = UnitScopedPerturbation(tensors, "gaussian", WeightVersions())
            real, launches = triton_kernels.AxpyGroup.__call__, {"n": 0}

            def second_fails(group, *args, **kwargs):
                launches["n"] += 1
                if launches["n"] == 2:
                    raise RuntimeError("failed launch")
                return real(group, *args, **kwargs)

            paired = kernels.PairedWrites.__call__

            def recorded_at_the_end(writes, kind, keys, alpha, written=None):
                done = []
                paired(writes, kind, keys, alpha, written=done.extend)
                if written is not None:
                    written(done)

            patches = [mock.patch.object(triton_kernels.AxpyGroup, "__call__", second_fails)]
            if not record_each_launch:
                patches.append(mock.patch.object(kernels.PairedWrites, "__call__", recorded_at_the_end))
            with kernels.forced("triton"), patches[0], contextlib.ExitStack() as stack:
                for patch in patches[1:]:
                    stack.enter_context(patch)
                with self.assertRaisesRegex(RuntimeError, "failed launch"), mechanism.scope(5, 1e-2):
                    module()
            return same_bits(module.a.detach(), start[0]) and same_bits(module.b.detach(), start[1])

        self.assertTrue(attempt(record_each_launch=True))
        self.assertFalse(attempt(record_each_launch=False))  # canary

    def test_trainer_step_with_triton_forced_equals_numba_path(self):
        """The whole trainer (perturbation swapped in per module, update) with the Triton
        kernels forced on CPU tensors: the same StepOutputs and weights as the default
        path (numba: the restore log for Rademacher, per-unit scratch for Gaussian), over 2
        steps with 2 directions, momentum and weight decay, on a one-layer model with tied
        embeddings."""
        for kind in spec.PERTURBATIONS:
            with self.subTest(kind=kind):
                runs = []
                for name in (None, "triton"):
                    model = tiny_llama(tie_word_embeddings=True, layers=1)
                    config = MeZOConfig(
                        perturbation=kind, learning_rate=1e-2, epsilon=1e-2, weight_decay=0.1, momentum=0.5,
                        num_directions=2, disable_tqdm=True,
                    )  # fmt: skip
                    with kernels.forced(name):
                        trainer = MeZOTrainer(model, config)
                        outs = [trainer.step(lm_batch(seed=s)) for s in range(2)]
                    runs.append(([(o.loss_perturbed, o.loss_baseline, o.coefficient) for o in outs], snapshot(model)))
                (numba_out, numba_weights), (triton_out, triton_weights) = runs
                self.assertEqual(numba_out, triton_out)
                for name, value in numba_weights.items():
                    self.assertTrue(same_bits(triton_weights[name], value), name)

    def test_lr0_steps_restore_bit_exactly_in_three_dtypes(self):
        """lr=0 steps through the Triton kernels leave every weight bit-identical, in float32,
        bfloat16 and float16 (one layer and two steps keep the interpreter's launches few)."""
        for dtype, kind in [(dtype, "gaussian") for dtype in HALF_DTYPES] + [(torch.bfloat16, "rademacher")]:
            with self.subTest(dtype=dtype, kind=kind):
                model = tiny_llama(dtype=dtype, layers=1)
                before = snapshot(model)
                with kernels.forced("triton"):
                    trainer = MeZOTrainer(
                        model, MeZOConfig(perturbation=kind, learning_rate=0.0, epsilon=1e-2, disable_tqdm=True)
                    )
                    outs = [trainer.step(lm_batch(seed=s)) for s in range(2)]
                self.assertTrue(all(o.loss_perturbed != o.loss_baseline for o in outs))  # z reached the forward
                for name, value in snapshot(model).items():
                    self.assertTrue(same_bits(value, before[name]), name)


if __name__ == "__main__":
    unittest.main()
