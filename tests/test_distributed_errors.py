"""Under torchrun, a bad setting is reported once, by rank 0, not once per rank (issue 21). torchrun's own report
of a failed child (its ChildFailedError traceback) follows it; that output is torchrun's, not ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_bad_setting_under_torchrun_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
         "train.device=cpu", "train.grad_accum=0", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0
    assert len(errors) == 1 and errors[0].startswith("error: train.grad_accum=0 must be a positive integer"), errors
