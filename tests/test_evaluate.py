"""The evaluation command: its loss is the hand-computed mean cross-entropy over non-overlapping windows, it is
the same number training prints at the end, and the CLI prints loss and perplexity or a one-line error."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from gptmini import data as data_lib
from gptmini.checkpoint import load_for_inference
from gptmini.cli import to_dataclass
from gptmini.config import DataConfig, EvalOptions, EvaluateConfig, ModelConfig, register_configs
from gptmini.evaluate import evaluate_split, run_evaluation
from gptmini.model import GPT
from gptmini.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def hand_loss(model: GPT, tokens: np.ndarray, window: int) -> float:
    """Window by window, straight from the definition: every position with a next token, exactly once."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            x = ids[start : min(start + window, len(ids) - 1)]
            y = ids[start + 1 : start + 1 + len(x)]
            logits = model(x[None]).logits[0]  # (t, vocab)
            total += F.cross_entropy(logits.double(), y, reduction="sum").item()
            count += len(y)
    assert count == len(ids) - 1
    return total / count


@pytest.mark.parametrize(("n_tokens", "window", "batch_size"), [(203, 16, 4), (161, 16, 3), (50, 7, 64), (22, 5, 2)])
def test_evaluate_split_equals_hand_computation(n_tokens, window, batch_size):
    """A partial last window (203: 10 positions), none (161, 50), and one of a single target (22: 21 positions)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=11))
    tokens = np.random.default_rng(0).integers(0, 11, n_tokens).astype(np.uint16)
    model.train()
    loss = evaluate_split(model, tokens, window, batch_size=batch_size)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert loss == pytest.approx(hand_loss(model, tokens, window), rel=1e-6)
    assert loss != pytest.approx(hand_loss(model, tokens, window // 2), rel=1e-3)  # the window matters


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained a few steps on a tiny corpus, with the trainer's final evaluation at window 8."""
    tmp = tmp_path_factory.mktemp("eval")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the cat sat on the mat.\n" for i in range(120)))
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = to_dataclass(compose("train", overrides=[
            "data=text", f"data.path={corpus}", f"data_dir={tmp / 'data'}", "model.n_layer=1", "model.n_head=2",
            "model.n_embd=16", "model.block_size=16", "train.batch_size=4", "train.max_iters=8",
            "train.warmup_iters=2", "train.eval_interval=0", "train.attn_interval=0", "train.sample_tokens=0",
            "train.eval_window=8", "train.device=cpu",
        ]))
    result = train(cfg, tmp / "run")
    return tmp, corpus, cfg, result


def test_run_evaluation_matches_hand_computation_and_training(trained):
    tmp, corpus, cfg, result = trained
    out = run_evaluation(EvaluateConfig(ckpt=str(tmp / "run"), eval=EvalOptions(window=8, device="cpu")),
                         stream=None)
    model = load_for_inference(tmp / "run", "cpu").model
    val = data_lib.prepare(cfg.data, cfg.data_dir, log=lambda _: None).val_tokens()
    assert out.loss == pytest.approx(hand_loss(model, val, 8), rel=1e-6)
    assert out.loss == pytest.approx(result.final_val_loss, abs=5e-5)  # the trainer's last line (4 decimals)
    assert out.perplexity == pytest.approx(math.exp(out.loss))
    assert out.positions == len(val) - 1 and out.window == 8
    # The default window is the model's block size; the train split is measured when asked.
    full = run_evaluation(EvaluateConfig(ckpt=str(tmp / "run"), eval=EvalOptions(device="cpu")), stream=None)
    assert full.window == 16 and full.loss == pytest.approx(hand_loss(model, val, 16), rel=1e-6)
    train_split = run_evaluation(
        EvaluateConfig(ckpt=str(tmp / "run"), eval=EvalOptions(split="train", window=8, device="cpu")), stream=None
    )
    train_tokens = data_lib.prepare(cfg.data, cfg.data_dir, log=lambda _: None).train_tokens()
    assert train_split.loss == pytest.approx(hand_loss(model, train_tokens, 8), rel=1e-6)


def test_bad_window_and_foreign_data_are_refused(trained, tmp_path):
    tmp, corpus, cfg, _ = trained
    with pytest.raises(ValueError, match=r"eval.window=17 must be between 1 and the model's block_size=16"):
        run_evaluation(EvaluateConfig(ckpt=str(tmp / "run"), eval=EvalOptions(window=17, device="cpu")), stream=None)
    other = tmp_path / "other.txt"
    other.write_text("completely different letters: XYZ QWJ 0123456789 " * 40)
    foreign = DataConfig(name="other", source="files", path=str(other), tokenizer="char")
    with pytest.raises(ValueError, match="character\\(s\\) not in the char vocabulary"):  # read with the model's
        run_evaluation(EvaluateConfig(ckpt=str(tmp / "run"), data=foreign, data_dir=str(tmp_path / "data"),
                                      eval=EvalOptions(device="cpu")), stream=None)
    as_bytes = DataConfig(name="other", source="files", path=str(other), tokenizer="bytes")
    with pytest.raises(ValueError, match="tokenized differently from the checkpoint's tokenizer"):
        run_evaluation(EvaluateConfig(ckpt=str(tmp / "run"), data=as_bytes, data_dir=str(tmp_path / "data"),
                                      eval=EvalOptions(device="cpu")), stream=None)
    with pytest.raises(ValueError, match="eval.split='test' is unknown; valid: val, train"):
        run_evaluation(EvaluateConfig(ckpt=str(tmp / "run"), eval=EvalOptions(split="test")), stream=None)


def evaluate_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptmini.evaluate", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_prints_loss_and_perplexity(trained, tmp_path):
    tmp, corpus, cfg, result = trained
    # With the data named on the command line, as a user would after training.
    done = evaluate_cli(f"ckpt={tmp / 'run'}", "data=text", f"data.path={corpus}", f"data_dir={tmp / 'data'}",
                        "eval.window=8", "eval.device=cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    match = re.search(r"^val loss (\d+\.\d{4}), perplexity (\d+\.\d{4}) \(whole split, window 8, ", done.stdout, re.M)
    assert match, done.stdout
    loss, ppl = float(match.group(1)), float(match.group(2))
    assert loss == pytest.approx(result.final_val_loss, abs=1e-4)
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    # Without data=..., the checkpoint's own data config is used: the same number.
    again = evaluate_cli(f"ckpt={tmp / 'run' / 'checkpoints' / 'last.pt'}", "eval.window=8", "eval.device=cpu",
                         cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"val loss {loss:.4f}" in again.stdout
    bad = evaluate_cli(f"ckpt={tmp / 'run'}", "eval.window=100", "eval.device=cpu", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: eval.window=100 must be between 1 and the model's block_size=16"]
    missing = evaluate_cli(f"ckpt={tmp_path / 'nope'}", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
