"""A run's inputs checked before any work: nothing is loaded, started or written here.

`check_inputs` refuses, with one `UsageError` each, what would otherwise fail minutes later
or halfway through: a missing or unreadable data file, a reward that cannot be imported, a resume point with no checkpoint,
a model path that does not exist (or a near miss of the offline default), a CUDA device on
a machine without one, and an output directory that holds another run. What needs the
model or the data (LoRA target modules, the data's fields, the objective's fit) is checked
as soon as they are loaded, still before the output directory is touched.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch

from sglang.srt.mezo.checkpoint import latest_checkpoint
from sglang.srt.mezo.config import MeZOConfig, flag
from sglang.srt.mezo.model_io import DEFAULT_MODEL, smollm2_location
from sglang.srt.mezo.output_dir import check_not_locked, check_output_dir
from sglang.srt.mezo.rewards import load_reward
from sglang.srt.mezo.usage_errors import ConfigError


def check_inputs(config: MeZOConfig) -> None:
    """Raises a `ConfigError` (or `OutputDirError`) naming the first bad input."""
    if config.train_file is None:
        raise ConfigError(
            f"{flag('train_file')} is required: the training data (JSONL, JSON, CSV, Parquet or a dataset dir)"
        )
    for name in ("train_file", "eval_file"):
        if getattr(config, name) is not None:
            check_readable(getattr(config, name), flag(name))
    if config.resume is not None and latest_checkpoint(config.resume) is None:
        raise ConfigError(
            f"--resume {config.resume}: no checkpoint found there (pass the run's checkpoints directory or one of "
            "its step-N directories)"
        )
    if config.reward is not None:
        load_reward(config.reward)  # imported once here; the trainer's import is then the cached module
    check_model(config.model)
    check_device(config)
    check_not_locked(Path(config.output_dir))
    check_output_dir(Path(config.output_dir), resume=config.resume is not None, overwrite=config.overwrite_output_dir)


def check_readable(path: str, option: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{option} {path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option} {path}: not readable (permission denied)")


def check_model(name: str) -> None:
    """The offline default must be installed; a name that is not an existing path must look
    like a Hub id (``org/name`` or ``name``), not a path or a near miss of the default."""
    if name == DEFAULT_MODEL:
        try:
            smollm2_location()
        except FileNotFoundError as error:
            raise ConfigError(f"--model {name}: {error}") from None
        return
    if os.path.exists(name):
        return
    looks_like_a_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # a Hub id is org/name
    if looks_like_a_path:
        raise ConfigError(f"--model {name}: no such directory or file")
    if difflib.get_close_matches(name, [DEFAULT_MODEL], n=1, cutoff=0.8):
        raise ConfigError(
            f"--model {name}: no such directory, and not a model this tool knows: did you mean {DEFAULT_MODEL}?"
        )


def check_device(config: MeZOConfig) -> None:
    if config.device != "auto" and torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"--device {config.device}: torch sees no CUDA device on this machine (torch {torch.__version__}, {built}): "
            "use --device cpu or auto"
        )
