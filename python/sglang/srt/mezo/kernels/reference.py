"""The definition of z and of every write MeZO makes to a weight, in plain torch: the specification.

The numba kernels (CPU float32) and the Triton kernels (GPUs) compute exactly these bits;
the tests compare all three. Everything here is written for readability, op by op in the
order the fast kernels use, and runs on any device in chunks of `CHUNK` elements.

**z** is a pure function of (step seed, canonical parameter name, element offset in the
unsharded tensor): a SplitMix64 hash of a per-tensor key (`tensor_key`) and a counter.

* Rademacher: one 64-bit hash per word of 64 elements; element i takes bit i % 64 of its
  word's hash: +1 where the bit is 0, -1 where it is 1.
* Gaussian: one 64-bit hash per pair of elements; Box-Muller in float32 on two 24-bit
  uniforms from it (|z| < 5.8). ln, sin and cos are Cephes-style float32 polynomials, each
  multiply and add rounded separately (never fused), sqrt correctly rounded; no division.

**Writes** (one rounding to the weight's dtype each, arithmetic wider than the weight):

* perturbation, ``axpy``: ``w = round(src + alpha * z)``, the product and then the sum each
  rounded in the write's arithmetic (`math_dtype`): float32 for bfloat16 and float16
  weights (as torch computes half-precision ops) and for Rademacher z on float32 weights
  (z = +-1: the float32 add is the exact float64 result rounded once), float64 otherwise.
  Where the arithmetic is float32, alpha is first rounded to float32 (`effective_alpha`).
* rounding to the weight's dtype (`round_to_dtype`): to float32 to nearest even, then to
  bfloat16 / float16 to nearest even (NaN becomes the canonical 0x7FC0 in bf16). Going
  through float32 is what torch's own double -> half conversion does.
* ZO-SGD update without momentum (`update_`): the decay ``w = round(w * (1 - lr wd))`` in
  float32 (float64 for float64 weights), then each term ``w = axpy(w, -lr c_i, z_i)`` in
  order, each rounded to the dtype. Terms with c_i = 0 are skipped.
* with momentum mu (buffer m in float32): ``m = f32(((m mu + sum_i c_i z_i) + wd w))`` and
  ``w = round(w - lr m)``, every op rounded in float64, in that order.

Every non-NaN result is bit-identical on every device. A NaN result (a weight that is
already NaN or infinite) is NaN everywhere, but its sign and payload are the hardware's:
x86 keeps an input NaN's payload and makes inf - inf negative, NVIDIA GPUs write a
canonical NaN.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Callable, Optional, Sequence

import torch

from sglang.srt.mezo.sharding import ShardLayout

GAUSSIAN = "gaussian"
RADEMACHER = "rademacher"
PERTURBATIONS = (GAUSSIAN, RADEMACHER)

# Elements per chunk for the torch path: 1 Mi float32 scratch = 4 MiB (times a few temporaries).
CHUNK = 1 << 20

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def f32(value: float) -> float:
    """`value` rounded to the nearest float32, as a Python float (exactly representable in float32,
    so no compiler or interpreter rounds the kernels' constants again)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


# Box-Muller constants (float32 values). ln: Cephes logf around 1, ln 2 split in two parts.
LN2_HI, LN2_LO = f32(0.693359375), f32(-2.12194440e-4)
SQRT_HALF = f32(0.70710678118654752440)
LOG_P = tuple(
    f32(c)
    for c in (
        7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
        -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
    )
)  # fmt: skip
SIN_P = (f32(-1.9515295891e-4), f32(8.3321608736e-3), f32(-1.6666654611e-1))
COS_P = (f32(2.443315711809948e-5), f32(-1.388731625493765e-3), f32(4.166664568298827e-2))
HALF_PI_2_22 = f32(math.pi / 2 / 2**22)  # a quarter turn over the 22 bits within a quadrant


def tensor_key(seed: int, name: str) -> int:
    """Stable 63-bit key of one tensor's direction for one seed (blake2b, not hash())."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


HALF_DTYPES = (torch.bfloat16, torch.float16)

# A structured direction's source (`structured_directions`): (its key, the first element's
# offset, the source values of those elements, flat) -> z of those elements, float32. The
# writes below draw z from `z_chunk` unless given one.
ZSource = Callable[[int, int, torch.Tensor], torch.Tensor]


def math_dtype(kind: str, dtype: torch.dtype) -> torch.dtype:
    """The arithmetic of a write to a `dtype` weight: float32 for half-precision weights and for
    Rademacher z on float32 weights (the float64 sum rounded to float32 is exactly the float32
    add there: z = +-1 and alpha is a float32), float64 otherwise."""
    return torch.float32 if dtype in HALF_DTYPES or (kind == RADEMACHER and dtype == torch.float32) else torch.float64


def effective_alpha(kind: str, dtype: torch.dtype, alpha: float) -> float:
    """The alpha every implementation uses: rounded to float32 where the arithmetic is float32
    (it changes alpha by less than 2^-24 relative), unchanged otherwise."""
    return f32(alpha) if math_dtype(kind, dtype) == torch.float32 else float(alpha)


def check_kind(kind: str) -> None:
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")


# ----------------------------------------------------------------------------- z
def mix(key: int, counter: torch.Tensor) -> torch.Tensor:
    """SplitMix64 of ``key + (counter + 1) * GOLDEN`` on int64 tensors (two's-complement
    wrap-around; logical shifts emulated by masking)."""

    def shr(x: torch.Tensor, s: int) -> torch.Tensor:
        return (x >> s) & ((1 << (64 - s)) - 1)

    def signed(c: int) -> int:
        return c - (1 << 64) if c >= 1 << 63 else c

    x = (counter + 1) * signed(GOLDEN) + signed(key & _MASK64)
    x = (x ^ shr(x, 30)) * signed(MIX1)
    x = (x ^ shr(x, 27)) * signed(MIX2)
    return x ^ shr(x, 31)


def _c(value: float, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def ln_uniform(m: torch.Tensor) -> torch.Tensor:
    """ln(m / 2^24) in float32 for integers 1 <= m <= 2^24: m = f 2^E with f in [0.5, 1)
    (exact), then ln f by the Cephes polynomial around 1 and (E - 24) ln 2 in two parts."""
    dev = m.device
    f, exponent = torch.frexp(m.to(torch.float32))
    e = (exponent - 24).to(torch.float32)
    small = f < _c(SQRT_HALF, dev)
    e = torch.where(small, e - 1.0, e)
    x = torch.where(small, (f + f) - 1.0, f - 1.0)
    z = x * x
    y = _c(LOG_P[0], dev) * x
    for c in LOG_P[1:-1]:
        y = (y + _c(c, dev)) * x
    y = (y + _c(LOG_P[-1], dev)) * x * z
    y = y + _c(LN2_LO, dev) * e
    y = y - _c(0.5, dev) * z
    return (x + y) + _c(LN2_HI, dev) * e


def gaussian_pairs(h: torch.Tensor) -> tuple:
    """(z0, z1) of each pair from its 64-bit hash: r = sqrt(-2 ln u1) with u1 from the top 24
    bits, the angle 2 pi u2 from the low 24 bits; sin/cos of the angle within its quadrant,
    reflected into [0, pi/4]."""
    dev = h.device
    # sqrt in float64, then one rounding: correctly rounded (torch's vectorised float32 sqrt is not always)
    r = torch.sqrt(_c(-2.0, dev) * ln_uniform(((h >> 40) & 0xFFFFFF) + 1).double()).float()
    angle_bits = h & 0xFFFFFF
    quadrant = angle_bits >> 22
    within = angle_bits & 0x3FFFFF
    reflect = within > 0x200000
    a = torch.where(reflect, 0x400000 - within, within).to(torch.float32) * _c(HALF_PI_2_22, dev)
    z = a * a
    s = ((_c(SIN_P[0], dev) * z + _c(SIN_P[1], dev)) * z + _c(SIN_P[2], dev)) * z * a + a
    c = ((_c(COS_P[0], dev) * z + _c(COS_P[1], dev)) * z + _c(COS_P[2], dev)) * z * z - _c(0.5, dev) * z + 1.0
    rs, rc = r * torch.where(reflect, c, s), r * torch.where(reflect, s, c)  # r sin, r cos within the quadrant
    swap = (quadrant & 1) == 1  # quadrant q turns (cos, sin) by q quarter turns
    z0, z1 = torch.where(swap, rs, rc), torch.where(swap, rc, rs)
    z0 = torch.where((quadrant == 1) | (quadrant == 2), -z0, z0)
    z1 = torch.where(quadrant >= 2, -z1, z1)
    return z0, z1


def z_chunk(
    kind: str, key: int, start: int, n: int, device="cpu", layout: Optional[ShardLayout] = None
) -> torch.Tensor:
    """z for elements [start, start + n) of the tensor keyed `key`, float32. With `layout`
    the tensor is a shard and its elements take the z of their offsets in the unsharded
    tensor."""
    check_kind(kind)
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    if layout is not None:
        idx = layout.global_index(idx)
    if kind == RADEMACHER:
        bit = (mix(key, idx >> 6) >> (idx & 63)) & 1
        return 1.0 - 2.0 * bit.to(torch.float32)
    z0, z1 = gaussian_pairs(mix(key, idx >> 1))
    return torch.where((idx & 1).bool(), z1, z0)


# ----------------------------------------------------------------------------- rounding
def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 or float32 tensor rounded to `dtype`: float64 unchanged; otherwise to float32
    (nearest even), then to bfloat16 (nearest even, written out, NaN -> 0x7FC0) or float16
    (nearest even)."""
    if dtype == torch.float64:
        return x
    x32 = x.to(torch.float32)
    if dtype == torch.float32:
        return x32
    if dtype == torch.float16:
        return x32.to(torch.float16)
    if dtype == torch.bfloat16:
        bits = x32.view(torch.int32)
        rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) & 0xFFFF
        rounded = torch.where(torch.isnan(x32), 0x7FC0, rounded)
        return rounded.to(torch.int16).view(torch.bfloat16)  # int32 -> int16 keeps the low 16 bits
    raise TypeError(f"MeZO writes float64, float32, bfloat16 and float16 weights, not {dtype}")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def decay(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``round(x * factor)``: one multiply in float32 (float64 for float64 weights)."""
    math_dtype = _opmath(x.dtype)
    product = x.to(math_dtype) * torch.tensor(factor, dtype=math_dtype, device=x.device)
    return round_to_dtype(product.to(torch.float64), x.dtype)


def axpy_values(src: torch.Tensor, z: torch.Tensor, alpha: float, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """``round_to_dtype(src + alpha * z)``: the product, then the sum, each rounded in the
    write's `math_dtype` (`alpha` already `effective_alpha`)."""
    math = math_dtype(kind, dtype)
    alpha_t = torch.tensor(alpha, dtype=math, device=src.device)
    return round_to_dtype(src.to(math) + z.to(math) * alpha_t, dtype)


# ----------------------------------------------------------------------------- writes
def axpy_(
    w: torch.Tensor,
    src: torch.Tensor,
    kind: str,
    key: int,
    alpha: float,
    save=None,
    layout: Optional[ShardLayout] = None,
    z_of: Optional[ZSource] = None,
) -> None:
    """``w = round(src + alpha * z)`` chunk by chunk (`alpha` already `effective_alpha`; z of
    the shard `layout`, if given, or from `z_of`).

    `save`, if given, receives src first. If a chunk fails (out of memory), the chunks
    already written are undone from `save` (where w is src) and the error propagates.
    """
    check_kind(kind)
    if save is not None:
        save.copy_(src)
    try:
        for start, (w_piece, src_piece) in _pieces(w.detach(), src.detach()):
            flat = src_piece.reshape(-1)
            z = z_chunk(kind, key, start, flat.numel(), w.device, layout) if z_of is None else z_of(key, start, flat)
            w_piece.copy_(axpy_values(flat, z, alpha, kind, w.dtype).view(w_piece.shape))
    except BaseException:
        if save is not None:
            w.detach().copy_(save)
        raise


def update_(
    w: torch.Tensor,
    kind: str,
    keys: Sequence[int],
    coefs: Sequence[float],
    lr: float,
    weight_decay: float,
    momentum: Optional[torch.Tensor] = None,
    mu: float = 0.0,
    layout: Optional[ShardLayout] = None,
    z_of: Optional[ZSource] = None,
) -> None:
    """One ZO-SGD update of `w` (see the module docstring), chunk by chunk.

    `keys[i]` is the key of term i's z for this tensor and `coefs[i]` its coefficient
    (coefficient / q); `weight_decay` is 0 for tensors without decay; `layout`, if
    given, places a shard in its unsharded tensor (its z); `z_of`, if given, draws each
    term's z from its key and the values before the update.
    """
    check_kind(kind)
    tensors = (w.detach(),) if momentum is None else (w.detach(), momentum)
    for start, pieces in _pieces(*tensors):
        piece = pieces[0]
        x = piece.reshape(-1)  # a copy where the piece's rows are not adjacent (written back below)
        if z_of is None:
            zs = [z_chunk(kind, key, start, x.numel(), w.device, layout) for key in keys]
        else:
            zs = [z_of(key, start, x) for key in keys]
        if momentum is None:
            value = decay(x, 1.0 - lr * weight_decay) if weight_decay and lr else x
            for z, coef in zip(zs, coefs):
                if coef:
                    value = axpy_values(value, z, effective_alpha(kind, w.dtype, -lr * coef), kind, w.dtype)
            piece.copy_(value.view(piece.shape))
            continue
        m = pieces[1].view(-1)
        acc = m.to(torch.float64) * mu
        for z, coef in zip(zs, coefs):
            acc = acc + z.to(torch.float64) * coef
        if weight_decay:
            acc = acc + x.to(torch.float64) * weight_decay
        m.copy_(acc.to(torch.float32))
        piece.copy_(round_to_dtype(x.to(torch.float64) - m.to(torch.float64) * lr, w.dtype).view(piece.shape))


def _pieces(*tensors: torch.Tensor):
    """(row-major offset of the first element, [a view of each tensor]) over same-shaped
    `tensors`, about CHUNK elements at a time: flat slices when all are contiguous; else
    blocks of rows, which must be contiguous (a column shard inside an engine tensor whose
    padding columns are left out is such a view). Momentum buffers are contiguous."""
    first = tensors[0]
    if all(t.is_contiguous() for t in tensors):
        flats = [t.view(-1) for t in tensors]
        for start in range(0, first.numel(), CHUNK):
            yield start, [f[start : start + CHUNK] for f in flats]
        return
    if first.dim() != 2 or any(t.stride(-1) != 1 for t in tensors):
        raise ValueError(
            f"MeZO writes contiguous tensors and matrices with contiguous rows, not strides {first.stride()}"
        )
    width = first.shape[1]
    rows = max(1, CHUNK // max(1, width))
    for row in range(0, first.shape[0], rows):
        yield row * width, [t[row : row + rows] for t in tensors]
