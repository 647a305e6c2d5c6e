"""MeZO objectives: callables ``(model, batch) -> (sum, count)``.

Returning a sum and a count, not a mean, lets micro-batches and data-parallel ranks be
combined exactly (token- or example-weighted) before the division. Sums are float64.

Batches follow transformers: ``input_ids``, ``attention_mask``, ``labels`` aligned with
``input_ids`` (-100 where no loss; the model's logit at position p predicts token p+1).
Candidate batches add ``example_id``, ``candidate_id`` and ``is_gold`` per row: one row
per candidate, an example's rows adjacent.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from sglang.srt.mezo.usage_errors import ConfigError

IGNORE_INDEX = -100
# log_softmax runs on row blocks of about this many logits. On a CPU, 4 MiB in float32: the
# block's output stays in cache for the gather (on one whole [tokens, vocab] tensor it writes
# and re-reads hundreds of MiB, ~2.8x slower at SmolLM2 16x128; the values are the same
# bits). On a GPU, 64 MiB: few enough launches, a bounded float32 temporary.
LOGPROB_BLOCK = 1 << 20
LOGPROB_BLOCK_GPU = 1 << 24


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., target] in fp32 at least (half-precision logits lose the
    O(eps) signal; float64 stays float64); targets < 0 give an arbitrary value to mask."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat, index = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1).clamp(min=0)
    block = LOGPROB_BLOCK if logits.device.type == "cpu" else LOGPROB_BLOCK_GPU
    rows = max(1, block // flat.shape[-1])
    picked = [
        torch.log_softmax(flat[i : i + rows].to(dtype), dim=-1).gather(-1, index[i : i + rows])
        for i in range(0, flat.shape[0], rows)
    ]
    return torch.cat(picked).view(targets.shape)


def positions(batch: dict) -> torch.Tensor:
    """Position ids from the attention mask, so left and right padding give the same RoPE."""
    mask = batch["attention_mask"]
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def right_aligned(batch: dict) -> dict:
    """The batch with each row's real tokens moved to the front (right padding).

    Left-padded query rows are fully masked, which some attention implementations turn
    into NaN (eager in float64, for one) that then leaks through the pad keys. With
    position ids taken from the mask, right alignment computes the same values.
    """
    mask = batch["attention_mask"]
    if not bool((mask[:, :1] == 0).any()):
        return batch
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
    aligned = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        aligned[key] = batch[key].gather(1, order)
    return aligned


def kept_logits(model: torch.nn.Module, batch: dict, keep: torch.Tensor, **options) -> torch.Tensor:
    """The plain model call's logits at positions `keep` only (`options`: extra keyword
    arguments of the call, e.g. peft's ``adapter_names``)."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=positions(batch),
        logits_to_keep=keep,
        use_cache=False,
        **options,
    ).logits


def row_logprobs(model: torch.nn.Module, batch: dict, forward: Optional[Callable] = None) -> tuple:
    """Per-row (sum of completion-token log-probs [B] float64, token count [B]).

    Logits are computed only at positions whose next token carries a label (the union
    over the batch), never over the whole sequence. `forward` replaces the plain model
    call (the KV-cache paths plug in here) and must return logits for `keep` positions.
    """
    batch = right_aligned(batch)
    labels = batch["labels"]
    target_mask = labels[:, 1:] != IGNORE_INDEX
    keep = target_mask.any(0).nonzero().squeeze(-1)  # logit positions p predicting p+1
    if keep.numel() == 0:
        zeros = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
        return zeros, torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
    logits = (forward or kept_logits)(model, batch, keep)
    targets = labels[:, keep + 1]
    valid = targets != IGNORE_INDEX
    picked = target_logprobs(logits, targets)
    sums = (picked.double() * valid).sum(-1)
    return sums, valid.sum(-1)


def example_groups(batch: dict) -> list:
    """Row index lists, one per example (an example's rows are adjacent; without
    ``example_id`` every row is its own example)."""
    rows = batch["input_ids"].shape[0]
    if "example_id" not in batch:
        return [[r] for r in range(rows)]
    ids, groups = batch["example_id"].tolist(), []
    for r in range(rows):
        if r and ids[r] == ids[r - 1]:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def candidate_scores(sums: torch.Tensor, counts: torch.Tensor, batch: dict) -> list:
    """[(scores of an example's candidates [C], index of the gold one)] per example.

    A candidate's score is the mean log-prob of its tokens (length-normalised).
    """
    scores = sums / counts.clamp(min=1)
    gold = batch["is_gold"].tolist()
    groups = []
    for rows in example_groups(batch):
        golds = [i for i, r in enumerate(rows) if gold[r]]
        if len(golds) != 1:
            raise ValueError(
                f"example {int(batch['example_id'][rows[0]])} has {len(golds)} gold candidates in the batch"
            )
        groups.append((scores[rows[0] : rows[-1] + 1], golds[0]))
    return groups


class RowObjective:
    """An objective computed from per-row completion log-likelihoods.

    Backends hand it ``reduce(sums, counts, batch)`` from whatever forward they run (the
    plain model, a KV-sharing path, an SGLang engine); calling it with ``(model, batch)``
    runs a plain transformers forward.
    """

    name = "rows"

    def reduce(self, sums: torch.Tensor, counts: torch.Tensor, batch: dict) -> tuple:
        raise NotImplementedError

    def __call__(self, model, batch):
        return self.reduce(*row_logprobs(model, batch), batch)


class CompletionNLL(RowObjective):
    """Mean negative log-likelihood of the completion tokens (token-weighted)."""

    name = "nll"

    def reduce(self, sums, counts, batch):
        return -sums.sum(), int(counts.sum())


class CandidateCrossEntropy(RowObjective):
    """Cross-entropy over candidates scored by length-normalised log-likelihood."""

    name = "candidate_ce"

    def reduce(self, sums, counts, batch):
        groups = candidate_scores(sums, counts, batch)
        loss = sum((torch.logsumexp(s, 0) - s[g] for s, g in groups), torch.zeros((), dtype=torch.float64))
        return loss, len(groups)


class NegativeAccuracy(RowObjective):
    """Minus the number of examples whose gold candidate scores highest (not differentiable)."""

    name = "accuracy"

    def reduce(self, sums, counts, batch):
        correct, examples = accuracy_counts(sums, counts, batch)
        return -float(correct), examples


def accuracy_counts(sums, counts, batch) -> tuple:
    """(examples whose gold candidate has the highest mean log-prob, examples)."""
    groups = candidate_scores(sums, counts, batch)
    return sum(int(torch.argmax(s)) == g for s, g in groups), len(groups)


def has_candidates(batch: dict) -> bool:
    return "example_id" in batch and "is_gold" in batch


CANDIDATE_OBJECTIVES = ("candidate_ce", "accuracy")


def check_objective_fits(name: str, candidates: bool, source: str) -> None:
    """Refuses an objective the data cannot serve: candidate objectives need candidates, and
    plain NLL on candidate rows would train every candidate, wrong ones included."""
    if name in CANDIDATE_OBJECTIVES and not candidates:
        raise ConfigError(
            f"--objective {name} scores candidates, and {source} has none (no candidates field): "
            "use --objective nll or auto, or add candidates to the data"
        )
    if name == "nll" and candidates:
        raise ConfigError(
            f"--objective nll on {source}, which holds candidates, would raise the likelihood of every candidate, "
            "wrong ones included: use --objective candidate_ce or auto"
        )


def make_objective(name: str, batch: dict) -> RowObjective:
    """The built-in objective called `name`; ``auto`` picks by whether the batch has candidates."""
    if name == "auto":
        name = "candidate_ce" if has_candidates(batch) else "nll"
    return {"nll": CompletionNLL, "candidate_ce": CandidateCrossEntropy, "accuracy": NegativeAccuracy}[name]()
