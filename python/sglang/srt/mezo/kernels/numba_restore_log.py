"""The restore-log kernel of `restore_log.RestoreLogPerturbation`: numba, CPU float32 only.

One sweep moves every trainable float32 weight from one offset along Rademacher z to
another (restore from the old offset and its log, optional ZO-SGD update at theta, move
to the new offset), logging each element whose way back by subtraction would not give its
bits back. Imported only when that mechanism is built (a CPU float32 Rademacher run).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from sglang.srt.mezo.kernels.numba_kernels import rademacher_word, splat

WORD = 64  # elements per random word: bit k of the word is the sign of element k
# Elements per work item (whole words). A thread starts an item only when its log region
# has room for every element of it, so an overflow never leaves an item half moved.
ITEM = 1 << 12  # a multiple of WORD
MIN_LOG_BYTES = 4 << 20
ENTRY_BYTES = 8  # int32 offset in the item + float32 value


def threads() -> int:
    """numba's thread count: the log has one region per thread."""
    return max(1, numba.get_num_threads())


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
        steps = builder.select(negative, splat(builder, builder.fneg(alpha), WORD), splat(builder, alpha, WORD))
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
        steps = builder.bitcast(builder.xor(splat(builder, builder.bitcast(alpha, i32), WORD), sign), floats)
    return full, present, pointer, x, steps


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
            splat(builder, builder.trunc(word_start, i32), WORD), ir.Constant(ints, list(range(WORD)))
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
def move(
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
