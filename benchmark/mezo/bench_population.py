"""A step's population in one batched call (LoRA slots) against its passes one by one.

SmolLM2-135M-Instruct, float32, LoRA r 8 on q_proj/v_proj (its B made non-zero, as after
training), fzoo with q directions (q + 1 passes a step). For each q, two sides step the
same batch, timed alternately (the order rotates each repeat) in one process after a
warm-up step each: the population (``population_batch="on"``: the step's perturbed adapters
as slots, one call) and the passes one by one. Printed: the ratio t_one_by_one /
t_population of the medians (above 1: the population is faster), of the fastest repeats
beside it, and the largest difference between the two sides' losses on the warm-up step
(the same weights: rounding only).

* ``--backend transformers``: peft mixed-adapter batches against passes that perturb the
  trained adapter in place (unit-scoped), two trainers on two copies of the model.
* ``--backend sglang``: one CPU engine, its LoRA pool holding the trained adapter and the
  slots (SGLang's multi-LoRA batches); the one-by-one side is the same backend with each
  point sent as its own pass (perturbed in the pool by the plugin), as without slots.

* ``teacher``: the completion NLL of 16 x 128 tokens, every position after the first labelled.
* ``generation``: the reward objective (``exact_match``, never met: no update, every step
  the same work) generating 32 new tokens greedily from 16 prompts of 64 random tokens.

    .venv/bin/python benchmark/mezo/bench_population.py                        # q = 2, 4, 8; ~18 min
    .venv/bin/python benchmark/mezo/bench_population.py --backend sglang       # ~25 min
    .venv/bin/python benchmark/mezo/bench_population.py --q 4 --repeats 2      # ~6 min
    .venv/bin/python benchmark/mezo/bench_population.py --form lowrank --q 1 --new-tokens 8 --repeats 2

``--form lowrank``: full-parameter, the ``lowrank`` estimator (rank 2) on every Linear weight
of the decoder layers, q directions (2q passes), its points as low-rank deltas of one call
against passes that write ``round(W + eps Z)`` unit by unit (`lowrank_population`).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

FORMS = {  # the trained tensors and the estimator of each one-call form
    "lora": dict(peft="lora", lora_rank=8, lora_alpha=16, lora_target_modules="q_proj,v_proj", estimator="fzoo"),
    "lowrank": dict(estimator="lowrank", lowrank_rank=2, trainable_patterns=r"layers\.\d+\..*_proj\.weight"),
}
PARTS = ("teacher", "generation")


def make_config(population: str, q: int, part: str, form: str = "lora", new_tokens: int = 32):
    from sglang.srt.mezo.config import MeZOConfig

    reward = dict(reward="exact_match", max_new_tokens=new_tokens, temperature=0.0) if part == "generation" else {}
    return MeZOConfig(
        num_directions=q, learning_rate=1e-5 if form == "lora" else 1e-7, epsilon=1e-3, population_batch=population,
        divergence_guard="off", disable_tqdm=True, **FORMS[form], **reward,
    )  # fmt: skip


def make_trainer(model, population: str, q: int, part: str, tokenizer, form: str = "lora", new_tokens: int = 32):
    from sglang.srt.mezo.trainer import MeZOTrainer

    config = make_config(population, q, part, form, new_tokens)
    trainer = MeZOTrainer(copy.deepcopy(model), config, tokenizer=tokenizer)
    if form == "lora":
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # B = 0 would make every perturbed adapter act like the base on its first pass
            for t in trainer.backend.tensors:
                t.param.copy_(torch.randn(t.param.shape, generator=generator) * 0.02)
    return trainer


class Engine:
    """One CPU engine serving SmolLM2 with room in its LoRA pool for the largest q's slots,
    and the adapter `make_trainer` starts from (saved once)."""

    def __init__(self, model, tokenizer, largest_q: int, root: Path):
        from sglang.srt.mezo.backends.engine_checkpoint import engine_checkpoint
        from sglang.srt.mezo.backends.engine_launch import generation_engine_args, launch_engine, lora_engine_args

        self.adapter_dir = root / "adapter"
        make_trainer(model, "off", 2, "teacher", tokenizer).model.save_pretrained(self.adapter_dir)
        self.model_dir = engine_checkpoint("smollm2-135m", "float32")
        widest = make_config("on", largest_q, "generation")
        self.engine = launch_engine(self.model_dir, **lora_engine_args(widest), **generation_engine_args(widest))

    def sides(self, q: int, part: str, tokenizer) -> dict:
        from sglang.srt.mezo.backends.sglang_backend import SGLangBackend
        from sglang.srt.mezo.trainer import MeZOTrainer

        config = make_config("on", q, part)
        backend = SGLangBackend(self.engine, config, self.model_dir, adapter_path=str(self.adapter_dir))
        one_by_one = copy.copy(backend)  # the same engine state; each point its own pass
        one_by_one.loss_sums = lambda objective, batch, points: [backend.loss_sum(objective, batch, *p) for p in points]
        return {
            "off": MeZOTrainer(None, config, tokenizer=tokenizer, backend=one_by_one),
            "on": MeZOTrainer(None, config, tokenizer=tokenizer, backend=backend),
        }


def make_batch(part: str, vocab: int) -> dict:
    if part == "teacher":
        batch = common.make_batch(vocab, 16, 128)
        batch["labels"][:, 0] = -100  # position 0 predicts nothing (the engine refuses a label there)
        return batch
    prompts = common.make_batch(vocab, 16, 64)
    return {
        "input_ids": prompts["input_ids"],
        "attention_mask": prompts["attention_mask"],
        "records": [{"answer": "never"}] * 16,
        "prompts": ["(random tokens)"] * 16,
    }


def measure(model, tokenizer, part: str, q: int, repeats: int, engine: Optional[Engine], form: str, new_tokens: int):
    batch = make_batch(part, model.config.vocab_size)
    if engine is None:
        sides = {name: make_trainer(model, name, q, part, tokenizer, form, new_tokens) for name in ("off", "on")}
    else:
        sides = engine.sides(q, part, tokenizer)
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
    parser.add_argument("--backend", default="transformers", choices=("transformers", "sglang"))
    parser.add_argument("--form", default="lora", choices=tuple(FORMS), help="LoRA slots, or full-parameter lowrank")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    args = parser.parse_args()
    if args.form == "lowrank" and args.backend != "transformers":
        parser.error("--form lowrank runs on the transformers backend (the engine draws dense z)")
    common.setup_threads()
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the vanishing-update check on a random adapter
    from sglang.srt.mezo_trainer import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    qs = [int(v) for v in args.q.split(",")]
    with tempfile.TemporaryDirectory(prefix="mezo-population-") as root:
        engine = Engine(model, tokenizer, max(qs), Path(root)) if args.backend == "sglang" else None
        try:
            meter = common.NeighbourMeter()
            print(f"backend {args.backend}, form {args.form}, {args.new_tokens} new tokens in generation")
            print("part        q  passes  one-by-one/population (median)  (best)  one-by-one step s  max |dL|")
            for part in common.parse_list(args.parts, PARTS):
                for q in qs:
                    row = measure(model, tokenizer, part, q, args.repeats, engine, args.form, args.new_tokens)
                    passes = q + 1 if args.form == "lora" else 2 * q
                    print(
                        f"{part:<10} {q:>2}  {passes:>6}  {row['median']:>31.2f}  {row['best']:>6.2f}"
                        f"  {row['off_s']:>17.2f}  {row['gap']:.1e}",
                        flush=True,
                    )
            print(meter.summary() + (" (the engine's own processes count as other processes)" if engine else ""))
        finally:
            if engine is not None:
                engine.engine.shutdown()


if __name__ == "__main__":
    main()
