"""MeZO: fine-tune a language model with forward passes only, inside SGLang.

Python API::

    from sglang.srt.mezo_trainer import MeZOConfig, MeZOTrainer, MeZODataset, create_dataloader
    cfg = MeZOConfig(learning_rate=1e-6, epsilon=1e-3, seed=0)
    trainer = MeZOTrainer(model, cfg)
    out = trainer.step(batch)            # out.loss_perturbed, out.loss_baseline, out.coefficient, out.seed
    trainer.train(create_dataloader(MeZODataset("train.jsonl", tokenizer), 16))

CLI (every `MeZOConfig` field is a flag; with no --lr / --epsilon the estimator and its
hyperparameters are the benchmarked defaults, see `sglang.srt.mezo.config.ESTIMATOR_DEFAULTS`)::

    python -m sglang.srt.mezo_trainer --peft lora --train-file train.jsonl --eval-file eval.jsonl --steps 200

The main job, `mezo_finetune`, is a recipe (`sglang.srt.mezo.recipe`): `setup` (model,
data, output dir, backend, resume), `train` (the loop, with metrics, evaluations and
checkpoints as it goes), `evaluate` (before and after) and `save` (the final checkpoint,
eval.json, the loss plot, the trained weights). This module is its public face: the API's
names and the CLI. Where things live: `sglang.srt.mezo` (see its package docstring).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Optional

from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.data import MeZODataset, create_dataloader
from sglang.srt.mezo.model_io import load_model_and_tokenizer
from sglang.srt.mezo.recipe import mezo_finetune
from sglang.srt.mezo.trainer import MeZOTrainer, StepOutput
from sglang.srt.mezo.usage_errors import ParserErrorsAreUsageErrors, reporting_usage_errors, split_debug_flag

__all__ = [
    "MeZOConfig",
    "MeZOTrainer",
    "MeZODataset",
    "StepOutput",
    "create_dataloader",
    "load_model_and_tokenizer",
    "mezo_finetune",
    "main",
]


def parse_args(argv: Optional[list] = None) -> MeZOConfig:
    """The config of a command line; a bad flag or value raises `UsageError` (one line)."""
    from transformers import HfArgumentParser

    class Parser(ParserErrorsAreUsageErrors, HfArgumentParser):
        pass

    # allow_abbrev: a misspelt flag must not silently mean another one (--learning-rat)
    parser = Parser(MeZOConfig, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:  # HfArgumentParser returns these instead of refusing them as argparse would
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return config


# Library messages that say nothing to a user of this CLI (logger -> message pattern):
# transformers imports torchao whenever it is installed (its quantizer registry, on every
# from_pretrained / save_pretrained), and torchao's import logs each CUDA-only extension it
# cannot load on this machine and registers enums torch now warns about.
LIBRARY_NOISE = {
    "torchao": re.compile(r"Failed to load .*\.so"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
}


def quiet_libraries() -> None:
    """The CLI's output is its own: exactly the messages of `LIBRARY_NOISE` are dropped, and
    the libraries' loading, data-preparation and writing progress bars (transformers,
    datasets, huggingface_hub) are off; the training loop's bar stays."""
    import datasets
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    for name, pattern in LIBRARY_NOISE.items():
        logging.getLogger(name).addFilter(lambda record, pattern=pattern: not pattern.search(record.getMessage()))
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def main(argv: Optional[list] = None) -> dict:
    """The CLI: a user's mistake is one line on stderr and exit status 2, before any work
    (``--debug`` or MEZO_DEBUG=1 shows its traceback)."""
    argv, debug = split_debug_flag(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    return reporting_usage_errors(lambda: mezo_finetune(parse_args(argv)), debug)


if __name__ == "__main__":
    main(sys.argv[1:])
