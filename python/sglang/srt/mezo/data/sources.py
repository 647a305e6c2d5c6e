"""Where MeZO's records come from, and errors that name the file, line/row and field.

A path to a JSONL, JSON (an array of records, or ``{"data": [...]}``), CSV or Parquet
file, or to a dataset directory written by ``save_to_disk``; a ``datasets.Dataset``; a
``DatasetDict`` (``split=`` picks one); or a list of dicts. Files are read with the
``datasets`` library into Arrow tables that are memory-mapped from its cache; the
records are then validated and tokenized in batches, and only the token ids are kept
(flat int32 arrays). JSON *arrays* have no streaming parser in ``datasets`` and are
parsed whole: prefer JSONL for big data.
"""

from __future__ import annotations

import csv
import json
import os
import re

from sglang.srt.mezo.usage_errors import UsageError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(UsageError):
    """Bad training data; the message names the source, the line/row and the field."""


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


def diagnose_json(path: str, kind: str, cause: BaseException) -> DataError:
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
    return DataError(f"{name}: cannot be loaded: {root_cause(cause)}")


def root_cause(error: BaseException) -> str:
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
            raise DataError(f"{path}: not a dataset directory written by save_to_disk ({root_cause(e)})") from e
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
            raise diagnose_json(path, kind, e) from e
        if isinstance(e, StopIteration) or "corresponds to no data" in str(e):
            raise DataError(f"{path}: empty dataset (no examples)") from e
        raise DataError(f"{path}: cannot be read as {builder.upper()}: {root_cause(e)}") from e
    return dataset, _Source(path, kind, path)
