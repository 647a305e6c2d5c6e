"""Checkpoints that resume bit-identically, written atomically (temp dir + rename)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file, save_file

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Trainer attributes that, with the weights and momentum, fix the rest of the run.
TRAINER_STATE = ("global_step", "epoch", "batches_seen_in_epoch", "nonfinite_in_a_row", "skipped_steps")


def save_checkpoint(trainer, directory: str | os.PathLike, keep: int = 2) -> Path:
    """Writes ``directory/step-N`` atomically and keeps the newest `keep` checkpoints."""
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
    state = {k: getattr(trainer, k) for k in TRAINER_STATE}
    state["config"] = trainer.config.to_dict()
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    old = None
    if final.exists():  # re-saving the same step: move the old one aside first
        old = root / f".step-{trainer.global_step}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old)
    for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale)
    return final


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


def load_checkpoint(trainer, directory: str | os.PathLike) -> Path:
    """Restores weights, momentum and loop position into `trainer` from a checkpoint."""
    path = latest_checkpoint(directory)
    if path is None:
        raise FileNotFoundError(f"no checkpoint (with {STATE_FILE}) in {directory}")
    try:
        trainer.backend.load_trainable_state(load_file(str(path / TRAINABLE_FILE)))
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: {e}") from e
    if (path / OPTIMIZER_FILE).is_file():
        trainer.backend.load_momentum_state(load_file(str(path / OPTIMIZER_FILE)))
    state = json.loads((path / STATE_FILE).read_text())
    for key in TRAINER_STATE:
        setattr(trainer, key, state[key])
    return path
