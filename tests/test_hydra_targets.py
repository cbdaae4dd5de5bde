"""A YAML cannot run code through Hydra: `_target_` anywhere in the composed config (a callback in `hydra:` too) is
refused in one line before Hydra instantiates anything, and so are the flags that would compose another config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptmini.cli import check_overrides

ROOT = Path(__file__).resolve().parents[1]


def attack(folder: Path) -> tuple[Path, dict[str, str]]:
    """An experiment file whose hydra callback would call a function that writes `marker`, and the environment
    that lets Hydra import that function."""
    (folder / "conf" / "lab").mkdir(parents=True)
    (folder / "payload.py").write_text("from pathlib import Path\n\n\ndef write(path):\n"
                                       "    Path(path).write_text('the payload ran')\n")
    marker = folder / "marker"
    (folder / "conf" / "lab" / "evil.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: payload.write\n"
        f"      path: {marker}\n")
    path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"PYTHONPATH": path}
    return marker, env


@pytest.mark.parametrize("script", ["generate", "train"])
def test_a_callback_target_in_an_experiment_file_never_runs(tmp_path, script):
    marker, env = attack(tmp_path)
    args = {"generate": [f"ckpt={tmp_path / 'nope'}"],
            "train": ["data=text", f"data.path={tmp_path / 'nope.txt'}", f"hydra.run.dir={tmp_path / 'run'}"]}[script]
    command = [sys.executable, str(ROOT / f"{script}.py"), *args, f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
               "+lab=evil"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists()  # the payload never ran
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: hydra.callbacks.x._target_='payload.write': _target_ is refused anywhere in the configuration, its "
        "hydra: section included (Hydra would import and call it; gptmini instantiates nothing from its config); "
        "remove it from the experiment file or override that sets it"]
    assert not (tmp_path / "run").exists()


def refused(capsys, config_name: str, args: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        check_overrides(config_name, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_targets_are_refused_wherever_they_are_set(capsys, tmp_path):
    assert check_overrides("generate", ["ckpt=x"]) == []  # Hydra's own launcher and sweeper targets are fine
    line = refused(capsys, "generate", ["ckpt=x", "+hydra.callbacks.y._target_=builtins.print"])
    assert line.startswith("error: hydra.callbacks.y._target_='builtins.print': _target_ is refused")
    line = refused(capsys, "generate", ["ckpt=x", "+hydra.sweeper.z._target_=os.system"])  # nested in a plugin
    assert line.startswith("error: hydra.sweeper.z._target_='os.system'")
    line = refused(capsys, "prepare", ["-m", "data=text", "+hydra.callbacks.y._target_=builtins.print"])  # a sweep
    assert "hydra.callbacks.y._target_" in line


def test_flags_that_compose_another_config_are_refused(capsys, tmp_path):
    for flag in (["-cd", str(tmp_path)], [f"--config-dir={tmp_path}"], ["-cn", "train"], ["--experimental-rerun",
                                                                                          "x.pickle"]):
        line = refused(capsys, "generate", ["ckpt=x", *flag])
        assert line.startswith(f"error: {flag[0].split('=')[0]}: gptmini's commands read their configs from ")
    assert check_overrides("generate", ["ckpt=x", "--cfg", "job"]) == []  # shows the config, runs nothing
    assert check_overrides("generate", ["--help"]) == []
