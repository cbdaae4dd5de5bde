"""What a run tells its user (issue 21, 'tried as a new user would'): where the run is, that the final evaluation
is running, and log lines that do not land on the progress bar's line."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from gptmini.config import GenerateConfig
from gptmini.generate_command import run_generation
from gptmini.run_log import BarSafeHandler
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_config  # noqa: E402


def test_the_run_names_its_folder_and_announces_the_final_evaluation(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    run = tmp_path / "run"
    train(make_config(corpus, tmp_path / "data", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                      "model.block_size=16", "train.max_iters=2"), run)
    log = (run / "train.log").read_text()
    assert log.count(f"run directory: {run}") == 2  # at the start, and with what to do next at the end
    assert f"python generate.py ckpt={run}" in log
    start = log.index("final evaluation: the whole val split")
    assert start < log.index("final val loss")
    capsys.readouterr()
    png = tmp_path / "maps" / "attn.png"
    run_generation(GenerateConfig(ckpt=str(run), max_new_tokens=2, device="cpu", attention_map=str(png)), None)
    assert f"attention map: {png}" in capsys.readouterr().err.splitlines()


def rendered_line(text: str, needle: str) -> str:
    """The terminal line holding `needle`, as shown: a carriage return starts the line again."""
    line = next(line for line in text.split("\n") if needle in line)
    return line.split("\r")[-1]


def test_log_lines_are_written_around_a_live_progress_bar():
    stream = io.StringIO()
    logger = logging.getLogger("gptmini.test.bar")
    logger.propagate = False
    handler = BarSafeHandler(stream)
    logger.addHandler(handler)
    try:
        with tqdm(total=10, file=stream, desc="train", mininterval=0, ascii=True) as bar:
            bar.update(5)
            logger.warning("step 5: val loss 1.2345")
            bar.update(5)
    finally:
        logger.removeHandler(handler)
    assert rendered_line(stream.getvalue(), "val loss") == "step 5: val loss 1.2345"


def test_an_unwritable_train_log_or_config_is_one_line(tmp_path, monkeypatch):
    """As root, a chmod is no obstacle: the OS's refusal is simulated where the files are opened."""
    import pytest

    from gptmini import paths, run_log

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    cfg = make_config(corpus, tmp_path / "data", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                      "model.block_size=16", "train.max_iters=2", "train.final_eval=false")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_log.logging, "FileHandler", read_only)
    with pytest.raises(ValueError, match=r"hydra.run.dir=.*: train.log cannot be written \(Permission denied\)"):
        train(cfg, tmp_path / "run1")
    monkeypatch.undo()
    monkeypatch.setattr(paths.tempfile, "mkstemp", read_only)
    with pytest.raises(ValueError, match=r"^hydra.run.dir=.*config.yaml' could not be written \(Permission denied\)"):
        train(cfg, tmp_path / "run2")
