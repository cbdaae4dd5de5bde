"""Tokenizers: Unicode round trips, specs that rebuild the same tokenizer, local .tiktoken files, clear errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from gptmini.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    build_tokenizer,
    tokenizer_from_spec,
)

ROOT = Path(__file__).resolve().parents[1]

# Scripts, accents (precomposed and combining), emoji beyond the BMP, control-ish whitespace, CRLF, the special
# token's text (which must stay plain text), and a zero-width space.
UNICODE = (
    "Hello, wörld! naïve café — 日本語のテキスト, Ελληνικά, עברית, русский; e\u0301 vs é; "
    "emoji 🐍🚀👩‍💻; tabs\tand\nnew lines\r\n; <|endoftext|> stays text; zero\u200bwidth; ½ ≠ ∞ ∑ 𝔘𝔫𝔦"
)


def r50k_file(cache: Path) -> Path:
    """The r50k_base vocabulary in a tiktoken cache, found by its contents (cache files are named by hash)."""
    for path in sorted(cache.iterdir()):
        with open(path, "rb") as f:
            head = f.read(200).splitlines()
        try:
            first = [(base64.b64decode(tok, validate=True), int(rank)) for tok, rank in map(bytes.split, head[:3])]
        except ValueError:
            continue  # gpt2's vocab.bpe / encoder.json: another format
        if first[0] == (b"!", 0) and len(path.read_bytes().splitlines()) == 50256:
            return path
    pytest.skip(f"no r50k_base .tiktoken file in the tiktoken cache {cache}")


def test_char_round_trip_unicode():
    tok = CharTokenizer.from_texts([UNICODE])
    assert tok.chars == "".join(sorted(set(UNICODE)))
    assert tok.vocab_size == len(set(UNICODE)) + 1 and tok.eot_id == len(set(UNICODE))
    ids = tok.encode(UNICODE)
    assert len(ids) == len(UNICODE) and max(ids) < tok.eot_id
    assert [tok.chars[i] for i in ids] == list(UNICODE)
    assert tok.decode(ids) == UNICODE
    # end-of-text separates documents and never decodes to a character
    assert tok.decode(tok.encode("ab") + [tok.eot_id] + tok.encode("c")) == "abc"


@pytest.mark.parametrize("chars", ["".join(sorted(set(UNICODE))), "".join(sorted(set(UNICODE), reverse=True))])
def test_char_encode_arrays_matches_encode(chars):
    """The vectorised path the data pipeline uses gives the same ids, for a vocabulary in any order."""
    tok = CharTokenizer(chars)
    texts = [UNICODE, "", UNICODE[::-1], "é"]
    for dtype in ("uint16", "int64"):
        arrays = tok.encode_arrays(texts, dtype)
        assert [a.dtype for a in arrays] == [np.dtype(dtype)] * len(texts)
        assert [a.tolist() for a in arrays] == [tok.encode(t) for t in texts]


def test_char_unknown_characters_error_lists_them():
    tok = CharTokenizer.from_texts(["hello world"])
    for encode in (tok.encode, lambda text: tok.encode_arrays([text])):
        with pytest.raises(TokenizerError) as err:
            encode("hello wörld 🐍!")
        message = str(err.value)
        assert "3 character(s)" in message
        for c in ("ö", "🐍", "!"):
            assert repr(c) in message
        assert "'h'" not in message  # known characters are not listed


def test_char_vocabulary_must_be_unique():
    with pytest.raises(TokenizerError, match="repeated"):
        CharTokenizer("abca")
    with pytest.raises(TokenizerError, match="needs the corpus"):
        build_tokenizer("char")


def test_bytes_round_trip_unicode():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.decode(ids) == UNICODE
    assert tok.decode(ids[:5] + [256] + ids[5:]) == UNICODE  # end-of-text is dropped
    assert [a.tolist() for a in tok.encode_arrays([UNICODE, ""], "uint16")] == [ids, []]
    # a sequence cut inside a multi-byte character (mid-generation) decodes with U+FFFD instead of failing
    cut = tok.encode("é")[:1]
    assert tok.decode(tok.encode("a") + cut) == "a\ufffd"


def test_tiktoken_gpt2_round_trip_matches_tiktoken(tiktoken_cache):
    import tiktoken

    tok = TiktokenTokenizer("gpt2")
    reference = tiktoken.get_encoding("gpt2")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    ids = tok.encode(UNICODE)
    assert ids == reference.encode_ordinary(UNICODE)
    assert tok.eot_id not in ids  # "<|endoftext|>" in the text is plain text, not the control token
    assert tok.decode(ids) == UNICODE
    assert tok.decode(ids + [tok.eot_id] + ids) == UNICODE + UNICODE
    assert tok.encode_batch([UNICODE, "x"]) == [ids, reference.encode_ordinary("x")]
    assert [a.tolist() for a in tok.encode_arrays([UNICODE], "uint16")] == [ids]


def test_tiktoken_local_published_file_tokenizes_like_the_download(tiktoken_cache, tmp_path, monkeypatch):
    """r50k_base from a local file (under a neutral name) is recognised by content and equals gpt2's BPE;
    reading it writes nothing into the tiktoken cache."""
    local = tmp_path / "my_vocab.tiktoken"
    local.write_bytes(r50k_file(tiktoken_cache).read_bytes())
    gpt2 = TiktokenTokenizer("gpt2")
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty_cache))
    tok = TiktokenTokenizer(str(local))
    assert list(empty_cache.iterdir()) == []
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode(UNICODE) == gpt2.encode(UNICODE)
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    rebuilt = tokenizer_from_spec(json.loads(json.dumps(tok.spec())))
    assert tok.spec() == {"kind": "tiktoken", "encoding": str(local)}
    assert rebuilt.encode(UNICODE) == tok.encode(UNICODE)


def test_tiktoken_local_custom_file(tmp_path):
    """Any file in the format: its merges, GPT-2's pre-tokenisation and end-of-text as the next id."""
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b" ab": 257}
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ranks.items()))
    tok = TiktokenTokenizer(str(path))
    assert (tok.vocab_size, tok.eot_id) == (259, 258)
    assert tok.encode("ab ab abc") == [256, 257, 257, ord("c")]
    text = "ab ab — ünï 🐍 <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text


def test_tiktoken_bad_local_files(tmp_path):
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(TokenizerError, match="does not exist") as err:
        TiktokenTokenizer(str(missing))
    assert str(missing) in str(err.value)
    bpe = tmp_path / "vocab.tiktoken"
    bpe.write_text("#version: 0.2\nĠ t\nĠ a\n")  # GPT-2's vocab.bpe format, not tiktoken's
    with pytest.raises(TokenizerError, match="is not a .tiktoken vocabulary file") as err:
        TiktokenTokenizer(str(bpe))
    assert str(bpe) in str(err.value)


def test_tiktoken_unknown_name_lists_valid_names():
    with pytest.raises(TokenizerError) as err:
        TiktokenTokenizer("gpt5_base")
    message = str(err.value)
    assert "'gpt5_base'" in message
    for name in ("gpt2", "r50k_base", "cl100k_base", "o200k_base", ".tiktoken file"):
        assert name in message


def test_tiktoken_download_failure_names_offline_remedies(tmp_path, monkeypatch):
    """cl100k_base is not in the offline cache: the download is attempted (and made to fail here, with no
    network touched), and the error names TIKTOKEN_CACHE_DIR and the local-file remedy."""
    import requests
    import tiktoken.load
    import tiktoken.registry

    attempted = []

    def no_network(url, *args, **kwargs):
        attempted.append(url)
        raise requests.ConnectionError(f"offline: {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    with pytest.raises(TokenizerError) as err:
        TiktokenTokenizer("cl100k_base")
    message = str(err.value)
    assert attempted and attempted[0].startswith("https://")
    assert "'cl100k_base'" in message and "TIKTOKEN_CACHE_DIR" in message and ".tiktoken" in message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["char", "bytes", "tiktoken"])
def test_spec_round_trip(kind, request):
    if kind == "tiktoken":
        request.getfixturevalue("tiktoken_cache")
    tok = build_tokenizer(kind, "gpt2", texts=[UNICODE])
    spec = json.loads(json.dumps(tok.spec()))  # as stored in meta.json and checkpoints
    assert spec["kind"] == kind
    rebuilt = tokenizer_from_spec(spec)
    assert type(rebuilt) is type(tok)
    assert (rebuilt.vocab_size, rebuilt.eot_id) == (tok.vocab_size, tok.eot_id)
    assert rebuilt.encode(UNICODE) == tok.encode(UNICODE)
    assert rebuilt.decode(tok.encode(UNICODE)) == UNICODE
    assert rebuilt.spec() == tok.spec()


def test_bad_specs_and_kinds():
    for spec in ({}, {"kind": "char"}, {"kind": "tiktoken"}, {"kind": "wordpiece"}, "char", None):
        with pytest.raises(TokenizerError, match="not a tokenizer spec"):
            tokenizer_from_spec(spec)
    with pytest.raises(TokenizerError) as err:
        build_tokenizer("wordpiece")
    assert "'wordpiece'" in str(err.value) and "char, bytes, tiktoken" in str(err.value)


def tampered(tmp_path, lines: list[tuple[bytes, int]]):
    path = tmp_path / "tampered.tiktoken"
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in lines))
    return path


BYTE_LINES = [(bytes([b]), b) for b in range(256)]


@pytest.mark.parametrize(("lines", "message"), [
    (BYTE_LINES + [(b"ab", -3)], r"rank -3 is outside \[0, 16777216\)"),
    (BYTE_LINES + [(b"ab", 10**15)], r"rank 1000000000000000 is outside"),
    (BYTE_LINES + [(b"ab", 256), (b"ab", 257)], r"1 token\(s\) appear more than once"),
    (BYTE_LINES + [(b"ab", 256), (b"cd", 256)], r"1 rank\(s\) are given to two tokens"),
    (BYTE_LINES[:65] + BYTE_LINES[66:] + [(b"ab", 256)], r"1 of the 256 single bytes have no token \(first: 0x41\)"),
])
def test_a_tampered_tiktoken_file_is_one_clear_error(tmp_path, lines, message):
    """tiktoken trusts its vocabulary: duplicate ranks and missing bytes ended in a Rust panic, huge ranks in an
    allocation without bound. Each is refused when the file is read."""
    with pytest.raises(TokenizerError, match=message):
        TiktokenTokenizer(str(tampered(tmp_path, lines)))
