"""The numba kernels for CPU float32 tensors: z and ``w = round(src + alpha z)`` in one pass.

Imported only when a CPU float32 tensor needs them (`sglang.srt.mezo.kernels` dispatches),
so a GPU box never loads numba. They compute the bits `reference` defines:

* Rademacher: the word's 64 signs from one hash, then one float32 add per element
  (alpha is already float32: `reference.effective_alpha`).
* Gaussian: 32 pairs per call as explicit LLVM vectors (`_gaussian_lanes`; LLVM's own
  loop vectoriser stops at 256-bit vectors on these CPUs), the polynomials op by op as in
  `reference` (no FMA: numba never contracts without fastmath, and the vector code writes
  each multiply and add; ln's mantissa and exponent are bit fields of float32(m), as in the
  Triton kernel); the write's float64 product and sum on the same registers
  (`_gaussian_axpy_lanes`), z never stored. An in-place sweep ran 0.32 G elements/s on 2
  cores as a vectorised loop with z in scratch, ~0.9 this way.
"""

from __future__ import annotations

import threading
import types

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils
from numba.core import types as nb_types
from numba.extending import intrinsic

from sglang.srt.mezo.kernels import reference as ref

# numba's default OpenMP layer loads a second libgomp beside torch's, after which torch's
# own parallel ops (attention above all) run many times slower; workqueue avoids that.
numba.config.THREADING_LAYER = "workqueue"

_GOLDEN, _M1, _M2 = ref.GOLDEN, ref.MIX1, ref.MIX2
_F32 = np.float32
_LN2_HI, _LN2_LO = _F32(ref.LN2_HI), _F32(ref.LN2_LO)
_SQRT_HALF = _F32(ref.SQRT_HALF)
_LOG_P = tuple(_F32(c) for c in ref.LOG_P)
_SIN_P = tuple(_F32(c) for c in ref.SIN_P)
_COS_P = tuple(_F32(c) for c in ref.COS_P)
_HALF_PI_2_22 = _F32(ref.HALF_PI_2_22)


@numba.njit(inline="always")
def _mix(key, counter):
    x = key + (counter + np.uint64(1)) * np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    return x ^ (x >> np.uint64(31))


@intrinsic
def _float_bits(typingctx, value):
    """The bits of a float32 as a uint32 (a register move, no conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return nb_types.uint32(nb_types.float32), codegen


@intrinsic
def _bits_float(typingctx, value):
    """The float32 whose bits are a uint32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return nb_types.float32(nb_types.uint32), codegen


@numba.njit(inline="always")
def _ln_uniform(m):
    """ln(m / 2^24) for an integer 1 <= m <= 2^24: m = f 2^E (f in [0.5, 1), exact), then
    ln f by the Cephes logf polynomial around 1 and (E - 24) ln 2 in two parts. f and E come
    from the bits of float32(m) (exact: m <= 2^24): its mantissa under the exponent of 0.5,
    and its exponent field; no division, no count of leading zeros."""
    bits = _float_bits(_F32(m))
    f = _bits_float((bits & np.uint32(0x007FFFFF)) | np.uint32(0x3F000000))
    e = _F32(np.int32(bits >> np.uint32(23)) - np.int32(126 + 24))  # E = exponent field - 126
    small = f < _SQRT_HALF
    e = e - _F32(1.0) if small else e
    x = (f + f) - _F32(1.0) if small else f - _F32(1.0)
    z = x * x
    p0, p1, p2, p3, p4, p5, p6, p7, p8 = _LOG_P
    y = ((((((((p0 * x + p1) * x + p2) * x + p3) * x + p4) * x + p5) * x + p6) * x + p7) * x + p8) * x * z
    y = y + _LN2_LO * e
    y = y - _F32(0.5) * z
    return (x + y) + _LN2_HI * e


@numba.njit(inline="always")
def _gaussian_pair(key, pair):
    """(z0, z1) of one pair: r = sqrt(-2 ln u1) and the angle 2 pi u2 from two 24-bit
    uniforms of one 64-bit hash; sin/cos by quadrant, reflected into [0, pi/4]."""
    h = _mix(key, np.uint64(pair))
    r = np.sqrt(_F32(-2.0) * _ln_uniform(np.int32(h >> np.uint64(40)) + np.int32(1)))
    angle_bits = np.int32(h & np.uint64(0xFFFFFF))
    quadrant = angle_bits >> 22
    within = angle_bits & 0x3FFFFF
    reflect = within > 0x200000
    a = _F32(0x400000 - within if reflect else within) * _HALF_PI_2_22
    z = a * a
    s = ((_SIN_P[0] * z + _SIN_P[1]) * z + _SIN_P[2]) * z * a + a
    c = ((_COS_P[0] * z + _COS_P[1]) * z + _COS_P[2]) * z * z - _F32(0.5) * z + _F32(1.0)
    rs = r * (c if reflect else s)  # r sin and r cos of the angle within its quadrant
    rc = r * (s if reflect else c)
    swap = (quadrant & 1) == 1  # quadrant q turns (cos, sin) by q quarter turns
    z0 = rs if swap else rc
    z1 = rc if swap else rs
    z0 = -z0 if quadrant == 1 or quadrant == 2 else z0
    z1 = -z1 if quadrant >= 2 else z1
    return z0, z1


_BLOCK = 1 << 14  # elements per parallel task; a multiple of 64 and of 2


@numba.njit(inline="always")
def rademacher_word(key, word):
    """The signs of elements 64 * word ... 64 * word + 63 of a tensor's Rademacher z, as the
    bits of one uint64: bit k is 0 where z = +1 and 1 where z = -1."""
    return _mix(key, np.uint64(word))


@numba.njit(inline="always")
def rademacher_steps(key, first_word, words, alpha, out):
    """alpha * z for `words` whole 64-element words from word `first_word`, into out[:64 * words]
    (float32): one hash per word, z = +1 where its bit is 0."""
    for j in range(words):
        bits = rademacher_word(key, first_word + j)
        word = out[j * 64 : j * 64 + 64]
        for k in range(64):
            word[k] = alpha if (bits >> np.uint64(k)) & np.uint64(1) == 0 else -alpha


# In place only (w is its own source, as in the perturbation and the update): given w and
# a separate `src`, LLVM must assume they overlap and keeps the loop scalar, while on one
# array the sign-apply loop vectorises. Float32 throughout (alpha is rounded to float32 by
# `axpy_direction_`): one correctly rounded add per element, no float64 conversions.
# Gaussian directions are bound by log/sin/cos instead.
def _axpy_rademacher(w, save, key, alpha, first_word):
    n = w.shape[0]
    key = np.uint64(key)
    saving = save.shape[0] == n
    for b in numba.prange((n + _BLOCK - 1) // _BLOCK):
        lo = b * _BLOCK
        hi = min(n, lo + _BLOCK)
        step = np.empty(64, dtype=np.float32)
        for word in range(lo >> 6, (hi + 63) >> 6):
            rademacher_steps(key, first_word + word, 1, alpha, step)  # the word's 64 signs first, then stream w
            base = word << 6
            if base + 64 <= hi:  # fixed trip counts on 64-element views: these loops vectorise
                ws = w[base : base + 64]
                if saving:
                    saved = save[base : base + 64]
                    for k in range(64):
                        value = ws[k]
                        saved[k] = value
                        ws[k] = value + step[k]
                else:
                    for k in range(64):
                        ws[k] = ws[k] + step[k]
            else:
                for k in range(hi - base):
                    value = w[base + k]
                    if saving:
                        save[base + k] = value
                    w[base + k] = value + step[k]


# Pairs per call of `_gaussian_lanes`: explicit 32-lane vectors (two AVX-512 registers per
# value; split into narrower registers elsewhere, same bits). LLVM's loop vectoriser stops
# at 256-bit vectors on these CPUs ("prefer-256-bit"); this generates pairs 2.2x faster
# (0.65 -> 1.4 G elements/s on 2 cores; 16 lanes: 1.25).
LANES = 32


def splat(builder, value, count: int):
    """IR of a <count x type> vector with `value` in every lane."""
    vector = ir.VectorType(value.type, count)
    lane0 = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(
        lane0, ir.Constant(vector, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), count), [0] * count)
    )


@intrinsic
def _gaussian_lanes(typingctx, key, first_pair, z0_address, z1_address):
    """(z0, z1) of pairs first_pair .. first_pair + LANES - 1, stored to the float32 arrays at
    the two addresses: `_gaussian_pair`'s operations, op for op, on LANES lanes at once (each
    an IEEE float32 or integer op, no FMA, sqrt correctly rounded: the same bits)."""
    signature = nb_types.void(nb_types.uint64, nb_types.int64, nb_types.int64, nb_types.int64)

    def codegen(context, builder, signature, args):
        key, first, z0_address, z1_address = args
        for value, address in zip(_gaussian_lanes_codegen(builder, key, first), (z0_address, z1_address)):
            builder.store(value, builder.inttoptr(address, ir.PointerType(value.type)), align=4)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _gaussian_axpy_lanes(typingctx, key, first_pair, dst_address, src_address, save_address, alpha):
    """``dst = round(src + alpha z)`` (float64 product and sum, rounded once to float32) for
    the 2 * LANES float32 elements of pairs first_pair .. first_pair + LANES - 1, and
    ``save = src`` first unless `save_address` is 0: z never leaves the registers."""
    signature = nb_types.void(
        nb_types.uint64, nb_types.int64, nb_types.int64, nb_types.int64, nb_types.int64, nb_types.float64
    )

    def codegen(context, builder, signature, args):
        key, first, dst_address, src_address, save_address, alpha = args
        b = builder
        z0, z1 = _gaussian_lanes_codegen(b, key, first)
        elements = ir.VectorType(ir.FloatType(), 2 * LANES)
        doubles = ir.VectorType(ir.DoubleType(), 2 * LANES)
        interleave = ir.Constant(
            ir.VectorType(ir.IntType(32), 2 * LANES), [k // 2 + (k % 2) * LANES for k in range(2 * LANES)]
        )
        z = b.shuffle_vector(z0, z1, interleave)  # z0[0], z1[0], z0[1], ...: the elements' order
        src = b.load(b.inttoptr(src_address, ir.PointerType(elements)), align=4)
        with b.if_then(b.icmp_unsigned("!=", save_address, ir.Constant(ir.IntType(64), 0))):
            b.store(src, b.inttoptr(save_address, ir.PointerType(elements)), align=4)
        value = b.fadd(b.fpext(src, doubles), b.fmul(splat(b, alpha, 2 * LANES), b.fpext(z, doubles)))
        b.store(b.fptrunc(value, elements), b.inttoptr(dst_address, ir.PointerType(elements)), align=4)
        return context.get_dummy_value()

    return signature, codegen


def _gaussian_lanes_codegen(b, key, first):
    """IR of (z0, z1) for pairs first .. first + LANES - 1: two <LANES x float> values."""
    i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
    ints, longs, floats = (ir.VectorType(t, LANES) for t in (i32, i64, f32))

    def u64(value):
        return ir.Constant(longs, [value & ((1 << 64) - 1)] * LANES)

    def i(value):
        return ir.Constant(ints, [value] * LANES)

    def f(value):  # exact float32 values (`reference.f32`): no rounding here
        return ir.Constant(floats, [float(value)] * LANES)

    # SplitMix64 of key + (pair + 1) * GOLDEN (`_mix`)
    pair = b.add(splat(b, first, LANES), ir.Constant(longs, list(range(LANES))))
    x = b.add(splat(b, key, LANES), b.mul(b.add(pair, u64(1)), u64(ref.GOLDEN)))
    x = b.mul(b.xor(x, b.lshr(x, u64(30))), u64(ref.MIX1))
    x = b.mul(b.xor(x, b.lshr(x, u64(27))), u64(ref.MIX2))
    h = b.xor(x, b.lshr(x, u64(31)))
    # ln(m / 2^24), m = (h >> 40) + 1 (`_ln_uniform`)
    m = b.add(b.trunc(b.lshr(h, u64(40)), ints), i(1))
    bits = b.bitcast(b.sitofp(m, floats), ints)
    fraction = b.bitcast(b.or_(b.and_(bits, i(0x007FFFFF)), i(0x3F000000)), floats)
    e = b.sitofp(b.sub(b.lshr(bits, i(23)), i(126 + 24)), floats)
    small = b.fcmp_ordered("<", fraction, f(_SQRT_HALF))
    e = b.select(small, b.fsub(e, f(1.0)), e)
    x = b.select(small, b.fsub(b.fadd(fraction, fraction), f(1.0)), b.fsub(fraction, f(1.0)))
    z = b.fmul(x, x)
    y = b.fmul(f(_LOG_P[0]), x)
    for c in _LOG_P[1:]:
        y = b.fmul(b.fadd(y, f(c)), x)
    y = b.fmul(y, z)
    y = b.fadd(y, b.fmul(f(_LN2_LO), e))
    y = b.fsub(y, b.fmul(f(0.5), z))
    ln = b.fadd(b.fadd(x, y), b.fmul(f(_LN2_HI), e))
    sqrt = cgutils.get_or_insert_function(b.module, ir.FunctionType(floats, [floats]), f"llvm.sqrt.v{LANES}f32")
    r = b.call(sqrt, [b.fmul(f(-2.0), ln)])
    # the angle within its quadrant, reflected into [0, pi/4] (`_gaussian_pair`)
    angle = b.trunc(b.and_(h, u64(0xFFFFFF)), ints)
    quadrant = b.ashr(angle, i(22))
    within = b.and_(angle, i(0x3FFFFF))
    reflect = b.icmp_signed(">", within, i(0x200000))
    a = b.fmul(b.sitofp(b.select(reflect, b.sub(i(0x400000), within), within), floats), f(_HALF_PI_2_22))
    z = b.fmul(a, a)
    sine = b.fmul(f(_SIN_P[0]), z)
    sine = b.fmul(b.fadd(sine, f(_SIN_P[1])), z)
    sine = b.fadd(b.fmul(b.fmul(b.fadd(sine, f(_SIN_P[2])), z), a), a)
    cosine = b.fmul(f(_COS_P[0]), z)
    cosine = b.fmul(b.fadd(cosine, f(_COS_P[1])), z)
    cosine = b.fmul(b.fmul(b.fadd(cosine, f(_COS_P[2])), z), z)
    cosine = b.fadd(b.fsub(cosine, b.fmul(f(0.5), z)), f(1.0))
    rs = b.fmul(r, b.select(reflect, cosine, sine))
    rc = b.fmul(r, b.select(reflect, sine, cosine))
    swap = b.icmp_signed("==", b.and_(quadrant, i(1)), i(1))
    z0, z1 = b.select(swap, rs, rc), b.select(swap, rc, rs)
    z0 = b.select(b.or_(b.icmp_signed("==", quadrant, i(1)), b.icmp_signed("==", quadrant, i(2))), b.fneg(z0), z0)
    z1 = b.select(b.icmp_signed(">=", quadrant, i(2)), b.fneg(z1), z1)
    return z0, z1


@numba.njit(inline="always")
def _gaussian_pairs(key, first_pair, pairs, z0, z1):
    """z of pairs [first_pair, first_pair + pairs) into z0 (even elements) and z1 (odd):
    `LANES` pairs per vector call, the last few one by one (the same operations)."""
    whole = pairs - pairs % LANES
    z0_address, z1_address = z0.ctypes.data, z1.ctypes.data
    for g in range(0, whole, LANES):
        _gaussian_lanes(key, first_pair + g, z0_address + 4 * g, z1_address + 4 * g)
    for p in range(whole, pairs):
        a, b = _gaussian_pair(key, first_pair + p)
        z0[p] = a
        z1[p] = b


def _axpy_gaussian(w, src, save, key, alpha, first_pair):
    n = w.shape[0]
    key = np.uint64(key)
    saving = save.shape[0] == n
    step = 2 * LANES  # elements per vector call
    for b in numba.prange((n + _BLOCK - 1) // _BLOCK):
        lo = b * _BLOCK  # a multiple of `step`: blocks hold whole calls
        hi = min(n, lo + _BLOCK)
        whole = lo + (hi - lo) // step * step
        for j in range(lo, whole, step):  # z generated and written in registers, 2 * LANES elements a call
            _gaussian_axpy_lanes(key, first_pair + (j >> 1), w.ctypes.data + 4 * j, src.ctypes.data + 4 * j,
                                 save.ctypes.data + 4 * j if saving else 0, alpha)  # fmt: skip
        for j in range(whole, hi):  # a tensor's last few elements: pair by pair
            z0, z1 = _gaussian_pair(key, first_pair + (j >> 1))
            value = src[j]
            if saving:
                save[j] = value
            w[j] = np.float32(np.float64(value) + alpha * np.float64(z1 if j & 1 else z0))


def _fill(out, kind, key, start, scratch):
    n = out.shape[0]
    key = np.uint64(key)
    for b in numba.prange((n + _BLOCK - 1) // _BLOCK):
        lo = b * _BLOCK
        hi = min(n, lo + _BLOCK)
        if kind == 0:  # pairs covering elements start+lo .. start+hi-1, then each element's half
            first = (start + lo) >> 1
            z0 = scratch[numba.get_thread_id(), 0]
            z1 = scratch[numba.get_thread_id(), 1]
            _gaussian_pairs(key, first, ((start + hi - 1) >> 1) - first + 1, z0, z1)
            for j in range(lo, hi):
                g = start + j
                out[j] = z1[(g >> 1) - first] if g & 1 else z0[(g >> 1) - first]
        else:
            for j in range(lo, hi):
                g = np.uint64(start + j)
                bit = (rademacher_word(key, g >> np.uint64(6)) >> (g & np.uint64(63))) & np.uint64(1)
                out[j] = 1.0 - 2.0 * np.float64(bit)


# Parallel kernels for big tensors; serial ones below PARALLEL_MIN elements, where waking
# the thread pool costs more than the work (and stalls badly when the cores are busy).
PARALLEL_MIN = 1 << 18


def _renamed(fn, name: str):
    """A copy of `fn` under another name: numba's on-disk cache keys entries by function
    name, not by compile options, so the serial twin needs its own name."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = name
    return twin


_KERNELS = {
    name: (
        numba.njit(parallel=True, nogil=True, cache=True)(fn),
        numba.njit(nogil=True, cache=True)(_renamed(fn, fn.__name__ + "_serial")),
    )
    for name, fn in (("rademacher", _axpy_rademacher), ("gaussian", _axpy_gaussian), ("fill", _fill))
}


def _kernel(name: str, n: int):
    parallel, serial = _KERNELS[name]
    return parallel if n >= PARALLEL_MIN else serial


_NO_SAVE = np.empty(0, dtype=np.float32)
_SCRATCH = threading.local()


def _gaussian_scratch() -> np.ndarray:
    """z scratch for `fill`'s Gaussian pairs: a row per numba thread, allocated (once per
    Python thread) before the kernel runs."""
    shape = (numba.get_num_threads(), 2, _BLOCK // 2 + 1)
    scratch = getattr(_SCRATCH, "rows", None)
    if scratch is None or scratch.shape[0] < shape[0]:
        scratch = _SCRATCH.rows = np.empty(shape, dtype=np.float32)
    return scratch


def fill(kind: str, key: int, start: int, n: int) -> torch.Tensor:
    """z for elements [start, start + n) of one tensor, float32 on the CPU."""
    out = np.empty(n, dtype=np.float32)
    _kernel("fill", n)(out, 0 if kind == ref.GAUSSIAN else 1, np.uint64(key), np.int64(start), _gaussian_scratch())
    return torch.from_numpy(out)


def axpy_(w: torch.Tensor, src: torch.Tensor, kind: str, key: int, alpha: float, save=None, first: int = 0) -> None:
    """``w = round(src + alpha z)`` on contiguous float32 CPU tensors, `save` <- src in the
    same pass, z of elements [first, first + w.numel()) of the tensor keyed `key` (`first`:
    a multiple of 64, where a tensor-parallel block of rows starts). Fails only before
    writing (the kernels allocate nothing)."""
    if first % 64:
        raise ValueError(f"numba kernels start z on a 64-element boundary, not at element {first}")
    flat_w, flat_src = w.detach().view(-1), src.detach().view(-1)
    saved = _NO_SAVE if save is None else save.detach().view(-1).numpy()
    kernel = _kernel(kind, flat_w.numel())
    if kind == ref.GAUSSIAN:
        kernel(flat_w.numpy(), flat_src.numpy(), saved, np.uint64(key), float(alpha), np.int64(first >> 1))
        return
    if flat_src.data_ptr() != flat_w.data_ptr():  # the Rademacher kernel works in place
        if save is not None:
            save.copy_(src)
            saved = _NO_SAVE
        flat_w.copy_(flat_src)
    kernel(flat_w.numpy(), saved, np.uint64(key), np.float32(alpha), np.int64(first >> 6))
