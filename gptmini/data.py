"""Datasets: load a corpus with Hugging Face `datasets`, tokenize it once into flat token files, draw batches.

    <data_dir>/<name>/train.bin   uint16 (or uint32) token ids, documents separated by end-of-text
    <data_dir>/<name>/val.bin
    <data_dir>/<name>/meta.json   tokenizer spec, dtype, token counts, source, fingerprint

`prepare(cfg, data_dir)` does no work when `meta.json` already holds the fingerprint of the same source,
tokenizer and settings; otherwise it writes into a temporary folder and swaps it in with renames, so old and
new files are never mixed. Run it on its own with `python -m gptmini.data data=<name> [data.path=...]`.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptmini.config import DataConfig
from gptmini.tokenizer import Tokenizer, build_tokenizer, tokenizer_from_spec

FORMAT = "gptmini-data"
VERSION = 1
SOURCES = ("python_stdlib", "files", "url", "hub")
SPLITS = ("auto", "document", "position")
FILE_TYPES = {".txt": "text", ".md": "text", ".py": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Folders of the standard library that hold test suites, not library code.
STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}

Log = Callable[[str], None]


class DataError(ValueError):
    """A corpus or prepared dataset that cannot be used; the message names the bad value and the fix."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Prepared data


@dataclass
class PreparedData:
    path: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer

    def _tokens(self, split: str) -> np.memmap:
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def train_tokens(self) -> np.memmap:
        return self._tokens("train")

    def val_tokens(self) -> np.memmap:
        return self._tokens("val")


def load_prepared(path: str | Path, expect_tokenizer: DataConfig | None = None) -> PreparedData:
    """Open a prepared dataset, checking that meta.json and the .bin files agree before anything uses them."""
    path = Path(path)
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{str(path)!r} holds no prepared dataset (no meta.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{str(meta_path)!r} is not valid JSON ({err}); delete {str(path)!r} to prepare again") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{str(meta_path)!r} is not a gptmini {FORMAT} v{VERSION} file; delete {str(path)!r}")
    damaged = f"delete {str(path)!r} to prepare it again"
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"{str(meta_path)!r}: dtype {meta.get('dtype')!r} is not uint16 or uint32; {damaged}")
    try:
        tokenizer = tokenizer_from_spec(meta["tokenizer"])
    except (KeyError, ValueError) as err:
        raise DataError(f"{str(meta_path)!r}: bad tokenizer spec ({err}); {damaged}") from None
    if tokenizer.vocab_size != meta.get("vocab_size"):
        raise DataError(
            f"{str(meta_path)!r}: vocab_size {meta.get('vocab_size')} does not match its tokenizer's "
            f"{tokenizer.vocab_size}; {damaged}"
        )
    if expect_tokenizer is not None:
        asked = _tokenizer_request(expect_tokenizer)
        held = {"kind": meta["tokenizer"]["kind"], "encoding": meta["tokenizer"].get("encoding")}
        if asked["kind"] != held["kind"] or (asked["kind"] == "tiktoken" and asked["encoding"] != held["encoding"]):
            raise DataError(
                f"{str(path)!r} was prepared with tokenizer {held} but {asked} was asked for; "
                f"{damaged}, or set data.name to another folder"
            )
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        file = path / f"{split}.bin"
        expected = meta.get(f"{split}_tokens")
        size = file.stat().st_size if file.is_file() else None
        if size is None or not isinstance(expected, int) or size != expected * itemsize:
            raise DataError(
                f"{str(file)!r} has {size} bytes but meta.json says {expected} {meta['dtype']} tokens "
                f"(truncated or from another preparation); {damaged}"
            )
        if expected and int(np.max(np.memmap(file, dtype=meta["dtype"], mode="r"))) >= tokenizer.vocab_size:
            raise DataError(f"{str(file)!r} holds token ids >= vocab_size {tokenizer.vocab_size}; {damaged}")
    return PreparedData(path, meta, tokenizer)


def prepare(cfg: DataConfig, data_dir: str | Path = "data", log: Log = _stderr, force: bool = False) -> PreparedData:
    """Prepare (or reuse) `<data_dir>/<cfg.name>/` for the corpus and tokenizer `cfg` describes."""
    _validate(cfg)
    out = Path(data_dir) / cfg.name
    source = _describe_source(cfg)
    fingerprint = _fingerprint(cfg, source)
    if not force and (out / "meta.json").is_file():
        try:
            previous = json.loads((out / "meta.json").read_text()).get("fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            previous = None
        if previous == fingerprint:
            try:
                prepared = load_prepared(out, expect_tokenizer=cfg)
            except DataError as err:  # damaged since (e.g. a truncated copy): prepare it again
                log(f"data: {err}; preparing it again")
            else:
                log(f"data: {out} is up to date ({prepared.meta['train_tokens']:,} train / "
                    f"{prepared.meta['val_tokens']:,} val tokens)")
                return prepared
    log(f"data: preparing {out} from {source['kind']} ({cfg.tokenizer} tokenizer)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the prepared folder is as shareable as any
    try:
        meta = _write(cfg, source, tmp, log)
        meta["fingerprint"] = fingerprint
        _write_json_synced(tmp / "meta.json", meta)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prepared = load_prepared(out, expect_tokenizer=cfg)
    log(f"data: wrote {out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
        f"vocab {meta['vocab_size']}, {meta['dtype']}")
    return prepared


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _validate(cfg: DataConfig) -> None:
    if cfg.source not in SOURCES:
        raise DataError(f"data.source={cfg.source!r} is unknown; valid: {', '.join(SOURCES)}")
    if cfg.split not in SPLITS:
        raise DataError(f"data.split={cfg.split!r} is unknown; valid: {', '.join(SPLITS)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    if cfg.dtype not in ("auto", "uint16", "uint32"):
        raise DataError(f"data.dtype={cfg.dtype!r} is unknown; valid: auto, uint16, uint32")
    if cfg.on_bad_utf8 not in ("error", "replace"):
        raise DataError(f"data.on_bad_utf8={cfg.on_bad_utf8!r} is unknown; valid: error, replace")
    if cfg.num_proc < 1:
        raise DataError(f"data.num_proc={cfg.num_proc} must be >= 1")
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        raise DataError(f"data.name={cfg.name!r} must be a plain folder name")
    if cfg.source == "files" and not cfg.path:
        raise DataError("data.path is required for local files: a file, a folder or a glob (data.path=notes.txt)")
    if cfg.source == "url" and not (cfg.url or cfg.path):
        raise DataError("data.url (or a local copy in data.path) is required for data.source=url")
    if cfg.source == "hub" and not cfg.hub_name and not cfg.path:
        raise DataError("data.hub_name is required for data.source=hub (e.g. roneneldan/TinyStories)")
    if cfg.streaming and cfg.tokenizer == "char":
        raise DataError("data.streaming=true cannot build a char vocabulary; use data.tokenizer=tiktoken or bytes")


def _tokenizer_request(cfg: DataConfig) -> dict[str, Any]:
    return {"kind": cfg.tokenizer, "encoding": cfg.encoding if cfg.tokenizer == "tiktoken" else None}


# ----------------------------------------------------------------------------------------------------------
# Sources


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
        raise DataError(f"data.path={pattern!r} does not exist (give a file, a folder or a glob)")
    if not files:
        raise DataError(f"data.path={pattern!r} matches no {'/'.join(FILE_TYPES)} files")
    kinds = {FILE_TYPES.get(p.suffix) for p in files}
    if None in kinds or len(kinds) > 1:
        bad = next(p for p in files if FILE_TYPES.get(p.suffix) is None) if None in kinds else files[0]
        raise DataError(
            f"data.path={pattern!r}: {str(bad)!r} mixes or has an unsupported type; "
            f"use files of one kind: {', '.join(FILE_TYPES)}"
        )
    return files


def _stat(files: list[Path]) -> list[list[Any]]:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _describe_source(cfg: DataConfig) -> dict[str, Any]:
    """What the corpus is, in a JSON-able dict: recorded in meta.json and hashed into the fingerprint."""
    if cfg.source == "python_stdlib":
        root, files = stdlib_files()
        return {"kind": "python_stdlib", "python": platform.python_version(), "root": str(root),
                "files": _stat(files)}
    if cfg.path:  # local files, also a local copy of a url or hub corpus
        return {"kind": "files", "path": cfg.path, "files": _stat(resolve_files(cfg.path))}
    if cfg.source == "url":
        return {"kind": "url", "url": cfg.url}
    return {"kind": "hub", "name": cfg.hub_name, "subset": cfg.hub_subset, "split": cfg.hub_split,
            "streaming": cfg.streaming}


def _fingerprint(cfg: DataConfig, source: dict[str, Any]) -> str:
    settings = {"version": VERSION, "ids": "relative", "source": source, "tokenizer": _tokenizer_request(cfg),
                "text_field": cfg.text_field, "val_fraction": cfg.val_fraction, "split": cfg.split,
                "max_tokens": cfg.max_tokens, "dtype": cfg.dtype, "on_bad_utf8": cfg.on_bad_utf8}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _bad_utf8(path: str | Path, offset: int, sample: bytes) -> DataError:
    return DataError(
        f"{str(path)!r} is not valid UTF-8 (byte offset {offset}: {sample!r}); "
        f"convert it, or set data.on_bad_utf8=replace"
    )


def _read_text(path: Path, on_bad_utf8: str, log: Log) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if on_bad_utf8 != "replace":
            raise _bad_utf8(path, err.start, raw[err.start : err.start + 4]) from None
        log(f"data: warning: {path}: invalid UTF-8 at byte offset {err.start}; replaced with U+FFFD")
        return raw.decode("utf-8", errors="replace")


def _utf8_file(path: Path, on_bad_utf8: str, log: Log, scratch: Path | None, block: int = 1 << 24) -> Path:
    """`path` when it is valid UTF-8; else an error, or (data.on_bad_utf8=replace) a repaired copy in `scratch`.

    Read in blocks: JSON lines files can be larger than memory.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous block
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                offset = done - len(pending) + err.start
                break
            if not data:
                return path
            done += len(data)
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


def _innermost(err: BaseException) -> str:
    """The original error under the chain of wrappers, as `Type: message` on one line."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return " ".join(f"{type(err).__name__}: {err}".split())


def load_documents(cfg: DataConfig, source: dict[str, Any], log: Log = _stderr, cache_dir: Path | None = None):
    """The corpus as a `datasets` Dataset (or IterableDataset when streaming) with a `text` column (and `id`).

    Local .jsonl/.parquet files are converted into `cache_dir` (a throwaway folder: the prepared .bin files are
    the cache), not into the Hugging Face cache; downloads (url, hub) use the Hugging Face cache as usual.
    """
    import datasets

    if source["kind"] in ("python_stdlib", "files"):
        files = [Path(f[0]) for f in source["files"]]
        kind = FILE_TYPES.get(files[0].suffix, "text") if source["kind"] == "files" else "text"
        if kind == "text":
            # Ids relative to the corpus folder: the split is the same wherever the corpus lies.
            root = Path(source["root"]) if "root" in source else Path(os.path.commonpath([p.parent for p in files]))
            ids = [p.relative_to(root).as_posix() for p in files]
            texts = [_read_text(p, cfg.on_bad_utf8, log) for p in files]
            return datasets.Dataset.from_dict({"id": ids, "text": texts})
        if kind == "json":  # checked here: the JSON reader's own error names neither the file nor the offset
            files = [_utf8_file(p, cfg.on_bad_utf8, log, cache_dir) for p in files]
        try:
            ds = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train",
                                       cache_dir=str(cache_dir) if cache_dir else None)
        except Exception as err:  # the reader's error is nested in datasets' generic one: show the cause
            raise DataError(f"{_source_label(cfg)} cannot be read as {kind} files ({_innermost(err)})") from None
    elif source["kind"] == "url":
        ds = datasets.load_dataset("text", data_files={"train": cfg.url}, sample_by="document", split="train")
    else:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_subset, split=cfg.hub_split, streaming=cfg.streaming)
    return _text_column(ds, cfg.text_field)


def _text_column(ds, field: str):
    columns = list(ds.column_names or [])
    if columns and field not in columns:
        raise DataError(f"data.text_field={field!r} is not a column of the corpus; columns: {', '.join(columns)}")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds


# ----------------------------------------------------------------------------------------------------------
# Tokenize, split, write


def _is_val(doc_id: str, fraction: float) -> bool:
    """Deterministic, order-independent document split: a hash of the document's id (a file's path relative to
    the corpus folder, or a row number)."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def _token_dtype(cfg: DataConfig, vocab_size: int) -> str:
    dtype = cfg.dtype if cfg.dtype != "auto" else ("uint16" if vocab_size <= 2**16 else "uint32")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"data.dtype={dtype} cannot hold a vocabulary of {vocab_size} tokens; use uint32 or auto")
    return dtype


def tokenize_documents(ds, tokenizer: Tokenizer, dtype: str, num_proc: int = 1):
    """The `text` column as an `ids` column of `dtype` token arrays: `Dataset.map(batched=True)` in `num_proc`
    processes (a streamed IterableDataset is tokenized lazily, as it is read)."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return {"ids": tokenizer.encode_arrays(batch["text"], dtype)}

    kwargs: dict[str, Any] = {"batched": True, "remove_columns": ["text"]}
    if hasattr(ds, "__len__"):
        # Naming the result ourselves spares `datasets` hashing the tokenizer (seconds for a BPE vocabulary).
        key = json.dumps([VERSION, tokenizer.spec(), dtype, ds._fingerprint], sort_keys=True)
        kwargs.update(num_proc=num_proc if num_proc > 1 else None, desc="tokenizing",
                      new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])
    return ds.map(tokenize, **kwargs)


def iter_token_documents(tokenized, dtype: str) -> Iterator[tuple[str | None, np.ndarray]]:
    """(document id or None, token array) per document, in order. A Dataset is read straight from its Arrow
    buffers, so no token becomes a Python int."""
    if not hasattr(tokenized, "__len__"):  # streamed
        for row in tokenized:
            yield row.get("id"), np.asarray(row["ids"], dtype=dtype)
        return
    for batch in tokenized.data.to_batches():  # pyarrow RecordBatches (map's output has no index mapping)
        ids = batch.column("ids")
        offsets = ids.offsets.to_numpy()  # (docs + 1,) into `values`, which ignores the batch's slicing
        values = ids.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        doc_ids = batch.column("id").to_pylist() if "id" in batch.schema.names else [None] * batch.num_rows
        for i, doc_id in enumerate(doc_ids):
            yield doc_id, values[offsets[i] : offsets[i + 1]]


def _source_label(cfg: DataConfig) -> str:
    """The corpus as the user named it, for error messages."""
    if cfg.path:
        return f"data.path={cfg.path!r}"
    return {"python_stdlib": "the Python standard library", "url": f"data.url={cfg.url!r}"}.get(
        cfg.source, f"data.hub_name={cfg.hub_name!r}"
    )


def _write(cfg: DataConfig, source: dict[str, Any], out: Path, log: Log) -> dict[str, Any]:
    """Tokenize the corpus into `out`/train.bin and val.bin; the meta.json contents (less the fingerprint)."""
    import pyarrow.compute as pc
    from tqdm.auto import tqdm

    ds = load_documents(cfg, source, log, cache_dir=out / ".cache")
    streaming = not hasattr(ds, "__len__")
    if not streaming and len(ds) == 0:
        raise DataError(f"the corpus ({_source_label(cfg)}) has no documents")
    texts = ds["text"] if cfg.tokenizer == "char" else None  # the char vocabulary needs the corpus
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.encoding, texts=texts)
    dtype = _token_dtype(cfg, tokenizer.vocab_size)
    n_docs = None if streaming else len(ds)
    mode = cfg.split if cfg.split != "auto" else ("position" if n_docs == 1 else "document")
    if streaming and mode == "position":
        raise DataError("data.split=position needs the whole corpus; streamed corpora split by document")
    if not streaming and "id" not in ds.column_names:
        ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    tokenized = tokenize_documents(ds, tokenizer, dtype, cfg.num_proc)

    eot = np.array([tokenizer.eot_id], dtype=dtype).tobytes()
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    documents = tqdm(iter_token_documents(tokenized, dtype), desc="writing", unit="doc", total=n_docs, disable=None)
    with open(out / "train.bin", "wb") as f_train, open(out / "val.bin", "wb") as f_val:
        files = {"train": f_train, "val": f_val}
        if mode == "position":  # one token stream (documents joined by end-of-text), cut at a fraction
            total = int(pc.sum(pc.list_value_length(tokenized.data.column("ids"))).as_py() or 0) + n_docs - 1
            n_train = int(total * (1 - cfg.val_fraction))
            position = 0
            for i, (_, ids) in enumerate(documents):
                stream = (eot if i > 0 else b"") + ids.tobytes()
                cut = min(max(n_train - position, 0), len(ids) + (i > 0)) * ids.itemsize
                f_train.write(stream[:cut])
                f_val.write(stream[cut:])
                position += len(ids) + (i > 0)
            counts = {"train": n_train, "val": total - n_train}
            docs = {"train": n_docs, "val": n_docs}
        else:  # whole documents, each to train or val by a hash of its id
            for i, (doc_id, ids) in enumerate(documents):
                split = "val" if _is_val(str(doc_id if doc_id is not None else i), cfg.val_fraction) else "train"
                if docs[split] > 0:
                    files[split].write(eot)
                    counts[split] += 1
                files[split].write(ids.tobytes())
                counts[split] += len(ids)
                docs[split] += 1
                if cfg.max_tokens is not None and counts["train"] + counts["val"] >= cfg.max_tokens:
                    break
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    shutil.rmtree(out / ".cache", ignore_errors=True)
    if counts["train"] == 0 and counts["val"] == 0:
        raise DataError(f"the corpus ({_source_label(cfg)}) is empty: no tokens")
    for split in ("train", "val"):
        if counts[split] == 0:
            raise DataError(
                f"the {split} split of {_source_label(cfg)} is empty ({docs['train'] + docs['val']} document(s)); "
                f"add documents or use data.split=position"
            )
    public_source = {k: v for k, v in source.items() if k != "files"}
    if "files" in source:
        public_source["n_files"] = len(source["files"])
    return {
        "format": FORMAT, "version": VERSION, "name": cfg.name, "tokenizer": tokenizer.spec(),
        "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "dtype": dtype,
        "train_tokens": counts["train"], "val_tokens": counts["val"], "documents": docs, "split": mode,
        "val_fraction": cfg.val_fraction, "source": public_source, "python": platform.python_version(),
    }


def _write_json_synced(path: Path, value: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames: a crash leaves the old folder, the new one, or none; never a mix."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))  # empty: a rename may replace it
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Batches


class BatchSampler:
    """Random `block_size` windows from a token array; batch k depends only on (seed, k).

    Batch k is one *global* batch of `batch_size * world_size` windows drawn from (seed, k); rank r takes rows
    [r*batch_size, (r+1)*batch_size). So each rank of a distributed job draws its own rows, N processes see exactly
    the windows one process with an N-times larger batch would, and a resumed run (restore `state_dict()`) draws
    exactly the batches an uninterrupted run would have.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(f"{len(tokens)} tokens are fewer than block_size+1={block_size + 1}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size, self.step = seed, rank, world_size, 0
        self.device = torch.device(device)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(x, y), each (B, T) int64 on the device; y is x shifted left by one token."""
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]  # this rank's rows
        rows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        batch = torch.from_numpy(rows)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            batch = batch.to(self.device)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


def iter_windows(tokens: np.ndarray, window: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Non-overlapping windows covering the whole split; every target position appears exactly once.

    Yields (x, y) of (b, window) int64, the last window possibly shorter (in a batch of its own).
    """
    n = max(len(tokens) - 1, 0)  # positions that have a next token
    full = n // window
    for first in range(0, full, batch_size):
        count = min(batch_size, full - first)
        chunk = np.asarray(tokens[first * window : (first + count) * window + 1], dtype=np.int64)
        x = torch.from_numpy(chunk[:-1].reshape(count, window))
        y = torch.from_numpy(chunk[1:].reshape(count, window))
        yield x, y
    rest = n - full * window
    if rest > 0:
        chunk = torch.from_numpy(np.asarray(tokens[full * window :], dtype=np.int64))
        yield chunk[None, :-1], chunk[None, 1:]


if __name__ == "__main__":
    from gptmini.cli import hydra_main

    hydra_main("prepare", lambda cfg: prepare(cfg.data, cfg.data_dir, force=cfg.force))
