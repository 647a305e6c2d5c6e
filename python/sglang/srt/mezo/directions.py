"""Counter-based random directions z for MeZO.

z is a pure function of (step seed, canonical parameter name, element offset): a
SplitMix64-style hash of a per-tensor key and a counter. Nothing is drawn from a global
RNG and nothing is stored, so the same z comes out whatever the chunking, thread count,
order of the trainable set or backend (the SGLang engine regenerates it in its own
process from the seed alone).

* Rademacher: one 64-bit hash per block of 64 elements, element i takes bit i % 64.
* Gaussian: one 64-bit hash per pair of elements; Box-Muller in float32 on two 24-bit
  uniforms from it (|z| < 5.8: the tail beyond has probability 8e-9).

`axpy_direction_(w, src, key, start, alpha)` writes ``w = round(src + alpha * z)`` with the
arithmetic in float64 and a single rounding to w's dtype (for Rademacher z on float32
tensors alpha is first rounded to float32, which makes that value the plain float32 add
z = +-1 needs). On CPU float32 tensors it runs
as one fused numba kernel (the hot path: unpack bits and apply without ever
materialising z); other dtypes and devices go through the torch reference in chunks of
`CHUNK` elements, which computes the identical value.
"""

from __future__ import annotations

import hashlib
import math
import types
from typing import Optional

import numba
import numpy as np
import torch

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
_TWO_PI = 2.0 * math.pi
_INV_2_24 = 1.0 / 16777216.0


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


@numba.njit(inline="always")
def _box_muller(key, pair):
    """(r, angle) of a pair, in float32: two 24-bit uniforms from one 64-bit hash."""
    h = _mix(key, np.uint64(pair))
    u1 = np.float32((np.float64(h >> np.uint64(40)) + 1.0) * _INV_2_24)
    u2 = np.float32(np.float64(h & np.uint64(0xFFFFFF)) * _INV_2_24)
    return np.float32(math.sqrt(np.float32(-2.0) * math.log(u1))), np.float32(_TWO_PI) * u2


@numba.njit(inline="always")
def _gaussian_at(key, i):
    r, angle = _box_muller(key, i >> 1)
    if i & 1:
        return np.float64(r * math.sin(angle))
    return np.float64(r * math.cos(angle))


_BLOCK = 1 << 14  # elements per parallel task; a multiple of 64 and of 2


@numba.njit(inline="always")
def rademacher_steps(key, first_word, words, alpha, out):
    """alpha * z for `words` whole 64-element words from word `first_word`, into out[:64 * words]
    (float32): one hash per word, z = +1 where its bit is 0."""
    for j in range(words):
        bits = _mix(key, np.uint64(first_word + j))
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


def _axpy_gaussian(w, src, save, key, alpha):
    n = w.shape[0]
    key = np.uint64(key)
    saving = save.shape[0] == n
    for b in numba.prange((n + _BLOCK - 1) // _BLOCK):
        lo = b * _BLOCK
        hi = min(n, lo + _BLOCK)
        for pair in range(lo >> 1, (hi + 1) >> 1):  # one hash, log and sqrt per pair
            r, angle = _box_muller(key, pair)
            j = pair << 1
            value = src[j]
            if saving:
                save[j] = value
            w[j] = np.float32(np.float64(value) + alpha * np.float64(r * math.cos(angle)))
            if j + 1 < hi:
                value = src[j + 1]
                if saving:
                    save[j + 1] = value
                w[j + 1] = np.float32(np.float64(value) + alpha * np.float64(r * math.sin(angle)))


def _fill(out, kind, key, start):
    n = out.shape[0]
    key = np.uint64(key)
    for b in numba.prange((n + _BLOCK - 1) // _BLOCK):
        lo = b * _BLOCK
        hi = min(n, lo + _BLOCK)
        for j in range(lo, hi):
            g = np.int64(start + j)
            if kind == 0:
                out[j] = _gaussian_at(key, g)
            else:
                bit = (_mix(key, np.uint64(g) >> np.uint64(6)) >> (np.uint64(g) & np.uint64(63))) & np.uint64(1)
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
    u1 = ((((h >> 40) & 0xFFFFFF).to(torch.float64) + 1.0) * _INV_2_24).to(torch.float32)
    u2 = ((h & 0xFFFFFF).to(torch.float64) * _INV_2_24).to(torch.float32)
    r = torch.sqrt(-2.0 * torch.log(u1))
    angle = torch.tensor(_TWO_PI, dtype=torch.float32) * u2
    return torch.where((idx & 1).bool(), r * torch.sin(angle), r * torch.cos(angle))


def direction_chunk(kind: str, key: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """z for elements [start, start + n) of one tensor as float32 (numba on CPU)."""
    if torch.device(device).type != "cpu":
        return direction_chunk_torch(kind, key, start, n, device)
    out = np.empty(n, dtype=np.float32)
    _kernel("fill", n)(out, 0 if kind == GAUSSIAN else 1, np.uint64(key), np.int64(start))
    return torch.from_numpy(out)


def direction(kind: str, seed: int, name: str, shape, device="cpu") -> torch.Tensor:
    """The whole z of one tensor (tests and small tensors; the trainer never calls this)."""
    n = math.prod(shape)
    return direction_chunk(kind, tensor_key(seed, name), 0, n, device).reshape(shape)


_NO_SAVE = np.empty(0, dtype=np.float32)


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
            kernel(flat_w.numpy(), flat_src.numpy(), saved, np.uint64(key), float(alpha))
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
