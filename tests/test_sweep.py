"""A sweep runs every job it can: a job refused for its input is named, leaves no folder, and does not stop the
jobs after it; the sweep ends with one `error:` line listing the refused jobs (issue 21)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "train.max_iters=2", "train.batch_size=2",
        "train.eval_interval=0", "train.attn_interval=0", "train.sample_tokens=0", "train.final_eval=false",
        "train.device=cpu"]


def test_a_refused_job_does_not_stop_the_sweep(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)  # ~1,800 chars: val < 1,025 tokens
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "data=text", f"data.path={corpus}",
         f"data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}", *TINY,
         "model.block_size=1024,16"],  # job 0 is refused (the val split is too small), job 1 runs after it
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error: 1 of 2 sweep jobs refused, the others ran; job 0 (")
    assert "model.block_size=1024" in errors[0] and "fewer than model.block_size+1=1025" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (sweep / "0").exists()  # the refused job left no folder
    assert (sweep / "1" / "checkpoints" / "last.pt").is_file()  # the job after it ran
