"""Whole-model offsets along z, undone exactly by a log of the few elements subtraction misses.

`ModuleScopedPerturbation` backs up each module's weights around its call, so every pass
costs a perturbation sweep plus a restore copy per module (and ~270 kernel launches).
With Rademacher directions z is nearly free to regenerate, so that memory traffic *is*
the cost of a step. `LoggedPerturbation` moves all trainable weights at once instead:

* a move from offset ``a z_a`` to ``b z_b`` is one sweep: each element is first restored
  to θ, then written as ``round(θ + b z_b)``;
* restoring ``round(w + b z) - b z`` gives back θ for all but a few elements (where the
  rounding crossed a binade, or |θ| < |b|: 1-2% of SmolLM2's weights at eps = 1e-3); the
  sweep checks every element and logs the ones it would not restore (and every NaN and
  zero, whose payload or sign a float comparison cannot see);
* inside `holding()`, a pass leaves the weights at its offset; the next pass moves them on
  (+eps z to -eps z in one sweep) and the update restores and updates in one sweep. A step
  is then three sweeps of the weights instead of two passes of (perturb + backup +
  restore) per module plus the update, and three kernel launches instead of ~800.

The log holds at most `log_bytes` (default: the larger of 4 MiB and the largest module's
trainable bytes, the memory the module-scoped backup would use). If a move would overflow
it (a very large eps), it is undone exactly and this object falls back to
`ModuleScopedPerturbation` for the rest of the run.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import numba
import numpy as np
import torch
from llvmlite import binding as llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from sglang.srt.mezo.directions import RADEMACHER, rademacher_word, tensor_key
from sglang.srt.mezo.perturbation import (
    ModuleScopedPerturbation,
    UpdatePlan,
    WeightVersions,
    _DeferredInterrupts,
    commit_update,
    largest_module_bytes,
)

logger = logging.getLogger(__name__)

WORD = 64  # elements per random word: bit k of the word is the sign of element k
# Elements per work item (whole words). A thread starts an item only when its log region
# has room for every element of it, so an overflow never leaves an item half moved.
ITEM = 1 << 12
assert ITEM % WORD == 0
MIN_LOG_BYTES = 4 << 20
_ENTRY_BYTES = 8  # int32 offset in the item + float32 value


def _target_has_avx512() -> bool:
    """Whether numba compiles for AVX-512 (its mask registers make a select by random bits,
    masked loads and stores and compress-stores single instructions)."""
    features = numba.core.config.CPU_FEATURES  # NUMBA_CPU_FEATURES, when set
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


# A compile-time constant for the kernels. Without AVX-512, LLVM scalarises a compress-store
# lane by lane, so there the elements to log are found from the word's bit mask instead.
_COMPRESS_STORE = _target_has_avx512()


@intrinsic
def _pointer(typingctx, address):
    """An int64 address as a void pointer, for `numba.carray` (arrays without refcounting)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@intrinsic
def _prefetch(typingctx, address):
    """Asks for the cache line at `address` (a hint: never faults)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        prefetch = _declare(builder, "llvm.prefetch.p0", ir.VoidType(), cgutils.voidptr_t, i32, i32, i32)
        builder.call(
            prefetch,
            [
                builder.inttoptr(args[0], cgutils.voidptr_t),
                ir.Constant(i32, 0),
                ir.Constant(i32, 3),
                ir.Constant(i32, 1),
            ],
        )
        return context.get_dummy_value()

    return types.void(address), codegen


def _word_codegen(builder, x_address, lanes, bits, alpha):
    """IR shared by the word kernels: the lane mask of a word's first `lanes` elements, its
    values, and its steps ``alpha * z`` (z = +1 where the bit is 0: `rademacher_word`)."""
    f32, i64 = ir.FloatType(), ir.IntType(64)
    floats, lane_mask = ir.VectorType(f32, WORD), ir.VectorType(ir.IntType(1), WORD)
    full = builder.icmp_unsigned(">=", lanes, ir.Constant(i64, WORD))
    partial = builder.sub(builder.shl(ir.Constant(i64, 1), lanes), ir.Constant(i64, 1))
    present = builder.bitcast(builder.select(full, ir.Constant(i64, -1), partial), lane_mask)
    pointer = builder.inttoptr(x_address, ir.PointerType(floats))
    # Whole words (all but a tensor's last) take plain loads and stores: without AVX-512 a
    # masked store is several times slower, and the branch is always predicted.
    with builder.if_else(full) as (whole, partial_word):
        with whole:
            whole_x = builder.load(pointer, align=4)
            whole_block = builder.block
        with partial_word:
            load = _declare(
                builder, "llvm.masked.load.v64f32.p0", floats, ir.PointerType(floats), ir.IntType(32), lane_mask, floats
            )
            partial_x = builder.call(
                load, [pointer, ir.Constant(ir.IntType(32), 4), present, ir.Constant(floats, [0.0] * WORD)]
            )
            partial_block = builder.block
    x = builder.phi(floats)
    x.add_incoming(whole_x, whole_block)
    x.add_incoming(partial_x, partial_block)
    if _COMPRESS_STORE:
        negative = builder.bitcast(bits, lane_mask)
        steps = builder.select(negative, _splat(builder, builder.fneg(alpha), WORD), _splat(builder, alpha, WORD))
    else:  # without mask registers: flip alpha's sign bit by each lane's bit, in 32-bit lanes
        i32 = ir.IntType(32)
        halves = ir.VectorType(i32, 2)
        pair = builder.insert_element(ir.Constant(halves, ir.Undefined), builder.trunc(bits, i32), ir.Constant(i32, 0))
        pair = builder.insert_element(
            pair, builder.trunc(builder.lshr(bits, ir.Constant(i64, 32)), i32), ir.Constant(i32, 1)
        )
        ints = ir.VectorType(i32, WORD)
        words = builder.shuffle_vector(pair, ir.Constant(halves, ir.Undefined), ir.Constant(ints, [0] * 32 + [1] * 32))
        lane_bits = builder.and_(
            builder.lshr(words, ir.Constant(ints, list(range(32)) * 2)), ir.Constant(ints, [1] * WORD)
        )
        sign = builder.shl(lane_bits, ir.Constant(ints, [31] * WORD))
        steps = builder.bitcast(builder.xor(_splat(builder, builder.bitcast(alpha, i32), WORD), sign), floats)
    return full, present, pointer, x, steps


def _splat(builder, value, count):
    vector = ir.VectorType(value.type, count)
    lane0 = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(
        lane0, ir.Constant(vector, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), count), [0] * count)
    )


def _declare(builder, name, result, *arguments):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, arguments), name)


def _store_word(builder, values, pointer, full, present):
    with builder.if_else(full) as (whole_word, partial_word):
        with whole_word:
            builder.store(values, pointer, align=4)
        with partial_word:
            store = _declare(
                builder,
                "llvm.masked.store.v64f32.p0",
                ir.VoidType(),
                values.type,
                ir.PointerType(values.type),
                ir.IntType(32),
                present.type,
            )
            builder.call(store, [values, pointer, ir.Constant(ir.IntType(32), 4), present])


@intrinsic
def _add_word(typingctx, x_address, lanes, bits, alpha):
    """x[:lanes] += alpha * z for one word of random bits, in float32 (one rounding per element)."""
    signature = types.void(types.int64, types.int64, types.uint64, types.float32)

    def codegen(context, builder, signature, args):
        full, present, pointer, x, steps = _word_codegen(builder, *args)
        _store_word(builder, builder.fadd(x, steps), pointer, full, present)
        return context.get_dummy_value()

    return signature, codegen


def _moved_and_missed(builder, present, x, steps):
    """``x + s``, and the present lanes whose way back is not exact: ``(x + s) - s != x``
    (true for NaN too) or ``x == 0`` (a zero's sign)."""
    moved = builder.fadd(x, steps)
    missed = builder.and_(
        present,
        builder.or_(
            builder.fcmp_unordered("!=", builder.fsub(moved, steps), x),
            builder.fcmp_ordered("==", x, ir.Constant(x.type, [0.0] * WORD)),
        ),
    )
    return moved, missed


@intrinsic
def _missed_word(typingctx, x_address, lanes, bits, alpha):
    """The bit mask of the lanes `_move_word` would log (bit k: lane k), moving nothing."""

    def codegen(context, builder, signature, args):
        _, present, _, x, steps = _word_codegen(builder, *args)
        _, missed = _moved_and_missed(builder, present, x, steps)
        return builder.bitcast(missed, ir.IntType(64))

    return types.uint64(types.int64, types.int64, types.uint64, types.float32), codegen


@intrinsic
def _trailing_zeros(typingctx, mask):
    """Index of the lowest set bit of a uint64 (cttz)."""

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.uint64(types.uint64), codegen


@intrinsic
def _move_word(typingctx, x_address, lanes, bits, alpha, off_address, val_address, word_start):
    """x[:lanes] += alpha * z, logging the elements whose way back is not exact.

    Where ``(x + s) - s != x`` or ``x == 0`` (s = alpha * z), the original value and
    ``word_start + lane`` (its offset in the item) are compress-stored to ``val``/``off``;
    returns how many were stored. With AVX-512 this is straight-line code, a few mask
    instructions per word, so finding the 1-2% of elements to log costs no branch and no
    scratch memory. Elsewhere (``not _COMPRESS_STORE``) the kernel logs the lanes of
    `_missed_word`'s mask one by one instead."""
    signature = types.int64(
        types.int64, types.int64, types.uint64, types.float32, types.int64, types.int64, types.int64
    )

    def codegen(context, builder, signature, args):
        x_address, lanes, bits, alpha, off_address, val_address, word_start = args
        full, present, pointer, x, steps = _word_codegen(builder, x_address, lanes, bits, alpha)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        ints = ir.VectorType(i32, WORD)
        moved, missed = _moved_and_missed(builder, present, x, steps)
        _store_word(builder, moved, pointer, full, present)
        offsets = builder.add(
            _splat(builder, builder.trunc(word_start, i32), WORD), ir.Constant(ints, list(range(WORD)))
        )
        for values, address, name in ((x, val_address, "v64f32"), (offsets, off_address, "v64i32")):
            vector = values.type
            store = _declare(
                builder, f"llvm.masked.compressstore.{name}", ir.VoidType(), vector, ir.PointerType(vector), missed.type
            )
            builder.call(store, [values, builder.inttoptr(address, ir.PointerType(vector)), missed])
        popcount = _declare(builder, "llvm.ctpop.i64", i64, i64)
        return builder.call(popcount, [builder.bitcast(missed, i64)])

    return signature, codegen


@numba.njit(inline="always")
def _add_steps(address, n, key, first_word, alpha):
    """x[:n] += alpha * z for the n float32 elements at `address`, whose signs are the
    tensor's random words from `first_word` on."""
    for j in range((n + WORD - 1) // WORD):
        _add_word(address + 4 * WORD * j, min(WORD, n - WORD * j), rademacher_word(key, first_word + j), alpha)


@numba.njit(parallel=True, nogil=True, cache=True)
def _move(
    addresses,
    item_tensor,
    item_start,
    item_stop,
    thread_lo,
    thread_hi,
    from_keys,
    from_alpha,
    old_off,
    old_val,
    old_count,
    old_read,
    decay,
    term_keys,
    term_alpha,
    to_keys,
    to_alpha,
    new_off,
    new_val,
    new_count,
    new_write,
    new_limit,
    stopped,
):
    """One sweep over the items of each thread's range: restore from the old offset (and
    its log), then decay and update terms, then move to the new offset, logging every
    element whose restore would not give its bits back. A thread stops before an item that
    might not fit its log region; `stopped[t]` is the first item it did not touch.

    All arithmetic is float32 with float32 alphas: one correctly rounded add per write,
    the value `axpy_direction_` computes for float32 tensors."""
    has_from = from_keys.shape[0] > 0
    has_to = to_keys.shape[0] > 0
    for th in numba.prange(thread_lo.shape[0]):
        rp = old_read[th]
        wp = new_write[th]
        off_base, val_base = new_off.ctypes.data, new_val.ctypes.data  # int32 / float32 entries: 4 bytes
        stopped[th] = thread_hi[th]
        for i in range(thread_lo[th], thread_hi[th]):
            lo, hi = item_start[i], item_stop[i]
            n = hi - lo
            if has_to and wp + n > new_limit[th]:
                stopped[th] = i
                break
            t = item_tensor[i]
            address = addresses[t] + 4 * lo  # raw addresses: no reference counting in the hot loop
            x = numba.carray(_pointer(address), (n,), np.float32)
            first_word = lo // WORD
            if has_from:  # back to the unperturbed value: subtract, then the logged exceptions
                _add_steps(address, n, from_keys[t], first_word, -from_alpha)
                for e in range(rp, rp + old_count[i]):
                    x[old_off[e]] = old_val[e]
                rp += old_count[i]
            if decay[t] != 1.0:
                for k in range(n):
                    x[k] = x[k] * decay[t]
            for q in range(term_alpha.shape[0]):
                _add_steps(address, n, term_keys[t, q], first_word, term_alpha[q])
            if has_to:  # move, logging what subtracting would not give back
                # Alone in its sweep, the move's loads wait on the log's write position (the
                # previous word's count): ask for the next item's lines ahead of them.
                if not has_from and i + 1 < thread_hi[th]:
                    ahead = addresses[item_tensor[i + 1]] + 4 * item_start[i + 1]
                    for line in range(0, 4 * (item_stop[i + 1] - item_start[i + 1]), 64):
                        _prefetch(ahead + line)
                written = wp
                for j in range((n + WORD - 1) // WORD):
                    bits = rademacher_word(to_keys[t], first_word + j)
                    word_address, lanes = address + 4 * WORD * j, min(WORD, n - WORD * j)
                    if _COMPRESS_STORE:
                        wp += _move_word(
                            word_address, lanes, bits, to_alpha, off_base + 4 * wp, val_base + 4 * wp, WORD * j
                        )
                    else:
                        missed = _missed_word(word_address, lanes, bits, to_alpha)
                        while missed:
                            k = WORD * j + np.int64(_trailing_zeros(missed))
                            new_off[wp] = k
                            new_val[wp] = x[k]
                            wp += 1
                            missed &= missed - np.uint64(1)
                        _add_word(word_address, lanes, bits, to_alpha)
                new_count[i] = wp - written
        old_read[th] = rp
        new_write[th] = wp


class LogFull(Exception):
    """A move needed more log entries than the log holds (it has been undone)."""


_EMPTY_KEYS = np.empty(0, dtype=np.uint64)
_NO_ALPHA = np.empty(0, dtype=np.float32)


class _Log:
    """Per-thread regions of (offset in item, original value) entries, and a count per item."""

    def __init__(self, threads: int, per_thread: int, items: int):
        self.off = np.empty(threads * per_thread, dtype=np.int32)
        self.val = np.empty(threads * per_thread, dtype=np.float32)
        self.count = np.zeros(items, dtype=np.int32)
        self.region_start = np.arange(threads, dtype=np.int64) * per_thread
        self.region_end = self.region_start + per_thread


@dataclass
class _Offset:
    """Weights at ``round(θ + alpha z(keys))``, with the log that makes the way back exact."""

    keys: np.ndarray  # uint64 direction key per tensor (empty: θ itself, no log used)
    alpha: np.float32
    log: _Log

    def kernel_args(self, positions: np.ndarray) -> tuple:
        """One side of a `_move` call: keys, alpha, the log's arrays and its per-thread positions."""
        return self.keys, self.alpha, self.log.off, self.log.val, self.log.count, positions


class LoggedPerturbation:
    """Moves all trainable float32 CPU tensors between offsets along Rademacher directions.

    Same contract as `ModuleScopedPerturbation` (inside `scope` forwards see ``w + scale z``,
    the weights are bit-exact after), plus `holding()`, in which a scope's weights stay
    where they are until the next scope or `commit` moves them on in the same sweep.

    Args:
        log_bytes: memory for the two logs (the one being read and the one being written
            during a move); by default the larger of 4 MiB and the largest module's
            trainable bytes.
    """

    def __init__(self, tensors: list, kind: str, versions: WeightVersions, log_bytes: Optional[int] = None):
        if not self.supports(tensors, kind):
            raise ValueError("LoggedPerturbation needs Rademacher directions over float32 CPU tensors (no masters)")
        self.tensors = tensors
        self.kind = kind
        self.versions = versions
        self._owners = list({id(m): m for t in tensors for m in t.owners}.values())
        self._pointers = [t.param.data_ptr() for t in tensors]
        self._addresses = np.array(self._pointers, dtype=np.int64)
        sizes = [t.param.numel() for t in tensors]
        items = [(i, s, min(s + ITEM, n)) for i, n in enumerate(sizes) for s in range(0, n, ITEM)]
        self._item_tensor, self._item_start, self._item_stop = (np.array(c, dtype=np.int64) for c in zip(*items))
        # one contiguous run of items per thread, with about equal numbers of elements
        threads = max(1, numba.get_num_threads())
        cumulative = np.cumsum(self._item_stop - self._item_start)
        bounds = np.searchsorted(cumulative, cumulative[-1] * np.arange(1, threads) / threads)
        self._thread_lo = np.array([0, *bounds], dtype=np.int64)
        self._thread_hi = np.array([*bounds, len(items)], dtype=np.int64)
        self.log_bytes = int(log_bytes if log_bytes is not None else max(MIN_LOG_BYTES, largest_module_bytes(tensors)))
        self._log_shape = (threads, self.log_bytes // 2 // _ENTRY_BYTES // threads, len(items))
        self._logs: Optional[list] = None  # two _Log, allocated on first use
        self._no_decay = np.ones(len(tensors), dtype=np.float32)
        self._no_terms = np.empty((len(tensors), 0), dtype=np.uint64)
        self._at: Optional[_Offset] = None  # where the weights rest (None: at θ)
        self._holding = False
        self._in_scope = False
        self.fallback: Optional[ModuleScopedPerturbation] = None  # after a log overflow
        self.last_log_entries = 0

    @staticmethod
    def supports(tensors: list, kind: str) -> bool:
        """Whether these tensors can be moved this way (Rademacher; float32 CPU; no masters)."""
        return (
            kind == RADEMACHER
            and bool(tensors)
            and all(
                t.master is None and t.param.dtype == torch.float32 and t.param.device.type == "cpu" for t in tensors
            )
        )

    @property
    def modules(self) -> list:
        return list(self._owners)

    def remove(self) -> None:
        if self.fallback is not None:
            self.fallback.remove()

    # -- the public contract -----------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, seed: int, scale: float) -> Iterator[None]:
        """Within this block, forwards see ``w + scale * z(seed)``; weights exact after
        (inside `holding()`: once the holding block ends or `commit` runs)."""
        if self._in_scope:
            raise RuntimeError("perturbation scopes do not nest")
        if self.fallback is None:
            try:
                self._move_to((self._keys(seed), scale))
            except LogFull:
                self._fall_back(scale)
        if self.fallback is not None:
            with self.fallback.scope(seed, scale):
                yield
            return
        self._in_scope = True
        try:
            yield
        except BaseException:
            self.settle()
            raise
        finally:
            self._in_scope = False
        if not self._holding:
            self.settle()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Between scopes in this block the weights may rest at the last offset; exact at exit."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            self.settle()

    def settle(self) -> None:
        """Back to the unperturbed weights, exactly."""
        if self._at is not None:
            self._move_to(None)

    def commit(self, plan: UpdatePlan) -> None:
        """The ZO-SGD update of `commit_update`, in the same sweep as the restore (without
        momentum: its buffer needs z as a tensor). Same bits: the decay is one float32
        multiply, then each term one float32 add, as `commit_update` does them."""
        if plan.momentum > 0 or plan.writes_nothing:
            self.settle()
            commit_update(self.tensors, plan, self.kind, self.versions)
            return
        decay = np.array([1.0 - plan.lr * plan.weight_decay if t.decay else 1.0 for t in self.tensors], np.float32)
        terms = [(seed, coef) for seed, coef in plan.terms if coef]
        keys = np.array([[tensor_key(seed, t.name) for seed, _ in terms] for t in self.tensors], dtype=np.uint64)
        alphas = np.array([-plan.lr * coef for _, coef in terms], dtype=np.float32)
        with _DeferredInterrupts():
            self._move_to(None, update=(decay, keys, alphas))

    # -- moves -------------------------------------------------------------------------------
    def _keys(self, seed: int) -> np.ndarray:
        return np.array([tensor_key(seed, t.name) for t in self.tensors], dtype=np.uint64)

    def _move_to(self, destination: Optional[tuple], update: Optional[tuple] = None) -> None:
        """One sweep from where the weights rest to `destination` ((keys, scale); None: θ),
        applying `update` ((decay, term keys, term alphas)) at θ on the way."""
        if [t.param.data_ptr() for t in self.tensors] != self._pointers:
            raise RuntimeError("a trainable tensor was reallocated (param.data replaced) while MeZO holds it")
        if self._logs is None:
            self._logs = [_Log(*self._log_shape), _Log(*self._log_shape)]
        source, target = self._at, None
        if destination is not None:
            log = self._logs[1] if source is not None and source.log is self._logs[0] else self._logs[0]
            target = _Offset(destination[0], np.float32(destination[1]), log)
        for m in self._owners:
            self.versions.bump(m)
        self._at = None
        read = source.log.region_start.copy() if source is not None else None
        stopped = self._sweep(source, read, target, self._thread_lo, self._thread_hi, update)
        if target is not None and np.any(stopped < self._thread_hi):
            # undo: the items already moved come back through the new log, the rest through the old
            self._sweep(target, None, None, self._thread_lo, stopped)
            if source is not None:
                self._sweep(source, read, None, stopped, self._thread_hi)
            raise LogFull(f"the move needed more than {self.log_bytes // 2} bytes of log")
        self._at = target

    def _sweep(self, source, read, target, lo, hi, update=None) -> np.ndarray:
        """The kernel over items [lo[t], hi[t]) of each thread t, reading `source`'s log from
        `read` (default: its start); returns where each thread stopped."""
        decay, term_keys, term_alpha = update or (self._no_decay, self._no_terms, _NO_ALPHA)
        theta = _Offset(_EMPTY_KEYS, np.float32(0), self._logs[0])  # empty keys: no restore, no log
        source, target = source or theta, target or theta
        write = target.log.region_start.copy()
        stopped = np.empty_like(lo)
        _move(
            self._addresses,
            self._item_tensor,
            self._item_start,
            self._item_stop,
            lo,
            hi,
            *source.kernel_args(read if read is not None else source.log.region_start.copy()),
            decay,
            term_keys,
            term_alpha,
            *target.kernel_args(write),
            target.log.region_end,
            stopped,
        )
        if target is not theta:
            self.last_log_entries = int((write - target.log.region_start).sum())
        return stopped

    def _fall_back(self, scale: float) -> None:
        logger.warning(
            "MeZO: the exact-restore log (%.1f MiB) overflowed at eps=%g; perturbing module by module with backups "
            "from now on",
            self.log_bytes / 2**20,
            abs(scale),
        )
        self.fallback = ModuleScopedPerturbation(self.tensors, self.kind, self.versions)
