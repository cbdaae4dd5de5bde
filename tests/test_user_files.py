"""Nothing a user had is lost: preparation never deletes files it did not write, and a command refused for its
data leaves the prepared dataset it found byte for byte as it was (issue 21, items 1 and 2)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from gptmini.data import DataError
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import ROOT, cfg_for, make_docs, run  # noqa: E402
from test_train import make_config  # noqa: E402

TRAIN = [sys.executable, str(ROOT / "train.py")]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.max_iters=2",
        "train.batch_size=2", "train.eval_interval=0", "train.attn_interval=0", "train.sample_tokens=0",
        "train.final_eval=false", "train.device=cpu"]


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(cmd: list[str], cwd: Path, needle: str) -> str:
    """Run a command that must fail with exactly one `error:` line containing `needle`; that line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


# ----------------------------------------------------------------------------------------------------------
# Item 1: the corpus (or anything else of the user's) where the dataset goes is never deleted


def test_train_with_the_corpus_where_the_dataset_goes_keeps_the_corpus(tmp_path):
    corpus = tmp_path / "data" / "text"
    make_docs(corpus, 6)
    before = checksums(corpus)
    line = refused([*TRAIN, "data=text", f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'run'}", *TINY],
                   tmp_path, "data.path=")
    assert "inside" in line
    assert checksums(corpus) == before
    assert not (tmp_path / "run").exists()


def test_data_command_into_a_folder_of_the_users_keeps_it(tmp_path):
    notes = tmp_path / "X" / "notes"
    make_docs(notes, 4)
    before = checksums(tmp_path / "X")
    refused([sys.executable, "-m", "gptmini.data", "data=text", f"data.path={notes}", "data.name=notes",
             f"data_dir={tmp_path / 'X'}", "data.split=position"], tmp_path, "data.name='notes'")
    assert checksums(tmp_path / "X") == before


@pytest.mark.parametrize("placed", ["run directory", "foreign bins", "a file"])
def test_forced_preparation_never_replaces_a_folder_holding_other_files(tmp_path, placed):
    make_docs(tmp_path / "src", 6)
    cfg = cfg_for(tmp_path / "src")
    out = tmp_path / "data" / cfg.name
    if placed == "run directory":  # a run placed inside a prepared dataset
        run(cfg, tmp_path / "data")
        (out / "run" / "checkpoints").mkdir(parents=True)
        (out / "run" / "checkpoints" / "last.pt").write_bytes(b"weights")
    elif placed == "foreign bins":  # another tool's train.bin/val.bin, no meta.json of ours
        out.mkdir(parents=True)
        (out / "train.bin").write_bytes(b"\x01\x00" * 50)
        (out / "val.bin").write_bytes(b"\x02\x00" * 10)
    else:
        out.parent.mkdir(parents=True)
        out.write_text("my notes")
    before = checksums(tmp_path / "data")
    with pytest.raises(DataError, match="gptmini did not write"):
        run(cfg, tmp_path / "data", force=True)
    assert checksums(tmp_path / "data") == before


def test_a_dataset_of_ours_and_an_empty_folder_are_still_replaced(tmp_path):
    make_docs(tmp_path / "src", 6)
    cfg = cfg_for(tmp_path / "src")
    (tmp_path / "data" / cfg.name).mkdir(parents=True)  # empty: nothing to lose
    first, _ = run(cfg, tmp_path / "data")
    make_docs(tmp_path / "src", 8)  # the corpus changes: the dataset of ours is replaced
    second, _ = run(cfg, tmp_path / "data")
    assert second.meta["train_tokens"] + second.meta["val_tokens"] > first.meta["train_tokens"] + first.meta[
        "val_tokens"]


# ----------------------------------------------------------------------------------------------------------
# Item 2: a command refused for its data leaves the prepared dataset as it was


@pytest.fixture()
def trained(tmp_path) -> dict[str, Path]:
    """A tiny run trained on `corpus.txt`, its dataset `data/text`, and a file of another vocabulary."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    (tmp_path / "other.txt").write_text("0123456789+-*/=()[]{}\n" * 300)
    train(make_config(corpus, tmp_path / "data", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                      "model.block_size=16", "train.max_iters=2", "train.final_eval=false"), tmp_path / "run")
    return {"root": tmp_path, "run": tmp_path / "run", "dataset": tmp_path / "data" / "text"}


def test_evaluate_refused_for_another_vocabulary_keeps_the_dataset(trained):
    root, before = trained["root"], checksums(trained["dataset"])
    refused([sys.executable, "-m", "gptmini.evaluate", f"ckpt={trained['run']}", "data=text",
             f"data.path={root / 'other.txt'}", "data.name=text", f"data_dir={root / 'data'}"],
            root, "holds the data this checkpoint was trained on")
    assert checksums(trained["dataset"]) == before


def test_heads_refused_for_another_vocabulary_keeps_the_dataset(trained):
    root, before = trained["root"], checksums(trained["dataset"])
    refused([sys.executable, "-m", "gptmini.heads", f"ckpt={trained['run']}", "data=text",
             f"data.path={root / 'other.txt'}", "data.name=text", f"data_dir={root / 'data'}", "out=null"],
            root, "holds the data this checkpoint was trained on")
    assert checksums(trained["dataset"]) == before


def test_resume_refused_for_another_vocabulary_keeps_the_dataset_and_the_run(trained):
    root, before, run_before = trained["root"], checksums(trained["dataset"]), checksums(trained["run"])
    refused([*TRAIN, "data=text", f"data.path={root / 'other.txt'}", f"data_dir={root / 'data'}",
             f"hydra.run.dir={trained['run']}", *TINY, "train.max_iters=4"], root, "tokenizer")
    assert checksums(trained["dataset"]) == before
    assert checksums(trained["run"]) == run_before


def test_a_job_refused_for_a_small_split_keeps_the_shared_dataset(trained):
    root, before = trained["root"], checksums(trained["dataset"])
    small = root / "small.txt"
    small.write_text("a short corpus. " * 8)  # a sweep job over data.path, too small for its block_size
    refused([*TRAIN, "data=text", f"data.path={small}", f"data_dir={root / 'data'}",
             f"hydra.run.dir={root / 'run2'}", *TINY], root, "model.block_size")
    assert checksums(trained["dataset"]) == before
    assert not any(p.name.startswith(".text.") for p in (root / "data").iterdir())  # no staging folder left
