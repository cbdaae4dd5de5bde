"""Bad input to preparation: one clear DataError line each, nothing written, nothing earlier damaged."""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from gptmini.data import DataError, preparation, sources, staging
from gptmini.data import format as format_lib

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import (  # noqa: E402
    assert_nothing_written,
    cfg_for,
    listing,
    make_docs,
    prepared_then_changed,
    run,
    split_docs,
    text_of,
)

# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear error each, nothing written


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
    names = [f"d{i}.txt" for i in range(50) if not preparation._is_val(f"d{i}.txt", 0.1)][:2]
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
                sources.utf8_file(path, "error", print, None, block=block)
            copy = sources.utf8_file(path, "replace", lambda _: None, tmp_path / "scratch", block=block)
            assert copy.read_text(encoding="utf-8") == raw.decode("utf-8", errors="replace")
    good = tmp_path / "good.jsonl"
    good.write_bytes(text)
    assert sources.utf8_file(good, "error", print, None, block=2) == good


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


# ----------------------------------------------------------------------------------------------------------
# Text fields that are not text


@pytest.mark.parametrize(
    ("name", "content", "where", "shown"),
    [("null.jsonl", '{"text": "ok"}\n{"text": null}\n', "line 2", "null"),
     ("numbers.jsonl", '{"text": 1}\n{"text": 2}\n', "line 1", "a number (1)"),
     ("mixed.jsonl", '{"text": "ok"}\n\n{"text": 5}\n', "line 3", "a number (5)"),
     ("missing.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "line 2", "missing"),
     ("flag.jsonl", '{"text": true}\n', "line 1", "a boolean (true)"),
     ("array.json", '[{"text": "ok"}, {"text": null}]', "record 2", "null")],
)
def test_a_text_field_that_is_not_text_names_the_file_and_record(tmp_path, name, content, where, shown):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        run(cfg_for(path, split="position"), tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message and f"{str(path)!r} {where}: data.text_field='text' is {shown}, not text" in message
    assert "set data.text_field=" in message
    assert_nothing_written(tmp_path / "data")


def test_a_null_text_field_lists_the_text_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rows.jsonl").write_text('{"title": "a", "body": "x"}\n{"title": "b", "body": null}\n')
    with pytest.raises(DataError, match=r"line 2: data.text_field='body' is null.*text columns: title"):
        run(cfg_for(tmp_path / "rows.jsonl", text_field="body"), tmp_path / "data")
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"content": ["a", "b"], "n": [1, 2]}), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(pa.table({"content": ["c", None], "n": [3, 4]}), tmp_path / "pq" / "part-1.parquet")
    with pytest.raises(DataError) as err:
        run(cfg_for(tmp_path / "pq", text_field="content"), tmp_path / "data")
    assert f"{str(tmp_path / 'pq' / 'part-1.parquet')!r} row 2: data.text_field='content' is null" in str(err.value)
    with pytest.raises(DataError, match="data.text_field='n' is a number"):
        run(cfg_for(tmp_path / "pq", text_field="n"), tmp_path / "data")
    assert_nothing_written(tmp_path / "data")


# ----------------------------------------------------------------------------------------------------------
# Corpora too short to split


def test_a_corpus_too_short_to_split_by_position_gets_a_hint_that_works(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a")
    for split in ("auto", "position"):  # one document: auto splits by position too
        with pytest.raises(DataError) as err:
            run(cfg_for(one, split=split), tmp_path / "data")
        message = str(err.value)
        assert "the train split" in message and "data.val_fraction=0.1" in message and "add text" in message
        assert "data.split=position" not in message  # the split already in use
    assert_nothing_written(tmp_path / "data")
    four = tmp_path / "four.txt"
    four.write_text("abcd")
    with pytest.raises(DataError, match="by position at data.val_fraction=0.9.*data.val_fraction=0.5"):
        run(cfg_for(four, val_fraction=0.9), tmp_path / "data")
    prepared, _ = run(cfg_for(four, val_fraction=0.5), tmp_path / "data")  # the hint's value works
    assert (prepared.meta["train_tokens"], prepared.meta["val_tokens"]) == (2, 2)


# ----------------------------------------------------------------------------------------------------------
# data_dir that cannot be written: a full disk, a read-only folder, a file


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullFile:
    """An open file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            no_space()
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def full_disk_opener(room: int):
    return lambda *args, **kwargs: FullFile(open(*args, **kwargs), room)


def break_disk(monkeypatch, where: str, data: Path) -> None:
    if where == "writing train.bin":
        monkeypatch.setattr(staging, "open", full_disk_opener(room=100), raising=False)
    elif where == "syncing the .bin files":
        monkeypatch.setattr(os, "fsync", no_space)
    elif where == "writing meta.json":
        monkeypatch.setattr(format_lib, "open", full_disk_opener(room=0), raising=False)
    else:  # the rename that swaps the new folder in
        real = os.replace

        def replace(src, dst):
            if ".tmp-" in os.fspath(src):
                no_space()
            real(src, dst)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("where", ["writing train.bin", "syncing the .bin files", "writing meta.json", "swapping in"])
def test_a_full_disk_is_one_line_and_keeps_the_earlier_dataset(tmp_path, monkeypatch, where):
    data, out, before = prepared_then_changed(tmp_path)
    with monkeypatch.context() as patch:
        break_disk(patch, where, data)
        with pytest.raises(DataError) as err:
            run(cfg_for(tmp_path / "corpus"), data)
        message = str(err.value)
        assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC  # still an OSError to callers
        assert "\n" not in message and f"data_dir={str(data)!r} cannot be written: No space left on device" in message
        assert listing(data) == ["corpus"]  # no temporary or old folder left
        assert {name: (out / name).read_bytes() for name in listing(out)} == before
        with pytest.raises(DataError, match="No space left on device"):  # a first preparation leaves nothing
            run(cfg_for(tmp_path / "corpus", name="fresh"), data)
        assert listing(data) == ["corpus"]
    again, _ = run(cfg_for(tmp_path / "corpus"), data)
    assert "changed\n" in split_docs(again, "train") + split_docs(again, "val")


def test_a_read_only_data_dir_is_one_line(tmp_path, monkeypatch):
    make_docs(tmp_path / "corpus", 6)
    data = tmp_path / "data"
    run(cfg_for(tmp_path / "corpus"), data)
    out = data / "corpus"
    before = {name: (out / name).read_bytes() for name in listing(out)}
    data.chmod(0o555)
    try:
        if os.access(data, os.W_OK):  # root writes anyway: refuse where the OS would, at the temporary folder
            real = tempfile.mkdtemp

            def refuse(*args, dir=None, **kwargs):
                if dir is not None and Path(dir) == data:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
                return real(*args, dir=dir, **kwargs)

            monkeypatch.setattr(tempfile, "mkdtemp", refuse)
        up_to_date, logs = run(cfg_for(tmp_path / "corpus"), data)  # reading needs no write
        assert any("up to date" in line for line in logs)
        (tmp_path / "corpus" / "doc_000.txt").write_text("changed\n")
        with pytest.raises(DataError) as err:
            run(cfg_for(tmp_path / "corpus"), data)
        message = str(err.value)
        assert "\n" not in message and f"data_dir={str(data)!r} cannot be written: Permission denied" in message
        assert listing(data) == ["corpus"] and {name: (out / name).read_bytes() for name in listing(out)} == before
    finally:
        data.chmod(0o755)


def test_a_data_dir_that_is_not_a_folder(tmp_path):
    make_docs(tmp_path / "corpus", 4)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    with pytest.raises(DataError, match=r"data_dir='.*notes.txt' is a file, not a folder; choose a folder"):
        run(cfg_for(tmp_path / "corpus"), notes)
    with pytest.raises(DataError) as err:
        run(cfg_for(tmp_path / "corpus"), notes / "sub")
    assert f"data_dir={str(notes / 'sub')!r} cannot be written: Not a directory" in str(err.value)
    assert notes.read_text() == "not a folder"
