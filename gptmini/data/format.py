"""The prepared-data format, owned here: what `<data_dir>/<name>/` holds and the checks that its parts agree.

    train.bin   uint16 (or uint32) token ids, documents separated by end-of-text
    val.bin
    meta.json   tokenizer spec, dtype, token counts, source, fingerprints, and a checksum of meta.json itself

Preparation writes meta.json with `write_meta`; everything that reads a prepared dataset goes through
`read_meta` and `check_prepared`, so the writer and the readers cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gptmini.config import DataConfig
from gptmini.tokenizer import Tokenizer, tokenizer_from_spec

DATA_FORMAT = "gptmini-data"
DATA_VERSION = 1
DTYPES = ("uint16", "uint32")
SPLIT_NAMES = ("train", "val")
META = "meta.json"
CACHE = ".cache"  # what converting .jsonl/.parquet leaves while a preparation runs


class DataError(ValueError):
    """A corpus or prepared dataset that cannot be used; the message names the bad value and the fix."""


def bin_path(folder: Path, split: str) -> Path:
    return folder / f"{split}.bin"


def meta_checksum(meta: dict[str, Any]) -> str:
    """A hash of meta.json's content (less the checksum): an edit by hand, e.g. a permuted vocabulary, shows."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def write_meta(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write `folder`/meta.json with its checksum, synced to disk; the meta as written."""
    meta = {**meta, "checksum": meta_checksum(meta)}
    with open(folder / META, "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    return meta


def read_meta(folder: Path) -> dict[str, Any]:
    """meta.json of a prepared dataset, checked to be this format and version."""
    meta_path = folder / META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{str(folder)!r} holds no prepared dataset (no meta.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{str(meta_path)!r} is not valid JSON ({err}); delete {str(folder)!r} to prepare again") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != DATA_FORMAT or meta.get("version") != DATA_VERSION:
        raise DataError(
            f"{str(meta_path)!r} is not a gptmini {DATA_FORMAT} v{DATA_VERSION} file; delete {str(folder)!r}"
        )
    return meta


def foreign_entries(folder: Path) -> list[str]:
    """What in `folder` a preparation did not write: everything, unless meta.json says it is a dataset of ours.

    An empty folder holds nothing to lose. Anything else is replaced only when it is this format's own files
    under this format's own meta.json; a user's corpus, a run directory or another tool's train.bin is not.
    """
    if not folder.is_dir():
        return [folder.name] if folder.exists() or folder.is_symlink() else []
    names = sorted(p.name for p in folder.iterdir())
    ours = {bin_path(folder, s).name for s in SPLIT_NAMES} | {META, CACHE}
    if not names or (meta_value(folder, "format") == DATA_FORMAT and set(names) <= ours):
        return []
    return names


def meta_value(folder: Path, key: str) -> Any:
    """One value of meta.json, or None when there is no readable meta.json (a cheap look before the checks)."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta.get(key) if isinstance(meta, dict) else None


def tokenizer_request(cfg: DataConfig) -> dict[str, Any]:
    """The tokenizer `cfg` asks for, as far as it is known before the corpus is read."""
    request = {"kind": cfg.tokenizer, "encoding": cfg.encoding if cfg.tokenizer == "tiktoken" else None}
    if cfg.tokenizer == "char" and cfg.vocabulary is not None:  # only when given: other fingerprints stay as they were
        request["chars"] = cfg.vocabulary
    return request


def check_prepared(folder: Path, meta: dict[str, Any], expect_tokenizer: DataConfig | None = None) -> Tokenizer:
    """The tokenizer of a prepared dataset, once meta.json and the .bin files are known to agree."""
    meta_path = folder / META
    damaged = f"delete {str(folder)!r} to prepare it again"
    if meta.get("dtype") not in DTYPES:
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
        _check_tokenizer_asked(folder, meta, expect_tokenizer, damaged)
    for split in SPLIT_NAMES:
        _check_bin(folder, split, meta, tokenizer.vocab_size, damaged)
    if "checksum" not in meta:
        raise DataError(f"{str(meta_path)!r} has no checksum (prepared by an older gptmini); {damaged}")
    if meta["checksum"] != meta_checksum(meta):
        raise DataError(f"{str(meta_path)!r} does not match its checksum (edited after preparation); {damaged}")
    return tokenizer


def _check_tokenizer_asked(folder: Path, meta: dict[str, Any], cfg: DataConfig, damaged: str) -> None:
    asked = tokenizer_request(cfg)
    held = {"kind": meta["tokenizer"]["kind"], "encoding": meta["tokenizer"].get("encoding")}
    if "chars" in asked:
        held["chars"] = meta["tokenizer"].get("chars")
    if asked["kind"] != held["kind"] or (asked["kind"] == "tiktoken" and asked["encoding"] != held["encoding"]) \
            or asked.get("chars", held.get("chars")) != held.get("chars"):
        raise DataError(
            f"{str(folder)!r} was prepared with tokenizer {held} but {asked} was asked for; "
            f"{damaged}, or set data.name to another folder"
        )


def _check_bin(folder: Path, split: str, meta: dict[str, Any], vocab_size: int, damaged: str) -> None:
    """The split's file holds exactly meta's token count, and no id outside the vocabulary."""
    file = bin_path(folder, split)
    expected = meta.get(f"{split}_tokens")
    size = file.stat().st_size if file.is_file() else None
    if size is None or not isinstance(expected, int) or size != expected * np.dtype(meta["dtype"]).itemsize:
        raise DataError(
            f"{str(file)!r} has {size} bytes but meta.json says {expected} {meta['dtype']} tokens "
            f"(truncated or from another preparation); {damaged}"
        )
    if expected and int(np.max(np.memmap(file, dtype=meta["dtype"], mode="r"))) >= vocab_size:
        raise DataError(f"{str(file)!r} holds token ids >= vocab_size {vocab_size}; {damaged}")
