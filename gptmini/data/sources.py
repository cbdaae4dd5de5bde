"""Corpora: find the source files, describe them for the fingerprint, read them (checking UTF-8 and the text
field) into a `datasets` Dataset with a `text` column.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import platform
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptmini.config import DataConfig
from gptmini.data.download import fetch_url
from gptmini.data.format import DataError
from gptmini.data.staging import DISK_FULL, Log

SOURCES = ("python_stdlib", "files", "url", "hub")
FILE_TYPES = {".txt": "text", ".md": "text", ".py": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Folders of the standard library that hold test suites, not library code.
STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr)


class SourceMissing(DataError):
    """data.path names nothing (any more): the prepared data, if intact, may stand in for the corpus."""


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running interpreter's standard library modules, in a stable order, without test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        # Prune in place: os.walk then never descends into site-packages (installed packages) or test suites.
        at_top = Path(folder) == root
        subdirs[:] = [d for d in subdirs if d not in STDLIB_TEST_DIRS and not (at_top and d == "site-packages")]
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    return root, sorted(files)


def resolve_files(pattern: str) -> list[Path]:
    """A file, a folder (every supported file under it) or a glob, sorted; each of a supported type."""
    path = Path(pattern).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_TYPES)
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        raise SourceMissing(f"data.path={pattern!r} does not exist (give a file, a folder or a glob)")
    files = once_each(files)
    if not files:
        raise SourceMissing(f"data.path={pattern!r} matches no {'/'.join(FILE_TYPES)} files")
    kinds = {FILE_TYPES.get(p.suffix) for p in files}
    if None in kinds or len(kinds) > 1:
        bad = next(p for p in files if FILE_TYPES.get(p.suffix) is None) if None in kinds else files[0]
        raise DataError(
            f"data.path={pattern!r}: {str(bad)!r} mixes or has an unsupported type; "
            f"use files of one kind: {', '.join(FILE_TYPES)}"
        )
    return files


def once_each(files: list[Path]) -> list[Path]:
    """Each real file once, sorted: a glob through a symlink loop (`d/self -> .`) or a link to a file already
    listed names one file many times. Each keeps its shortest name as given (not the resolved one), so document
    ids stay relative to the folder the user named."""
    shortest: dict[Path, Path] = {}
    for p in files:
        real = p.resolve()
        if real not in shortest or (len(p.parts), str(p)) < (len(shortest[real].parts), str(shortest[real])):
            shortest[real] = p
    return sorted(shortest.values())


def _stat(files: list[Path]) -> list[list[Any]]:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def describe_request(cfg: DataConfig) -> dict[str, Any]:
    """The corpus `cfg` names, without looking at any file: what stays the same while the files change."""
    if cfg.source == "python_stdlib":
        return {"kind": "python_stdlib", "python": platform.python_version(),
                "root": sysconfig.get_paths()["stdlib"]}
    if cfg.path:  # local files, also a local copy of a url or hub corpus
        return {"kind": "files", "path": cfg.path}
    if cfg.source == "url":
        return {"kind": "url", "url": cfg.url}
    return {"kind": "hub", "name": cfg.hub_name, "subset": cfg.hub_subset, "split": cfg.hub_split,
            "streaming": cfg.streaming}


def describe_source(cfg: DataConfig) -> dict[str, Any]:
    """What the corpus is, in a JSON-able dict (with each file's size and mtime): hashed into the fingerprint."""
    source = describe_request(cfg)
    if source["kind"] == "python_stdlib":
        root, files = stdlib_files()
        source |= {"root": str(root), "files": _stat(files)}
    elif source["kind"] == "files":
        source["files"] = _stat(resolve_files(cfg.path))
    return source


def source_label(cfg: DataConfig) -> str:
    """The corpus as the user named it, for error messages."""
    if cfg.path:
        return f"data.path={cfg.path!r}"
    return {"python_stdlib": "the Python standard library", "url": f"data.url={cfg.url!r}"}.get(
        cfg.source, f"data.hub_name={cfg.hub_name!r}"
    )


# ----------------------------------------------------------------------------------------------------------
# UTF-8


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
# Documents


def load_documents(cfg: DataConfig, source: dict[str, Any], log: Log = stderr_log, cache_dir: Path | None = None):
    """The corpus as a `datasets` Dataset (or IterableDataset when streaming) with a `text` column (and `id`).

    Local .jsonl/.parquet files are converted into `cache_dir` (a throwaway folder: the prepared .bin files are
    the cache), not into the Hugging Face cache; a URL is downloaded once into gptmini's download cache
    (`gptmini.data.download`), a hub dataset into the Hugging Face cache as usual.
    """
    import datasets

    files = [Path(f[0]) for f in source.get("files", [])]
    if source["kind"] == "url":
        text = read_text(fetch_url(cfg.url, log), cfg.on_bad_utf8, log)
        return datasets.Dataset.from_dict({"id": ["0"], "text": [text]})
    elif source["kind"] == "hub":
        ds = _load_hub(cfg)
    elif source["kind"] == "python_stdlib" or FILE_TYPES[files[0].suffix] == "text":
        # Ids relative to the corpus folder: the split is the same wherever the corpus lies.
        root = Path(source["root"]) if "root" in source else Path(os.path.commonpath([p.parent for p in files]))
        ids = [p.relative_to(root).as_posix() for p in files]
        texts = [read_text(p, cfg.on_bad_utf8, log) for p in files]
        return datasets.Dataset.from_dict({"id": ids, "text": texts})
    else:
        ds = _load_table_files(cfg, files, log, cache_dir)
    return text_column(ds, cfg.text_field, cfg, files)


def _load_hub(cfg: DataConfig):
    """A hub dataset; what keeps it from loading (offline, unknown name, a loading script) is one line."""
    import datasets

    try:
        return datasets.load_dataset(cfg.hub_name, cfg.hub_subset, split=cfg.hub_split, streaming=cfg.streaming)
    except Exception as err:
        cause = innermost(err)
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            raise cause from None
        raise DataError(f"data.hub_name={cfg.hub_name!r} could not be loaded ({one_line(err)}); check the name and "
                        f"the network, or pass a local copy with data.path=FILE") from None


def _load_table_files(cfg: DataConfig, files: list[Path], log: Log, cache_dir: Path | None):
    """JSON (lines) or parquet files through `datasets`, with the reader's own error on one line."""
    import datasets

    kind = FILE_TYPES[files[0].suffix]
    if kind == "json":  # checked here: the JSON reader's own error names neither the file nor the offset
        files = [utf8_file(p, cfg.on_bad_utf8, log, cache_dir) for p in files]
    try:
        return datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train",
                                     cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # the reader's error is nested in datasets' generic one: show the cause
        cause = innermost(err)
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:  # the conversion's fault, not the corpus's
            raise cause from None
        found = _first_bad_record(files, cfg.text_field)  # e.g. text in one row, a number in the next
        if found is not None:
            raise _not_text(*found, cfg.text_field, "") from None
        raise DataError(f"{source_label(cfg)} cannot be read as {kind} files ({one_line(cause)})") from None


def text_column(ds, field: str, cfg: DataConfig | None = None, files: list[Path] | None = None):
    """`ds` reduced to its `field` column, named `text`; a column that is not all text is a one-line error."""
    columns = list(ds.column_names or [])
    if columns and field not in columns:
        raise DataError(f"data.text_field={field!r} is not a column of the corpus; columns: {', '.join(columns)}")
    if getattr(ds, "features", None) is not None and hasattr(ds, "__len__"):
        _check_text_values(ds, field, cfg, files or [])
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds


def _is_text(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _check_text_values(ds, field: str, cfg: DataConfig | None, files: list[Path]) -> None:
    """Every row's `field` is a string: a null or a number would otherwise fail deep inside tokenization."""
    if _is_text(ds.features[field]) and ds.data.column(field).null_count == 0:
        return
    found = _first_bad_record(files, field)
    if found is None:  # no files (hub, url) or not found again: the row of the Dataset
        values = ds[field]
        row = next(i for i, v in enumerate(values) if not isinstance(v, str))
        found = (source_label(cfg) if cfg else "the corpus", f"row {row + 1}", values[row], True)
    text_columns = [c for c, f in ds.features.items() if _is_text(f) and c != field]
    other = f"text columns: {', '.join(text_columns)}" if text_columns else "the corpus has no other text column"
    raise _not_text(*found, field, f" ({other})")


def _not_text(where: str, record: str, value: Any, present: bool, field: str, columns: str) -> DataError:
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


def _first_bad_record(files: list[Path], field: str) -> tuple[str, str, Any, bool] | None:
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
