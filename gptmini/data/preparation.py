"""Offline preparation: tokenize a corpus once into `<data_dir>/<name>/` (see `gptmini.data.format`).

`prepare(cfg, data_dir)` does no work when meta.json already holds the fingerprint of the same source, tokenizer
and settings; otherwise it writes into a temporary folder and swaps it in with renames, so old and new files are
never mixed. When the source files are gone but the prepared data for the same request is intact, that is used.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptmini.config import DataConfig
from gptmini.data.batches import PreparedData, load_prepared
from gptmini.data.format import DATA_FORMAT, DATA_VERSION, DataError, meta_value, tokenizer_request, write_meta
from gptmini.data.records import describe_value
from gptmini.data.sources import (
    Log,
    SourceMissing,
    describe_request,
    describe_source,
    load_documents,
    source_class,
    source_label,
    stderr_log,
)
from gptmini.data.staging import (
    DISK_FULL,
    SplitFiles,
    check_data_dir,
    check_replaceable,
    make_tmp,
    remove_stale,
    swap_in,
    writes_to,
)
from gptmini.tokenizer import Tokenizer, build_tokenizer

SPLIT_MODES = ("auto", "document", "position")  # data.split: how the corpus is cut into train and val
Counts = dict[str, int]
Accept = Callable[[PreparedData], None]


def prepare(cfg: DataConfig, data_dir: str | Path = "data", log: Log = stderr_log, force: bool = False,
            accept: Accept | None = None) -> PreparedData:
    """Prepare (or reuse) `<data_dir>/<cfg.name>/` for the corpus and tokenizer `cfg` describes.

    `accept` sees the data before it replaces anything and raises to refuse it: a command that then refuses
    (another vocabulary than its checkpoint's, a split too small for the model) leaves the earlier dataset as it
    was, instead of replacing the data other runs rely on and then stopping.
    """
    _validate(cfg)
    data_dir = Path(data_dir)
    out = data_dir / cfg.name
    accept = accept or (lambda _: None)
    check_data_dir(data_dir)
    remove_stale(data_dir, cfg.name, log)
    try:
        source = describe_source(cfg)
    except SourceMissing as missing:
        if force:
            raise
        return _checked(_without_source(cfg, out, missing, log), accept)
    fingerprint = _fingerprint(cfg, source)
    if not force and meta_value(out, "fingerprint") == fingerprint:
        try:
            prepared = load_prepared(out, expect_tokenizer=cfg)
        except DataError as err:  # damaged since (e.g. a truncated copy): prepare it again
            log(f"data: {err}; preparing it again")
        else:
            log(f"data: {out} is up to date ({_counts(prepared.meta)})")
            return _checked(prepared, accept)
    _check_target(cfg, data_dir, source)
    return _prepare_into(cfg, data_dir, source, fingerprint, accept, log)


def _checked(prepared: PreparedData, accept: Accept) -> PreparedData:
    accept(prepared)
    return prepared


def _check_target(cfg: DataConfig, data_dir: Path, source: dict[str, Any]) -> None:
    """Before any work: the corpus must not lie inside the folder it is prepared into, nor anything of the user's."""
    out = (data_dir / cfg.name).resolve()
    inside = next((f for f, *_ in source.get("files", []) if out in Path(f).resolve().parents), None)
    if inside is not None:
        raise DataError(
            f"{source_label(cfg)} lies inside {str(data_dir / cfg.name)!r}, the folder data.name={cfg.name!r} in "
            f"data_dir={str(data_dir)!r} is prepared into; choose another data.name= or data_dir="
        )
    check_replaceable(data_dir, cfg.name)


def _prepare_into(cfg: DataConfig, data_dir: Path, source: dict[str, Any], fingerprint: str, accept: Accept,
                  log: Log) -> PreparedData:
    """Tokenize into a temporary folder beside `<data_dir>/<name>`; swap it in only once `accept` agreed."""
    out = data_dir / cfg.name
    log(f"data: preparing {out} from {source['kind']} ({cfg.tokenizer} tokenizer)")
    with writes_to(data_dir):
        tmp = make_tmp(data_dir, cfg.name)
    try:
        meta = _write(cfg, source, tmp, log)
        with writes_to(data_dir):
            write_meta(tmp, meta | {"fingerprint": fingerprint, "request": _request_fingerprint(cfg)})
        staged = load_prepared(tmp, expect_tokenizer=cfg)
        accept(staged)
        with writes_to(data_dir):
            swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"data: wrote {out}: {_counts(meta)}, vocab {meta['vocab_size']}, {meta['dtype']}")
    return PreparedData(out, staged.meta, staged.tokenizer)  # the same files, renamed into place


def _counts(meta: dict[str, Any]) -> str:
    return f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens"


def _without_source(cfg: DataConfig, out: Path, missing: SourceMissing, log: Log) -> PreparedData:
    """The prepared data of this very request when its source files are gone; else the missing source's error."""
    if meta_value(out, "request") != _request_fingerprint(cfg):
        raise missing
    try:
        prepared = load_prepared(out, expect_tokenizer=cfg)
    except DataError as damage:
        raise DataError(f"{missing}, and the prepared {str(out)!r} cannot stand in for it: {damage}") from None
    log(f"data: note: {source_label(cfg)} is missing; using the prepared data in {out} ({_counts(prepared.meta)})")
    return prepared


def _validate(cfg: DataConfig) -> None:
    source = source_class(cfg.source)(cfg)  # an unknown data.source is refused first
    if cfg.split not in SPLIT_MODES:
        raise DataError(f"data.split={cfg.split!r} is unknown; valid: {', '.join(SPLIT_MODES)}")
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
    source.check()  # what this source needs (data.path, data.url, data.hub_name)
    if cfg.streaming and cfg.tokenizer == "char":
        raise DataError("data.streaming=true cannot build a char vocabulary; use data.tokenizer=tiktoken or bytes")


def _settings(cfg: DataConfig) -> dict[str, Any]:
    """Every setting that changes the prepared files (num_proc does not)."""
    return {"version": DATA_VERSION, "ids": "relative", "tokenizer": tokenizer_request(cfg),
            "text_field": cfg.text_field, "val_fraction": cfg.val_fraction, "split": cfg.split,
            "max_tokens": cfg.max_tokens, "dtype": cfg.dtype, "on_bad_utf8": cfg.on_bad_utf8}


def _hash(value: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(cfg: DataConfig, source: dict[str, Any]) -> str:
    """The settings and the source down to each file's size and mtime: equal means nothing to do."""
    return _hash(_settings(cfg) | {"source": source})


def _request_fingerprint(cfg: DataConfig) -> str:
    """The settings and the source as named (no file looked at): what the prepared data was made for."""
    return _hash(_settings(cfg) | {"request": describe_request(cfg)})


# ----------------------------------------------------------------------------------------------------------
# Tokenize


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


def tokenize_documents(ds, tokenizer: Tokenizer, dtype: str, num_proc: int = 1, field: str = "text"):
    """The `text` column as an `ids` column of `dtype` token arrays: `Dataset.map(batched=True)` in `num_proc`
    processes (a streamed IterableDataset is tokenized lazily, as it is read)."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        bad = next((t for t in batch["text"] if not isinstance(t, str)), "")  # streamed rows are checked only here
        if not isinstance(bad, str):
            raise DataError(f"a document's data.text_field={field!r} is {describe_value(bad)}, not text; "
                            f"set data.text_field= to a column of text")
        return {"ids": tokenizer.encode_arrays(batch["text"], dtype)}

    kwargs: dict[str, Any] = {"batched": True, "remove_columns": ["text"]}
    if hasattr(ds, "__len__"):
        # Naming the result ourselves spares `datasets` hashing the tokenizer (seconds for a BPE vocabulary).
        key = json.dumps([DATA_VERSION, tokenizer.spec(), dtype, ds._fingerprint], sort_keys=True)
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
        values = ids.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)  # (tokens,)
        doc_ids = batch.column("id").to_pylist() if "id" in batch.schema.names else [None] * batch.num_rows
        for i, doc_id in enumerate(doc_ids):
            yield doc_id, values[offsets[i] : offsets[i + 1]]


def _tokenize_corpus(cfg: DataConfig, ds) -> tuple[Tokenizer, str, str, Any]:
    """(tokenizer, token dtype, split mode, tokenized dataset) for the loaded corpus."""
    streaming = not hasattr(ds, "__len__")
    if not streaming and len(ds) == 0:
        raise DataError(f"the corpus ({source_label(cfg)}) has no documents")
    # The char vocabulary needs the corpus, unless it is given (data.vocabulary).
    texts = ds["text"] if cfg.tokenizer == "char" and cfg.vocabulary is None else None
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.encoding, texts=texts, chars=cfg.vocabulary)
    dtype = _token_dtype(cfg, tokenizer.vocab_size)
    mode = cfg.split if cfg.split != "auto" else ("position" if not streaming and len(ds) == 1 else "document")
    if streaming and mode == "position":
        raise DataError("data.split=position needs the whole corpus; streamed corpora split by document")
    if not streaming and "id" not in ds.column_names:
        ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    return tokenizer, dtype, mode, tokenize_documents(ds, tokenizer, dtype, cfg.num_proc, cfg.text_field)


# ----------------------------------------------------------------------------------------------------------
# Write


def _write(cfg: DataConfig, source: dict[str, Any], out: Path, log: Log) -> dict[str, Any]:
    """Tokenize the corpus into `out`/train.bin and val.bin; the meta.json contents (less the fingerprints)."""
    from tqdm.auto import tqdm

    with writes_to(out.parent, errnos=DISK_FULL):  # converting .jsonl/.parquet writes into out/.cache
        ds = load_documents(cfg, source, log, cache_dir=out / ".cache")
    tokenizer, dtype, mode, tokenized = _tokenize_corpus(cfg, ds)
    n_docs = len(ds) if hasattr(ds, "__len__") else None
    documents = tqdm(iter_token_documents(tokenized, dtype), desc="writing", unit="doc", total=n_docs, disable=None)
    eot = np.array([tokenizer.eot_id], dtype=dtype).tobytes()
    with SplitFiles(out, out.parent) as files:
        if mode == "position":
            counts, docs = _write_by_position(tokenized, documents, files, eot, cfg.val_fraction)
        else:
            counts, docs = _write_by_document(documents, files, eot, cfg)
    shutil.rmtree(out / ".cache", ignore_errors=True)
    _check_splits(cfg, mode, counts, docs)
    return _meta(cfg, source, tokenizer, dtype, mode, counts, docs)


def _write_by_position(tokenized, documents, files: SplitFiles, eot: bytes,
                       val_fraction: float) -> tuple[Counts, Counts]:
    """One token stream (documents joined by end-of-text), cut at a fraction: train before, val after."""
    import pyarrow.compute as pc

    n_docs = len(tokenized)
    total = int(pc.sum(pc.list_value_length(tokenized.data.column("ids"))).as_py() or 0) + n_docs - 1
    n_train = int(total * (1 - val_fraction))
    position = 0
    for i, (_, ids) in enumerate(documents):
        stream = (eot if i > 0 else b"") + ids.tobytes()
        cut = min(max(n_train - position, 0), len(ids) + (i > 0)) * ids.itemsize  # bytes of this piece for train
        files.write("train", stream[:cut])
        files.write("val", stream[cut:])
        position += len(ids) + (i > 0)
    return {"train": n_train, "val": total - n_train}, {"train": n_docs, "val": n_docs}


def _write_by_document(documents, files: SplitFiles, eot: bytes, cfg: DataConfig) -> tuple[Counts, Counts]:
    """Whole documents, each to train or val by a hash of its id; stop after data.max_tokens."""
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    for i, (doc_id, ids) in enumerate(documents):
        split = "val" if _is_val(str(doc_id if doc_id is not None else i), cfg.val_fraction) else "train"
        if docs[split] > 0:
            files.write(split, eot)
            counts[split] += 1
        files.write(split, ids.tobytes())
        counts[split] += len(ids)
        docs[split] += 1
        if cfg.max_tokens is not None and counts["train"] + counts["val"] >= cfg.max_tokens:
            break
    return counts, docs


def _check_splits(cfg: DataConfig, mode: str, counts: Counts, docs: Counts) -> None:
    """Both splits hold tokens; if not, the fix that works for the split actually in use."""
    total = counts["train"] + counts["val"]
    if total == 0:
        raise DataError(f"the corpus ({source_label(cfg)}) is empty: no tokens")
    for split in ("train", "val"):
        if counts[split] > 0:
            continue
        if mode == "position":
            fix = "add text: each split needs a token" if total < 2 else "add text, or set data.val_fraction=0.5"
            raise DataError(
                f"the {split} split of {source_label(cfg)} is empty: {total} token(s) cut by position at "
                f"data.val_fraction={cfg.val_fraction} leave it none; {fix}"
            )
        raise DataError(
            f"the {split} split of {source_label(cfg)} is empty ({docs['train'] + docs['val']} document(s)); "
            f"add documents or use data.split=position"
        )


def _meta(cfg: DataConfig, source: dict[str, Any], tokenizer: Tokenizer, dtype: str, mode: str, counts: Counts,
          docs: Counts) -> dict[str, Any]:
    public_source = {k: v for k, v in source.items() if k != "files"}
    if "files" in source:
        public_source["n_files"] = len(source["files"])
    return {
        "format": DATA_FORMAT, "version": DATA_VERSION, "name": cfg.name, "tokenizer": tokenizer.spec(),
        "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "dtype": dtype,
        "train_tokens": counts["train"], "val_tokens": counts["val"], "documents": docs, "split": mode,
        "val_fraction": cfg.val_fraction, "source": public_source, "python": platform.python_version(),
    }
