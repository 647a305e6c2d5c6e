"""Triton kernels for MeZO's directions on non-CPU devices: z, the perturbation and the update.

Each write reads and writes the weights once: the hash -> z -> ``w = round(src + alpha z)``
perturbation (the backup, if asked for, in the same pass), and the whole ZO-SGD update
(decay, q terms, momentum buffer) per tensor. Grouped launches write many tensors of one
dtype at once (a unit's perturbation, in place with backups or into scratch; the update of
every tensor); float32, bfloat16, float16 and float64 weights; any length (masked tail);
views with storage offsets; a shard's z from its place in the unsharded tensor.

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

import collections
import contextlib
import itertools
import os
import struct
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from sglang.srt.mezo.kernels import reference as ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per program: 4096 on a GPU (a multiple of 64 and 2: tiles hold whole words and
# pairs); the interpreter runs a program as numpy calls, so there fewer, larger tiles.
TILE = 1 << 14 if INTERPRETED else 1 << 12
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
def _round(x, DTYPE: tl.constexpr):
    """`reference.round_to_dtype` of a float64 or float32 value: float64 weights keep it;
    otherwise to float32, then to the weight's dtype, each to nearest even."""
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
def _axpy_value(src, z, alpha, KIND: tl.constexpr, DTYPE: tl.constexpr):
    """`reference.axpy_values`: src + alpha z (alpha float64, already `effective_alpha`) in the
    write's arithmetic, product then sum, rounded to DTYPE."""
    if DTYPE == tl.float64 or (DTYPE == tl.float32 and KIND == 0):
        return _round(src.to(tl.float64) + z.to(tl.float64) * alpha, DTYPE)
    else:  # half-precision weights, and Rademacher on float32: float32 arithmetic
        return _round(src.to(tl.float32) + z * alpha.to(tl.float32), DTYPE)


@triton.jit
def _fill_kernel(out_ptr, n, start, key_high, key_low, KIND: tl.constexpr, TILE: tl.constexpr):
    """out[i] = z[start + i] for i < n (float32)."""
    tile_start = (tl.program_id(0).to(tl.int64) + start // TILE) * TILE
    local = _offsets(tile_start, KIND, TILE) - start
    z = _z(_u64(key_high, key_low), tile_start, KIND, TILE)
    tl.store(out_ptr + local, z, mask=(local >= 0) & (local < n))


@triton.jit
def _axpy_tile(dst, src_ptr, save_ptr, key, alpha, tile_start, n, z_first, KIND: tl.constexpr, TILE: tl.constexpr):
    """One tile of ``dst = round(src + alpha z)`` (and ``save = src`` first unless save_ptr is
    None); `n` None for a tile that lies wholly inside the tensor (no mask: vector accesses).
    Element i takes z at ``z_first + i`` (a shard's place in its unsharded tensor: a
    multiple of 64, so tiles stay whole words and pairs)."""
    offsets = _offsets(tile_start, KIND, TILE)
    mask = offsets < n if n is not None else None
    src = tl.load(src_ptr + offsets, mask=mask)
    if save_ptr is not None:
        tl.store(save_ptr + offsets, src, mask=mask)
    z = _z(key, z_first + tile_start, KIND, TILE)
    tl.store(dst + offsets, _axpy_value(src, z, alpha, KIND, dst.dtype.element_ty), mask=mask)


@triton.jit
def _axpy_kernel(
    w_ptr, src_ptr, save_ptr, n, z_first, key_high, key_low, alpha_high, alpha_low,
    KIND: tl.constexpr, SAVE: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """w[i] = round(src[i] + alpha z[z_first + i]); save[i] = src[i] first when SAVE (one read,
    one write)."""
    tile_start = tl.program_id(0).to(tl.int64) * TILE
    key = _u64(key_high, key_low)
    alpha = _u64(alpha_high, alpha_low).to(tl.float64, bitcast=True)
    save = save_ptr if SAVE else None
    if tile_start + TILE <= n:
        _axpy_tile(w_ptr, src_ptr, save, key, alpha, tile_start, None, z_first, KIND, TILE)
    else:
        _axpy_tile(w_ptr, src_ptr, save, key, alpha, tile_start, n, z_first, KIND, TILE)


@triton.jit
def _tile(tile_tensor_ptr, first_tile_ptr, TILE: tl.constexpr):
    """(index of this program's tensor in a group table, the first element of its tile)."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor_ptr + pid)
    tile_start = (pid - tl.load(first_tile_ptr + t)).to(tl.int64) * TILE
    return t.to(tl.int64), tile_start


@triton.jit
def _pointer(row_ptr, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in a group table's row as a pointer to DTYPE (16-byte aligned when ALIGNED:
    the hint lets the compiler use vector accesses, as it does for pointer arguments)."""
    pointer = tl.load(row_ptr + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _axpy_group_kernel(
    rows_ptr, tile_tensor_ptr, first_tile_ptr, keys_ptr, alpha_high, alpha_low,
    KIND: tl.constexpr, SAVE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """`_axpy_kernel` over several tensors of one dtype in one launch. A row of `rows` is
    (dst address, src address, save address, numel, z offset of element 0) (the save
    address is read only when SAVE); `keys` holds each row's key."""
    t, tile_start = _tile(tile_tensor_ptr, first_tile_ptr, TILE)
    row = rows_ptr + 5 * t
    dst = _pointer(row, 0, DTYPE, ALIGNED)
    src = _pointer(row, 1, DTYPE, ALIGNED)
    save = _pointer(row, 2, DTYPE, ALIGNED) if SAVE else None
    n = tl.load(row + 3)
    z_first = tl.load(row + 4)
    key = tl.load(keys_ptr + t).to(tl.uint64)
    alpha = _u64(alpha_high, alpha_low).to(tl.float64, bitcast=True)
    if tile_start + TILE <= n:
        _axpy_tile(dst, src, save, key, alpha, tile_start, None, z_first, KIND, TILE)
    else:
        _axpy_tile(dst, src, save, key, alpha, tile_start, n, z_first, KIND, TILE)


@triton.jit
def _update_tile(
    w_ptr, m_ptr, keys_ptr, scalars_ptr, terms, factor, wd, tile_start, n, z_first,
    KIND: tl.constexpr, MOMENTUM: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """One tile of `reference.update_` (`n` None: a whole tile, no mask; element i takes z at
    ``z_first + i``, as in `_axpy_tile`)."""
    DTYPE = w_ptr.dtype.element_ty
    offsets = _offsets(tile_start, KIND, TILE)
    mask = offsets < n if n is not None else None
    w = tl.load(w_ptr + offsets, mask=mask)
    lr = tl.load(scalars_ptr)
    if MOMENTUM:
        acc = tl.load(m_ptr + offsets, mask=mask).to(tl.float64) * tl.load(scalars_ptr + 1)
        for i in range(terms):
            z = _z(tl.load(keys_ptr + i).to(tl.uint64), z_first + tile_start, KIND, TILE)
            acc = acc + z.to(tl.float64) * tl.load(scalars_ptr + 2 + i)
        if wd != 0.0:
            acc = acc + w.to(tl.float64) * wd
        m = acc.to(tl.float32)
        tl.store(m_ptr + offsets, m, mask=mask)
        w = _round(w.to(tl.float64) - m.to(tl.float64) * lr, DTYPE)
    else:
        if wd != 0.0:
            if DTYPE == tl.float64:
                w = w * factor
            else:
                w = _round(w.to(tl.float32) * factor.to(tl.float32), DTYPE)
        for i in range(terms):
            z = _z(tl.load(keys_ptr + i).to(tl.uint64), z_first + tile_start, KIND, TILE)
            w = _axpy_value(w, z, -lr * tl.load(scalars_ptr + 2 + i), KIND, DTYPE)
    tl.store(w_ptr + offsets, w, mask=mask)


@triton.jit
def _update_group_kernel(
    rows_ptr, tile_tensor_ptr, first_tile_ptr, decay_ptr, keys_ptr, scalars_ptr, terms,
    KIND: tl.constexpr, MOMENTUM: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """`reference.update_` over several tensors of one dtype in one launch, one pass each.

    A row of `rows` is (weight address, float32 momentum address, numel, z offset of element
    0); `decay` holds each row's (1 - lr wd, wd), wd = 0 where the tensor is not decayed;
    `keys` each row's key per term; `scalars` = [lr, mu, c_0, ..., c_{terms-1}] (float64)."""
    t, tile_start = _tile(tile_tensor_ptr, first_tile_ptr, TILE)
    row = rows_ptr + 4 * t
    w_ptr = _pointer(row, 0, DTYPE, ALIGNED)
    m_ptr = _pointer(row, 1, tl.float32, ALIGNED)
    n = tl.load(row + 2)
    z_first = tl.load(row + 3)
    keys = keys_ptr + t * terms
    factor = tl.load(decay_ptr + 2 * t)
    wd = tl.load(decay_ptr + 2 * t + 1)
    if tile_start + TILE <= n:
        _update_tile(w_ptr, m_ptr, keys, scalars_ptr, terms, factor, wd, tile_start, None, z_first, KIND, MOMENTUM,
                     TILE)  # fmt: skip
    else:
        _update_tile(w_ptr, m_ptr, keys, scalars_ptr, terms, factor, wd, tile_start, n, z_first, KIND, MOMENTUM,
                     TILE)  # fmt: skip


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


def axpy_(w: torch.Tensor, src: torch.Tensor, kind: str, key: int, alpha: float, save=None, first: int = 0) -> None:
    """``w = round(src + alpha z)`` in one pass (`alpha` already `effective_alpha`), z from
    element `first` (a multiple of 64) of the tensor keyed `key`."""
    if w.numel():
        with _on(w.device):
            _axpy_kernel[_grid(w.numel())](
                w, src, save if save is not None else w, w.numel(), first, *_halves(key), *_float_halves(alpha),
                KIND=_KIND[kind], SAVE=save is not None, TILE=TILE, enable_fp_fusion=False,
            )  # fmt: skip


_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}


class GroupTables:
    """Device tables that let one launch cover several tensors of one dtype on one device:
    a row of addresses per tensor, the tensor of each tile and each tensor's first tile.
    Built once and reused while the tensors stay where they are (`matches`)."""

    def __init__(self, columns: list, device: torch.device, z_firsts: Optional[list] = None):
        self.device = device
        self.signature = self.signature_of(columns, z_firsts)  # addresses and sizes only: no tensor is kept alive
        numels = [row[0].numel() for row in columns]
        tiles = [triton.cdiv(n, TILE) for n in numels]
        self.tiles = sum(tiles)
        self.aligned = all(a % 16 == 0 for row, _, _ in self.signature for a in row)
        rows = [[*addresses, n, first] for addresses, n, first in self.signature]
        self.rows = _upload(torch.tensor(rows, dtype=torch.int64), device)
        index = torch.repeat_interleave(torch.arange(len(tiles), dtype=torch.int32), torch.tensor(tiles))
        self.tile_tensor = _upload(index, device)
        first = [0, *itertools.accumulate(tiles)][:-1]
        self.first_tile = _upload(torch.tensor(first, dtype=torch.int32), device)

    @staticmethod
    def signature_of(columns: list, z_firsts: Optional[list] = None) -> tuple:
        """Per row: the addresses of its tensors (0 for None), the first one's size and where
        its z starts (`z_firsts`, default 0: whole tensors)."""
        firsts = z_firsts or [0] * len(columns)
        return tuple(
            (tuple(t.data_ptr() if t is not None else 0 for t in row), row[0].numel(), first)
            for row, first in zip(columns, firsts)
        )

    def matches(self, columns: list, z_firsts: Optional[list] = None) -> bool:
        return self.signature == self.signature_of(columns, z_firsts)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table on `device` without waiting for the device's queued work (pinned,
    non-blocking; the caching host allocator keeps the buffer until the copy is done)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class AxpyGroup:
    """``dst_i = round(src_i + alpha z_i)`` for several (dst, src) pairs of one dtype on one device
    in one launch (the perturbation of a whole unit's tensors: into its scratch, or in place
    with their backups written to it in the same pass, `saves`); z_i from element
    ``z_firsts[i]`` of its unsharded tensor (default 0)."""

    def __init__(self, dsts: list, srcs: list, saves: Optional[list] = None, z_firsts: Optional[list] = None):
        self.dsts, self.srcs, self.saves = dsts, srcs, saves
        self.z_firsts = list(z_firsts) if z_firsts is not None else [0] * len(dsts)
        self.dtype, self.device = dsts[0].dtype, dsts[0].device
        self._tables = None

    def __call__(self, kind: str, keys: Sequence[int], alpha: float) -> None:
        saves = self.saves if self.saves is not None else [None] * len(self.dsts)
        columns = [[d, s, b] for d, s, b in zip(self.dsts, self.srcs, saves)]
        if self._tables is None or not self._tables.matches(columns, self.z_firsts):
            moved = [
                t.device for t in (*self.srcs, *(self.saves or ())) if t.device != self.device or t.dtype != self.dtype
            ]
            if moved:
                raise ValueError(f"grouped write on {self.device} {self.dtype}: a source moved to {moved[0]}")
            self._tables = GroupTables(columns, self.device, self.z_firsts)
        tables = self._tables
        if not tables.tiles:
            return
        key_table = _upload(torch.tensor(keys, dtype=torch.int64), self.device)
        with _on(self.device):
            _axpy_group_kernel[(tables.tiles,)](
                tables.rows, tables.tile_tensor, tables.first_tile, key_table, *_float_halves(alpha),
                KIND=_KIND[kind], SAVE=self.saves is not None, DTYPE=_TL_DTYPES[self.dtype], ALIGNED=tables.aligned,
                TILE=TILE, enable_fp_fusion=False,
            )  # fmt: skip


_UPDATE_TABLES: "collections.OrderedDict[tuple, GroupTables]" = collections.OrderedDict()  # a few, by signature


def update_(targets: Sequence, kind: str, coefs: Sequence[float], lr: float, mu: float, z_firsts=None) -> None:
    """`reference.update_` for each target (`UpdateTarget`): one launch per device and dtype,
    one pass over each tensor; the per-step keys and scalars go to each device once.
    `z_firsts[i]`: where target i's z starts in its unsharded tensor (default 0)."""
    groups: dict = {}
    firsts = list(z_firsts) if z_firsts is not None else [0] * len(targets)
    for target, first in zip(targets, firsts):
        if target.weight.numel():
            groups.setdefault((target.weight.device, target.weight.dtype), []).append((target, first))
    momentum = mu > 0
    for (device, dtype), pairs in groups.items():
        group, group_firsts = [t for t, _ in pairs], [f for _, f in pairs]
        columns = [[t.weight, t.momentum] for t in group]
        signature = (device, GroupTables.signature_of(columns, group_firsts))
        tables = _UPDATE_TABLES.pop(signature, None) or GroupTables(columns, device, group_firsts)
        _UPDATE_TABLES[signature] = tables  # the most recent last
        while len(_UPDATE_TABLES) > 4:
            _UPDATE_TABLES.popitem(last=False)
        decays = [[1.0 - lr * t.weight_decay, t.weight_decay if (lr or momentum) else 0.0] for t in group]
        decay = _upload(torch.tensor(decays, dtype=torch.float64), device)
        keys = _upload(torch.tensor([t.keys for t in group] if coefs else [[0]], dtype=torch.int64), device)
        scalars = _upload(torch.tensor([lr, mu, *coefs], dtype=torch.float64), device)
        with _on(device):
            _update_group_kernel[(tables.tiles,)](
                tables.rows, tables.tile_tensor, tables.first_tile, decay, keys, scalars, len(coefs),
                KIND=_KIND[kind], MOMENTUM=momentum, DTYPE=_TL_DTYPES[dtype], ALIGNED=tables.aligned, TILE=TILE,
                enable_fp_fusion=False,
            )  # fmt: skip
