"""Tokenizers behind one small interface: char-level, raw bytes, and any tiktoken BPE.

Every tokenizer describes itself with `spec()`, a plain dict of strings that is saved in `meta.json` and in
checkpoints; `tokenizer_from_spec` rebuilds it, so generation needs nothing but the checkpoint.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TOKENIZERS = ("char", "bytes", "tiktoken")
TIKTOKEN_NAMES = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
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


def _load_tiktoken(encoding: str):
    import tiktoken

    if encoding.endswith(".tiktoken") or os.sep in encoding:
        path = Path(encoding).expanduser()
        if not path.is_file():
            raise TokenizerError(f"tiktoken vocabulary file {encoding!r} does not exist")
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str

        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as err:  # the file is not in tiktoken's "base64 rank" format
            raise TokenizerError(f"{encoding!r} is not a .tiktoken vocabulary file ({err})") from None
        # A local file carries only the merges; GPT-2's pre-tokenisation pattern and <|endoftext|> complete it.
        return tiktoken.Encoding(
            name=path.stem, pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: len(ranks)}
        )
    if encoding not in tiktoken.list_encoding_names():
        raise TokenizerError(
            f"tiktoken encoding {encoding!r} is unknown; valid: {', '.join(TIKTOKEN_NAMES)} or a .tiktoken file path"
        )
    try:
        return tiktoken.get_encoding(encoding)
    except Exception as err:
        raise TokenizerError(
            f"could not load the tiktoken vocabulary {encoding!r} ({type(err).__name__}); it is downloaded on "
            f"first use. Offline: point TIKTOKEN_CACHE_DIR at a tiktoken cache that holds it, or pass a local "
            f".tiktoken file as the encoding"
        ) from None


def build_tokenizer(kind: str, encoding: str = "gpt2", texts: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer a dataset config asks for; `char` builds its vocabulary from `texts`."""
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
