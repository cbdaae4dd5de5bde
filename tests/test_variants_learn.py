"""Every attention variant that trains on CPU learns: a short run through the library's own training path on Tiny
Shakespeare ends well below the character unigram entropy of the text (what a model that ignores the context
can reach at best), measured on the validation split by the run's own evaluation. Muon and a warm-up/stable/decay
schedule (as experiment=speedrun_cpu) get a 2-layer, 64-wide model there in 160 steps, a few seconds; it also gets
below the bigram entropy, which needs attention to work (with the attention output zeroed it stays above)."""

from __future__ import annotations

import collections
import math
import time
from pathlib import Path

import pytest
from test_train import make_config

from gptmini import ATTENTION_REGISTRY
from gptmini.trainer import train

# The shared data folder beside the checkout (../shared), which CI provides too.
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TRAINABLE = [n for n, cls in ATTENTION_REGISTRY.items() if cls.trains_on_cpu]  # asked of the flag, never by name
MARGIN = 0.6  # nats below the unigram entropy (3.31 nats): a context-blind model cannot get there
STEPS = 160


def unigram_entropy(text: str) -> float:
    """-Σ p(c) ln p(c) over the characters of `text`, in nats: the loss of the best context-free predictor."""
    counts = collections.Counter(text)
    return -sum(n / len(text) * math.log(n / len(text)) for n in counts.values())


def bigram_entropy(text: str) -> float:
    """H(next character | this one) over `text`, in nats: the loss of the best predictor that sees one character
    back (fitted to the very text it is measured on), which a model gets to without any working attention."""
    pairs, firsts = collections.Counter(zip(text, text[1:], strict=False)), collections.Counter(text[:-1])
    return -sum(n / (len(text) - 1) * math.log(n / firsts[a]) for (a, _), n in pairs.items())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One prepared copy of the corpus for every variant (the first run prepares it, the others reuse it)."""
    if not SHAKESPEARE.is_file():
        pytest.fail(f"{SHAKESPEARE} is missing: Tiny Shakespeare belongs in ../shared/data beside the checkout")
    return tmp_path_factory.mktemp("shakespeare")


@pytest.mark.parametrize("attention", TRAINABLE)
def test_every_trainable_variant_learns_tiny_shakespeare(tmp_path, data_dir, attention):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    entropy, bigram = unigram_entropy(text), bigram_entropy(text)
    assert 3.2 < entropy < 3.4 and 2.4 < bigram < 2.5  # Tiny Shakespeare's characters, computed here
    cfg = make_config(
        SHAKESPEARE, data_dir, f"model/attention={attention}", "model.n_embd=64", "model.n_head=4", "optim=muon",
        f"train.max_iters={STEPS}", "train.batch_size=16", "train.lr=1e-2", "train.warmup_iters=10",
        "train.lr_schedule=wsd", f"train.eval_interval={STEPS}", "train.eval_iters=20", "train.attn_interval=0",
        "train.sample_tokens=0", f"train.ckpt_interval={STEPS}", "train.log_interval=50", "train.final_eval=false",
    )
    start = time.perf_counter()
    result = train(cfg, tmp_path / "run")
    seconds = time.perf_counter() - start
    assert result.step == STEPS
    # The val loss at the last step, on 20 random batches of the validation split: well below the unigram entropy,
    # and below what one character of context allows (a model whose attention is dead stops above that).
    assert result.best_val_loss < entropy - MARGIN, (attention, result.best_val_loss, entropy, seconds)
    assert result.best_val_loss < bigram - 0.05, (attention, result.best_val_loss, bigram, seconds)
