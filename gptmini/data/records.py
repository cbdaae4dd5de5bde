"""Reading a corpus's text safely: UTF-8 checked (or repaired) with the byte offset of the first bad sequence, and
the text column checked record by record, so a bad corpus is one line naming the file and the record, not a
traceback from deep inside `datasets` or the tokenizer. Used by every data source (gptmini.data.sources)."""

from __future__ import annotations

import codecs
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptmini.data.format import DataError
from gptmini.data.staging import Log


def _bad_utf8(path: str | Path, offset: int, sample: bytes) -> DataError:
    return DataError(
        f"{str(path)!r} is not valid UTF-8 (byte offset {offset}: {sample!r}); "
        f"convert it, or set data.on_bad_utf8=replace"
    )


def read_text(path: Path, on_bad_utf8: str, log: Log) -> str:
    """A whole text file; invalid UTF-8 is an error naming the offset, or (on_bad_utf8=replace) U+FFFD."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if on_bad_utf8 != "replace":
            raise _bad_utf8(path, err.start, raw[err.start : err.start + 4]) from None
        log(f"data: warning: {path}: invalid UTF-8 at byte offset {err.start}; replaced with U+FFFD")
        return raw.decode("utf-8", errors="replace")


def _first_bad_utf8(path: Path, block: int) -> int | None:
    """The byte offset of the first invalid UTF-8 sequence, read in blocks (files may exceed memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous block
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                return done - len(pending) + err.start
            if not data:
                return None
            done += len(data)


def utf8_file(path: Path, on_bad_utf8: str, log: Log, scratch: Path | None, block: int = 1 << 24) -> Path:
    """`path` when it is valid UTF-8; else an error, or (data.on_bad_utf8=replace) a repaired copy in `scratch`."""
    offset = _first_bad_utf8(path, block)
    if offset is None:
        return path
    if on_bad_utf8 != "replace":
        with open(path, "rb") as f:
            f.seek(offset)
            raise _bad_utf8(path, offset, f.read(4))
    log(f"data: warning: {path}: invalid UTF-8 at byte offset {offset}; replaced with U+FFFD")
    if scratch is None:
        scratch = Path(tempfile.mkdtemp(prefix="gptmini-utf8-"))
    scratch.mkdir(parents=True, exist_ok=True)
    copy = Path(tempfile.mkdtemp(prefix="utf8-", dir=scratch)) / path.name  # a folder each: names may repeat
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as src, open(copy, "w", encoding="utf-8") as dst:
        while data := src.read(block):
            dst.write(decoder.decode(data))
        dst.write(decoder.decode(b"", final=True))
    return copy


def innermost(err: BaseException) -> BaseException:
    """The original error under the chain of wrappers."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())



# ----------------------------------------------------------------------------------------------------------
# The text column


def text_column(ds, field: str, label: str = "the corpus", files: list[Path] | None = None):
    """`ds` reduced to its `field` column, named `text`; a column that is not all text is a one-line error."""
    columns = list(ds.column_names or [])
    if columns and field not in columns:
        raise DataError(f"data.text_field={field!r} is not a column of the corpus; columns: {', '.join(columns)}")
    if getattr(ds, "features", None) is not None and hasattr(ds, "__len__"):
        _check_text_values(ds, field, label, files or [])
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds


def _is_text(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _check_text_values(ds, field: str, label: str, files: list[Path]) -> None:
    """Every row's `field` is a string: a null or a number would otherwise fail deep inside tokenization."""
    if _is_text(ds.features[field]) and ds.data.column(field).null_count == 0:
        return
    found = first_bad_record(files, field)
    if found is None:  # no files (hub, url) or not found again: the row of the Dataset
        values = ds[field]
        row = next(i for i, v in enumerate(values) if not isinstance(v, str))
        found = (label, f"row {row + 1}", values[row], True)
    text_columns = [c for c, f in ds.features.items() if _is_text(f) and c != field]
    other = f"text columns: {', '.join(text_columns)}" if text_columns else "the corpus has no other text column"
    raise not_text(*found, field, f" ({other})")


def not_text(where: str, record: str, value: Any, present: bool, field: str, columns: str) -> DataError:
    return DataError(
        f"{where} {record}: data.text_field={field!r} is {describe_value(value, present)}, not text; "
        f"fix that record, or set data.text_field= to a column of text{columns}"
    )


def describe_value(value: Any, present: bool = True) -> str:
    if not present:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    return f"a {type(value).__name__}"


def first_bad_record(files: list[Path], field: str) -> tuple[str, str, Any, bool] | None:
    """(file, 'line N' / 'record N' / 'row N', value, present) of the first non-string `field`; None if none."""
    for path in files:
        found = _bad_parquet_row(path, field) if path.suffix == ".parquet" else _bad_json_record(path, field)
        if found is not None:
            return (repr(str(path)), *found)
    return None


def _bad_parquet_row(path: Path, field: str) -> tuple[str, Any, bool] | None:
    import pyarrow.parquet as pq

    for i, value in enumerate(pq.read_table(path, columns=[field]).column(field).to_pylist()):
        if not isinstance(value, str):
            return f"row {i + 1}", value, True
    return None


def _bad_json_record(path: Path, field: str) -> tuple[str, Any, bool] | None:
    """The first record of a JSON lines file (or of a JSON array) whose `field` is not a string."""
    for where, record in _json_records(path):
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            return where, value, isinstance(record, dict) and field in record
    return None


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """('line N' or 'record N', record) for each record, read lazily from a JSON lines file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if f.read(4096).lstrip().startswith("["):  # one JSON array of records
            f.seek(0)
            yield from ((f"record {i + 1}", r) for i, r in enumerate(json.load(f)))
            return
        f.seek(0)
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError:
                    continue
