"""Zeroth-order training on a reward of generated text against TRL's GRPOTrainer.

Same model (SmolLM2-135M-Instruct, LoRA r 8 on q_proj/v_proj, float32), same prompts
(reasoning-gym ``chain_sum``: the sum of two numbers of one or two digits, as a chat turn
asking for the number only), same reward (math-verify's answer check, this project's
built-in ``--reward math``), same wall-clock budget of training on this machine's cores.
Each method runs in its own process (`--child`), so its peak memory (VmHWM, the process's
resident high-water mark: libraries, model, training) is its own; both are measured side
by side in one run of this script. Before and after training each model is scored the
same way: mean greedy reward on held-out prompts (`greedy_reward`).

* ZO: ``MeZOConfig(reward="math", peft="lora")`` with nothing else set (the CLI's
  defaults: fzoo, q = 4, the divergence guard), completions sampled at temperature 1.
* GRPO: TRL's GRPOTrainer with its defaults except: 4 completions per prompt, batches of
  16 completions, completions of at most the same length, LoRA learning rate 1e-5 (TRL's
  default 1e-6 is for full fine-tuning), no checkpoints, CPU.

    .venv/bin/python benchmark/mezo/bench_reward.py            # 600 s of training per method, ~25 min
    .venv/bin/python benchmark/mezo/bench_reward.py --quick    # 60 s per method, < 5 min
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import setup_threads

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
MAX_NEW_TOKENS = 16
GRPO_LEARNING_RATE = 1e-5


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def chain_sum_records(count: int, seed: int) -> list:
    """reasoning-gym chain_sum entries as chat prompts, with the fields the rewards read."""
    import reasoning_gym

    entries = reasoning_gym.create_dataset(
        "chain_sum", size=count, seed=seed, min_terms=2, max_terms=2, min_digits=1, max_digits=2
    )
    return [
        {
            "messages": [{"role": "user", "content": e["question"] + " Reply with the number only."}],
            "answer": e["answer"],
            "metadata": e["metadata"],
        }
        for e in entries
    ]


def greedy_reward(model, tokenizer, records: list) -> float:
    """Mean ``math`` reward of greedy completions of `records` (the evaluation both share)."""
    from sglang.srt.mezo.generation import GenerationSettings, transformers_completions
    from sglang.srt.mezo.rewards import load_reward
    from sglang.srt.mezo_trainer import MeZODataset, create_dataloader

    reward, settings = load_reward("math"), GenerationSettings(MAX_NEW_TOKENS, 0.0, 1.0, (), 1)
    data = MeZODataset(records, tokenizer, prompt_only=True)
    values = []
    with torch.no_grad():
        for batch in create_dataloader(data, 16, shuffle=False):
            completions = transformers_completions(model, tokenizer, batch, settings)
            values += reward(batch["prompts"], completions, batch["records"])
    return sum(values) / len(values)


def run_zo(model, tokenizer, train: list, budget: float) -> dict:
    from sglang.srt.mezo_trainer import MeZOConfig, MeZODataset, MeZOTrainer, create_dataloader

    config = MeZOConfig(reward="math", peft="lora", max_new_tokens=MAX_NEW_TOKENS, max_steps=10**6, disable_tqdm=True)
    trainer = MeZOTrainer(model, config, tokenizer=tokenizer)
    loader = create_dataloader(MeZODataset(train, tokenizer, **config.dataset_options()), 16, seed=0)
    started = time.perf_counter()
    out = trainer.train(loader, should_stop=lambda: time.perf_counter() - started > budget)
    return {"model": trainer.model, "steps": out.steps, "seconds": time.perf_counter() - started,
            "hyperparameters": f"{config.estimator}, lr {config.learning_rate}, eps {config.epsilon}, "
                               f"q {config.num_directions}, batch 16 prompts"}  # fmt: skip


def run_grpo(model, tokenizer, train: list, budget: float, work: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from sglang.srt.mezo.rewards import load_reward

    math_reward = load_reward("math")

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return math_reward(prompts, texts, [{"answer": a} for a in answer])

    class Budget(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = time.perf_counter() - started > budget

    args = GRPOConfig(
        output_dir=str(work / "grpo"), per_device_train_batch_size=16, num_generations=4,
        max_completion_length=MAX_NEW_TOKENS, learning_rate=GRPO_LEARNING_RATE, max_steps=10**6, use_cpu=True,
        save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True, seed=0,
    )  # fmt: skip
    dataset = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in train])
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[Budget()],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    return {"model": trainer.model, "steps": trainer.state.global_step, "seconds": time.perf_counter() - started,
            "hyperparameters": f"lr {GRPO_LEARNING_RATE}, 4 completions per prompt, batch 16 completions"}  # fmt: skip


def child(method: str, budget: float, train_size: int, eval_size: int, result_path: Path) -> None:
    from sglang.srt.mezo_trainer import load_model_and_tokenizer

    setup_threads()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    train, evaluation = chain_sum_records(train_size, seed=1), chain_sum_records(eval_size, seed=2)
    before = greedy_reward(model, tokenizer, evaluation)
    loaded = status_mib("VmHWM")
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as work:
        run = (
            run_zo(model, tokenizer, train, budget)
            if method == "zo"
            else run_grpo(model, tokenizer, train, budget, Path(work))
        )
    peak = status_mib("VmHWM")
    after = greedy_reward(run.pop("model").eval(), tokenizer, evaluation)
    result = {"method": method, "before": before, "after": after, "peak_mib": peak, "loaded_mib": loaded, **run}
    result_path.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training per method")
    parser.add_argument("--train", type=int, default=512, help="training prompts")
    parser.add_argument("--eval", type=int, default=128, help="held-out prompts scored before and after")
    parser.add_argument("--quick", action="store_true", help="60 s per method, 32 eval prompts")
    parser.add_argument("--out", type=Path, default=Path("mezo_output/bench_reward"))
    parser.add_argument("--child", choices=("zo", "grpo"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.budget, args.eval = 60.0, 32
    if args.child:
        child(args.child, args.budget, args.train, args.eval, args.result)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in ("zo", "grpo"):
        path = args.out / f"{method}.json"
        command = [sys.executable, __file__, "--child", method, "--budget", str(args.budget), "--train",
                   str(args.train), "--eval", str(args.eval), "--result", str(path)]  # fmt: skip
        subprocess.run(command, check=True)
        results[method] = json.loads(path.read_text())
        print(json.dumps(results[method]), flush=True)
    (args.out / "bench_reward.json").write_text(json.dumps(results, indent=1))
    zo, grpo = results["zo"], results["grpo"]
    print(f"\n{args.budget:.0f} s of training each, {args.eval} held-out prompts, greedy reward (math-verify)")
    print("| method | steps | reward before -> after | gain | peak RSS (VmHWM) |")
    print("|---|---|---|---|---|")
    for name, r in (("ZO (defaults: fzoo)", zo), ("TRL GRPO", grpo)):
        print(f"| {name} | {r['steps']} | {r['before']:.3f} -> {r['after']:.3f} | {r['after'] - r['before']:+.3f} | "
              f"{r['peak_mib']:.0f} MiB |")  # fmt: skip
    print(
        f"ZO / GRPO peak memory: {zo['peak_mib'] / grpo['peak_mib']:.2f}; "
        f"training only (peak minus the model loaded and scored): "
        f"{(zo['peak_mib'] - zo['loaded_mib']) :.0f} MiB vs {(grpo['peak_mib'] - grpo['loaded_mib']):.0f} MiB"
    )


if __name__ == "__main__":
    main()
