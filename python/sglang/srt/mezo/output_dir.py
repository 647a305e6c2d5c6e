"""One run per output directory: refusal, overwrite, one writer at a time.

* A non-empty output directory is refused unless the run resumes (``--resume``) or was
  told to start over (``--overwrite-output-dir``, which removes every artifact a previous
  run wrote once the new run has started: nothing of two runs is ever mixed, and a start
  that fails leaves the directory as it found it, `OutputDirClaim`).
* `OutputDirLock`: an advisory ``fcntl`` lock on ``OUTPUT_DIR/.mezo.lock`` for the run's
  whole life; a second process fails at once, naming the holder. The kernel releases it
  when the holder exits, however it exits.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Optional

from sglang.srt.mezo.usage_errors import UsageError

LOCK_FILE = ".mezo.lock"
SET_ASIDE = ".mezo-previous-run"  # an overwritten run's artifacts until the new run has started
# Everything a run writes into its output directory (and nothing else is ever removed).
RUN_ARTIFACTS = (
    "config.json",
    "metrics.jsonl",
    "eval.json",
    "loss.png",
    "model",
    "checkpoints",
    "best",
    "tensorboard",
    "engine_model",  # written by earlier versions (the engine now serves a shared cache: engine_checkpoint)
    "initial_adapter",
)


class OutputDirError(UsageError):
    """The output directory holds another run, or another process is writing to it."""


def check_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses, without touching anything, a directory that holds anything (but the lock)
    unless the run resumes or overwrites it; a missing directory is fine."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputDirError(f"--output-dir {out_dir} is a file: choose a directory")
    entries = sorted(p.name for p in out_dir.iterdir() if p.name not in (LOCK_FILE, SET_ASIDE))
    if entries and not resume and not overwrite:
        raise OutputDirError(
            f"output directory {out_dir} is not empty (it holds {entries[:8]}"
            f"{' and more' if len(entries) > 8 else ''}): pass --resume {out_dir / 'checkpoints'} to continue "
            "that run, --overwrite-output-dir to replace it, or another --output-dir"
        )


def check_not_locked(out_dir: Path) -> None:
    """Refuses, without taking the lock, a directory another process is writing to."""
    holder = lock_holder(Path(out_dir) / LOCK_FILE)
    if holder is not None:
        raise _held_by(holder, Path(out_dir))


def lock_holder(path: Path) -> Optional[str]:
    """The pid written in a lock file that another process holds now (None: not held),
    found without taking or writing it."""
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _held_by(holder: str, out_dir: Path) -> OutputDirError:
    return OutputDirError(
        f"another MeZO process (pid {holder}) is writing to {out_dir}: wait for it to finish or choose another "
        "--output-dir"
    )


class OutputDirClaim:
    """The output directory taken for one run's start: locked, checked, and with
    `overwrite` the previous run's artifacts set aside (moved into ``.mezo-previous-run``).

    `commit()` (the start succeeded) deletes what was set aside; `rollback()` (it failed)
    removes everything this start added, puts the previous run back and removes a directory
    the start created: a failed start leaves the directory as it found it.
    """

    def __init__(self, out_dir: Path, *, resume: bool, overwrite: bool):
        self.out_dir = Path(out_dir)
        self.created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.found = {p.name for p in self.out_dir.iterdir()}
        self.set_aside = self.out_dir / SET_ASIDE
        self.lock = OutputDirLock(self.out_dir).acquire()
        try:
            check_output_dir(self.out_dir, resume=resume, overwrite=overwrite)
        except OutputDirError:
            self.rollback()
            raise
        if overwrite and not resume:
            self.set_aside.mkdir(exist_ok=True)
            for name in RUN_ARTIFACTS:
                if (self.out_dir / name).exists() or (self.out_dir / name).is_symlink():
                    (self.out_dir / name).rename(self.set_aside / name)

    def commit(self) -> None:
        if self.set_aside.exists():
            shutil.rmtree(self.set_aside)

    def rollback(self) -> None:
        self.lock.release()
        if self.created:
            shutil.rmtree(self.out_dir, ignore_errors=True)
            return
        for path in self.out_dir.iterdir():
            if path.name not in self.found and path != self.set_aside:
                _remove(path)
        if self.set_aside.is_dir():
            for path in self.set_aside.iterdir():
                _remove(self.out_dir / path.name)
                path.rename(self.out_dir / path.name)
            self.set_aside.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class OutputDirLock:
    """Holds ``OUTPUT_DIR/.mezo.lock`` (fcntl.flock, exclusive, non-blocking) while open."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def acquire(self) -> "OutputDirLock":
        """Takes the lock (or raises `OutputDirError` naming the holder) and writes this pid."""
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise _held_by(holder, self.path.parent) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        """Gives the lock up (once; later calls do nothing)."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
