"""Seeded sampling that both backends share: the Gumbel-max trick with counter-based noise.

A completion's token at position t (0-based among its new tokens) is
``argmax(logits / T + g)`` over the top-p nucleus, with g a Gumbel draw per vocabulary entry
computed from (the completion's seed, t) alone: SplitMix64 (`kernels.reference.mix`, the
hash z is drawn with) of the key ``mix(seed, t)`` at each token id, the top 53 bits a
uniform u in (0, 1), ``g = -log(-log u)``, in float64. That argmax is an exact draw from
softmax(logits / T) restricted to the nucleus, and it depends on nothing else: not on
the batch a request shares, its padding, the order requests finish, nor any RNG state.

So the passes of one step (same seeds) draw the same numbers and differ only through
their logits: with eps = 0 they generate identical text (common random numbers), and
the SGLang engine and transformers, given equal logits, sample equal tokens. Each backend
applies it as a logits processor that leaves only the chosen token (score 0, the rest
-inf) and then decodes greedily: `SeededGumbelSampling` (transformers' ``generate``) and
`backends.engine_sampling.EngineSeededSampling` (SGLang's custom logit processor).
"""

from __future__ import annotations

import torch

from sglang.srt.mezo.kernels.reference import mix
from sglang.srt.mezo.primitives import derived_seed

UNIT_53 = 2.0**-53


def completion_seed(step_seed: int, prompt: int, sample: int) -> int:
    """The seed of sample `sample` of the batch's prompt `prompt` in a step (63 bits)."""
    return derived_seed("mezo-completion", step_seed, prompt, sample)


def gumbel_noise(seed: int, position: int, vocab: int, device) -> torch.Tensor:
    """g [vocab] float64 for token position `position` of the completion seeded `seed`."""
    key = int(mix(seed, torch.tensor([position], dtype=torch.int64)))
    bits = mix(key, torch.arange(vocab, dtype=torch.int64, device=device))
    u = (((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) + 0.5) * UNIT_53
    return -torch.log(-torch.log(u))


def nucleus_mask(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """True on the smallest set of top tokens whose probability reaches `top_p` (rows of
    float64 scores; the most likely token always kept)."""
    if top_p >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    probs, order = torch.softmax(scores, dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    keep_sorted = before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def gumbel_choice(logits: torch.Tensor, seeds: list, positions: list, temperature: float, top_p: float) -> list:
    """The sampled token of each row of `logits` [R, V] (see the module docstring)."""
    scores = logits.to(torch.float64) / temperature
    scores = scores.masked_fill(~nucleus_mask(scores, top_p), -torch.inf)
    vocab, device = logits.shape[-1], logits.device
    noise = torch.stack([gumbel_noise(s, p, vocab, device) for s, p in zip(seeds, positions)])
    return (scores + noise).argmax(-1).tolist()


def only(choices: list, like: torch.Tensor) -> torch.Tensor:
    """Scores shaped like `like` that make greedy decoding pick `choices`: 0 there, -inf elsewhere."""
    out = torch.full_like(like, -torch.inf)
    out[torch.arange(len(choices)), torch.tensor(choices)] = 0.0
    return out


class SeededGumbelSampling:
    """A transformers logits processor: each row's next token by `gumbel_choice` with its own
    seed, at its position counted from the prompt's end (rows padded to `prompt_length`)."""

    def __init__(self, seeds: list, temperature: float, top_p: float, prompt_length: int):
        self.seeds, self.temperature, self.top_p, self.prompt_length = seeds, temperature, top_p, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_length
        choices = gumbel_choice(scores, self.seeds, [position] * len(self.seeds), self.temperature, self.top_p)
        return only(choices, scores)
