"""Outputs never destroy what the user had (issue 21, items 3 and 4): `generate.py out=`/`attention_map=` refuse a
run's own files and the command's inputs, an output replaces an earlier one only when complete, and an export
killed midway leaves nothing that a later export does not remove."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptmini import paths
from gptmini.config import GenerateConfig
from gptmini.generate_command import run_generation
from gptmini.paths import HOST, write_atomic
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_config  # noqa: E402


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    train(make_config(corpus, root / "data", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                      "model.block_size=16", "train.max_iters=2", "train.final_eval=false"), root / "run")
    return root / "run"


def generate(run: Path, **kw) -> list[str]:
    return run_generation(GenerateConfig(**{"ckpt": str(run), "max_new_tokens": 4, "device": "cpu", **kw}), stream=None)


@pytest.mark.parametrize("target", ["checkpoints/last.pt", "checkpoints/best.pt", "config.yaml", "train.log"])
@pytest.mark.parametrize("key", ["out", "attention_map"])
def test_a_runs_own_files_are_never_an_output(run, target, key):
    before = digest(run / target)
    with pytest.raises(ValueError, match=f"^{key}=.*never overwritten"):
        generate(run, **{key: str(run / target)})
    assert digest(run / target) == before


def test_the_checkpoint_read_or_the_prompt_file_is_never_the_output(run, tmp_path):
    copied = tmp_path / "model.pt"  # a checkpoint outside any run directory, read by this very command
    copied.write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    with pytest.raises(ValueError, match="is an input of this command"):
        generate(copied, out=str(copied))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick")
    with pytest.raises(ValueError, match="is an input of this command"):
        generate(run, prompt_file=str(prompt), out=str(prompt))
    assert prompt.read_text() == "the quick"
    other_weights = tmp_path / "other.pt"  # weights the command does not read are not overwritten either
    other_weights.write_bytes(b"weights")
    with pytest.raises(ValueError, match="holds weights"):
        generate(run, out=str(other_weights))
    assert other_weights.read_bytes() == b"weights"


def test_an_earlier_output_is_replaced_only_by_a_complete_one(run, tmp_path, monkeypatch):
    out = tmp_path / "samples.txt"
    generate(run, out=str(out))
    first = out.read_text()
    assert first.startswith("\n") and len(first) > 1

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(paths.os, "fsync", disk_full)
    with pytest.raises(ValueError, match="^out=.*No space left on device.*earlier file is unchanged"):
        generate(run, out=str(out), seed=7, max_new_tokens=8)
    assert out.read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.txt"]  # no temporary file left


def test_write_atomic_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    out.chmod(0o640)
    write_atomic(out, b"new", "out")
    assert out.read_bytes() == b"new" and out.stat().st_mode & 0o777 == 0o640
    fresh = tmp_path / "sub" / "b.txt"
    write_atomic(fresh, b"x", "out")  # a new file: as readable as any the user makes (not mkstemp's 0600)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~paths.umask()


# ----------------------------------------------------------------------------------------------------------
# Item 4: an interrupted export


def test_an_export_removes_what_a_killed_export_left(tmp_path):
    from test_export import tiny_gpt

    from gptmini.export import export_hf

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".hf.tmp-{int(dead.stdout)}@{HOST}-abc"  # a process that is gone
    live = tmp_path / f".hf.tmp-{os.getpid()}@{HOST}-def"  # this process: still running, kept
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    export_hf(tiny_gpt(vocab_size=64), None, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert not stale.exists() and live.exists()


SLOW_EXPORT = """
import sys, time
sys.path.insert(0, sys.argv[2])
from test_export import tiny_gpt
from gptmini import cli, export
slow = export.hf_tensors
export.hf_tensors = lambda *a: (time.sleep(120), slow(*a))[1]
cli.run_reporting_errors(lambda: export.export_hf(tiny_gpt(vocab_size=64), None, sys.argv[1]))
"""


def test_sigterm_during_an_export_leaves_no_temporary_folder(tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(out), str(Path(__file__).parent)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.name.startswith(".hf.tmp-") for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM)"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_an_export_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from test_export import tiny_gpt

    from gptmini import export

    real, calls = export._write_json, []

    def fills_the_disk(path, data):
        calls.append(path)
        if len(calls) == 2:  # after config.json and the weights: generation_config.json finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(export, "_write_json", fills_the_disk)
    with pytest.raises(ValueError, match=r"^out='.*hf' could not be written \(No space left on device\); nothing "):
        export.export_hf(tiny_gpt(vocab_size=64), None, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
