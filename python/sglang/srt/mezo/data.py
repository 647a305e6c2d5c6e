"""The MeZO data path: `MeZODataset`, `MeZOCollator`, `MeZOSampler` and `create_dataloader`.

Sources
    A path to a JSONL, JSON (an array of records, or ``{"data": [...]}``), CSV or Parquet
    file, or to a dataset directory written by ``save_to_disk``; a ``datasets.Dataset``; a
    ``DatasetDict`` (``split=`` picks one); or a list of dicts. Files are read with the
    ``datasets`` library into Arrow tables that are memory-mapped from its cache; the
    records are then validated and tokenized in batches, and only the token ids are kept
    (flat int32 arrays). JSON *arrays* have no streaming parser in ``datasets`` and are
    parsed whole: prefer JSONL for big data.

Records
    ``{"prompt": str, "completion": str}``; optional ``"candidates": [str, ...]`` (the
    completion must be one of them; in CSV, or wherever the column holds strings, a
    JSON-encoded list); or ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered
    with the tokenizer's chat template, with the loss on the last assistant turn only
    (turns after it are dropped). Field names are configurable. A dataset holds either
    only candidate examples or only plain ones (chat records are plain).

Tokenization rule
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

Truncation
    Every row of an example has the same prompt tokens, then one completion (one row per
    candidate). The completion is always kept whole; the prompt is cut from the LEFT
    (the BOS stays first) so that the longest row fits in ``max_length``. When the
    longest completion (plus BOS) alone exceeds ``max_length`` the example is an error
    naming it (``overlong="error"``, default) or is skipped and counted in
    ``dataset.skipped`` (``overlong="skip"``).

Examples and batches
    ``dataset[i]`` is ``{"example_id", "rows": [(input_ids, labels), ...], "gold",
    "prompt_length"}``; labels are aligned with ``input_ids`` (-100 on prompt tokens;
    the model shifts). ``example_id`` is the record's 0-based index in the source, so it
    stays meaningful when overlong records are skipped. `MeZOCollator` pads dynamically
    to the longest row of the batch (right or left) and, for candidate examples, emits
    one row per candidate (an example's rows adjacent) with ``example_id``,
    ``candidate_id``, ``is_gold`` and ``prompt_length``.

Sampling policy (`create_dataloader`)
    ``batch_size`` counts examples per rank, so candidate groups are never split across
    batches or ranks; the global batch of a data-parallel step is ``batch_size x
    world_size`` examples. Sharding is torch's `DistributedSampler` (also with one
    process, where it is simply a seeded shuffler): epoch ``e`` is a permutation seeded
    with ``seed + e`` (``sampler.set_epoch(e)``), and rank ``r`` takes positions
    ``r, r + W, r + 2W, ...``. When the size ``n`` divides by ``W`` the shards are
    disjoint and cover the dataset. Otherwise, by default, the first ``ceil(n/W)*W - n``
    examples of the epoch's order are repeated at the end (every rank gets
    ``ceil(n/W)`` examples, up to ``W - 1`` examples are seen twice per epoch, never twice
    on one rank); with ``drop_last=True`` the last ``n mod W`` examples of the epoch's
    order are dropped (every rank gets ``floor(n/W)``). Either way every rank gets the
    same number of examples and therefore of batches, which the per-step all-reduce of
    data-parallel MeZO requires.
"""

from __future__ import annotations

import array
import csv
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sglang.srt.mezo.objectives import IGNORE_INDEX

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
OVERLONG_POLICIES = ("error", "skip")
PAD_SIDES = ("right", "left")

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "MeZOCollator",
    "MeZODataset",
    "MeZOSampler",
    "create_dataloader",
    "encode_example",
    "load_source",
    "tokenizer_adds_bos",
]


class DataError(ValueError):
    """Bad training data; the message names the source, the line/row and the field."""


# ----------------------------------------------------------------------------- sources
class _Source:
    """Where records come from, and how to name record ``i`` of it in an error message."""

    def __init__(self, name: str, kind: str, path: str | None = None):
        self.name = name  # the file / directory path, or a description of an in-memory source
        self.kind = kind  # jsonl | json-array | json-data | csv | rows
        self.path = path

    def where(self, index: int) -> str:
        """``line k`` (1-based, JSONL/CSV), ``record k`` / ``data[k]`` (JSON), else ``row k`` (0-based)."""
        if self.kind == "jsonl":
            line = _jsonl_line_of_record(self.path, index)
            return f"line {line}" if line is not None else f"record {index}"
        if self.kind == "csv":
            line = _csv_line_of_row(self.path, index)
            return f"line {line}" if line is not None else f"row {index + 1}"
        if self.kind == "json-array":
            return f"record {index}"
        if self.kind == "json-data":
            return f"data[{index}]"
        return f"row {index}"

    def error(self, index: int | None, message: str) -> DataError:
        place = "" if index is None else f" {self.where(index)}:"
        return DataError(f"{self.name}:{place} {message}")


def _jsonl_line_of_record(path: str, index: int) -> int | None:
    """1-based line number of the ``index``-th record of a JSONL file (blank lines skipped)."""
    seen = -1
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == index:
                    return lineno
    return None


def _csv_line_of_row(path: str, index: int) -> int | None:
    """1-based line on which data row ``index`` (0-based, header excluded) starts."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        end = 0
        row = -2  # the header is row -1
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields:  # blank lines are skipped by the loader too
                continue
            row += 1
            if row == index:
                return start
    return None


def _diagnose_json(path: str, kind: str, cause: BaseException) -> DataError:
    """The precise error for a JSON/JSONL file that `datasets` failed to load."""
    name = path
    if kind == "jsonl":
        records = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    return DataError(f"{name}: line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})")
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    return DataError(f"{name}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})")
                if not isinstance(record, dict):
                    return DataError(f"{name}: line {lineno}: expected a JSON object, got {type(record).__name__}")
                records += 1
        if records == 0:
            return DataError(f"{name}: empty dataset (no examples, only blank lines)")
    else:
        try:
            with open(path, encoding="utf-8-sig") as f:
                document = json.load(f)
        except UnicodeDecodeError as e:
            return DataError(f"{name}: not valid UTF-8 ({e.reason} at byte {e.start})")
        except json.JSONDecodeError as e:
            return DataError(f"{name}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})")
        records = document.get("data") if isinstance(document, dict) else document
        if not isinstance(records, list):
            return DataError(f"{name}: expected a JSON array of records or an object with a 'data' array")
        if not records:
            return DataError(f"{name}: empty dataset (no examples)")
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                return DataError(f"{name}: record {i}: expected a JSON object, got {type(record).__name__}")
    return DataError(f"{name}: cannot be loaded: {_root_cause(cause)}")


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _json_kind(path: str, json_field: str | None) -> tuple:
    """('jsonl' | 'json-array' | 'json-data', field) from the extension and the first bytes."""
    if json_field is not None:
        return "json-data", json_field
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        return "json-array", None
    if re.match(rb'\{\s*"data"\s*:\s*\[', head):
        return "json-data", "data"
    return "jsonl", None


def load_source(source, *, split: str | None = None, cache_dir: str | None = None, json_field=None, fields=()):
    """(a ``datasets.Dataset``, a `_Source` naming it) for any supported source."""
    import datasets

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        return _load_path(source, split=split, cache_dir=cache_dir, json_field=json_field, fields=fields)
    if isinstance(source, datasets.DatasetDict):
        if split is None:
            raise DataError(f"a DatasetDict needs split= (one of {sorted(source)})")
        if split not in source:
            raise DataError(f"DatasetDict has no split {split!r} (splits: {sorted(source)})")
        return source[split], _Source(f"<DatasetDict split {split!r}>", "rows")
    if isinstance(source, datasets.Dataset):
        return source, _Source("<datasets.Dataset>", "rows")
    if isinstance(source, (list, tuple)):
        # Iterated as is (no Arrow conversion, which would coerce or reject mixed types).
        for i, record in enumerate(source):
            if not isinstance(record, dict):
                raise DataError(f"<list of records>: row {i}: expected a dict, got {type(record).__name__}")
        return list(source), _Source("<list of records>", "rows")
    raise TypeError(
        "MeZODataset source must be a path, a datasets.Dataset, a DatasetDict or a list of dicts, "
        f"not {type(source).__name__}"
    )


def _load_path(path: str, *, split, cache_dir, json_field, fields):
    import datasets

    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(f"{path}: not a dataset directory written by save_to_disk ({_root_cause(e)})") from e
        if isinstance(loaded, datasets.DatasetDict):
            if split is None or split not in loaded:
                raise DataError(f"{path}: a saved DatasetDict needs split= one of {sorted(loaded)} (got {split!r})")
            return loaded[split], _Source(f"{path} [split {split!r}]", "rows")
        return loaded, _Source(path, "rows")
    extension = os.path.splitext(path)[1].lower()
    if extension not in FILE_FORMATS:
        raise DataError(
            f"{path}: unknown extension {extension or '(none)'!r}; expected one of {sorted(FILE_FORMATS)} "
            "or a save_to_disk directory"
        )
    if split not in (None, "train"):
        raise DataError(f"{path}: split={split!r} applies to DatasetDicts only; a file holds one split")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: file is not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file (no examples)")
    builder, options = FILE_FORMATS[extension], {}
    kind = {"csv": "csv", "parquet": "rows"}.get(builder)
    if builder == "json":
        kind, field = _json_kind(path, json_field)
        if field is not None:
            options["field"] = field
    elif builder == "csv":
        # Everything a string, nothing turned into NaN: a completion "NA" or "1" stays text.
        options.update(converters={f: str for f in fields}, keep_default_na=False, na_filter=False)
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir, **options)
    except Exception as e:
        if builder == "json":
            raise _diagnose_json(path, kind, e) from e
        if isinstance(e, StopIteration) or "corresponds to no data" in str(e):
            raise DataError(f"{path}: empty dataset (no examples)") from e
        raise DataError(f"{path}: cannot be read as {builder.upper()}: {_root_cause(e)}") from e
    return dataset, _Source(path, kind, path)


# ----------------------------------------------------------------------------- tokenization
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


def _chat_split(tokenizer, messages: list) -> tuple:
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


class _Tokens:
    """Flat int32 token storage with offsets (a few bytes per token, picklable)."""

    def __init__(self):
        self.tokens = array.array("i")
        self.offsets = array.array("q", [0])

    def append(self, ids: Sequence[int]) -> None:
        self.tokens.extend(ids)
        self.offsets.append(len(self.tokens))

    def freeze(self) -> tuple:
        return np.frombuffer(self.tokens, dtype=np.int32).copy(), np.frombuffer(self.offsets, dtype=np.int64).copy()


# ----------------------------------------------------------------------------- dataset
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
        tokenize_batch_size: int = 1000,
    ):
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={overlong!r}: expected one of {OVERLONG_POLICIES}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r}: must be an int >= 2")
        self.max_length = max_length
        self.overlong = overlong
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
        self._build(table, tokenizer, tokenize_batch_size)

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
        selected = [c for c in wanted if c in self._columns]
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
                    raise _diagnose_json(src.path, src.kind, e) from e
                raise src.error(None, f"cannot decode the records: {_root_cause(e)}") from e
            n = len(next(iter(columns.values())))
            yield [{k: v[j] for k, v in columns.items()} for j in range(n)]

    def _build(self, table, tokenizer, chunk: int) -> None:
        src = self.source
        if len(table) == 0:
            raise src.error(None, "empty dataset (no examples)")
        prompts, completions, golds = _Tokens(), _Tokens(), array.array("i")
        rows_per_example, example_ids = array.array("q", [0]), array.array("q")
        self.skipped = 0
        self.kind: str | None = None  # "candidates" | "plain", fixed by the first record
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
            for (index, _, _, gold), (p, comps) in zip(texts, encoded):
                fitted = self._fit(index, p, comps)
                if fitted is None:
                    continue
                p, comps = fitted
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
        longest = np.maximum.reduceat(completion_lengths, self._row_offsets[:-1])
        #: the longest row of each example, in tokens (for length-grouped batching)
        self.lengths = np.diff(self._prompt_offsets) + longest

    def _parse(self, record: dict, index: int, tokenizer) -> tuple:
        """(prompt text, [completion texts], gold index | None, kind) of one validated record."""
        src = self.source
        messages = record.get(self.messages_field)
        if messages is not None:
            messages = self._messages(messages, index)
            if getattr(tokenizer, "chat_template", None) is None:
                raise src.error(index, f"field {self.messages_field!r}: the tokenizer has no chat template")
            try:
                prompt, completion = _chat_split(tokenizer, messages)
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

    def _messages(self, value, index: int) -> list:
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
        if not any(m["role"] == "assistant" for m in messages):
            raise self.source.error(index, f"field {field!r}: no assistant message to train on")
        return messages

    def _fit(self, index: int, prompt: list, completions: list) -> tuple | None:
        """BOS/EOS and left truncation of the prompt; None when skipped as overlong."""
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


# ----------------------------------------------------------------------------- batching
class MeZOCollator:
    """Pads a list of examples into one batch of rows (one row per candidate).

    Output: ``input_ids``, ``attention_mask``, ``labels`` ([R, L] long; labels -100 on
    prompt and padding), padded to the longest row (rounded up to ``pad_to_multiple_of``)
    on ``pad_side``; for candidate examples also ``example_id``, ``candidate_id``,
    ``prompt_length`` ([R] long) and ``is_gold`` ([R] bool), an example's rows adjacent.
    """

    def __init__(self, pad_token_id: int, pad_side: str = "right", pad_to_multiple_of: int | None = None):
        if pad_side not in PAD_SIDES:
            raise ValueError(f"pad_side={pad_side!r}: expected one of {PAD_SIDES}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is required")
        self.pad_token_id = int(pad_token_id)
        self.pad_side = pad_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        kinds = {ex["gold"] is not None for ex in examples}
        if len(kinds) > 1:
            raise ValueError(
                "batch mixes candidate and plain examples (example ids "
                f"{[ex['example_id'] for ex in examples]}); a dataset must be all one kind"
            )
        candidates = kinds.pop()
        ids = [ex["example_id"] for ex in examples]
        if candidates and len(set(ids)) != len(ids):
            raise ValueError(f"example ids repeat within one batch ({ids}): candidate groups would merge")
        rows = [(ex, c, row) for ex in examples for c, row in enumerate(ex["rows"])]
        length = max(len(row[0]) for _, _, row in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for r, (_, _, (tokens, row_labels)) in enumerate(rows):
            n = len(tokens)
            span = slice(0, n) if self.pad_side == "right" else slice(length - n, length)
            input_ids[r, span] = torch.tensor(tokens, dtype=torch.long)
            labels[r, span] = torch.tensor(row_labels, dtype=torch.long)
            attention_mask[r, span] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if candidates:
            batch["example_id"] = torch.tensor([ex["example_id"] for ex, _, _ in rows], dtype=torch.long)
            batch["candidate_id"] = torch.tensor([c for _, c, _ in rows], dtype=torch.long)
            batch["is_gold"] = torch.tensor([c == ex["gold"] for ex, c, _ in rows], dtype=torch.bool)
            batch["prompt_length"] = torch.tensor([ex["prompt_length"] for ex, _, _ in rows], dtype=torch.long)
        return batch


class MeZOSampler(DistributedSampler):
    """torch's `DistributedSampler`, optionally grouping examples of similar length.

    Without ``group_by_length`` it is exactly `DistributedSampler` (seeded permutation per
    epoch, padding/dropping as documented in the module docstring, rank ``r`` takes every
    ``W``-th index). With it, the epoch's permutation is cut into mega-batches of
    ``batch_size * num_replicas * megabatch_mult`` examples, each sorted by length
    (longest first, stable) before the same padding and sharding, so every rank's batches
    hold examples of similar length.
    """

    def __init__(
        self,
        dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        group_by_length: bool = False,
        batch_size: int = 1,
        lengths: Sequence[int] | None = None,
        megabatch_mult: int = 50,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.group_by_length = group_by_length
        if group_by_length:
            if lengths is None:
                lengths = getattr(dataset, "lengths", None)
            if lengths is None or len(lengths) != len(dataset):
                raise ValueError("group_by_length needs one length per example (dataset.lengths)")
            self.lengths = np.asarray(lengths)
            self.megabatch = max(1, batch_size * num_replicas * megabatch_mult)

    def __iter__(self):
        if not self.group_by_length:
            return super().__iter__()
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        indices = []
        for s in range(0, n, self.megabatch):
            chunk = order[s : s + self.megabatch]
            indices.extend(sorted(chunk, key=lambda i: -int(self.lengths[i])))
        if not self.drop_last:
            padding = self.total_size - len(indices)
            if padding > 0:
                indices += (indices * math.ceil(padding / len(indices)))[:padding]
        else:
            indices = indices[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


def create_dataloader(
    dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    pad_side: str = "right",
    group_by_length: bool = False,
    distributed: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    pad_token_id: int | None = None,
    pad_to_multiple_of: int | None = None,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader of padded MeZO batches; ``batch_size`` examples per rank and step.

    ``distributed=None`` shards over the initialised ``torch.distributed`` group if any
    (``rank``/``world_size`` default to the group's); ``distributed=True`` with explicit
    ``rank``/``world_size`` needs no process group. ``drop_last`` is the sampler's policy
    for a size that does not divide by the world size (see the module docstring); the
    last batch of a rank may be smaller than ``batch_size`` and is kept.
    ``dataloader.sampler.set_epoch(e)`` reshuffles deterministically (seed + e).
    """
    import torch.distributed as dist

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1 (examples per rank)")
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised or world_size not in (None, 1)
    if distributed:
        if world_size is None:
            if not initialised:
                raise ValueError("distributed=True needs world_size= (and rank=) or an initialised process group")
            world_size = dist.get_world_size()
        if rank is None:
            if not initialised:
                raise ValueError("distributed=True needs rank= or an initialised process group")
            rank = dist.get_rank()
    else:
        rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    if len(dataset) == 0:
        raise ValueError("cannot build a dataloader over an empty dataset")
    if drop_last and len(dataset) < world_size:
        raise ValueError(f"drop_last=True with {len(dataset)} examples and world_size={world_size} leaves no data")
    sampler = MeZOSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        group_by_length=group_by_length,
        batch_size=batch_size,
    )
    if collate_fn is None:
        if pad_token_id is None:
            pad_token_id = getattr(dataset, "pad_token_id", None)
        if pad_token_id is None:
            raise ValueError("pad_token_id= is required when the dataset does not carry one")
        collate_fn = MeZOCollator(pad_token_id, pad_side=pad_side, pad_to_multiple_of=pad_to_multiple_of)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=False,
        persistent_workers=False,
    )
