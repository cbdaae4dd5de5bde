"""Data preparation from corpora made in tmp_path: local files, splits, tokenizers, the stdlib corpus, the CLI."""

from __future__ import annotations

import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from gptmini import data as data_lib
from gptmini.config import DataConfig
from gptmini.data import DataError, load_prepared, preparation, sources, stdlib_files
from gptmini.tokenizer import ByteTokenizer, CharTokenizer, TiktokenTokenizer, build_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import cfg_for, listing, make_docs, prepare_cli, run, split_docs, text_of  # noqa: E402

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
    assert preparation._token_dtype(DataConfig(), 2**16) == "uint16"
    assert preparation._token_dtype(DataConfig(), 2**16 + 1) == "uint32"
    assert preparation._token_dtype(DataConfig(dtype="uint32"), 50257) == "uint32"
    with pytest.raises(DataError, match="data.dtype=uint16 cannot hold a vocabulary of 100277 tokens"):
        preparation._token_dtype(DataConfig(dtype="uint16"), 100277)


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
    monkeypatch.setattr(sources, "stdlib_files", lambda: (root, subset))
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
