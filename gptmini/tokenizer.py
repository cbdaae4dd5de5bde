"""Tokenizers behind one small interface: char-level, raw bytes, and any tiktoken BPE.

Every tokenizer describes itself with `spec()`, a plain dict of strings that is saved in `meta.json` and in
checkpoints; `tokenizer_from_spec` rebuilds it, so generation needs nothing but the checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZERS = ("char", "bytes", "tiktoken")
ENDOFTEXT = "<|endoftext|>"


class TokenizerError(ValueError):
    """Text or a vocabulary that a tokenizer cannot handle; the message names the remedy."""


class Tokenizer(ABC):
    """encode / decode / vocab_size / eot_id, plus a spec that can be saved and reloaded."""

    vocab_size: int
    eot_id: int  # end-of-text: separates documents, stops generation

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once (tiktoken parallelises this internally)."""
        return [self.encode(t) for t in texts]

    def encode_arrays(self, texts: list[str], dtype: np.dtype | str = np.int64) -> list[np.ndarray]:
        """encode_batch as integer arrays (what the data pipeline writes), without a Python int per token."""
        return [np.asarray(ids, dtype=dtype) for ids in self.encode_batch(texts)]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def spec(self) -> dict[str, Any]: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per distinct character of the corpus, in sorted order; end-of-text is the id after them."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise TokenizerError("char tokenizer: the vocabulary has repeated characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.eot_id = len(chars)
        self.vocab_size = len(chars) + 1
        # For encode_arrays: the code points sorted, and the id of each (the vocabulary may be in any order).
        codes = _code_points(chars)
        self._order = np.argsort(codes, kind="stable")
        self._sorted_codes = codes[self._order]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self.stoi.keys())
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise TokenizerError(
                f"{len(unknown)} character(s) not in the char vocabulary: {shown}; "
                f"use only characters of the training corpus, or tokenizer=bytes/tiktoken"
            ) from None

    def encode_arrays(self, texts: list[str], dtype: np.dtype | str = np.int64) -> list[np.ndarray]:
        out = []
        for text in texts:
            codes = _code_points(text)  # (N,)
            pos = np.searchsorted(self._sorted_codes, codes).clip(max=max(len(self.chars) - 1, 0))
            if len(codes) and (not len(self.chars) or np.any(self._sorted_codes[pos] != codes)):
                self.encode(text)  # raises the error that lists the unknown characters
            out.append(self._order[pos].astype(dtype))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids if i != self.eot_id)

    def spec(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


class ByteTokenizer(Tokenizer):
    """The 256 UTF-8 byte values, plus end-of-text as id 256. Needs no vocabulary file at all."""

    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: list[str], dtype: np.dtype | str = np.int64) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # A partial UTF-8 sequence (e.g. mid-stream during generation) shows as U+FFFD instead of failing.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": "bytes"}


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding by name (`gpt2`, `cl100k_base`, ...) or from a local `.tiktoken` file."""

    def __init__(self, encoding: str = "gpt2") -> None:
        self.encoding_name = encoding
        self.enc = _load_tiktoken(encoding)
        self.eot_id = self.enc.eot_token
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        # Special tokens in the text are treated as plain text, never as control tokens.
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([i for i in ids if i != self.eot_id])

    def spec(self) -> dict[str, Any]:
        return {"kind": "tiktoken", "encoding": self.encoding_name}


def _code_points(text: str) -> np.ndarray:
    """The Unicode code points of `text` as a uint32 array (N,); lone surrogates pass through."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


def _load_tiktoken(encoding: str):
    import tiktoken

    if encoding.endswith(".tiktoken") or os.sep in encoding:
        return _load_tiktoken_file(Path(encoding).expanduser())
    names = tiktoken.list_encoding_names()
    if encoding not in names:
        raise TokenizerError(
            f"tiktoken encoding {encoding!r} is unknown; valid: {', '.join(names)}, or a .tiktoken file path"
        )
    try:
        return tiktoken.get_encoding(encoding)
    except Exception as err:
        raise TokenizerError(
            f"could not load the tiktoken vocabulary {encoding!r} ({type(err).__name__}); it is downloaded on "
            f"first use. Offline: point TIKTOKEN_CACHE_DIR at a tiktoken cache that holds it, or pass a local "
            f".tiktoken file as the encoding (data.encoding=/path/to/{encoding}.tiktoken)"
        ) from None


def _load_tiktoken_file(path: Path):
    """A tiktoken Encoding from a local `.tiktoken` file ("base64-token rank" lines), read without any cache.

    A file with the contents of a published encoding (r50k_base, cl100k_base, ...: checked by its hash) gets
    that encoding's pre-tokenisation pattern and special tokens, so it tokenizes exactly like the download.
    Any other file gets GPT-2's pattern and <|endoftext|> as the id after its merges.
    """
    import tiktoken

    if not path.is_file():
        raise TokenizerError(f"tiktoken vocabulary file {str(path)!r} does not exist")
    raw = path.read_bytes()
    ranks: dict[bytes, int] = {}
    try:
        for line in raw.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except Exception:  # not tiktoken's format (e.g. GPT-2's vocab.bpe or encoder.json)
        raise TokenizerError(
            f"{str(path)!r} is not a .tiktoken vocabulary file (lines of 'base64-token rank'); it begins "
            f"{raw[:60].splitlines()[0]!r}"
        ) from None
    _check_ranks(path, ranks, sum(1 for line in raw.splitlines() if line))
    params = _published_encoding(raw, ranks)
    if params is None:
        from tiktoken_ext.openai_public import r50k_pat_str

        params = {"pat_str": r50k_pat_str, "special_tokens": {ENDOFTEXT: max(ranks.values()) + 1}}
    params = {k: v for k, v in params.items() if k not in ("name", "mergeable_ranks")}
    return tiktoken.Encoding(name=path.stem, mergeable_ranks=ranks, **params)


MAX_RANK = 2**24  # 16.7 M: far above any published vocabulary, and an embedding that size is already 50+ GB


def _check_ranks(path: Path, ranks: dict[bytes, int], n_lines: int) -> None:
    """What tiktoken assumes of a vocabulary and does not check itself (it panics, or allocates without bound):
    every token once, every rank once and in [0, MAX_RANK), and each of the 256 bytes a token of its own, so that
    any text can be encoded."""
    where = f"{str(path)!r} is not a usable .tiktoken vocabulary"
    if not ranks:
        raise TokenizerError(f"{str(path)!r} is an empty .tiktoken vocabulary file")
    if len(ranks) != n_lines:
        raise TokenizerError(f"{where}: {n_lines - len(ranks)} token(s) appear more than once")
    bad = next((r for r in ranks.values() if not 0 <= r < MAX_RANK), None)
    if bad is not None:
        raise TokenizerError(f"{where}: rank {bad} is outside [0, {MAX_RANK})")
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{where}: {len(ranks) - len(set(ranks.values()))} rank(s) are given to two tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{where}: {len(missing)} of the 256 single bytes have no token (first: "
                             f"{missing[0]:#04x}), so some text could not be encoded")


def _published_encoding(raw: bytes, ranks: dict[bytes, int]) -> dict[str, Any] | None:
    """tiktoken's own definition of the published encoding whose file has exactly the contents `raw`, if any.

    Each definition in `tiktoken_ext.openai_public` loads its file with `load_tiktoken_bpe(url, expected_hash)`;
    here that loader hands over the local ranks when the hash matches, so nothing is downloaded.
    """
    import tiktoken_ext.openai_public as public

    digest = hashlib.sha256(raw).hexdigest()

    class Mismatch(Exception):
        pass

    def local_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if expected_hash != digest:
            raise Mismatch
        return ranks

    loader, public.load_tiktoken_bpe = public.load_tiktoken_bpe, local_ranks
    try:
        for name, constructor in public.ENCODING_CONSTRUCTORS.items():
            if name == "gpt2":  # defined from GPT-2's own vocab.bpe/encoder.json files, not a .tiktoken file
                continue
            try:
                return constructor()
            except Mismatch:
                continue
        return None
    finally:
        public.load_tiktoken_bpe = loader


def build_tokenizer(kind: str, encoding: str = "gpt2", texts: Iterable[str] | None = None,
                    chars: str | None = None) -> Tokenizer:
    """The tokenizer a dataset config asks for; `char` takes `chars` as its vocabulary, or builds one from `texts`."""
    if kind == "char" and chars is not None:
        return CharTokenizer(chars)
    if kind == "char":
        if texts is None:
            raise TokenizerError("the char tokenizer needs the corpus to build its vocabulary")
        return CharTokenizer.from_texts(texts)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "tiktoken":
        return TiktokenTokenizer(encoding)
    raise TokenizerError(f"tokenizer {kind!r} is unknown; valid: {', '.join(TOKENIZERS)}")


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.spec()` (as stored in meta.json and checkpoints)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "char" and isinstance(spec.get("chars"), str):
        return CharTokenizer(spec["chars"])
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "tiktoken" and isinstance(spec.get("encoding"), str):
        return TiktokenTokenizer(spec["encoding"])
    raise TokenizerError(f"not a tokenizer spec: {spec!r}")
