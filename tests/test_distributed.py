"""Multi-process training through torchrun with 2 CPU processes (gloo): DDP equals one process, resume across
world sizes, one run directory, rank-aware batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptmini.checkpoint import load_checkpoint
from gptmini.data import BatchSampler

ROOT = Path(__file__).resolve().parents[1]

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.0",
        "train.warmup_iters=2", "train.lr=3e-3", "train.eval_interval=0", "train.attn_interval=0",
        "train.sample_tokens=0", "train.log_interval=2", "train.ckpt_interval=100", "train.device=cpu",
        "train.final_eval=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rng = np.random.default_rng(0)
    path.write_text(" ".join(rng.choice(words, size=4000)) + "\n")
    return path


def launch(nproc: int, run_dir: Path, corpus: Path, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    data = ["data=text", f"data.path={corpus}", f"data_dir={corpus.parent / 'data'}"]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([*cmd, *data, *TINY, f"hydra.run.dir={run_dir}", *overrides], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def test_global_batch_is_split_across_ranks(corpus):
    tokens = np.arange(1000, dtype=np.uint16)
    one = BatchSampler(tokens, 8, batch_size=6, seed=3)
    ranks = [BatchSampler(tokens, 8, batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x1, y1 = one.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(x1, torch.cat([p[0] for p in parts]))
        assert torch.equal(y1, torch.cat([p[1] for p in parts]))
        assert not torch.equal(parts[0][0], parts[1][0])  # each rank its own rows


@pytest.mark.slow
def test_ddp_matches_one_process_and_resumes_across_world_sizes(tmp_path, corpus):
    one = tmp_path / "one"
    launch(1, one, corpus, "train.batch_size=8", "train.max_iters=10", cwd=tmp_path)
    two = tmp_path / "two"
    result = launch(2, two, corpus, "train.batch_size=4", "train.max_iters=10", cwd=tmp_path)
    assert "2 processes, strategy ddp" in result.stderr

    # Same global batch, same weights (to fp32 reduction-order tolerance).
    a, b = weights(one), weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert "distributed: 2 processes" in (two / "train.log").read_text()
    # One run directory, written by rank 0 only: one events file, one log, nothing stray in the cwd.
    assert len(list(two.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["last.pt"]

    # A 2-process checkpoint resumes on 1 process (global batch kept: 8 = 2 x 4) and lands where a straight
    # 1-process run lands.
    launch(1, one, corpus, "train.batch_size=8", "train.max_iters=20", cwd=tmp_path)
    launch(1, two, corpus, "train.batch_size=8", "train.max_iters=20", cwd=tmp_path)
    a, b = weights(one), weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert load_checkpoint(two / "checkpoints" / "last.pt")["step"] == 20


@pytest.mark.slow
def test_ddp_resume_is_exact_and_loss_goes_down(tmp_path, corpus):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("train.batch_size=4", "train.max_iters=12", "train.grad_accum=2", "model.dropout=0.1")
    launch(2, straight, corpus, *common, cwd=tmp_path)
    launch(2, split, corpus, *common, "train.stop_after=6", cwd=tmp_path)
    assert load_checkpoint(split / "checkpoints" / "last.pt")["step"] == 6
    launch(2, split, corpus, *common, cwd=tmp_path)
    a, b = weights(straight), weights(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(straight))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss/train")]
    assert losses[-1] < losses[0] - 0.3, losses
    tokens_per_s = acc.Scalars("throughput/tokens_per_s")[-1].value
    per_device = acc.Scalars("throughput/tokens_per_s_per_device")[-1].value
    assert tokens_per_s == pytest.approx(2 * per_device)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_checkpoints_move_between_them(tmp_path, corpus):
    one, two = tmp_path / "one", tmp_path / "fsdp"
    launch(1, one, corpus, "train.batch_size=8", "train.max_iters=6", cwd=tmp_path)
    result = launch(2, two, corpus, "train.batch_size=4", "train.max_iters=6", "train.strategy=fsdp", cwd=tmp_path)
    assert "strategy fsdp" in result.stderr
    # The FSDP checkpoint is gathered into the single-process layout: plain tensors, optimizer keyed by index.
    state = load_checkpoint(two / "checkpoints" / "last.pt")
    reference = load_checkpoint(one / "checkpoints" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["params"] == reference["optimizer"]["param_groups"][0]["params"]
    for key in reference["model"]:
        torch.testing.assert_close(state["model"][key], reference["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    for i, moments in reference["optimizer"]["state"].items():
        torch.testing.assert_close(state["optimizer"]["state"][i]["exp_avg"], moments["exp_avg"], rtol=1e-4,
                                   atol=1e-6)

    # A single-process checkpoint continues under FSDP and ends where the single process ends.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "last.pt").write_bytes((one / "checkpoints" / "last.pt").read_bytes())
    launch(2, resumed, corpus, "train.batch_size=4", "train.max_iters=12", "train.strategy=fsdp", cwd=tmp_path)
    launch(1, one, corpus, "train.batch_size=8", "train.max_iters=12", cwd=tmp_path)
    a, b = weights(one), weights(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def children(pid: int) -> list[int]:
    """Child process ids, from /proc (no procps needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


@pytest.mark.slow
def test_a_crashed_rank_brings_the_job_down_instead_of_hanging(tmp_path, corpus):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           "data=text", f"data.path={corpus}", f"data_dir={corpus.parent / 'data'}", *TINY, "train.batch_size=4",
           "train.max_iters=1000000", "train.ckpt_interval=5", f"hydra.run.dir={run}"]
    log = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115  (a file, not a pipe that could fill up and block)
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoints" / "last.pt").is_file():  # both ranks are in the training loop
            assert time.monotonic() < deadline and launcher.poll() is None, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.1)
        workers = children(launcher.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # one rank dies mid-training
        code = launcher.wait(timeout=120)  # the job must end, not hang on the survivor's next collective
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    assert code != 0
    assert "SIGKILL" in (tmp_path / "stderr.txt").read_text()  # the launcher names the failed rank's signal
    load_checkpoint(run / "checkpoints" / "last.pt")  # and the last checkpoint is whole
