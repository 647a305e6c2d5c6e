"""A step's population in one batched call (LoRA slots) against its passes one by one.

SmolLM2-135M-Instruct, float32, LoRA r 8 on q_proj/v_proj (its B made non-zero, as after
training), fzoo with q directions (q + 1 passes a step), on the transformers backend. For
each q, two trainers that differ only in ``population_batch`` ("on": the step's adapters
as slots of one peft mixed-adapter call; "off": pass after pass, each adapter perturbed
in place by the unit-scoped mechanism) step the same batch, timed alternately (the order
rotates each repeat) in one process after a warm-up step each. Printed: the ratio
t_one_by_one / t_population of the medians (above 1: the population is faster), of the
fastest repeats beside it, and the largest difference between the two sides' losses
(the same weights: rounding only).

* ``teacher``: the completion NLL of 16 x 128 tokens, every position labelled.
* ``generation``: the reward objective (``exact_match``, never met: no update, every step
  the same work) generating 32 new tokens greedily from 16 prompts of 64 random tokens.

    .venv/bin/python benchmark/mezo/bench_population.py                      # q = 2, 4, 8; ~25 min
    .venv/bin/python benchmark/mezo/bench_population.py --q 4 --repeats 2    # ~6 min
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

LORA = dict(peft="lora", lora_rank=8, lora_alpha=16, lora_target_modules="q_proj,v_proj")
PARTS = ("teacher", "generation")


def make_trainer(model, population: str, q: int, part: str, tokenizer):
    from sglang.srt.mezo.config import MeZOConfig
    from sglang.srt.mezo.trainer import MeZOTrainer

    reward = dict(reward="exact_match", max_new_tokens=32, temperature=0.0) if part == "generation" else {}
    config = MeZOConfig(
        estimator="fzoo", num_directions=q, learning_rate=1e-5, epsilon=1e-3, population_batch=population,
        divergence_guard="off", disable_tqdm=True, **LORA, **reward,
    )  # fmt: skip
    trainer = MeZOTrainer(copy.deepcopy(model), config, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 would make every perturbed adapter act like the base on its first pass
        for t in trainer.backend.tensors:
            t.param.copy_(torch.randn(t.param.shape, generator=generator) * 0.02)
    return trainer


def make_batch(part: str, vocab: int) -> dict:
    if part == "teacher":
        return common.make_batch(vocab, 16, 128)
    prompts = common.make_batch(vocab, 16, 64)
    return {
        "input_ids": prompts["input_ids"],
        "attention_mask": prompts["attention_mask"],
        "records": [{"answer": "never"}] * 16,
        "prompts": ["(random tokens)"] * 16,
    }


def measure(model, tokenizer, part: str, q: int, repeats: int) -> dict:
    batch = make_batch(part, model.config.vocab_size)
    sides = {name: make_trainer(model, name, q, part, tokenizer) for name in ("off", "on")}
    losses = {name: trainer.step(batch) for name, trainer in sides.items()}  # warm-up (and numba's compile)
    times = {name: [] for name in sides}
    for r in range(repeats):
        for name in list(sides)[r % 2 :] + list(sides)[: r % 2]:
            times[name].append(common.timed(lambda trainer=sides[name]: trainer.step(batch)))
    gap = max(
        abs(a.loss_perturbed - b.loss_perturbed)
        for a, b in zip(losses["off"].per_direction, losses["on"].per_direction)
    )
    return {
        "median": common.median(times["off"]) / common.median(times["on"]),
        "best": min(times["off"]) / min(times["on"]),
        "off_s": common.median(times["off"]),
        "gap": gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--q", default="2,4,8", help="directions per step, comma-separated")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    common.setup_threads()
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the vanishing-update check on a random adapter
    from sglang.srt.mezo_trainer import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    meter = common.NeighbourMeter()
    print("part        q  passes  one-by-one/population (median)  (best)  one-by-one step s  max |dL|")
    for part in common.parse_list(args.parts, PARTS):
        for q in [int(v) for v in args.q.split(",")]:
            row = measure(model, tokenizer, part, q, args.repeats)
            print(
                f"{part:<10} {q:>2}  {q + 1:>6}  {row['median']:>31.2f}  {row['best']:>6.2f}  {row['off_s']:>17.2f}"
                f"  {row['gap']:.1e}",
                flush=True,
            )
    print(meter.summary())


if __name__ == "__main__":
    main()
