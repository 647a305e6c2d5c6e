"""The tokenization rule for MeZO examples, and chat rendering.

``{"prompt": str, "completion": str}``; optional ``"candidates": [str, ...]`` (the
completion must be one of them; in CSV, or wherever the column holds strings, a
JSON-encoded list); or ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered
with the tokenizer's chat template, with the loss on the last assistant turn only
(turns after it are dropped). Field names are configurable. A dataset holds either
only candidate examples or only plain ones (chat records are plain).

The prompt is tokenized alone (``P``) and joined with each completion (``J`` =
tokens of ``prompt + completion``, plain string concatenation, no separator added).
If ``J`` starts with ``P`` the completion's tokens are the rest of ``J``, so the row is
exactly the tokenization of the joined text; otherwise (a merge across the boundary,
e.g. a prompt ending in a space before a byte-level BPE word) the completion is
tokenized on its own and appended to ``P``. Special tokens are never added by the
tokenizer call itself: a BOS id is prepended when ``add_bos`` is true, which by
default (``add_bos=None``) means "when ``tokenizer("x").input_ids`` starts with BOS",
i.e. when the tokenizer normally adds it (and never twice: a chat template that
already renders the BOS keeps its own). An EOS id is appended to every completion
when ``add_eos=True`` (default False; a chat template's own EOS counts).
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import numpy as np


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS first when called normally (``tokenizer("x")``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_specials = tokenizer("x").input_ids
    plain = tokenizer("x", add_special_tokens=False).input_ids
    return bool(with_specials) and with_specials[0] == bos and plain[:1] != [bos]


def encode_example(tokenizer, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list:
    """[(prompt ids, [completion ids per candidate])] by the module's tokenization rule.

    No special tokens are added here (BOS/EOS are the dataset's business).
    """

    def ids(texts):
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    prompt_ids = ids(prompts)
    joined = ids([p + c for p, comps in zip(prompts, completions) for c in comps])
    out, k, fallback = [], 0, []
    for i, (p, comps) in enumerate(zip(prompt_ids, completions)):
        rows = []
        for c in comps:
            j = joined[k]
            k += 1
            if len(j) > len(p) and j[: len(p)] == p:
                rows.append(j[len(p) :])
            else:
                rows.append(None)
                fallback.append((i, len(rows) - 1, c))
        out.append((p, rows))
    for (i, r, _), c_ids in zip(fallback, ids([c for _, _, c in fallback])):
        out[i][1][r] = c_ids
    return out


def chat_split(tokenizer, messages: list) -> tuple:
    """(prompt text, completion text) of a conversation: loss on its last assistant turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages[: last + 1], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template does not render the conversation up to the last assistant turn as a "
            "prefix of the conversation including it; cannot separate the assistant's tokens"
        )
    return prompt, full[len(prompt) :]


class TokenStore:
    """Flat int32 token storage with offsets (a few bytes per token, picklable)."""

    def __init__(self):
        self.tokens = array.array("i")
        self.offsets = array.array("q", [0])

    def append(self, ids: Sequence[int]) -> None:
        self.tokens.extend(ids)
        self.offsets.append(len(self.tokens))

    def freeze(self) -> tuple:
        return np.frombuffer(self.tokens, dtype=np.int32).copy(), np.frombuffer(self.offsets, dtype=np.int64).copy()
