"""Data preparation on corpora made in tmp_path, the prepared-data checks, and the batch samplers."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from gptmini import data as data_lib
from gptmini.config import DataConfig
from gptmini.data import BatchSampler, DataError, iter_windows, load_prepared, prepare, stdlib_files
from gptmini.tokenizer import ByteTokenizer, CharTokenizer, TiktokenTokenizer, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma délta ε zeta η θ iota kappa λ mu".split()


def text_of(i: int, words: int = 30) -> str:
    """Document i: a unique header, then words drawn from a fixed list (some non-ASCII)."""
    rng = np.random.default_rng(i)
    return f"<doc {i:03d}>\n" + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words)) + f"\n</doc {i:03d}>\n"


def make_docs(folder: Path, n: int, suffix: str = ".txt") -> dict[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = {folder / f"doc_{i:03d}{suffix}": text_of(i) for i in range(n)}
    for path, text in docs.items():
        path.write_text(text, encoding="utf-8")
    return docs


def cfg_for(path: Path | str, **kw) -> DataConfig:
    return DataConfig(**{"name": "corpus", "source": "files", "path": str(path), **kw})


def run(cfg: DataConfig, data_dir: Path, **kw) -> tuple[data_lib.PreparedData, list[str]]:
    logs: list[str] = []
    return prepare(cfg, data_dir, log=logs.append, **kw), logs


def split_docs(prepared: data_lib.PreparedData, split: str) -> list[str]:
    """The documents of a split: its tokens cut at end-of-text, each decoded."""
    tokens = np.asarray(prepared._tokens(split))
    cuts = np.flatnonzero(tokens == prepared.tokenizer.eot_id)
    return [prepared.tokenizer.decode(piece.tolist()) for piece in np.split(tokens, cuts)]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def file_ids(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


# ----------------------------------------------------------------------------------------------------------
# Preparation from local files


def test_several_txt_files_split_by_document(tmp_path):
    docs = make_docs(tmp_path / "corpus", 40)
    prepared, logs = run(cfg_for(tmp_path / "corpus", val_fraction=0.25), tmp_path / "data")
    meta = prepared.meta
    assert meta["split"] == "document" and meta["source"]["n_files"] == 40
    train, val = split_docs(prepared, "train"), split_docs(prepared, "val")
    assert len(train) == meta["documents"]["train"] and len(val) == meta["documents"]["val"]
    assert len(train) + len(val) == 40 and train and val
    # every file is exactly one document of one split, in file order within each split
    texts = list(docs.values())
    assert sorted(train + val) == sorted(texts)
    assert train == [t for t in texts if t in train] and val == [t for t in texts if t in val]
    # val documents never appear in train (each holds a unique header)
    train_text = prepared.tokenizer.decode(np.asarray(prepared.train_tokens()).tolist())
    for doc in val:
        assert doc.splitlines()[0] not in train_text
    # token counts: characters, plus one end-of-text between consecutive documents of a split
    assert meta["train_tokens"] == sum(map(len, train)) + len(train) - 1
    assert meta["val_tokens"] == sum(map(len, val)) + len(val) - 1
    assert any("wrote" in line for line in logs)


def test_document_split_depends_only_on_the_document(tmp_path):
    """Adding files never moves an existing document to the other split (the split hashes each document)."""
    make_docs(tmp_path / "corpus", 30)
    first, _ = run(cfg_for(tmp_path / "corpus", val_fraction=0.3), tmp_path / "data")
    val_before = set(split_docs(first, "val"))
    for i in range(30, 45):
        (tmp_path / "corpus" / f"doc_{i:03d}.txt").write_text(text_of(i))
    second, _ = run(cfg_for(tmp_path / "corpus", val_fraction=0.3), tmp_path / "data")
    old_texts = {text_of(i) for i in range(30)}
    assert set(split_docs(second, "val")) & old_texts == val_before
    assert set(split_docs(second, "train")) & old_texts == old_texts - val_before


@pytest.mark.parametrize("n_chars", [1000, 1001, 4567])
def test_one_txt_file_split_by_position(tmp_path, n_chars):
    text = ("The quick brown fox — ünïcode 🦊 jumps.\n" * 200)[:n_chars]
    path = tmp_path / "one.txt"
    path.write_text(text, encoding="utf-8")
    prepared, _ = run(cfg_for(path), tmp_path / "data")
    n_train = int(n_chars * 0.9)
    assert prepared.meta["split"] == "position"
    assert (prepared.meta["train_tokens"], prepared.meta["val_tokens"]) == (n_train, n_chars - n_train)
    tok = prepared.tokenizer
    assert np.asarray(prepared.train_tokens()).tolist() == tok.encode(text[:n_train])
    assert np.asarray(prepared.val_tokens()).tolist() == tok.encode(text[n_train:])


def test_position_split_of_several_files(tmp_path):
    """data.split=position over several documents: one stream joined by end-of-text, cut at the fraction."""
    docs = make_docs(tmp_path / "corpus", 5)
    prepared, _ = run(cfg_for(tmp_path / "corpus", split="position", val_fraction=0.3), tmp_path / "data")
    tok = prepared.tokenizer
    stream = []
    for i, text in enumerate(docs.values()):
        stream += ([tok.eot_id] if i else []) + tok.encode(text)
    cut = int(len(stream) * 0.7)
    assert np.asarray(prepared.train_tokens()).tolist() == stream[:cut]
    assert np.asarray(prepared.val_tokens()).tolist() == stream[cut:]


def test_jsonl_with_another_text_field(tmp_path):
    rows = [{"title": f"t{i}", "body": text_of(i), "n": i} for i in range(30)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prepared, _ = run(cfg_for(path, text_field="body", val_fraction=0.3), tmp_path / "data")
    train, val = split_docs(prepared, "train"), split_docs(prepared, "val")
    assert sorted(train + val) == sorted(r["body"] for r in rows) and train and val
    assert prepared.meta["tokenizer"]["chars"] == "".join(sorted(set("".join(r["body"] for r in rows))))
    assert listing(tmp_path / "data") == ["corpus"]  # the json conversion left nothing behind
    assert listing(tmp_path / "data" / "corpus") == ["meta.json", "train.bin", "val.bin"]


def test_parquet_files_with_another_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [text_of(i) for i in range(40)]
    (tmp_path / "pq").mkdir()
    for part in range(2):  # two files: read in order, as one corpus
        chunk = texts[part * 20 : (part + 1) * 20]
        table = pa.table({"content": chunk, "id_other": list(range(len(chunk)))})
        pq.write_table(table, tmp_path / "pq" / f"part-{part}.parquet")
    prepared, _ = run(cfg_for(tmp_path / "pq", text_field="content", val_fraction=0.3, tokenizer="bytes"),
                      tmp_path / "data")
    train, val = split_docs(prepared, "train"), split_docs(prepared, "val")
    assert sorted(train + val) == sorted(texts) and train and val
    assert train == [t for t in texts if t in train]  # file order, then row order
    assert prepared.meta["source"]["n_files"] == 2 and prepared.meta["tokenizer"] == {"kind": "bytes"}
    assert prepared.meta["train_tokens"] == sum(len(t.encode()) for t in train) + len(train) - 1


def test_folder_and_glob(tmp_path):
    corpus = tmp_path / "corpus"
    make_docs(corpus / "sub", 3)
    (corpus / "notes.md").write_text(text_of(100))
    (corpus / "code.py").write_text(text_of(101))
    (corpus / "skip.bin").write_bytes(b"\x00\xff")  # not a supported type: ignored in a folder
    prepared, _ = run(cfg_for(corpus, split="position"), tmp_path / "data")
    assert prepared.meta["source"]["n_files"] == 5
    everything = prepared.tokenizer.decode(np.concatenate([prepared.train_tokens(), prepared.val_tokens()]).tolist())
    assert everything == "".join(text_of(i) for i in (101, 100, 0, 1, 2))  # sorted: code.py, notes.md, sub/...
    globbed, _ = run(cfg_for(corpus / "sub" / "doc_00[02].txt", name="globbed", split="position"), tmp_path / "data")
    assert globbed.meta["source"] == {"kind": "files", "path": str(corpus / "sub" / "doc_00[02].txt"), "n_files": 2}
    both = globbed.tokenizer.decode(np.concatenate([globbed.train_tokens(), globbed.val_tokens()]).tolist())
    assert both == text_of(0) + text_of(2)


def test_meta_json_contents(tmp_path):
    docs = make_docs(tmp_path / "corpus", 20)
    prepared, _ = run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    meta = json.loads((out / "meta.json").read_text())
    assert meta == prepared.meta
    chars = "".join(sorted(set("".join(docs.values()))))
    assert meta["format"] == "gptmini-data" and meta["version"] == 1 and meta["name"] == "corpus"
    assert meta["tokenizer"] == {"kind": "char", "chars": chars}
    assert meta["vocab_size"] == len(chars) + 1 and meta["eot_id"] == len(chars)
    assert meta["dtype"] == "uint16" and meta["python"] == platform.python_version()
    assert meta["train_tokens"] * 2 == (out / "train.bin").stat().st_size
    assert meta["val_tokens"] * 2 == (out / "val.bin").stat().st_size
    assert meta["train_tokens"] + meta["val_tokens"] == sum(map(len, docs.values())) + 20 - 2
    assert isinstance(meta["fingerprint"], str) and len(meta["fingerprint"]) == 16
    int(meta["fingerprint"], 16)
    assert meta["source"] == {"kind": "files", "path": str(tmp_path / "corpus"), "n_files": 20}
    assert prepared.train_tokens().dtype == np.uint16


def big_alphabet(n: int) -> str:
    """n distinct characters, no surrogates (which UTF-8 files cannot hold)."""
    return "".join(chr(c) for c in range(0x100, 0x100 + n + 0x800) if not 0xD800 <= c <= 0xDFFF)[:n]


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    path = tmp_path / "wide.txt"
    text = big_alphabet(65536) + "\n" + big_alphabet(65536)[::7]  # 65,536 characters + end-of-text > 2**16
    path.write_text(text, encoding="utf-8")
    prepared, _ = run(cfg_for(path), tmp_path / "data")
    meta = prepared.meta
    assert meta["vocab_size"] == len(set(text)) + 1 == 65538  # and "\n"; end-of-text
    assert meta["dtype"] == "uint32"
    out = tmp_path / "data" / "corpus"
    assert (out / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    tokens = np.concatenate([prepared.train_tokens(), prepared.val_tokens()])
    assert tokens.dtype == np.uint32 and int(tokens.max()) > 2**16 - 1
    assert prepared.tokenizer.decode(tokens.tolist()) == text
    with pytest.raises(DataError) as err:
        run(cfg_for(path, dtype="uint16", name="narrow"), tmp_path / "data")
    assert "data.dtype=uint16" in str(err.value) and str(meta["vocab_size"]) in str(err.value)
    assert not (tmp_path / "data" / "narrow").exists()


def test_dtype_choice():
    assert data_lib._token_dtype(DataConfig(), 2**16) == "uint16"
    assert data_lib._token_dtype(DataConfig(), 2**16 + 1) == "uint32"
    assert data_lib._token_dtype(DataConfig(dtype="uint32"), 50257) == "uint32"
    with pytest.raises(DataError, match="data.dtype=uint16 cannot hold a vocabulary of 100277 tokens"):
        data_lib._token_dtype(DataConfig(dtype="uint16"), 100277)


def test_forced_uint32_files(tmp_path):
    make_docs(tmp_path / "corpus", 10)
    small, _ = run(cfg_for(tmp_path / "corpus", val_fraction=0.3), tmp_path / "a")
    wide, _ = run(cfg_for(tmp_path / "corpus", dtype="uint32", val_fraction=0.3), tmp_path / "b")
    assert wide.meta["dtype"] == "uint32"
    assert (tmp_path / "b" / "corpus" / "train.bin").stat().st_size == 4 * len(wide.train_tokens())
    assert np.array_equal(np.asarray(small.train_tokens()), np.asarray(wide.train_tokens()))


def test_gpt2_preparation(tmp_path, tiktoken_cache):
    import tiktoken

    docs = make_docs(tmp_path / "corpus", 12)
    prepared, _ = run(cfg_for(tmp_path / "corpus", tokenizer="tiktoken", encoding="gpt2", val_fraction=0.3),
                      tmp_path / "data")
    meta = prepared.meta
    assert meta["tokenizer"] == {"kind": "tiktoken", "encoding": "gpt2"}
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, 50256, "uint16")
    enc = tiktoken.get_encoding("gpt2")
    train = split_docs(prepared, "train")
    assert sorted(train + split_docs(prepared, "val")) == sorted(docs.values())
    expected = []
    for i, doc in enumerate(train):
        expected += ([50256] if i else []) + enc.encode_ordinary(doc)
    assert np.asarray(prepared.train_tokens()).tolist() == expected


@pytest.mark.parametrize("tokenizer", ["char", "bytes", "tiktoken"])
def test_num_proc_2_writes_identical_files(tmp_path, tokenizer, request, monkeypatch):
    if tokenizer == "tiktoken":
        request.getfixturevalue("tiktoken_cache")
    make_docs(tmp_path / "corpus", 24)
    cls = {"char": CharTokenizer, "bytes": ByteTokenizer, "tiktoken": TiktokenTokenizer}[tokenizer]
    original, pids = cls.encode_arrays, tmp_path / "pids"

    def record_pid(self, texts, dtype):  # which processes tokenize (forked workers inherit the patch)
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(self, texts, dtype)

    monkeypatch.setattr(cls, "encode_arrays", record_pid)
    for n in (1, 2):
        pids.unlink(missing_ok=True)
        run(cfg_for(tmp_path / "corpus", tokenizer=tokenizer, num_proc=n, val_fraction=0.3), tmp_path / f"{n}")
        others = set(pids.read_text().split()) - {str(os.getpid())}
        assert len(others) == (0 if n == 1 else 2)  # num_proc=2: two worker processes, none of it here
    for name in ("train.bin", "val.bin", "meta.json"):
        one, two = (tmp_path / f"{n}" / "corpus" / name for n in (1, 2))
        assert one.read_bytes() == two.read_bytes(), name


def test_max_tokens_stops_after_the_document_that_reaches_it(tmp_path):
    docs = make_docs(tmp_path / "corpus", 30)
    prepared, _ = run(cfg_for(tmp_path / "corpus", max_tokens=600, val_fraction=0.3), tmp_path / "data")
    total = prepared.meta["train_tokens"] + prepared.meta["val_tokens"]
    longest = max(map(len, docs.values()))
    assert 600 <= total < 600 + longest + 1
    assert prepared.meta["documents"]["train"] + prepared.meta["documents"]["val"] < 30


def test_streamed_documents_tokenize_like_a_dataset():
    """The streaming branch (an IterableDataset, as for hub corpora) yields the same token arrays."""
    import datasets

    texts = [text_of(i) for i in range(7)]
    tok = build_tokenizer("bytes")
    eager = datasets.Dataset.from_dict({"id": [str(i) for i in range(7)], "text": texts})
    streamed = datasets.IterableDataset.from_generator(lambda: ({"id": str(i), "text": t} for i, t in enumerate(texts)))
    a = list(data_lib.iter_token_documents(data_lib.tokenize_documents(eager, tok, "uint16"), "uint16"))
    b = list(data_lib.iter_token_documents(data_lib.tokenize_documents(streamed, tok, "uint16"), "uint16"))
    assert [i for i, _ in a] == [i for i, _ in b] == [str(i) for i in range(7)]
    for (_, x), (_, y), text in zip(a, b, texts, strict=True):
        assert x.dtype == y.dtype == np.uint16
        assert x.tolist() == y.tolist() == list(text.encode())


# ----------------------------------------------------------------------------------------------------------
# Cache hits, re-preparation, interruption


def test_same_inputs_do_no_work(tmp_path, monkeypatch):
    make_docs(tmp_path / "corpus", 10)
    first, _ = run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    before = file_ids(tmp_path / "data" / "corpus")

    def must_not_write(*args, **kwargs):
        raise AssertionError("prepared again although nothing changed")

    monkeypatch.setattr(data_lib, "_write", must_not_write)
    again, logs = run(cfg_for(tmp_path / "corpus", num_proc=2), tmp_path / "data")  # num_proc: same result
    assert file_ids(tmp_path / "data" / "corpus") == before
    assert again.meta == first.meta and any("up to date" in line for line in logs)
    with pytest.raises(AssertionError, match="prepared again"):
        run(cfg_for(tmp_path / "corpus"), tmp_path / "data", force=True)


@pytest.mark.parametrize("change", ["edit a file", "add a file", "tokenizer", "val_fraction"])
def test_changed_inputs_prepare_again_without_leftovers(tmp_path, change):
    make_docs(tmp_path / "corpus", 10)
    first, _ = run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    overrides = {}
    if change == "edit a file":
        (tmp_path / "corpus" / "doc_003.txt").write_text(text_of(3) + "an edit ✍\n")
    elif change == "add a file":
        (tmp_path / "corpus" / "doc_999.txt").write_text(text_of(999))
    elif change == "tokenizer":
        overrides = {"tokenizer": "bytes"}
    else:
        overrides = {"val_fraction": 0.5}
    second, logs = run(cfg_for(tmp_path / "corpus", **overrides), tmp_path / "data")
    assert second.meta["fingerprint"] != first.meta["fingerprint"]
    assert not any("up to date" in line for line in logs)
    assert listing(tmp_path / "data") == ["corpus"]  # no temporary or old folders left
    assert listing(tmp_path / "data" / "corpus") == ["meta.json", "train.bin", "val.bin"]
    everything = "".join(split_docs(second, "train") + split_docs(second, "val"))
    if change == "edit a file":
        assert "an edit ✍" in everything and "✍" in second.meta["tokenizer"]["chars"]
    elif change == "add a file":
        assert "<doc 999>" in everything
    elif change == "tokenizer":
        assert second.meta["tokenizer"] == {"kind": "bytes"} and second.meta["vocab_size"] == 257
    else:
        assert second.meta["val_fraction"] == 0.5 and second.meta["documents"] != first.meta["documents"]
    load_prepared(tmp_path / "data" / "corpus", expect_tokenizer=cfg_for("x", **overrides))


def test_interrupted_preparation_keeps_the_previous_data(tmp_path, monkeypatch):
    make_docs(tmp_path / "corpus", 10)
    run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    before = {name: (out / name).read_bytes() for name in listing(out)}
    real = data_lib.iter_token_documents

    def fails_half_way(*args, **kwargs):
        for i, doc in enumerate(real(*args, **kwargs)):
            if i == 5:
                raise OSError("No space left on device")
            yield doc

    monkeypatch.setattr(data_lib, "iter_token_documents", fails_half_way)
    (tmp_path / "corpus" / "doc_000.txt").write_text("changed\n")
    with pytest.raises(OSError, match="No space left"):
        run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    assert listing(tmp_path / "data") == ["corpus"]  # the temporary folder is gone
    assert {name: (out / name).read_bytes() for name in listing(out)} == before
    with pytest.raises(OSError, match="No space left"):  # a first preparation leaves nothing at all
        run(cfg_for(tmp_path / "corpus", name="fresh"), tmp_path / "data")
    assert listing(tmp_path / "data") == ["corpus"]
    monkeypatch.setattr(data_lib, "iter_token_documents", real)
    again, _ = run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    assert "changed\n" in split_docs(again, "train") + split_docs(again, "val")


def test_prepared_folder_is_not_private(tmp_path):
    make_docs(tmp_path / "corpus", 4)
    run(cfg_for(tmp_path / "corpus", split="position"), tmp_path / "data")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "data" / "corpus").stat().st_mode & 0o777 == 0o777 & ~mask


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear error each, nothing written


def assert_nothing_written(data_dir: Path) -> None:
    assert not data_dir.exists() or listing(data_dir) == []


def test_missing_path(tmp_path):
    missing = tmp_path / "no_such_corpus.txt"
    with pytest.raises(DataError, match="does not exist") as err:
        run(cfg_for(missing), tmp_path / "data")
    assert str(missing) in str(err.value)
    with pytest.raises(DataError, match="matches no"):
        run(cfg_for(tmp_path / "nothing*.txt"), tmp_path / "data")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="matches no") as err:
        run(cfg_for(tmp_path / "empty_dir"), tmp_path / "data")
    assert str(tmp_path / "empty_dir") in str(err.value)
    assert_nothing_written(tmp_path / "data")


def test_empty_corpus(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(DataError, match="empty") as err:
        run(cfg_for(path), tmp_path / "data")
    assert str(path) in str(err.value)
    assert_nothing_written(tmp_path / "data")


def test_a_split_left_empty(tmp_path):
    # two documents that both hash to train at this fraction: the val split would be empty
    names = [f"d{i}.txt" for i in range(50) if not data_lib._is_val(f"d{i}.txt", 0.1)][:2]
    (tmp_path / "c").mkdir()
    for name in names:
        (tmp_path / "c" / name).write_text("some text\n")
    with pytest.raises(DataError, match="the val split of data.path=.* is empty .*data.split=position"):
        run(cfg_for(tmp_path / "c"), tmp_path / "data")
    assert_nothing_written(tmp_path / "data")
    prepared, _ = run(cfg_for(tmp_path / "c", split="position"), tmp_path / "data")
    assert prepared.meta["val_tokens"] > 0


def test_non_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("naïve café\n".encode("latin-1"))  # ï is 0xEF at byte offset 2
    with pytest.raises(DataError) as err:
        run(cfg_for(path), tmp_path / "data")
    message = str(err.value)
    assert str(path) in message and "byte offset 2" in message and "data.on_bad_utf8=replace" in message
    assert_nothing_written(tmp_path / "data")
    prepared, logs = run(cfg_for(path, on_bad_utf8="replace"), tmp_path / "data")
    text = "".join(prepared.tokenizer.decode(np.asarray(t).tolist()) for t in (prepared.train_tokens(),
                                                                               prepared.val_tokens()))
    assert text == "na\ufffdve caf\ufffd\n"
    assert any("warning" in line and "byte offset 2" in line for line in logs)


def test_non_utf8_jsonl(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        run(cfg_for(path), tmp_path / "data")
    assert str(path) in str(err.value) and "byte offset 28" in str(err.value)
    prepared, _ = run(cfg_for(path, on_bad_utf8="replace", split="position", val_fraction=0.5), tmp_path / "data")
    assert prepared.tokenizer.decode(np.concatenate([prepared.train_tokens(), prepared.val_tokens()]).tolist()) \
        == "ok" + "caf\ufffd"
    assert listing(tmp_path / "data") == ["corpus"]


def test_utf8_check_of_large_files_is_exact_across_blocks(tmp_path):
    """JSON lines files are checked block by block: the offset, and the repaired copy, match a whole-file decode."""
    text = "aé€🐍 x\n".encode() * 3
    for bad_at in (0, 1, 3, 6, 10, 12, 36):  # character boundaries (13 bytes a line)
        raw = text[:bad_at] + b"\xff" + text[bad_at:]
        path = tmp_path / f"bad{bad_at}.jsonl"
        path.write_bytes(raw)
        for block in (1, 2, 3, 5, 64):
            with pytest.raises(DataError, match=f"byte offset {bad_at}:"):
                data_lib._utf8_file(path, "error", print, None, block=block)
            copy = data_lib._utf8_file(path, "replace", lambda _: None, tmp_path / "scratch", block=block)
            assert copy.read_text(encoding="utf-8") == raw.decode("utf-8", errors="replace")
    good = tmp_path / "good.jsonl"
    good.write_bytes(text)
    assert data_lib._utf8_file(good, "error", print, None, block=2) == good


def test_broken_jsonl_is_a_one_line_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError) as err:
        run(cfg_for(path), tmp_path / "data")
    assert str(path) in str(err.value) and "json" in str(err.value) and "\n" not in str(err.value)
    assert_nothing_written(tmp_path / "data")


def test_unknown_text_field_lists_the_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"title": "t", "body": text_of(i)}) + "\n" for i in range(3)))
    with pytest.raises(DataError) as err:
        run(cfg_for(path, text_field="text"), tmp_path / "data")
    message = str(err.value)
    assert "data.text_field='text'" in message and "title" in message and "body" in message
    assert_nothing_written(tmp_path / "data")


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [("split", "random", "auto, document, position"), ("val_fraction", 1.5, "(0, 1)"), ("dtype", "int8", "uint32"),
     ("on_bad_utf8", "ignore", "error, replace"), ("num_proc", 0, ">= 1"), ("name", "../up", "plain folder"),
     ("source", "ftp", "python_stdlib, files, url, hub"), ("tokenizer", "wordpiece", "char, bytes, tiktoken")],
)
def test_bad_settings(tmp_path, field, value, shown):
    make_docs(tmp_path / "corpus", 3)
    with pytest.raises(ValueError) as err:
        run(cfg_for(tmp_path / "corpus", **{field: value}), tmp_path / "data")
    assert repr(value) in str(err.value) or str(value) in str(err.value)
    assert shown in str(err.value)
    assert_nothing_written(tmp_path / "data")


def test_meta_that_does_not_match_the_tokenizer_asked_for(tmp_path):
    make_docs(tmp_path / "corpus", 6)
    run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    with pytest.raises(DataError) as err:
        load_prepared(out, expect_tokenizer=DataConfig(tokenizer="tiktoken", encoding="cl100k_base"))
    message = str(err.value)
    assert "'char'" in message and "'tiktoken'" in message and "cl100k_base" in message and str(out) in message
    with pytest.raises(DataError, match="'bytes'"):
        load_prepared(out, expect_tokenizer=DataConfig(tokenizer="bytes"))
    assert load_prepared(out, expect_tokenizer=DataConfig(tokenizer="char")).meta["tokenizer"]["kind"] == "char"


def test_truncated_bin_is_detected_and_prepared_again(tmp_path):
    make_docs(tmp_path / "corpus", 8)
    first, _ = run(cfg_for(tmp_path / "corpus", val_fraction=0.3), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    full = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(full[:-2])  # one uint16 token short
    with pytest.raises(DataError) as err:
        load_prepared(out)
    message = str(err.value)
    assert str(out / "train.bin") in message and f"{len(full) - 2} bytes" in message
    assert f"{first.meta['train_tokens']} uint16 tokens" in message
    again, logs = run(cfg_for(tmp_path / "corpus", val_fraction=0.3), tmp_path / "data")  # same fingerprint
    assert (out / "train.bin").read_bytes() == full and any("preparing it again" in line for line in logs)


def test_damaged_meta_json(tmp_path):
    make_docs(tmp_path / "corpus", 4)
    run(cfg_for(tmp_path / "corpus", split="position"), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    meta = json.loads((out / "meta.json").read_text())
    with pytest.raises(DataError, match="no meta.json"):
        load_prepared(tmp_path / "data" / "elsewhere")
    (out / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_prepared(out)
    (out / "meta.json").write_text(json.dumps(meta | {"vocab_size": 3}))
    with pytest.raises(DataError, match="vocab_size 3 does not match"):
        load_prepared(out)
    (out / "meta.json").write_text(json.dumps(meta | {"dtype": "float32"}))
    with pytest.raises(DataError, match="'float32' is not uint16 or uint32"):
        load_prepared(out)


# ----------------------------------------------------------------------------------------------------------
# The python_stdlib corpus and the command line


def test_stdlib_files_are_the_library_without_tests():
    root, files = stdlib_files()
    assert root == Path(sysconfig.get_paths()["stdlib"])
    assert files == sorted(set(files)) and all(p.suffix == ".py" and p.is_file() for p in files)
    rel = [p.relative_to(root) for p in files]
    assert not any(r.parts[0] == "site-packages" for r in rel)
    assert not any({"test", "tests", "idle_test"} & set(r.parts[:-1]) for r in rel)
    for module in ("os.py", "json/__init__.py", "collections/__init__.py", "email/mime/text.py"):
        assert root / module in files
    # an independent listing: every .py under the root, less site-packages and test folders
    reference = sorted(
        p for p in root.rglob("*.py")
        if p.relative_to(root).parts[0] != "site-packages"
        and not {"test", "tests", "idle_test"} & set(p.relative_to(root).parts[:-1])
    )
    assert files == reference
    if (root / "test" / "test_os.py").exists():
        assert root / "test" / "test_os.py" not in files
    if sys.version_info[:2] == (3, 11):
        assert 700 <= len(files) <= 770  # the figure: 734 files on 3.11


def test_python_stdlib_source(tmp_path, monkeypatch):
    """The stdlib corpus (a slice of it, to stay fast): one document per module, ids relative to the root,
    the Python version in meta.json and in the fingerprint."""
    root, files = stdlib_files()
    subset = files[:40]
    monkeypatch.setattr(data_lib, "stdlib_files", lambda: (root, subset))
    cfg = DataConfig(name="stdlib", source="python_stdlib", val_fraction=0.2)
    prepared, _ = run(cfg, tmp_path / "data")
    meta = prepared.meta
    assert meta["source"]["kind"] == "python_stdlib" and meta["source"]["n_files"] == 40
    assert meta["source"]["python"] == platform.python_version() == meta["python"]
    assert meta["source"]["root"] == str(root)
    texts = [p.read_text(encoding="utf-8") for p in subset]
    train, val = split_docs(prepared, "train"), split_docs(prepared, "val")
    assert sorted(train + val) == sorted(texts) and val
    monkeypatch.setattr(platform, "python_version", lambda: "3.99.0")
    other, logs = run(cfg, tmp_path / "data")
    assert other.meta["fingerprint"] != meta["fingerprint"] and other.meta["python"] == "3.99.0"


def prepare_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "gptmini.data", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_command_line_prepares_and_reports_errors(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be, that is the question\n" * 50)
    done = prepare_cli("data=text", f"data.path={path}", f"data_dir={tmp_path / 'data'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "data" / "text"
    assert listing(out) == ["meta.json", "train.bin", "val.bin"]
    meta = load_prepared(out).meta
    assert (meta["train_tokens"], meta["val_tokens"]) == (int(2050 * 0.9), 2050 - int(2050 * 0.9))
    bad = prepare_cli("data=text", f"data.path={tmp_path / 'missing.txt'}", f"data_dir={tmp_path / 'data'}",
                      cwd=tmp_path)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.txt" in lines[0]
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------------------------------
# Batches


def test_batch_shapes_and_shift_against_the_raw_tokens():
    tokens = np.random.default_rng(0).permutation(5000).astype(np.uint16)  # distinct: a value gives its position
    where = {int(t): i for i, t in enumerate(tokens)}
    sampler = BatchSampler(tokens, block_size=16, batch_size=6, seed=3)
    for _ in range(5):
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            start = where[row_x[0]]
            assert row_x == tokens[start : start + 16].tolist()
            assert row_y == tokens[start + 1 : start + 17].tolist()


def test_every_window_start_is_reachable():
    """Starts run from 0 to len - block_size - 1, so the first token is an input and the last one a target."""
    tokens = np.arange(20, dtype=np.uint16)
    sampler = BatchSampler(tokens, block_size=4, batch_size=8, seed=0)
    starts = set()
    for _ in range(100):
        x, y = sampler.next_batch()
        starts.update(x[:, 0].tolist())
        assert int(y.max()) <= 19
    assert starts == set(range(16))


def test_sampler_determinism_ranks_and_restore():
    tokens = np.random.default_rng(1).integers(0, 1000, 3000).astype(np.uint16)

    def draws(sampler: BatchSampler, n: int) -> list[torch.Tensor]:
        return [torch.stack(sampler.next_batch()) for _ in range(n)]  # (2, B, T)

    a = draws(BatchSampler(tokens, 32, 4, seed=7), 8)
    b = draws(BatchSampler(tokens, 32, 4, seed=7), 8)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    other_seed = draws(BatchSampler(tokens, 32, 4, seed=8), 8)
    assert not any(torch.equal(p, q) for p, q in zip(a, other_seed, strict=True))
    # ranks: each draws its own rows of the global batch, which is what one process with batch 4 * 3 draws
    ranks = [draws(BatchSampler(tokens, 32, 4, seed=7, rank=r, world_size=3), 8) for r in range(3)]
    whole = draws(BatchSampler(tokens, 32, 12, seed=7), 8)
    for step in range(8):
        assert not torch.equal(ranks[0][step], ranks[1][step]) and not torch.equal(ranks[1][step], ranks[2][step])
        assert torch.equal(torch.cat([ranks[r][step] for r in range(3)], dim=1), whole[step])
    with pytest.raises(DataError, match="rank 3 is outside world size 3"):
        BatchSampler(tokens, 32, 4, rank=3, world_size=3)
    # resume: a sampler restored from the state after 3 batches draws batches 4..8 of the uninterrupted run
    interrupted = BatchSampler(tokens, 32, 4, seed=7)
    draws(interrupted, 3)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = BatchSampler(tokens, 32, 4, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(draws(resumed, 5), a[3:], strict=True))
    assert resumed.state_dict() == {**state, "step": 8}


def test_sampler_on_prepared_memmap(tmp_path):
    make_docs(tmp_path / "corpus", 6)
    prepared, _ = run(cfg_for(tmp_path / "corpus", split="position"), tmp_path / "data")
    tokens = prepared.train_tokens()
    assert isinstance(tokens, np.memmap)
    x, y = BatchSampler(tokens, 8, 3, seed=0).next_batch()
    assert int(x.max()) < prepared.tokenizer.vocab_size and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(DataError, match="fewer than block_size"):
        BatchSampler(tokens[:8], 8, 3)


def test_iter_windows_covers_every_target_once():
    tokens = np.arange(23, dtype=np.uint16)  # 22 positions with a next token
    batches = list(iter_windows(tokens, window=5, batch_size=2))
    expected_x = [[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19]], [[20, 21]]]
    assert [x.tolist() for x, _ in batches] == expected_x
    assert [y.tolist() for _, y in batches] == [[[t + 1 for t in row] for row in b] for b in expected_x]
    assert all(x.dtype == torch.int64 for x, _ in batches)
    targets = torch.cat([y.flatten() for _, y in batches]).tolist()
    assert targets == list(range(1, 23))
    # an exact multiple has no partial window; a single token has no target at all
    exact = list(iter_windows(np.arange(21), window=5, batch_size=3))
    assert [tuple(x.shape) for x, _ in exact] == [(3, 5), (1, 5)]
    assert list(iter_windows(np.arange(1), 5, 2)) == [] and list(iter_windows(np.arange(0), 5, 2)) == []
