"""Triton kernels for MeZO's directions on non-CPU devices: z, the perturbation and the update.

Each write reads and writes the weights once: the hash -> z -> ``w = round(src + alpha z)``
perturbation (the backup, if asked for, in the same pass), and the whole ZO-SGD update
(decay, q terms, momentum buffer) per tensor. One launch per tensor; float32, bfloat16,
float16 and float64 weights; any length (masked tail); views with storage offsets.

The bits are those of `reference` (and of the numba CPU kernels), so a run trained on a
GPU replays bit for bit on a CPU. That rests on choices that make every operation
IEEE-rounded the same way on every device:

* hashing is uint64 arithmetic (wrap-around multiplies, logical shifts): exact;
* launched with ``enable_fp_fusion=False``: the compiler never contracts ``a*b + c``
  into an FMA (`_mul_add` names every such pair; a fused variant fails the tests);
* sqrt is ``tl.sqrt_rn`` (correctly rounded; ``tl.sqrt`` is approximate on NVIDIA);
* there is no division: ln's mantissa/exponent split is bit manipulation;
* no fast-math transcendental: ln, sin and cos are the float32 polynomials;
* constants are exact float32 values (`reference.f32`), so no compiler rounds them;
* the axpy runs in float64 (product, then sum), then float64 -> float32 -> bf16/fp16, each
  to nearest even; bf16 is rounded by integer ops (the interpreter's cast truncates);
* alpha travels as the bits of a float64 (a Python float argument would be float32).

`TRITON_INTERPRET=1` (set before triton is imported) runs these kernels on CPU tensors;
the tests use it to check bit-identity with the reference on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Sequence

import torch
import triton
import triton.language as tl

from sglang.srt.mezo.kernels import reference as ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per program: 4096 on a GPU (a multiple of 64 and 2: tiles hold whole words and
# pairs); the interpreter runs a program as numpy calls, so there fewer, larger tiles.
TILE = 1 << 16 if INTERPRETED else 1 << 12
_KIND = {ref.GAUSSIAN: 0, ref.RADEMACHER: 1}

_GOLDEN = tl.constexpr(ref.GOLDEN)
_MIX1 = tl.constexpr(ref.MIX1)
_MIX2 = tl.constexpr(ref.MIX2)
_LN2_HI = tl.constexpr(ref.LN2_HI)
_LN2_LO = tl.constexpr(ref.LN2_LO)
_SQRT_HALF = tl.constexpr(ref.SQRT_HALF)
_P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7, _P8 = (tl.constexpr(c) for c in ref.LOG_P)
_S0, _S1, _S2 = (tl.constexpr(c) for c in ref.SIN_P)
_C0, _C1, _C2 = (tl.constexpr(c) for c in ref.COS_P)
_HALF_PI_2_22 = tl.constexpr(ref.HALF_PI_2_22)


@triton.jit
def _mix(key, counter):
    """SplitMix64 of ``key + (counter + 1) * GOLDEN`` (uint64, wrap-around)."""
    x = key + (counter + 1) * _GOLDEN
    x = (x ^ (x >> 30)) * _MIX1
    x = (x ^ (x >> 27)) * _MIX2
    return x ^ (x >> 31)


@triton.jit
def _mul_add(a, b, c):
    """``a * b + c`` with two roundings: never an FMA (the kernels launch without fp fusion).
    Callers pass a tensor as `a` (a constexpr first operand would stay a constexpr in the
    interpreter); ``a * b`` is ``b * a`` bit for bit."""
    return a * b + c


@triton.jit
def _ln_uniform(m):
    """ln(m / 2^24) for int32 1 <= m <= 2^24, op for op as `reference.ln_uniform`."""
    bits = m.to(tl.float32).to(tl.int32, bitcast=True)  # m is exact in float32
    e_bits = ((bits >> 23) & 0xFF) - 126  # m = f 2^e_bits, f in [0.5, 1)
    f = ((bits & 0x007FFFFF) | (126 << 23)).to(tl.float32, bitcast=True)
    e = (e_bits - 24).to(tl.float32)
    small = f < _SQRT_HALF
    e = tl.where(small, e - 1.0, e)
    x = tl.where(small, (f + f) - 1.0, f - 1.0)
    z = x * x
    y = _mul_add(x, _P0, _P1)
    y = _mul_add(y, x, _P2)
    y = _mul_add(y, x, _P3)
    y = _mul_add(y, x, _P4)
    y = _mul_add(y, x, _P5)
    y = _mul_add(y, x, _P6)
    y = _mul_add(y, x, _P7)
    y = _mul_add(y, x, _P8)
    y = y * x * z
    y = _mul_add(e, _LN2_LO, y)
    y = _mul_add(z, -0.5, y)
    return _mul_add(e, _LN2_HI, x + y)


@triton.jit
def _gaussian_pair(h):
    """(z0, z1) of each pair from its uint64 hash, op for op as `reference.gaussian_pairs`."""
    r = tl.sqrt_rn(-2.0 * _ln_uniform(((h >> 40) + 1).to(tl.int32)))
    angle_bits = (h & 0xFFFFFF).to(tl.int32)
    quadrant = angle_bits >> 22
    within = angle_bits & 0x3FFFFF
    reflect = within > 0x200000
    a = tl.where(reflect, 0x400000 - within, within).to(tl.float32) * _HALF_PI_2_22
    z = a * a
    s = _mul_add(_mul_add(_mul_add(z, _S0, _S1), z, _S2) * z, a, a)
    c = _mul_add(z, -0.5, _mul_add(_mul_add(z, _C0, _C1), z, _C2) * z * z) + 1.0
    rs = r * tl.where(reflect, c, s)
    rc = r * tl.where(reflect, s, c)
    swap = (quadrant & 1) == 1
    z0 = tl.where(swap, rs, rc)
    z1 = tl.where(swap, rc, rs)
    z0 = tl.where((quadrant == 1) | (quadrant == 2), -z0, z0)
    z1 = tl.where(quadrant >= 2, -z1, z1)
    return z0, z1


@triton.jit
def _u64(high, low):
    """A uint64 from two 32-bit halves (Python ints in [0, 2^32), whatever integer type or
    specialisation Triton gives each argument)."""
    high64 = tl.cast(high, tl.uint64) & 0xFFFFFFFF
    return (high64 << 32) | (tl.cast(low, tl.uint64) & 0xFFFFFFFF)


@triton.jit
def _offsets(tile_start, KIND: tl.constexpr, TILE: tl.constexpr):
    """Global offsets of the TILE elements from `tile_start` (a multiple of TILE): a
    [words, 64] tile for Rademacher (one hash per word), a [TILE] vector for Gaussian."""
    if KIND == 1:
        return (tile_start // 64 + tl.arange(0, TILE // 64))[:, None] * 64 + tl.arange(0, 64)[None, :]
    else:
        return tile_start + tl.arange(0, TILE)


@triton.jit
def _z(key, tile_start, KIND: tl.constexpr, TILE: tl.constexpr):
    """z at `_offsets(tile_start)` (float32) of the tensor keyed `key` (uint64)."""
    if KIND == 1:
        h = _mix(key, (tile_start // 64 + tl.arange(0, TILE // 64)).to(tl.uint64))
        bit = (h[:, None] >> tl.arange(0, 64)[None, :].to(tl.uint64)) & 1
        return tl.where(bit == 0, 1.0, -1.0)
    else:
        z0, z1 = _gaussian_pair(_mix(key, (tile_start // 2 + tl.arange(0, TILE // 2)).to(tl.uint64)))
        return tl.interleave(z0, z1)


@triton.jit
def _round_from_f64(x, DTYPE: tl.constexpr):
    """`reference.round_to_dtype`: float64 -> float32 -> the weight dtype, each to nearest even."""
    if DTYPE == tl.float64:
        return x
    x32 = x.to(tl.float32)
    if DTYPE == tl.float32:
        return x32
    elif DTYPE == tl.float16:
        return x32.to(tl.float16)
    else:
        bits = x32.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x32 != x32, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fill_kernel(out_ptr, n, start, key_high, key_low, KIND: tl.constexpr, TILE: tl.constexpr):
    """out[i] = z[start + i] for i < n (float32)."""
    tile_start = (tl.program_id(0).to(tl.int64) + start // TILE) * TILE
    local = _offsets(tile_start, KIND, TILE) - start
    z = _z(_u64(key_high, key_low), tile_start, KIND, TILE)
    tl.store(out_ptr + local, z, mask=(local >= 0) & (local < n))


@triton.jit
def _axpy_kernel(
    w_ptr, src_ptr, save_ptr, n, key_high, key_low, alpha_high, alpha_low,
    KIND: tl.constexpr, SAVE: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """w[i] = round(src[i] + alpha z[i]); save[i] = src[i] first when SAVE (one read, one write)."""
    tile_start = tl.program_id(0).to(tl.int64) * TILE
    offsets = _offsets(tile_start, KIND, TILE)
    mask = offsets < n
    src = tl.load(src_ptr + offsets, mask=mask)
    if SAVE:
        tl.store(save_ptr + offsets, src, mask=mask)
    z = _z(_u64(key_high, key_low), tile_start, KIND, TILE)
    alpha = _u64(alpha_high, alpha_low).to(tl.float64, bitcast=True)
    value = src.to(tl.float64) + z.to(tl.float64) * alpha
    tl.store(w_ptr + offsets, _round_from_f64(value, w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_kernel(
    w_ptr, m_ptr, n, keys_ptr, scalars_ptr, terms,
    KIND: tl.constexpr, MOMENTUM: tl.constexpr, DECAY: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """`reference.update_` on one tensor in one pass. `keys` holds the tensor's key of each
    term; `scalars` = [lr, mu, 1 - lr wd, wd, c_0, ..., c_{terms-1}] (float64)."""
    tile_start = tl.program_id(0).to(tl.int64) * TILE
    offsets = _offsets(tile_start, KIND, TILE)
    mask = offsets < n
    w = tl.load(w_ptr + offsets, mask=mask)
    lr = tl.load(scalars_ptr)
    if MOMENTUM:
        acc = tl.load(m_ptr + offsets, mask=mask).to(tl.float64) * tl.load(scalars_ptr + 1)
        for i in range(terms):
            z = _z(tl.load(keys_ptr + i).to(tl.uint64), tile_start, KIND, TILE)
            acc = acc + z.to(tl.float64) * tl.load(scalars_ptr + 4 + i)
        if DECAY:
            acc = acc + w.to(tl.float64) * tl.load(scalars_ptr + 3)
        m = acc.to(tl.float32)
        tl.store(m_ptr + offsets, m, mask=mask)
        w = _round_from_f64(w.to(tl.float64) - m.to(tl.float64) * lr, w_ptr.dtype.element_ty)
    else:
        if DECAY:
            factor = tl.load(scalars_ptr + 2)
            if w_ptr.dtype.element_ty == tl.float64:
                w = w * factor
            else:
                w = _round_from_f64((w.to(tl.float32) * factor.to(tl.float32)).to(tl.float64), w_ptr.dtype.element_ty)
        for i in range(terms):
            alpha = -lr * tl.load(scalars_ptr + 4 + i)
            if KIND == 1 and w_ptr.dtype.element_ty == tl.float32:
                alpha = alpha.to(tl.float32).to(tl.float64)  # `reference.effective_alpha`
            z = _z(tl.load(keys_ptr + i).to(tl.uint64), tile_start, KIND, TILE)
            w = _round_from_f64(w.to(tl.float64) + z.to(tl.float64) * alpha, w_ptr.dtype.element_ty)
    tl.store(w_ptr + offsets, w, mask=mask)


def _halves(value: int) -> tuple:
    """A 64-bit pattern as (high, low) 32-bit halves: kernel arguments Triton cannot narrow."""
    value &= (1 << 64) - 1
    return value >> 32, value & 0xFFFFFFFF


def _float_halves(value: float) -> tuple:
    return _halves(struct.unpack("<Q", struct.pack("<d", float(value)))[0])


def _on(device: torch.device):
    """Triton launches on the current device: make it the tensor's (models spread over GPUs)."""
    if device.type == "cpu":  # the interpreter
        return contextlib.nullcontext()
    backend = getattr(torch, device.type)
    if device.index is None or device.index == backend.current_device():
        return contextlib.nullcontext()
    return backend.device(device)


def _grid(n: int) -> tuple:
    return (triton.cdiv(n, TILE),)


def fill(kind: str, key: int, start: int, n: int, device) -> torch.Tensor:
    """z for elements [start, start + n), float32 on `device`."""
    device = torch.device(device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        with _on(device):
            _fill_kernel[(triton.cdiv(start + n, TILE) - start // TILE,)](
                out, n, start, *_halves(key), KIND=_KIND[kind], TILE=TILE, enable_fp_fusion=False
            )
    return out


def axpy_(w: torch.Tensor, src: torch.Tensor, kind: str, key: int, alpha: float, save=None) -> None:
    """``w = round(src + alpha z)`` in one pass (`alpha` already `effective_alpha`)."""
    if w.numel():
        with _on(w.device):
            _axpy_kernel[_grid(w.numel())](
                w, src, save if save is not None else w, w.numel(), *_halves(key), *_float_halves(alpha),
                KIND=_KIND[kind], SAVE=save is not None, TILE=TILE, enable_fp_fusion=False,
            )  # fmt: skip


def update_(targets: Sequence, kind: str, coefs: Sequence[float], lr: float, mu: float) -> None:
    """`reference.update_` for each target (`UpdateTarget`), one pass and one launch per tensor;
    the keys and scalars go to each device once."""
    by_device: dict = {}
    for target in targets:
        by_device.setdefault(target.weight.device, []).append(target)
    for device, group in by_device.items():
        keys = torch.tensor([t.keys for t in group], dtype=torch.int64).to(device)
        scalars = {}
        with _on(device):
            for row, t in enumerate(group):
                wd = t.weight_decay
                if wd not in scalars:
                    values = [lr, mu, 1.0 - lr * wd, wd, *coefs]
                    scalars[wd] = torch.tensor(values, dtype=torch.float64).to(device)
                decay = bool(wd and (lr or t.momentum is not None))
                if t.weight.numel():
                    _update_kernel[_grid(t.weight.numel())](
                        t.weight, t.momentum if t.momentum is not None else t.weight, t.weight.numel(), keys[row],
                        scalars[wd], len(coefs), KIND=_KIND[kind], MOMENTUM=t.momentum is not None, DECAY=decay,
                        TILE=TILE, enable_fp_fusion=False,
                    )  # fmt: skip
