"""`python -m gptmini.evaluate ckpt=RUN data=text data.path=other.txt`: other text measured with the checkpoint's
own tokenizer (a char model through its training vocabulary), never by replacing the run's training data."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from gptmini.checkpoint import load_for_inference
from gptmini.config import DataConfig, EvalOptions, EvaluateConfig
from gptmini.evaluate import run_evaluation
from gptmini.tokenizer import TokenizerError
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_config  # noqa: E402

CORPUS = "the quick brown fox jumps over the lazy dog.\n" * 200


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate_other")
    (root / "corpus.txt").write_text(CORPUS)
    train(make_config(root / "corpus.txt", root / "data", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                      "model.block_size=16", "train.max_iters=2", "train.final_eval=false"), root / "run")
    return root / "run"


def evaluate(run: Path, path: Path, **data) -> float:
    cfg = EvaluateConfig(ckpt=str(run), data=DataConfig(name=data.pop("name", "text"), source="files",
                                                        path=str(path), **data),
                         data_dir=str(run.parent / "data"), eval=EvalOptions(split="val"))
    return run_evaluation(cfg, stream=None).loss


def test_other_text_is_read_through_the_checkpoints_vocabulary(run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("a lazy dog jumps over the quick brown fox.\n" * 50)  # fewer characters than the corpus
    loss = evaluate(run, other, name="other")
    model, tokenizer = load_for_inference(run)[:2]
    prepared = run.parent / "data" / "other"
    ids = np.concatenate([np.fromfile(prepared / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert tokenizer.decode(ids.tolist()) == other.read_text()  # the checkpoint's ids, not a vocabulary of its own
    assert np.isfinite(loss) and loss > 0


def test_a_character_the_model_never_saw_is_named(run, tmp_path):
    other = tmp_path / "digits.txt"
    other.write_text("the dog 42\n" * 50)
    with pytest.raises(TokenizerError, match=r"2 character\(s\) not in the char vocabulary: '2', '4'"):
        evaluate(run, other, name="digits")
    assert not (run.parent / "data" / "digits").exists()


def test_other_text_never_replaces_the_runs_training_data(run, tmp_path):
    dataset = run.parent / "data" / "text"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dataset.iterdir()}
    other = tmp_path / "other.txt"
    other.write_text("a lazy dog jumps over the quick brown fox.\n" * 50)
    with pytest.raises(ValueError, match=r"data.name='text' .* holds the data this checkpoint was trained on; "
                                         r"preparing other text there would replace it: add data.name="):
        evaluate(run, other)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dataset.iterdir()} == before
