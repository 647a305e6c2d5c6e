"""Checkpoints that resume bit-identically, written atomically (temp dir + rename).

Every checkpoint records its run's identity (`run_identity`: the config fields that define
the trajectory and the training data's SHA-256). Resuming checks it, naming the fields
that differ, and rotation only ever removes older checkpoints of the same run, never the
one just written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file, save_file

from sglang.srt.mezo.config import RESUMABLE_FIELDS, MeZOConfig
from sglang.srt.mezo.guard import BEST_WEIGHTS_FILE
from sglang.srt.mezo.usage_errors import UsageError

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Trainer attributes that, with the weights and momentum, fix the rest of the run.
TRAINER_STATE = ("global_step", "epoch", "batches_seen_in_epoch", "nonfinite_in_a_row", "skipped_steps")
# Trainer state added since, with what a checkpoint written before means by its absence.
ADDED_TRAINER_STATE = {"learning_rate_found": None, "epsilon_found": None}


def data_fingerprint(path: Optional[str]) -> Optional[str]:
    """SHA-256 of a data file, or of a directory's files (relative names and bytes, sorted);
    None without a path. Cached per (path, size, mtime): a run hashes its data once."""
    if path is None:
        return None
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stamp = (str(root.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _FINGERPRINTS:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        _FINGERPRINTS[stamp] = h.hexdigest()
    return _FINGERPRINTS[stamp]


_FINGERPRINTS: dict = {}


def run_identity(config) -> dict:
    """What makes two checkpoints steps of one run: every `MeZOConfig` field except
    `config.RESUMABLE_FIELDS`, and the training data's SHA-256 (``train_data_sha256``)."""
    identity = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_FIELDS}
    identity["train_data_sha256"] = data_fingerprint(config.train_file)
    return identity


def save_checkpoint(trainer, directory: str | os.PathLike, keep: int = 2, identity: Optional[dict] = None) -> Path:
    """Writes ``directory/step-N`` atomically, recording the run's `identity` (by default
    `run_identity` of the trainer's config), then removes the oldest checkpoints of the same
    run beyond `keep` (never the one just written; other runs' checkpoints are not touched)."""
    identity = run_identity(trainer.config) if identity is None else identity
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{trainer.global_step}"
    tmp = root / f".step-{trainer.global_step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    backend = trainer.backend
    save_file({k: v.contiguous() for k, v in backend.trainable_state().items()}, str(tmp / TRAINABLE_FILE))
    momentum = backend.momentum_state()
    if momentum:
        save_file(momentum, str(tmp / OPTIMIZER_FILE))
    state = {k: getattr(trainer, k) for k in (*TRAINER_STATE, *ADDED_TRAINER_STATE)}
    if trainer.guard is not None and trainer.best_weights_path is not None:
        state["guard"] = trainer.guard.state_dict()
        shutil.copyfile(trainer.best_weights_path, tmp / BEST_WEIGHTS_FILE)
    state["config"] = trainer.config.to_dict()
    state["identity"] = identity
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    old = None
    if final.exists():  # re-saving the same step: move the old one aside first
        old = root / f".step-{trainer.global_step}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old)
    same_run = [p for p in list_checkpoints(root) if p != final and _identity_of(p) == identity]
    for stale in same_run[: max(0, len(same_run) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(stale)
    return final


def drop_checkpoints_after(directory: str | os.PathLike, step: int, identity: dict) -> list:
    """Removes this run's checkpoints past `step` (a resume from an earlier one abandons that
    continuation; the run writes them again, bit for bit). Returns the removed paths."""
    later = [p for p in list_checkpoints(directory) if int(p.name.split("-")[1]) > step and _identity_of(p) == identity]
    for path in later:
        shutil.rmtree(path)
    return later


def _identity_of(checkpoint: Path) -> Optional[dict]:
    return json.loads((checkpoint / STATE_FILE).read_text()).get("identity")


def list_checkpoints(directory: str | os.PathLike) -> list:
    """Complete checkpoints under `directory`, oldest first (temp dirs are never listed)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """`directory` itself if it is a checkpoint, else its newest complete checkpoint."""
    root = Path(directory)
    if (root / STATE_FILE).is_file():
        return root
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(trainer, directory: str | os.PathLike, identity: Optional[dict] = None) -> Path:
    """Restores weights, momentum and loop position into `trainer` from a checkpoint; with
    `identity` (`run_identity` of the resuming run) refuses a checkpoint of another run."""
    path = latest_checkpoint(directory)
    if path is None:
        raise FileNotFoundError(f"no checkpoint (with {STATE_FILE}) in {directory}")
    if identity is not None:
        check_identity(path, identity)
    try:
        trainer.backend.load_trainable_state(load_file(str(path / TRAINABLE_FILE)))
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: {e}") from e
    if (path / OPTIMIZER_FILE).is_file():
        trainer.backend.load_momentum_state(load_file(str(path / OPTIMIZER_FILE)))
    state = json.loads((path / STATE_FILE).read_text())
    for key in TRAINER_STATE:
        setattr(trainer, key, state[key])
    for key, absent in ADDED_TRAINER_STATE.items():
        setattr(trainer, key, state.get(key, absent))
    if trainer.guard is not None and (path / BEST_WEIGHTS_FILE).is_file():
        trainer.guard.load_state_dict(state["guard"])
        trainer.snapshot_best_weights(source=path / BEST_WEIGHTS_FILE)
    return path


# Identity fields added after checkpoints were first written, with the values that
# reproduce what such a run did (MeZO; the other fields' defaults, unused by it): a
# checkpoint without them resumes under them.
ADDED_IDENTITY_FIELDS = {
    "estimator": "mezo",
    "divergence_guard": "off",
    **{
        f.name: f.default
        for f in fields(MeZOConfig)
        if f.name
        in (
            "sparse_fraction",
            "lowrank_rank",
            "lowrank_interval",
            "lr_search_batches",
            "lr_search_directions",
            "guard_batches",
            "guard_window",
            "guard_tolerance",
        )
    },
}


def check_identity(checkpoint: Path, identity: dict) -> None:
    """Raises ValueError naming every field in which `checkpoint`'s run differs from `identity`."""
    recorded = _identity_of(checkpoint)
    if recorded is None:
        raise UsageError(f"checkpoint {checkpoint} records no run identity: it cannot be matched to this run")
    recorded = {**ADDED_IDENTITY_FIELDS, **recorded}
    differing = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
    if differing:
        changes = ", ".join(f"{k}: {recorded.get(k)!r} -> {identity.get(k)!r}" for k in differing[:6])
        raise UsageError(
            f"checkpoint {checkpoint} belongs to another run ({changes}"
            f"{f' and {len(differing) - 6} more' if len(differing) > 6 else ''}); only "
            "config.RESUMABLE_FIELDS may change on --resume"
        )
