"""Corpora: the data sources (one registered class per `data.source=` name), which find the source files,
describe them for the fingerprint and read them (checking UTF-8 and the text field, gptmini.data.records) into a
`datasets` Dataset with a `text` column.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from gptmini.config import DataConfig
from gptmini.data.download import fetch_url
from gptmini.data.format import DataError
from gptmini.data.records import first_bad_record, innermost, not_text, one_line, read_text, text_column, utf8_file
from gptmini.data.staging import DISK_FULL, Log

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


# ----------------------------------------------------------------------------------------------------------
# The registry: one class per data.source


class Source:
    """One kind of corpus, chosen by `data.source=<name>`. A subclass with `@register_source("<name>")` (and a
    configs/data/<name>.yaml that sets `source: <name>`) is all a new kind needs: preparation asks the class, never
    the name, whether its settings are there (`check`), what it is without reading a file (`request`: whether the
    prepared data answers the same request), what it is down to each file (`describe`: the fingerprint that says
    whether to prepare again), how to name it in messages (`label`) and its documents (`documents`)."""

    name: ClassVar[str] = "base"
    # The source that reads data.path instead of this one when it is set (url, hub: a local copy); None: this one.
    local_copy: ClassVar[str | None] = None

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    def check(self) -> None:
        """Raise a one-line DataError when a setting this source needs is missing (before any work)."""

    def request(self) -> dict[str, Any]:
        """The corpus as configured, JSON-able, without looking at any file; includes `kind`: the source's name."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """`request()` plus what changes when the corpus changes (each file's size and mtime): the fingerprint."""
        return self.request()

    def label(self) -> str:
        """The corpus as the user named it, for messages (`data.url='...'`)."""
        raise NotImplementedError

    def documents(self, described: dict[str, Any], log: Log, cache_dir: Path | None) -> Any:
        """The corpus as a `datasets` Dataset (or IterableDataset) with a `text` column (and `id`); `described` is
        what `describe()` returned."""
        raise NotImplementedError


SOURCE_REGISTRY: dict[str, type[Source]] = {}


def register_source(name: str) -> Callable[[type[Source]], type[Source]]:
    """Class decorator: `@register_source("mine")` makes `data.source=mine` prepare with this class."""

    def add(cls: type[Source]) -> type[Source]:
        SOURCE_REGISTRY[name] = cls
        cls.name = name
        return cls

    return add


def source_class(name: str) -> type[Source]:
    """The registered source called `name`; a one-line DataError listing the valid names otherwise."""
    if name not in SOURCE_REGISTRY:
        raise DataError(f"data.source={name!r} is unknown; valid: {', '.join(SOURCE_REGISTRY)}")
    return SOURCE_REGISTRY[name]


def source_for(cfg: DataConfig) -> Source:
    """The source that reads the corpus `cfg` names: data.source's, or the one reading its local copy."""
    cls = source_class(cfg.source)
    if cfg.path and cls.local_copy is not None:
        cls = source_class(cls.local_copy)
    return cls(cfg)


def describe_request(cfg: DataConfig) -> dict[str, Any]:
    """The corpus `cfg` names, without looking at any file: what stays the same while the files change."""
    return source_for(cfg).request()


def describe_source(cfg: DataConfig) -> dict[str, Any]:
    """What the corpus is, in a JSON-able dict (with each file's size and mtime): hashed into the fingerprint."""
    return source_for(cfg).describe()


def source_label(cfg: DataConfig) -> str:
    """The corpus as the user named it, for error messages."""
    return source_for(cfg).label()


def load_documents(cfg: DataConfig, source: dict[str, Any], log: Log = stderr_log, cache_dir: Path | None = None):
    """The corpus as a `datasets` Dataset (or IterableDataset when streaming) with a `text` column (and `id`).

    Local .jsonl/.parquet files are converted into `cache_dir` (a throwaway folder: the prepared .bin files are
    the cache), not into the Hugging Face cache; a URL is downloaded once into gptmini's download cache
    (`gptmini.data.download`), a hub dataset into the Hugging Face cache as usual.
    """
    return source_for(cfg).documents(source, log, cache_dir)


def text_documents(files: list[Path], root: Path, on_bad_utf8: str, log: Log) -> Any:
    """Text files as documents, with ids relative to `root`: the split is the same wherever the corpus lies."""
    import datasets

    ids = [p.relative_to(root).as_posix() for p in files]
    texts = [read_text(p, on_bad_utf8, log) for p in files]
    return datasets.Dataset.from_dict({"id": ids, "text": texts})


@register_source("python_stdlib")
class PythonStdlib(Source):
    """This interpreter's standard library, test suites left out."""

    def request(self) -> dict[str, Any]:
        return {"kind": self.name, "python": platform.python_version(), "root": sysconfig.get_paths()["stdlib"]}

    def describe(self) -> dict[str, Any]:
        root, files = stdlib_files()
        return self.request() | {"root": str(root), "files": _stat(files)}

    def label(self) -> str:
        return "the Python standard library"

    def documents(self, described, log, cache_dir):
        files = [Path(f[0]) for f in described["files"]]
        return text_documents(files, Path(described["root"]), self.cfg.on_bad_utf8, log)


@register_source("files")
class Files(Source):
    """data.path: a file, a folder or a glob of text, JSON (lines) or parquet files, all of one kind."""

    def check(self) -> None:
        if not self.cfg.path:
            raise DataError("data.path is required for local files: a file, a folder or a glob (data.path=notes.txt)")

    def request(self) -> dict[str, Any]:
        return {"kind": self.name, "path": self.cfg.path}

    def describe(self) -> dict[str, Any]:
        return self.request() | {"files": _stat(resolve_files(self.cfg.path))}

    def label(self) -> str:
        return f"data.path={self.cfg.path!r}"

    def documents(self, described, log, cache_dir):
        files = [Path(f[0]) for f in described["files"]]
        if FILE_TYPES[files[0].suffix] == "text":
            root = Path(os.path.commonpath([p.parent for p in files]))
            return text_documents(files, root, self.cfg.on_bad_utf8, log)
        ds = _load_table_files(self.cfg, files, self.label(), log, cache_dir)
        return text_column(ds, self.cfg.text_field, self.label(), files)


@register_source("url")
class Url(Source):
    """data.url: one text document downloaded once into gptmini's cache (data.path: a local copy instead)."""

    local_copy = "files"

    def check(self) -> None:
        if not (self.cfg.url or self.cfg.path):
            raise DataError("data.url (or a local copy in data.path) is required for data.source=url")

    def request(self) -> dict[str, Any]:
        return {"kind": self.name, "url": self.cfg.url}

    def label(self) -> str:
        return f"data.url={self.cfg.url!r}"

    def documents(self, described, log, cache_dir):
        import datasets

        text = read_text(fetch_url(self.cfg.url, log), self.cfg.on_bad_utf8, log)
        return datasets.Dataset.from_dict({"id": ["0"], "text": [text]})


@register_source("hub")
class Hub(Source):
    """data.hub_name: a Hugging Face hub dataset, downloaded or streamed (data.path: a local copy instead)."""

    local_copy = "files"

    def check(self) -> None:
        if not self.cfg.hub_name and not self.cfg.path:
            raise DataError("data.hub_name is required for data.source=hub (e.g. roneneldan/TinyStories)")

    def request(self) -> dict[str, Any]:
        c = self.cfg
        return {"kind": self.name, "name": c.hub_name, "subset": c.hub_subset, "split": c.hub_split,
                "streaming": c.streaming}

    def label(self) -> str:
        return f"data.hub_name={self.cfg.hub_name!r}"

    def documents(self, described, log, cache_dir):
        return text_column(_load_hub(self.cfg), self.cfg.text_field, self.label())


# ----------------------------------------------------------------------------------------------------------
# Reading hub datasets and table files


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


def _load_table_files(cfg: DataConfig, files: list[Path], label: str, log: Log, cache_dir: Path | None):
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
        found = first_bad_record(files, cfg.text_field)  # e.g. text in one row, a number in the next
        if found is not None:
            raise not_text(*found, cfg.text_field, "") from None
        raise DataError(f"{label} cannot be read as {kind} files ({one_line(cause)})") from None
