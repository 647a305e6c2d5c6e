"""`MeZODataset`: validated, tokenized, truncated examples (rules in `sources` and `tokenization`).

Truncation
    Every row of an example has the same prompt tokens, then one completion (one row per
    candidate). The completion is always kept whole; the prompt is cut from the LEFT
    (the BOS stays first) so that the longest row fits in ``max_length``. When the
    longest completion (plus BOS) alone exceeds ``max_length`` the example is an error
    naming it (``overlong="error"``, default) or is skipped and counted in
    ``dataset.skipped`` (``overlong="skip"``).

Examples
    ``dataset[i]`` is ``{"example_id", "rows": [(input_ids, labels), ...], "gold",
    "prompt_length"}``; labels are aligned with ``input_ids`` (-100 on prompt tokens;
    the model shifts). ``example_id`` is the record's 0-based index in the source, so it
    stays meaningful when overlong records are skipped.
"""

from __future__ import annotations

import array
import json
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from sglang.srt.mezo.data.sources import diagnose_json, load_source, root_cause
from sglang.srt.mezo.data.tokenization import TokenStore, chat_split, encode_example, tokenizer_adds_bos
from sglang.srt.mezo.objectives import IGNORE_INDEX

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("error", "skip")
TOKENIZE_BATCH = 1000  # records tokenized per tokenizer call


class MeZODataset(Dataset):
    """Tokenized MeZO training/evaluation examples (see the module docstring for the rules).

    Args:
        source: a file path (.jsonl/.json/.csv/.parquet), a ``save_to_disk`` directory, a
            ``datasets.Dataset``, a ``DatasetDict`` (with ``split=``) or a list of dicts.
        tokenizer: the model's tokenizer (a transformers tokenizer).
        split: the split of a ``DatasetDict`` / saved DatasetDict directory.
        prompt_field, completion_field, candidates_field, messages_field: field names.
        max_length: the longest row, in tokens (prompt + completion, BOS/EOS included).
        overlong: ``"error"`` (default) or ``"skip"`` for an example whose completion alone
            does not fit; skipped examples are counted in ``skipped``.
        add_bos: prepend the tokenizer's BOS id; ``None`` = when the tokenizer adds it.
        add_eos: append the tokenizer's EOS id to every completion (not twice).
        json_field: the key holding the records of a JSON object file (default: auto-detect
            ``{"data": [...]}``).
        cache_dir: the ``datasets`` cache for files (default: the HF datasets cache).
        prompt_only: prompts to generate from (the ``reward`` objective): a record needs
            only ``prompt`` (or ``messages`` ending in a user turn, rendered with the
            generation prompt); every field of the record is kept for the reward
            (``dataset[i]["record"]``).
    """

    def __init__(
        self,
        source,
        tokenizer,
        *,
        split: str | None = None,
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        candidates_field: str = "candidates",
        messages_field: str = "messages",
        max_length: int = 256,
        overlong: str = "error",
        add_bos: bool | None = None,
        add_eos: bool = False,
        json_field: str | None = None,
        cache_dir: str | None = None,
        prompt_only: bool = False,
    ):
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={overlong!r}: expected one of {OVERLONG_POLICIES}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r}: must be an int >= 2")
        self.max_length = max_length
        self.overlong = overlong
        self.prompt_only = bool(prompt_only)
        self._records: list = []  # prompt_only: every field of each kept record
        self._prompt_texts: list = []  # prompt_only: each kept record's prompt as the model reads it
        self.prompt_field, self.completion_field = prompt_field, completion_field
        self.candidates_field, self.messages_field = candidates_field, messages_field
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.add_bos = tokenizer_adds_bos(tokenizer) if add_bos is None else bool(add_bos)
        self.add_eos = bool(add_eos)
        if self.add_bos and self.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
        if self.add_eos and self.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)

        fields = (prompt_field, completion_field, candidates_field, messages_field)
        table, self.source = load_source(source, split=split, cache_dir=cache_dir, json_field=json_field, fields=fields)
        self.source_name = self.source.name
        self._build(table, tokenizer, TOKENIZE_BATCH)

    # -- construction ---------------------------------------------------------------------
    def _chunks(self, table, chunk: int) -> Iterator[list]:
        """The source's records as lists of dicts, ``chunk`` at a time (Arrow batches stay mapped)."""
        self._columns: list = []  # the table's columns (records of a list carry their own keys)
        if isinstance(table, list):
            for s in range(0, len(table), chunk):
                yield table[s : s + chunk]
            return
        wanted = (self.prompt_field, self.completion_field, self.candidates_field, self.messages_field)
        self._columns = list(table.column_names)
        selected = list(self._columns) if self.prompt_only else [c for c in wanted if c in self._columns]
        if not selected:  # none of our fields: the first record reports what is missing
            yield [{}]
            return
        table = table.with_format(None).select_columns(selected)
        batches = table.iter(batch_size=chunk)
        while True:
            try:
                columns = next(batches)
            except StopIteration:
                return
            except Exception as e:  # e.g. invalid UTF-8 that Arrow stored and only decoding finds
                src = self.source
                if src.path is not None and src.kind in ("jsonl", "json-array", "json-data"):
                    raise diagnose_json(src.path, src.kind, e) from e
                raise src.error(None, f"cannot decode the records: {root_cause(e)}") from e
            n = len(next(iter(columns.values())))
            yield [{k: v[j] for k, v in columns.items()} for j in range(n)]

    def _build(self, table, tokenizer, chunk: int) -> None:
        src = self.source
        if len(table) == 0:
            raise src.error(None, "empty dataset (no examples)")
        prompts, completions, golds = TokenStore(), TokenStore(), array.array("i")
        rows_per_example, example_ids = array.array("q", [0]), array.array("q")
        self.skipped = 0
        self.kind: str | None = None  # "candidates" | "plain" | "prompts", fixed by the first record
        first_index = None
        start = 0
        for records in self._chunks(table, chunk):
            n = len(records)
            texts = []
            for j, record in enumerate(records):
                index = start + j
                prompt, comps, gold, kind = self._parse(record, index, tokenizer)
                if self.kind is None:
                    self.kind, first_index = kind, index
                elif kind != self.kind:
                    raise src.error(
                        index,
                        f"field {self.candidates_field!r} is {'present' if kind == 'candidates' else 'missing'}, "
                        f"but the first example ({src.where(first_index)}) is a "
                        f"{'candidate' if self.kind == 'candidates' else 'plain'} example: a dataset must hold "
                        "only candidate examples or only plain ones",
                    )
                texts.append((index, prompt, comps, gold))
            encoded = encode_example(tokenizer, [t[1] for t in texts], [t[2] for t in texts])
            for (index, prompt_text, _, gold), (p, comps), record in zip(texts, encoded, records):
                fitted = self._fit(index, p, comps)
                if fitted is None:
                    continue
                p, comps = fitted
                if self.prompt_only:
                    self._records.append(dict(record))
                    self._prompt_texts.append(prompt_text)
                prompts.append(p)
                for c in comps:
                    completions.append(c)
                rows_per_example.append(rows_per_example[-1] + len(comps))
                golds.append(-1 if gold is None else gold)
                example_ids.append(index)
            start += n
        if len(example_ids) == 0:
            raise src.error(None, f"empty dataset: all {self.skipped} examples exceed max_length={self.max_length}")
        if self.skipped:
            logger.warning(
                "%s: skipped %d of %d examples whose completion exceeds max_length=%d",
                src.name,
                self.skipped,
                start,
                self.max_length,
            )
        self._prompt_tokens, self._prompt_offsets = prompts.freeze()
        self._completion_tokens, self._completion_offsets = completions.freeze()
        self._row_offsets = np.frombuffer(rows_per_example, dtype=np.int64).copy()
        self._gold = np.frombuffer(golds, dtype=np.int32).copy()
        self._example_ids = np.frombuffer(example_ids, dtype=np.int64).copy()
        completion_lengths = np.diff(self._completion_offsets)
        if self.prompt_only:  # no completions: a row is its prompt
            longest = np.zeros(len(self._example_ids), dtype=np.int64)
        else:
            longest = np.maximum.reduceat(completion_lengths, self._row_offsets[:-1])
        #: the longest row of each example, in tokens (for length-grouped batching)
        self.lengths = np.diff(self._prompt_offsets) + longest

    def _parse(self, record: dict, index: int, tokenizer) -> tuple:
        """(prompt text, [completion texts], gold index | None, kind) of one validated record."""
        src = self.source
        messages = record.get(self.messages_field)
        if self.prompt_only:
            return self._prompt(record, messages, index, tokenizer), [], None, "prompts"
        if messages is not None:
            messages = self._messages(messages, index)
            if getattr(tokenizer, "chat_template", None) is None:
                raise src.error(index, f"field {self.messages_field!r}: the tokenizer has no chat template")
            try:
                prompt, completion = chat_split(tokenizer, messages)
            except Exception as e:
                raise src.error(index, f"field {self.messages_field!r}: {e}") from e
            return prompt, [completion], None, "plain"
        prompt = self._string(record, self.prompt_field, index, allow_empty=True)
        completion = self._string(record, self.completion_field, index)
        candidates = record.get(self.candidates_field)
        if candidates is None:
            return prompt, [completion], None, "plain"
        candidates = self._candidates(candidates, index)
        if completion not in candidates:
            raise src.error(
                index, f"field {self.completion_field!r}: {completion!r} is not one of the candidates {candidates!r}"
            )
        return prompt, candidates, candidates.index(completion), "candidates"

    def _prompt(self, record: dict, messages, index: int, tokenizer) -> str:
        """The prompt text of a prompt-only record: its chat rendered up to the generation
        prompt, or its prompt field."""
        if messages is None:
            return self._string(record, self.prompt_field, index)
        messages = self._messages(messages, index, assistant_last=False)
        if getattr(tokenizer, "chat_template", None) is None:
            raise self.source.error(index, f"field {self.messages_field!r}: the tokenizer has no chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _string(self, record: dict, field: str, index: int, allow_empty: bool = False) -> str:
        value = record.get(field)
        if value is None:
            present = sorted({k for k, v in record.items() if v is not None} | (set(self._columns) - set(record)))
            hint = ""
            ours = (self.prompt_field, self.completion_field, self.candidates_field, self.messages_field)
            if self.source.kind == "jsonl" and len(present) == 1 and present[0] not in ours:
                hint = "; if the file is one JSON object, its records must be under 'data' (or pass json_field=)"
            raise self.source.error(index, f"missing field {field!r} (fields present: {present}){hint}")
        if not isinstance(value, str):
            raise self.source.error(index, f"field {field!r} must be a string, got {type(value).__name__} {value!r}")
        if not value and not allow_empty:
            raise self.source.error(index, f"field {field!r} is empty")
        return value

    def _decode_json_list(self, value, field: str, index: int):
        if isinstance(value, str):  # CSV and other string columns hold JSON-encoded lists
            try:
                return json.loads(value)
            except json.JSONDecodeError as e:
                raise self.source.error(index, f"field {field!r} is not valid JSON ({e.msg}): {value!r}") from e
        return value

    def _candidates(self, value, index: int) -> list:
        field = self.candidates_field
        value = self._decode_json_list(value, field, index)
        if not isinstance(value, (list, tuple)) or not value:
            raise self.source.error(index, f"field {field!r} must be a non-empty list of strings, got {value!r}")
        for k, c in enumerate(value):
            if not isinstance(c, str) or not c:
                raise self.source.error(index, f"field {field!r}: candidate {k} must be a non-empty string, got {c!r}")
        if len(set(value)) != len(value):
            raise self.source.error(index, f"field {field!r} has duplicate candidates: {list(value)!r}")
        return list(value)

    def _messages(self, value, index: int, assistant_last: bool = True) -> list:
        field = self.messages_field
        value = self._decode_json_list(value, field, index)
        if not isinstance(value, (list, tuple)) or not value:
            raise self.source.error(index, f"field {field!r} must be a non-empty list of messages, got {value!r}")
        messages = []
        for k, m in enumerate(value):
            if not isinstance(m, dict):
                raise self.source.error(index, f"field {field!r}: message {k} must be an object, got {m!r}")
            m = {key: v for key, v in m.items() if v is not None}  # Arrow fills absent keys with None
            for key in ("role", "content"):
                if not isinstance(m.get(key), str):
                    raise self.source.error(index, f"field {field!r}: message {k} needs a string {key!r}, got {m!r}")
            messages.append(m)
        if assistant_last and not any(m["role"] == "assistant" for m in messages):
            raise self.source.error(index, f"field {field!r}: no assistant message to train on")
        if not assistant_last and messages[-1]["role"] == "assistant":
            raise self.source.error(
                index, f"field {field!r}: a prompt to generate from ends with the assistant's turn; drop that turn"
            )
        return messages

    def _fit(self, index: int, prompt: list, completions: list) -> tuple | None:
        """BOS/EOS and left truncation of the prompt; None when skipped as overlong."""
        if self.prompt_only:  # the prompt alone must fit; cut from the left, a BOS kept first
            has_bos = self.bos_token_id is not None and prompt[:1] == [self.bos_token_id]
            if self.add_bos and not has_bos:
                prompt, has_bos = [self.bos_token_id] + prompt, True
            if len(prompt) > self.max_length:
                head = prompt[:1] if has_bos else []
                prompt = head + prompt[len(prompt) - self.max_length + len(head) :]
            return prompt, completions
        if self.add_eos:
            completions = [c if c[-1:] == [self.eos_token_id] else c + [self.eos_token_id] for c in completions]
        if not all(completions):
            raise self.source.error(index, f"field {self.completion_field!r}: the completion tokenizes to no tokens")
        bos_id = self.bos_token_id
        if bos_id is not None and prompt[:1] == [bos_id]:
            bos, prompt = prompt[:1], prompt[1:]  # a BOS rendered by a chat template stays first
        else:
            bos = [bos_id] if self.add_bos else []
        longest = max(len(c) for c in completions)
        room = self.max_length - len(bos) - longest
        if room < 0:
            if self.overlong == "skip":
                self.skipped += 1
                return None
            raise self.source.error(
                index,
                f"field {self.completion_field!r}: completion of {longest} tokens{' + BOS' if bos else ''} "
                f"exceeds max_length={self.max_length}; raise max_length or pass overlong='skip'",
            )
        if len(prompt) > room:
            prompt = prompt[len(prompt) - room :]
        return bos + prompt, completions

    # -- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._example_ids)

    @property
    def has_candidates(self) -> bool:
        return self.kind == "candidates"

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for a dataset of {n}")
        i = int(i) % n
        prompt = self._prompt_tokens[self._prompt_offsets[i] : self._prompt_offsets[i + 1]].tolist()
        rows = []
        for r in range(self._row_offsets[i], self._row_offsets[i + 1]):
            c = self._completion_tokens[self._completion_offsets[r] : self._completion_offsets[r + 1]].tolist()
            rows.append((prompt + c, [IGNORE_INDEX] * len(prompt) + c))
        gold = int(self._gold[i])
        if self.prompt_only:
            return {
                "example_id": int(self._example_ids[i]),
                "rows": [(prompt, [IGNORE_INDEX] * len(prompt))],
                "gold": None,
                "prompt_length": len(prompt),
                "record": self._records[i],
                "prompt_text": self._prompt_texts[i],
            }
        return {
            "example_id": int(self._example_ids[i]),
            "rows": rows,
            "gold": None if gold < 0 else gold,
            "prompt_length": len(prompt),
        }

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return (
            f"MeZODataset({self.source_name!r}, examples={len(self)}, kind={self.kind}, "
            f"skipped={self.skipped}, max_length={self.max_length})"
        )


class ExampleSubset(Subset):
    """Some examples of a `MeZODataset`, usable wherever it is (lengths, pad id, kind kept)."""

    @property
    def lengths(self):
        return self.dataset.lengths[np.asarray(self.indices, dtype=np.int64)]

    @property
    def pad_token_id(self) -> int:
        return self.dataset.pad_token_id

    @property
    def has_candidates(self) -> bool:
        return self.dataset.has_candidates


def hold_back(dataset: MeZODataset, count: int, seed: int) -> tuple:
    """(the rest, `count` examples drawn by `seed`) of `dataset`, as `ExampleSubset`s."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return ExampleSubset(dataset, sorted(order[count:])), ExampleSubset(dataset, sorted(order[:count]))
