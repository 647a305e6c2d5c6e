"""Generation for the ``reward`` objective: its settings, its seeds, and the transformers path.

Common random numbers: every pass of one step samples with the same seeds (`sampling_seed`
of the step, `sampling.completion_seed` per prompt and sample) by the same rule on every
backend (`sampling`), so the perturbed passes draw the same random numbers and differ
only through the weights (with eps = 0 they generate identical text), which is what
keeps the two-point difference's variance low. Evaluation decodes greedily.

Completions are the generated text up to (not including) the first stop string or the
end-of-sequence token, as SGLang returns them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from sglang.srt.mezo.primitives import derived_seed
from sglang.srt.mezo.sampling import SeededGumbelSampling, completion_seed


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are generated (the config's generation fields)."""

    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    stop: tuple  # stop strings, not part of the completion
    num_samples: int  # completions per prompt
    seed: Optional[int] = None  # the sampling seed of this step's passes (None: greedy)

    @classmethod
    def from_config(cls, config) -> "GenerationSettings":
        return cls(
            config.max_new_tokens, config.temperature, config.top_p, tuple(config.stop or ()), config.num_samples
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.seed is None

    def completion_seeds(self, prompts: int) -> list:
        """The seed of each completion of `prompts` prompts, a prompt's samples adjacent."""
        return [completion_seed(self.seed, p, k) for p in range(prompts) for k in range(self.num_samples)]

    def at_step(self, run_seed: int, step: Optional[int]) -> "GenerationSettings":
        """These settings for the passes of `step` (its common sampling seed); `step` None:
        greedy, one completion per prompt (evaluation)."""
        if step is None:
            return replace(self, temperature=0.0, num_samples=1, seed=None)
        return replace(self, seed=sampling_seed(run_seed, step))


def sampling_seed(run_seed: int, step: int) -> int:
    """The seed every generating pass of `step` samples with (63 bits, apart from the
    directions' seeds by its own prefix)."""
    return derived_seed("mezo-sampling", int(run_seed), int(step))


def cut_at_stop(text: str, stop: tuple) -> str:
    """`text` up to the first occurrence of any stop string."""
    end = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:end]


def left_aligned(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int) -> tuple:
    """(input_ids, attention_mask) with each row's tokens moved to the end (left padding,
    which generation appends to)."""
    order = torch.argsort((attention_mask != 0).to(torch.int8), dim=1, stable=True)
    ids = input_ids.gather(1, order).masked_fill(attention_mask.gather(1, order) == 0, pad_token_id)
    return ids, attention_mask.gather(1, order)


def prompt_token_lists(batch: dict) -> list:
    """Each row's prompt tokens (the attention mask's ones), in order."""
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


def transformers_completions(
    model, tokenizer, batch: dict, settings: GenerationSettings, copies: Optional[int] = None, **generate_options
) -> list:
    """Completions of the batch's prompts, ``settings.num_samples`` per prompt (a prompt's
    samples adjacent), from `model.generate`: greedy, or sampled by `SeededGumbelSampling`.

    With `copies`, the rows are generated that many times in one call, one copy after
    another and each with the same sampling seeds (a step's population, which
    `generate_options` route to the copies' weights): then a list of completion lists,
    one per copy."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_aligned(batch["input_ids"], batch["attention_mask"], pad)
    ids, mask = ids.repeat_interleave(settings.num_samples, 0), mask.repeat_interleave(settings.num_samples, 0)
    rows, repeats = ids.shape[0], copies or 1
    ids, mask = ids.repeat(repeats, 1), mask.repeat(repeats, 1)
    config = GenerationConfig(
        do_sample=False,  # sampling is the logits processor's choice, made by the shared rule
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=list(settings.stop) or None,
    )
    processors = []
    if not settings.greedy:
        seeds = settings.completion_seeds(len(batch["input_ids"])) * repeats
        processors.append(SeededGumbelSampling(seeds, settings.temperature, settings.top_p, ids.shape[1]))
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=config,
        tokenizer=tokenizer,
        logits_processor=processors,
        **generate_options,
    )
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    texts = [cut_at_stop(text, settings.stop) for text in texts]
    return texts if copies is None else [texts[i * rows : (i + 1) * rows] for i in range(copies)]
