"""Ctrl-C at any moment of start-up (torch loading, Hydra composing) ends in one line and exit code 130, never a
traceback (issue 21: 'Ctrl-C during the first 1.5 s')."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
@pytest.mark.parametrize("after_s", [0.2, 0.6, 1.2])
@pytest.mark.parametrize("command", [[str(ROOT / "train.py"), "train.device=cpu"], ["-m", "gptmini.data"]],
                         ids=["train.py", "-m data"])
def test_ctrl_c_while_starting_is_one_line(tmp_path, command, after_s):
    """Both commands then prepare the standard library corpus (seconds): every moment tried is before they end."""
    proc = subprocess.Popen([sys.executable, *command, f"data_dir={tmp_path / 'data'}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted (Ctrl-C)" and proc.returncode == 130, stderr
