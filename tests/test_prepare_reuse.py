"""Preparing again: cache hits, changed inputs, interrupted preparations, missing sources, edited meta.json."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gptmini import data as data_lib
from gptmini.data import DataError, load_prepared, preparation, staging
from gptmini.paths import HOST

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import cfg_for, file_ids, listing, make_docs, prepared_then_changed, run, split_docs, text_of  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Cache hits, re-preparation, interruption


def test_same_inputs_do_no_work(tmp_path, monkeypatch):
    make_docs(tmp_path / "corpus", 10)
    first, _ = run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    before = file_ids(tmp_path / "data" / "corpus")

    def must_not_write(*args, **kwargs):
        raise AssertionError("prepared again although nothing changed")

    monkeypatch.setattr(preparation, "_write", must_not_write)
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

    monkeypatch.setattr(preparation, "iter_token_documents", fails_half_way)
    (tmp_path / "corpus" / "doc_000.txt").write_text("changed\n")
    with pytest.raises(OSError, match="No space left"):
        run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    assert listing(tmp_path / "data") == ["corpus"]  # the temporary folder is gone
    assert {name: (out / name).read_bytes() for name in listing(out)} == before
    with pytest.raises(OSError, match="No space left"):  # a first preparation leaves nothing at all
        run(cfg_for(tmp_path / "corpus", name="fresh"), tmp_path / "data")
    assert listing(tmp_path / "data") == ["corpus"]
    monkeypatch.setattr(preparation, "iter_token_documents", real)
    again, _ = run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    assert "changed\n" in split_docs(again, "train") + split_docs(again, "val")


def test_prepared_folder_is_not_private(tmp_path):
    make_docs(tmp_path / "corpus", 4)
    run(cfg_for(tmp_path / "corpus", split="position"), tmp_path / "data")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "data" / "corpus").stat().st_mode & 0o777 == 0o777 & ~mask


# ----------------------------------------------------------------------------------------------------------
# Killed preparations, missing sources, edited meta.json

KILLED_MID_WRITE = """
import os, signal, sys
from gptmini.config import DataConfig
from gptmini.data import prepare, preparation

real = preparation.iter_token_documents

def dies_half_way(*args, **kwargs):
    for i, doc in enumerate(real(*args, **kwargs)):
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # no finally block runs: the temporary folder stays
        yield doc

preparation.iter_token_documents = dies_half_way
prepare(DataConfig(name="corpus", source="files", path=sys.argv[1]), sys.argv[2], log=lambda _: None)
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL and os.kill(pid, 0) are POSIX")
def test_a_killed_preparation_leaves_a_folder_the_next_one_removes(tmp_path):
    data, out, before = prepared_then_changed(tmp_path)
    killed = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path / "corpus"), str(data)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr
    [stale] = [name for name in listing(data) if name.startswith(".corpus.tmp-")]
    assert stale.startswith(f".corpus.tmp-{killed.pid}@{HOST}-") and (data / stale / "train.bin").exists()
    assert {name: (out / name).read_bytes() for name in listing(out)} == before  # the killed run changed nothing
    keep = [f".corpus.tmp-{os.getpid()}@{HOST}-live",  # a live preparation (this process)
            f".corpus.tmp-{killed.pid}@{HOST}x-other",  # made on another machine sharing data_dir
            f".other.tmp-{killed.pid}@{HOST}-x"]  # another dataset's: its own prepare cleans it
    for name in [*keep, f".corpus.old-{killed.pid}@{HOST}-y"]:
        (data / name).mkdir()
    again, logs = run(cfg_for(tmp_path / "corpus"), data)
    assert listing(data) == sorted(["corpus", *keep])
    removed = [line for line in logs if "interrupted preparation" in line]
    assert len(removed) == 2 and all(str(killed.pid) in line for line in removed)
    assert "changed\n" in split_docs(again, "train") + split_docs(again, "val")


def test_a_previous_dataset_caught_mid_swap_is_kept(tmp_path):
    """A process killed between its two renames leaves the previous dataset as `.NAME.old-*`: not deleted."""
    data = tmp_path / "data"
    (data / f".corpus.old-{2**22 + 12345}@{HOST}-z").mkdir(parents=True)  # no such process; no corpus/
    staging.remove_stale(data, "corpus", print)
    assert listing(data) == [f".corpus.old-{2**22 + 12345}@{HOST}-z"]


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_a_deleted_source_uses_the_intact_prepared_data(tmp_path, layout):
    """evaluate and resume call prepare(): with the corpus gone, the prepared data of the same request serves."""
    make_docs(tmp_path / "corpus", 6)
    path = tmp_path / "corpus" / "doc_002.txt" if layout == "file" else tmp_path / "corpus"
    first, _ = run(cfg_for(path), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    before = file_ids(out)
    shutil.rmtree(tmp_path / "corpus")
    again, logs = run(cfg_for(path), tmp_path / "data")
    assert again.meta == first.meta and file_ids(out) == before
    notes = [line for line in logs if "missing" in line]
    assert len(notes) == 1 and f"data.path={str(path)!r}" in notes[0] and "using the prepared data" in notes[0]
    # not for another request: other settings, another path, or force=true
    with pytest.raises(DataError, match="does not exist"):
        run(cfg_for(path, val_fraction=0.5), tmp_path / "data")
    with pytest.raises(DataError, match="does not exist"):
        run(cfg_for(tmp_path / "elsewhere.txt"), tmp_path / "data")
    with pytest.raises(DataError, match="does not exist"):
        run(cfg_for(path), tmp_path / "data", force=True)
    assert file_ids(out) == before


@pytest.mark.parametrize("damage", ["truncate train.bin", "delete val.bin", "edit meta.json"])
def test_a_deleted_source_and_damaged_prepared_data_is_refused(tmp_path, damage):
    path = tmp_path / "one.txt"
    path.write_text("to be or not to be\n" * 20)
    run(cfg_for(path), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    if damage == "truncate train.bin":
        (out / "train.bin").write_bytes((out / "train.bin").read_bytes()[:-2])
    elif damage == "delete val.bin":
        (out / "val.bin").unlink()
    else:
        meta = json.loads((out / "meta.json").read_text())
        (out / "meta.json").write_text(json.dumps(meta | {"val_fraction": 0.2}))
    path.unlink()
    with pytest.raises(DataError) as err:
        run(cfg_for(path), tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message and f"data.path={str(path)!r} does not exist" in message
    assert f"{str(out)!r} cannot stand in for it" in message


def permute_vocabulary(out: Path) -> dict:
    """meta.json with two characters of its vocabulary swapped, everything else (the checksum too) as it was."""
    meta = json.loads((out / "meta.json").read_text())
    chars = list(meta["tokenizer"]["chars"])
    chars[0], chars[1] = chars[1], chars[0]
    edited = meta | {"tokenizer": {**meta["tokenizer"], "chars": "".join(chars)}}
    (out / "meta.json").write_text(json.dumps(edited))
    return meta


def test_an_edited_vocabulary_is_not_up_to_date(tmp_path):
    make_docs(tmp_path / "corpus", 6)
    first, _ = run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    bins = {name: (out / name).read_bytes() for name in ("train.bin", "val.bin")}
    permute_vocabulary(out)
    again, logs = run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    assert not any("up to date" in line for line in logs)
    assert any("checksum" in line and "preparing it again" in line for line in logs)
    assert again.meta == first.meta and json.loads((out / "meta.json").read_text()) == first.meta
    assert {name: (out / name).read_bytes() for name in bins} == bins
