"""One training process per run directory: a second one is refused in one line, and a kill -9 frees the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptmini.checkpoint import load_checkpoint
from gptmini.run_lock import PID_NAME, RunDirLocked, run_dir_lock
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_config  # noqa: E402  (the shared tiny-run config)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=1", "model.n_head=2", "model.block_size=16", "train.batch_size=2", "train.eval_interval=0",
        "train.attn_interval=0", "train.sample_tokens=0", "train.final_eval=false", "train.device=cpu",
        "train.log_interval=1", "train.ckpt_interval=5"]


def train_cmd(tmp: Path, run: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "data=text", f"data.path={tmp / 'corpus.txt'}",
            f"data_dir={tmp / 'data'}", f"hydra.run.dir={run}", *TINY, *overrides]


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def test_lock_is_exclusive_reentrant_and_cleans_up(tmp_path):
    run = tmp_path / "run"
    with run_dir_lock(run):
        assert (run / PID_NAME).read_text().strip() == str(os.getpid())
        with run_dir_lock(run):  # the entry point and the library in one process
            pass
        holder = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from gptmini.run_lock import run_dir_lock\n"
             "with run_dir_lock(Path(sys.argv[1])): pass", str(run)],
            capture_output=True, text=True,
        )
        assert holder.returncode != 0 and f"(pid {os.getpid()})" in holder.stderr
    assert not run.exists()  # created by the lock, nothing written: removed again


@pytest.mark.slow
def test_a_second_run_on_a_busy_run_dir_is_refused_and_a_kill_frees_it(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(tmp_path, run, "model.n_embd=16", "train.max_iters=100000"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "checkpoints" / "last.pt").is_file())
        second = subprocess.run(train_cmd(tmp_path, run, "model.n_embd=32", "train.max_iters=3"),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"in use by another training process (pid {first.pid})" in errors[0]
        assert "Traceback" not in second.stderr
        assert "n_embd: 16" in (run / "config.yaml").read_text()  # still the first run's
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["config"]["model"]["n_embd"] == 16
    # kill -9 left no lock behind: the next run takes the directory and resumes the first run's checkpoint.
    third = subprocess.run(train_cmd(tmp_path, run, "model.n_embd=16", f"train.max_iters={saved['step'] + 2}"),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at step {saved['step']}" in third.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == saved["step"] + 2


def test_library_train_is_refused_while_another_process_holds_the_run(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from gptmini.run_lock import run_dir_lock\n"
         "with run_dir_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=rf"pid {holder.pid}"):
            train(make_config(tmp_path / "corpus.txt", tmp_path / "data", "train.max_iters=2"), run)
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
