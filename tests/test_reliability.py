"""Nothing lost: kill -9 at random moments, full disks, runs that would overwrite other runs, untrusted files."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptmini.checkpoint import CheckpointError, load_checkpoint, load_for_inference, save_checkpoint
from gptmini.config import ModelConfig
from gptmini.model import GPT
from gptmini.trainer import TrainingError, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_config  # noqa: E402  (the shared tiny-run config)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_kill_9_at_random_moments_never_breaks_a_checkpoint(tmp_path, corpus):
    """20 hard kills, each resumed from whatever `last.pt` survived; saving every step puts many kills mid-write."""
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), "data=text", f"data.path={corpus}", f"data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={run}", "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32",
            "train.batch_size=4", "train.ckpt_interval=1", "train.eval_interval=3",
            "train.eval_iters=1", "train.attn_interval=0", "train.sample_tokens=0", "train.log_interval=50",
            "train.device=cpu"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    steps, torn_writes = [], 0
    for _ in range(20):
        log = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115  (a file, not a pipe that could fill up and block)
        proc = subprocess.Popen([*args, "train.max_iters=100000"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=log)
        deadline = time.monotonic() + 120
        start_step = steps[-1] if steps else 0
        # Wait until this process has saved at least once past where it started, then kill it at a random moment.
        while time.monotonic() < deadline:
            last = run / "checkpoints" / "last.pt"
            try:
                if last.is_file() and load_checkpoint(last)["step"] > start_step:
                    break
            except CheckpointError:
                pass  # read while being replaced: cannot happen with rename, but do not rely on it here
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        torn_writes += any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
        for name in ("last.pt", "best.pt"):
            if (run / "checkpoints" / name).is_file():
                state = load_checkpoint(run / "checkpoints" / name)  # raises if broken
                assert all(torch.isfinite(t).all() for t in state["model"].values())
        steps.append(load_checkpoint(run / "checkpoints" / "last.pt")["step"])
    assert steps == sorted(steps) and steps[-1] > steps[0], steps  # every restart continued, never went back
    assert torn_writes >= 1, "no kill landed during a checkpoint write; the test did not test what it claims"

    # train.resume=auto (the default) finishes the run from the last complete checkpoint.
    final = subprocess.run([*args, f"train.max_iters={steps[-1] + 3}"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at step {steps[-1]}" in final.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == steps[-1] + 3


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    run = tmp_path / "run"
    train(make_config(corpus, tmp_path / "data", "train.max_iters=10", "train.final_eval=false"), run)
    before = snapshot(run / "checkpoints")
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint there is intact"):
        train(make_config(corpus, tmp_path / "data", "train.max_iters=20", "train.final_eval=false"), run)
    assert snapshot(run / "checkpoints") == before  # same files, same bytes, no temporary left behind


@pytest.mark.parametrize("resume", ["never", "other"])
def test_a_new_run_never_overwrites_another_runs_checkpoints(tmp_path, corpus, resume):
    run = tmp_path / "run"
    train(make_config(corpus, tmp_path / "data", "train.max_iters=5", "train.final_eval=false"), run)
    other = tmp_path / "other"
    train(make_config(corpus, tmp_path / "data", "train.max_iters=5", "train.final_eval=false", "train.seed=7"), other)
    before = snapshot(run)
    value = "never" if resume == "never" else str(other / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="already holds another run's checkpoints.*train.resume=auto"):
        train(make_config(corpus, tmp_path / "data", "train.max_iters=8", f"train.resume={value}"), run)
    assert snapshot(run) == before


def test_checkpoint_config_is_data_never_code(tmp_path):
    """A config with `_target_` (Hydra's instantiate hook) or an unknown key is refused, and nothing runs."""
    marker = tmp_path / "pwned"
    model_cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=10)
    config = {"model": dataclasses.asdict(model_cfg) | {"_target_": "os.system"}}
    config["model"]["attention"]["_target_"] = f"pathlib.Path.touch('{marker}')"
    path = tmp_path / "evil.pt"
    save_checkpoint({"model": GPT(model_cfg).state_dict(), "config": config,
                     "tokenizer": {"kind": "bytes"}}, path)
    with pytest.raises(CheckpointError, match="lacks a valid model config"):
        load_for_inference(path)
    assert not marker.exists()


def test_training_refuses_bad_config_before_writing_anything(tmp_path, corpus):
    run = tmp_path / "run"
    train(make_config(corpus, tmp_path / "data", "train.max_iters=5", "train.final_eval=false"), run)
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="model.n_layer: checkpoint 2 vs now 3"):
        train(make_config(corpus, tmp_path / "data", "model.n_layer=3"), run)
    with pytest.raises(TrainingError, match="fewer than model.block_size"):
        train(make_config(corpus, tmp_path / "data", "model.block_size=4096", "train.resume=auto"), tmp_path / "x")
    assert snapshot(run) == before
    assert not (tmp_path / "x").exists()
