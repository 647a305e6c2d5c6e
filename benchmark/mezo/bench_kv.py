"""KV / hidden-state reuse on SmolLM2-135M: tokens computed, wall time and exactness, as ratios.

1. Candidate scoring (prompt-prefix sharing): 16 prompts x 4 candidates, 64-token prompts,
   1-3-token candidates. Prints tokens (off / on), wall time (off / on) of one unperturbed
   pass, and max |delta loss| between the two paths. Targets: >= 3x fewer tokens, >= 2x
   faster, max |delta loss| <= 1e-5.
2. Top-half-of-layers training (frozen-layer reuse, tied embedding frozen): step time with
   reuse / without, beside the theoretical fraction from the FLOP split (every position
   labelled, so logits everywhere); and the second epoch served from the cross-step store.
   Projected gradients compared with the full recompute against (|dL+| + |dL-|) / (2 eps).

    .venv/bin/python benchmark/mezo/bench_kv.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.objectives import row_logprobs
from sglang.srt.mezo.trainer import MeZOTrainer
from sglang.srt.mezo_trainer import load_model_and_tokenizer


def candidate_batch(vocab: int, prompts=16, candidates=4, prompt_len=64, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows, meta = [], []
    for e in range(prompts):
        prompt = torch.randint(100, vocab, (prompt_len,), generator=g).tolist()
        for c in range(candidates):
            cand = torch.randint(100, vocab, (1 + (c + e) % 3,), generator=g).tolist()
            rows.append((prompt + cand, [-100] * prompt_len + cand))
            meta.append((e, c, c == e % candidates, prompt_len))
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (tokens, lab) in enumerate(rows):
        ids[i, : len(tokens)], labels[i, : len(tokens)], mask[i, : len(tokens)] = (
            torch.tensor(tokens),
            torch.tensor(lab),
            1,
        )
    e, c, gold, plen = zip(*meta)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        example_id=torch.tensor(e),
        candidate_id=torch.tensor(c),
        is_gold=torch.tensor(gold),
        prompt_length=torch.tensor(plen),
    )


def lm_batch(vocab: int, batch=16, length=128, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, 0] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_prefix(model, repeats: int) -> None:
    batch = candidate_batch(model.config.vocab_size)
    shared = MeZOTrainer(model, MeZOConfig(learning_rate=0.0, disable_tqdm=True))
    store = shared.backend.row_forward.store
    on_times, off_times = [], []
    for _ in range(repeats):  # alternate the two sides so machine noise hits both
        store.clear()
        on_times.append(timed(lambda: shared.backend.row_logprobs(batch)))
        off_times.append(timed(lambda: row_logprobs(shared.model, batch)))
    store.clear()
    on, _ = shared.backend.row_logprobs(batch)
    stats = shared.cache_stats
    off, _ = row_logprobs(shared.model, batch)
    computed = stats["pass/prefix_sharing/tokens_computed"]
    total = computed + stats["pass/prefix_sharing/tokens_reused"]
    counts = (batch["labels"] != -100).sum(-1)
    delta = float(((on - off) / counts).abs().max())
    print("\n== candidate scoring: 16 prompts x 4 candidates, 64-token prompts, 1-3-token candidates")
    print(f"tokens computed     off/on = {total}/{computed} = {total / computed:.2f}x  (target >= 3x)")
    speed = statistics.median(off_times) / statistics.median(on_times)
    print(f"wall time (median)  off/on = {speed:.2f}x  (target >= 2x)")
    print(f"max |delta loss| per candidate (mean token NLL) = {delta:.2e}  (target <= 1e-5)")


def bench_frozen(model, repeats: int) -> None:
    """Two trainers on one model (lr = 0, so the weights never change): a trainer's hooks
    act only inside its own perturbation scope, so they do not disturb each other."""
    layers = model.config.num_hidden_layers
    top = "|".join(str(i) for i in range(layers // 2, layers))
    batch = lm_batch(model.config.vocab_size)
    common = dict(
        learning_rate=0.0,
        epsilon=1e-3,
        perturbation="rademacher",
        trainable_patterns=rf"\.layers\.({top})\.",
        disable_tqdm=True,
    )
    reuse = MeZOTrainer(model, MeZOConfig(**common, frozen_layer_reuse=True, frozen_store_mb=512))
    full = MeZOTrainer(model, MeZOConfig(**common, frozen_layer_reuse=False))
    print(f"\n== top half of the layers trainable ({layers // 2}..{layers - 1}), tied embedding frozen, 16x128")
    print(f"frozen-layer reuse starts at layer {reuse.backend.row_forward.frozen.k}")
    store = reuse.backend.row_forward.store
    t_full, t_first, t_second = [], [], []
    for _ in range(repeats):  # alternate the sides so machine noise hits all three
        t_full.append(timed(lambda: full.step(batch)))
        store.clear()
        t_first.append(timed(lambda: reuse.step(batch)))
        t_second.append(timed(lambda: reuse.step(batch)))  # the same batch again: from the store
    # FLOP split per token: decoder layers vs LM head (attention scores ignored at T = 128)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_layer = cfg.hidden_size * (2 * cfg.hidden_size + 2 * cfg.num_key_value_heads * head_dim)
    per_layer += 3 * cfg.hidden_size * cfg.intermediate_size
    body, head = layers * per_layer, cfg.vocab_size * cfg.hidden_size
    full_step = 2 * (body + head)
    theory_first = (body / 2 + 2 * (body / 2) + 2 * head) / full_step
    theory_second = (2 * (body / 2) + 2 * head) / full_step
    print(f"LM head share of a forward: {head / (body + head):.0%}")
    m_full = statistics.median(t_full)
    for label, times, theory in (("first epoch ", t_first, theory_first), ("second epoch", t_second, theory_second)):
        ratio = statistics.median(times) / m_full
        verdict = "yes" if ratio <= 1.05 * theory else "no"
        print(f"step time reuse/full, {label}: {ratio:.3f}  (theory {theory:.3f}; within 1.05x: {verdict})")
    reuse.global_step = full.global_step  # the same seed for both
    a, b = full.step(batch), reuse.step(batch)
    bound = (abs(a.loss_perturbed - b.loss_perturbed) + abs(a.loss_baseline - b.loss_baseline)) / (2 * 1e-3)
    diff = abs(a.coefficient - b.coefficient)
    print(f"projected grad: full {a.coefficient:.6g}, reuse {b.coefficient:.6g}; |diff| {diff:.2e} <= {bound:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("prefix", "frozen"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer("smollm2-135m")
    if args.only in (None, "prefix"):
        bench_prefix(model, args.repeats)
    if args.only in (None, "frozen"):
        bench_frozen(model, args.repeats)


if __name__ == "__main__":
    main()
