"""Whole-model offsets along z, undone exactly by a log of the few elements subtraction misses.

`UnitScopedPerturbation` backs up each module's weights around its call, so every pass
costs a perturbation sweep plus a restore copy per module (and ~270 kernel launches).
With Rademacher directions z is nearly free to regenerate, so that memory traffic *is*
the cost of a step. `RestoreLogPerturbation` moves all trainable weights at once instead:

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
`UnitScopedPerturbation` for the rest of the run.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from sglang.srt.mezo import kernels
from sglang.srt.mezo.kernels import RADEMACHER, tensor_key
from sglang.srt.mezo.perturbation import (
    NestedHolding,
    UnitScopedPerturbation,
    WeightVersions,
    largest_module_bytes,
)
from sglang.srt.mezo.sharding import is_shard
from sglang.srt.mezo.signals import DeferredInterrupts
from sglang.srt.mezo.zo_sgd import UpdatePlan, commit_update

logger = logging.getLogger(__name__)


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


class RestoreLogPerturbation(NestedHolding):
    """Moves all trainable float32 CPU tensors between offsets along Rademacher directions.

    Same contract as `UnitScopedPerturbation` (inside `scope` forwards see ``w + scale z``,
    the weights are bit-exact after), plus `holding()`, in which a scope's weights stay
    where they are until the next scope or `commit` moves them on in the same sweep.

    Args:
        log_bytes: memory for the two logs (the one being read and the one being written
            during a move); by default the larger of 4 MiB and the largest module's
            trainable bytes.
    """

    def __init__(self, tensors: list, kind: str, versions: WeightVersions, log_bytes: Optional[int] = None):
        if not self.supports(tensors, kind):
            raise ValueError(
                "RestoreLogPerturbation needs Rademacher directions over whole float32 CPU tensors (no masters, no shards)"
            )
        from sglang.srt.mezo.kernels import numba_restore_log  # numba: only for CPU float32 runs

        self._kernel = numba_restore_log
        self.tensors = tensors
        self.kind = kind
        self.versions = versions
        self._owners = list({id(m): m for t in tensors for m in t.owners}.values())
        self._pointers = [t.param.data_ptr() for t in tensors]
        self._addresses = np.array(self._pointers, dtype=np.int64)
        sizes = [t.param.numel() for t in tensors]
        items = [
            (i, s, min(s + numba_restore_log.ITEM, n))
            for i, n in enumerate(sizes)
            for s in range(0, n, numba_restore_log.ITEM)
        ]
        self._item_tensor, self._item_start, self._item_stop = (np.array(c, dtype=np.int64) for c in zip(*items))
        # one contiguous run of items per thread, with about equal numbers of elements
        threads = numba_restore_log.threads()
        cumulative = np.cumsum(self._item_stop - self._item_start)
        bounds = np.searchsorted(cumulative, cumulative[-1] * np.arange(1, threads) / threads)
        self._thread_lo = np.array([0, *bounds], dtype=np.int64)
        self._thread_hi = np.array([*bounds, len(items)], dtype=np.int64)
        self.log_bytes = int(
            log_bytes if log_bytes is not None else max(numba_restore_log.MIN_LOG_BYTES, largest_module_bytes(tensors))
        )
        self._log_shape = (threads, self.log_bytes // 2 // numba_restore_log.ENTRY_BYTES // threads, len(items))
        self._logs: Optional[list] = None  # two _Log, allocated on first use
        self._no_decay = np.ones(len(tensors), dtype=np.float32)
        self._no_terms = np.empty((len(tensors), 0), dtype=np.uint64)
        self._at: Optional[_Offset] = None  # where the weights rest (None: at θ)
        self._pending: Optional[tuple] = None  # an update committed but not yet written (see `commit`)
        self._in_scope = False
        self.fallback: Optional[UnitScopedPerturbation] = None  # after a log overflow
        self.last_log_entries = 0

    @property
    def name(self) -> str:
        """``restore_log``; after an overflow, the per-unit mechanism's name and why."""
        if self.fallback is None:
            return "restore_log"
        return f"{self.fallback.name} (the restore log overflowed)"

    @staticmethod
    def supports(tensors: list, kind: str) -> bool:
        """Whether these tensors can be moved this way: Rademacher, no masters, and every tensor
        a whole one the numba kernels serve (float32 on the CPU, unless another implementation
        is forced; not a tensor-parallel shard)."""
        return (
            kind == RADEMACHER
            and bool(tensors)
            and all(
                t.master is None and not is_shard(t.layout) and kernels.implementation(t.param) == "numba"
                for t in tensors
            )
        )

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
                self._move_with_pending((self._keys(seed), scale))
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
        if not self.held:
            self.settle()

    def settle(self) -> None:
        """Back to the unperturbed weights, with any pending update written, exactly (after a
        fallback nothing rests or waits here: its scopes restore, `commit` writes at once)."""
        if self._at is not None or self._pending is not None:
            self._move_with_pending(None)

    def commit(self, plan: UpdatePlan) -> None:
        """The ZO-SGD update of `commit_update`, in the same sweep as the restore (without
        momentum: its buffer needs z as a tensor). Same bits: the decay is one float32
        multiply, then each term one float32 add, as `commit_update` does them. Inside
        `holding()` it waits for the next move (the next scope's, or `settle`'s), which
        writes it on the way: one sweep fewer per step, the same bits."""
        if self.fallback is not None:
            self.fallback.commit(plan)
            return
        if plan.momentum > 0 or plan.writes_nothing:
            self.settle()
            commit_update(self.tensors, plan, self.kind, self.versions)
            return
        decay = np.array([1.0 - plan.lr * plan.weight_decay if t.decay else 1.0 for t in self.tensors], np.float32)
        terms = [(seed, coef) for seed, coef in plan.terms if coef]
        keys = np.array([[tensor_key(seed, t.name) for seed, _ in terms] for t in self.tensors], dtype=np.uint64)
        alphas = np.array([-plan.lr * coef for _, coef in terms], dtype=np.float32)
        if self._pending is not None:
            self.settle()  # two updates never wait together
        self._pending = (decay, keys, alphas)
        if not self.held:
            self.settle()

    @property
    def pending_update(self) -> bool:
        """Whether a committed update waits for the next move (the weights are not yet the
        updated ones: read them through `settle`)."""
        return self._pending is not None

    def _move_with_pending(self, destination: Optional[tuple]) -> None:
        """`_move_to` `destination`, writing a waiting update on the way, with Ctrl-C deferred
        (all or nothing). The update stops waiting once a move has written it: when the move
        is done, or undone after a log overflow (which writes it too); any other failure
        happens before the sweep, and it still waits."""
        with DeferredInterrupts():
            try:
                self._move_to(destination, update=self._pending)
            except LogFull:
                self._pending = None
                raise
            self._pending = None

    # -- moves -------------------------------------------------------------------------------
    def _keys(self, seed: int) -> np.ndarray:
        return np.array([tensor_key(seed, t.name) for t in self.tensors], dtype=np.uint64)

    def _move_to(self, destination: Optional[tuple], update: Optional[tuple] = None) -> None:
        """One sweep from where the weights rest to `destination` ((keys, scale); None: θ),
        applying `update` ((decay, term keys, term alphas)) at θ on the way. If the log
        overflows, every item ends at θ with the update written, and LogFull is raised."""
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
            # undo: the items already moved come back through the new log, the rest through the
            # old one, and they take the update the moved items took on their way
            self._sweep(target, None, None, self._thread_lo, stopped)
            if source is not None or update is not None:
                self._sweep(source, read, None, stopped, self._thread_hi, update)
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
        self._kernel.move(
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
        self.fallback = UnitScopedPerturbation(self.tensors, self.kind, self.versions)
