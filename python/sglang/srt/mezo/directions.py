"""Counter-based random directions z for MeZO.

z is a pure function of (step seed, canonical parameter name, element offset): a
SplitMix64-style hash of a per-tensor key and a counter. Nothing is drawn from a global
RNG and nothing is stored, so the same z comes out whatever the chunking, thread count,
order of the trainable set or backend (the SGLang engine regenerates it in its own
process from the seed alone).

* Rademacher: one 64-bit hash per block of 64 elements, element i takes bit i % 64.
* Gaussian: one 64-bit hash per pair of elements; Box-Muller in float32 on two 24-bit
  uniforms from it (|z| < 5.8: the tail beyond has probability 8e-9). ln, sin and cos are
  polynomials written out op by op (within a few ulps of libm), so the numba loop
  vectorises (0.7 G elements/s on 2 cores, ~5x libm calls) and the torch reference gives
  the same bits.

`axpy_direction_(w, src, key, start, alpha)` writes ``w = round(src + alpha * z)`` with the
arithmetic in float64 and a single rounding to w's dtype (for Rademacher z on float32
tensors alpha is first rounded to float32, which makes that value the plain float32 add
z = +-1 needs). On CPU float32 tensors it runs as one fused numba kernel (the hot path:
z is never materialised beyond a block); other dtypes and devices go through the torch
reference in chunks of `CHUNK` elements, which computes the identical value.
"""

from __future__ import annotations

import hashlib
import math
import threading
import types
from typing import Optional

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types as nb_types
from numba.extending import intrinsic

# numba's default OpenMP layer loads a second libgomp beside torch's, after which torch's
# own parallel ops (attention above all) run many times slower; workqueue avoids that.
numba.config.THREADING_LAYER = "workqueue"

GAUSSIAN = "gaussian"
RADEMACHER = "rademacher"
PERTURBATIONS = (GAUSSIAN, RADEMACHER)

# Elements per chunk for the torch path: 1 Mi float32 scratch = 4 MiB (times ~4 temporaries).
CHUNK = 1 << 20

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def tensor_key(seed: int, name: str) -> int:
    """Stable 63-bit key of one tensor's direction for one seed (blake2b, not hash())."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------- numba
@numba.njit(inline="always")
def _mix(key, counter):
    x = key + (counter + np.uint64(1)) * np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    return x ^ (x >> np.uint64(31))


# Box-Muller in float32 arithmetic only (no libm): ln and sin/cos are Cephes-style
# polynomials written out op by op, so LLVM vectorises them and the torch reference below
# computes the very same bits with the same operations in the same order.
_F32 = np.float32
_LN2_HI, _LN2_LO = _F32(0.693359375), _F32(-2.12194440e-4)
_SQRT_HALF = _F32(0.70710678118654752440)
_LOG_P = tuple(
    _F32(c)
    for c in (
        7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
        -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
    )
)  # fmt: skip
_SIN_P = (_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1))
_COS_P = (_F32(2.443315711809948e-5), _F32(-1.388731625493765e-3), _F32(4.166664568298827e-2))
_HALF_PI_2_22 = _F32(math.pi / 2 / 2**22)  # a quarter turn over the 22 bits within a quadrant


@intrinsic
def _leading_zeros32(typingctx, value):
    """Leading zero bits of a uint32 (ctlz)."""

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return nb_types.uint32(nb_types.uint32), codegen


@numba.njit(inline="always")
def _ln_uniform(m):
    """ln(m / 2^24) for an integer 1 <= m <= 2^24: m = f 2^E (f in [0.5, 1), exact), then
    ln f by the Cephes logf polynomial around 1 and (E - 24) ln 2 in two parts."""
    e_bits = np.int64(32) - np.int64(_leading_zeros32(np.uint32(m)))
    f = _F32(m) / _F32(np.int64(1) << e_bits)
    e = _F32(e_bits - 24)
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
    r = np.sqrt(_F32(-2.0) * _ln_uniform(np.int64(h >> np.uint64(40)) + 1))
    angle_bits = np.int64(h & np.uint64(0xFFFFFF))
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
def _axpy_rademacher(w, save, key, alpha):
    n = w.shape[0]
    key = np.uint64(key)
    saving = save.shape[0] == n
    for b in numba.prange((n + _BLOCK - 1) // _BLOCK):
        lo = b * _BLOCK
        hi = min(n, lo + _BLOCK)
        step = np.empty(64, dtype=np.float32)
        for word in range(lo >> 6, (hi + 63) >> 6):
            rademacher_steps(key, word, 1, alpha, step)  # the word's 64 signs first, then stream w
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


@numba.njit(inline="always")
def _gaussian_pairs(key, first_pair, pairs, z0, z1):
    """z of pairs [first_pair, first_pair + pairs) into z0 (even elements) and z1 (odd): a
    straight loop over pairs, which LLVM vectorises (~5x the element-by-element rate)."""
    for p in range(pairs):
        a, b = _gaussian_pair(key, first_pair + p)
        z0[p] = a
        z1[p] = b


def _axpy_gaussian(w, src, save, key, alpha, scratch):
    n = w.shape[0]
    key = np.uint64(key)
    saving = save.shape[0] == n
    for b in numba.prange((n + _BLOCK - 1) // _BLOCK):
        lo = b * _BLOCK  # even: blocks hold whole pairs
        hi = min(n, lo + _BLOCK)
        z0 = scratch[numba.get_thread_id(), 0]
        z1 = scratch[numba.get_thread_id(), 1]
        _gaussian_pairs(key, lo >> 1, (hi - lo + 1) >> 1, z0, z1)
        if saving:
            for j in range(lo, hi):
                save[j] = src[j]
        for p in range((hi - lo + 1) >> 1):
            j = lo + 2 * p
            w[j] = np.float32(np.float64(src[j]) + alpha * np.float64(z0[p]))
        for p in range((hi - lo) >> 1):
            j = lo + 2 * p + 1
            w[j] = np.float32(np.float64(src[j]) + alpha * np.float64(z1[p]))


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


# ----------------------------------------------------------------------------- torch
def _torch_mix(key: int, counter: torch.Tensor) -> torch.Tensor:
    """SplitMix64 on int64 tensors (two's-complement wraparound, logical shifts emulated)."""

    def shr(x: torch.Tensor, s: int) -> torch.Tensor:
        return (x >> s) & ((1 << (64 - s)) - 1)

    def signed(c: int) -> int:
        return c - (1 << 64) if c >= 1 << 63 else c

    x = (counter + 1) * signed(_GOLDEN) + signed(key & _MASK64)
    x = (x ^ shr(x, 30)) * signed(_M1)
    x = (x ^ shr(x, 27)) * signed(_M2)
    return x ^ shr(x, 31)


def direction_chunk_torch(kind: str, key: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """z for elements [start, start + n) of one tensor, float32, reference implementation."""
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    if kind == RADEMACHER:
        bits = _torch_mix(key, idx >> 6)
        bit = ((bits >> (idx & 63)) & 1).to(torch.float32)
        return 1.0 - 2.0 * bit
    h = _torch_mix(key, idx >> 1)
    # float64 then one rounding: torch's vectorised float32 sqrt is not always correctly rounded
    r = torch.sqrt(-2.0 * _torch_ln_uniform(((h >> 40) & 0xFFFFFF) + 1).double()).float()
    angle_bits = h & 0xFFFFFF
    quadrant = angle_bits >> 22
    within = angle_bits & 0x3FFFFF
    reflect = within > 0x200000
    a = torch.where(reflect, 0x400000 - within, within).to(torch.float32) * _f32(_HALF_PI_2_22)
    z = a * a
    s = ((_f32(_SIN_P[0]) * z + _f32(_SIN_P[1])) * z + _f32(_SIN_P[2])) * z * a + a
    c = ((_f32(_COS_P[0]) * z + _f32(_COS_P[1])) * z + _f32(_COS_P[2])) * z * z - _f32(0.5) * z + _f32(1.0)
    rs, rc = r * torch.where(reflect, c, s), r * torch.where(reflect, s, c)
    swap = (quadrant & 1) == 1
    z0, z1 = torch.where(swap, rs, rc), torch.where(swap, rc, rs)
    z0 = torch.where((quadrant == 1) | (quadrant == 2), -z0, z0)
    z1 = torch.where(quadrant >= 2, -z1, z1)
    return torch.where((idx & 1).bool(), z1, z0)


def _f32(c) -> torch.Tensor:
    return torch.tensor(float(c), dtype=torch.float32)


def _torch_ln_uniform(m: torch.Tensor) -> torch.Tensor:
    """`_ln_uniform` on a tensor of integers, op for op."""
    f, exponent = torch.frexp(m.to(torch.float32))  # m = f 2^E, f in [0.5, 1), both exact
    e = (exponent - 24).to(torch.float32)
    small = f < _f32(_SQRT_HALF)
    e = torch.where(small, e - 1.0, e)
    x = torch.where(small, (f + f) - 1.0, f - 1.0)
    z = x * x
    y = _f32(_LOG_P[0]) * x
    for c in _LOG_P[1:-1]:
        y = (y + _f32(c)) * x
    y = (y + _f32(_LOG_P[-1])) * x * z
    y = y + _f32(_LN2_LO) * e
    y = y - _f32(0.5) * z
    return (x + y) + _f32(_LN2_HI) * e


def direction_chunk(kind: str, key: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """z for elements [start, start + n) of one tensor as float32 (numba on CPU)."""
    if torch.device(device).type != "cpu":
        return direction_chunk_torch(kind, key, start, n, device)
    out = np.empty(n, dtype=np.float32)
    _kernel("fill", n)(out, 0 if kind == GAUSSIAN else 1, np.uint64(key), np.int64(start), _gaussian_scratch())
    return torch.from_numpy(out)


def direction(kind: str, seed: int, name: str, shape, device="cpu") -> torch.Tensor:
    """The whole z of one tensor (tests and small tensors; the trainer never calls this)."""
    n = math.prod(shape)
    return direction_chunk(kind, tensor_key(seed, name), 0, n, device).reshape(shape)


_NO_SAVE = np.empty(0, dtype=np.float32)
_SCRATCH = threading.local()


def _gaussian_scratch() -> np.ndarray:
    """z scratch for the Gaussian kernels: a row per numba thread, allocated (once per Python
    thread) before a kernel runs, so a kernel never fails after it has started writing."""
    shape = (numba.get_num_threads(), 2, _BLOCK // 2 + 1)
    scratch = getattr(_SCRATCH, "rows", None)
    if scratch is None or scratch.shape[0] < shape[0]:
        scratch = _SCRATCH.rows = np.empty(shape, dtype=np.float32)
    return scratch


def axpy_direction_(
    w: torch.Tensor, src: torch.Tensor, kind: str, key: int, alpha: float, save: Optional[torch.Tensor] = None
) -> None:
    """w = round_to_dtype(src + alpha * z) elementwise, z of the tensor keyed `key`.

    `src` may be `w` itself or a backup of it (same shape); all must be contiguous.
    `save`, if given, receives src's values first: on the fused CPU path in the same
    memory pass (the perturbation's backup costs no extra sweep). If this raises, `w` is
    as it was (the fused kernel fails only before writing; the chunked path undoes itself).
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
    if kind == RADEMACHER and w.dtype == torch.float32:
        # z = +-1: with a float32 alpha, the float64 sum below rounds to exactly the float32
        # add the fused kernels do (that sum is exact unless alpha is far below w's ulp, and
        # then both give w). It changes alpha by less than 2^-24 relative.
        alpha = float(np.float32(alpha))
    flat_w, flat_src = w.detach().view(-1), src.detach().view(-1)
    fused = w.device.type == "cpu" and w.dtype == torch.float32 and src.dtype == torch.float32
    if fused and (save is None or save.dtype == torch.float32):
        saved = _NO_SAVE if save is None else save.detach().view(-1).numpy()
        kernel = _kernel(kind, flat_w.numel())
        if kind == GAUSSIAN:
            kernel(flat_w.numpy(), flat_src.numpy(), saved, np.uint64(key), float(alpha), _gaussian_scratch())
            return
        if flat_src.data_ptr() != flat_w.data_ptr():  # the Rademacher kernel works in place
            if save is not None:
                save.copy_(src)
                saved = _NO_SAVE
            flat_w.copy_(flat_src)
        kernel(flat_w.numpy(), saved, np.uint64(key), np.float32(alpha))
        return
    if save is not None:
        save.copy_(src)
    try:
        for start in range(0, flat_w.numel(), CHUNK):
            n = min(CHUNK, flat_w.numel() - start)
            z = direction_chunk(kind, key, start, n, w.device).to(w.device, torch.float64)
            # out of place: for a float64 `src`, .to() returns `src` itself, which must not change
            chunk = torch.add(flat_src[start : start + n].to(torch.float64), z, alpha=float(alpha))
            flat_w[start : start + n].copy_(chunk)
    except BaseException:
        if save is not None:  # w was src: undo the chunks already written
            w.detach().copy_(save)
        raise
