"""Finding the corpus files: a glob through a symlink loop reads each real file once."""

from __future__ import annotations

import os

from data_helpers import cfg_for, make_docs, run, split_docs, text_of

from gptmini.data.sources import resolve_files


def test_a_glob_through_a_symlink_loop_reads_each_file_once(tmp_path):
    """`d/self -> .` makes `d/**/*.txt` match every file 41 times over; each must land in train+val once,
    under the same document id (so in the same split) as without the loop."""
    d = tmp_path / "d"
    make_docs(d, 6)
    make_docs(d / "sub", 0)
    (d / "sub" / "deep.txt").write_text(text_of(50), encoding="utf-8")
    plain, _ = run(cfg_for(f"{d}/**/*.txt", name="plain", split="document", val_fraction=0.3), tmp_path / "data")
    os.symlink(".", d / "self")
    looped, _ = run(cfg_for(f"{d}/**/*.txt", name="looped", split="document", val_fraction=0.3), tmp_path / "data")

    assert looped.meta["source"]["n_files"] == 7
    train, val = split_docs(looped, "train"), split_docs(looped, "val")
    everything = "".join(train + val)
    for i in [*range(6), 50]:
        assert everything.count(f"<doc {i:03d}>") == 1, i
    assert val and train  # both splits hold documents, and none of them both
    assert split_docs(plain, "train") == train and split_docs(plain, "val") == val  # ids as without the loop


def test_each_real_file_keeps_its_shortest_name(tmp_path):
    d = tmp_path / "d"
    make_docs(d / "sub", 2)
    os.symlink(".", d / "self")
    os.symlink(d / "sub" / "doc_000.txt", d / "alias.txt")  # a link to a file the glob finds anyway
    expected = [d / "alias.txt", d / "sub" / "doc_001.txt"]  # doc_000's shortest name is the link to it
    assert resolve_files(f"{d}/**/*.txt") == expected
    assert resolve_files(str(d)) == expected  # a folder too
