"""The fused, chunked LM head + cross-entropy against the plain path: the same loss and the same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import tiny_config
from test_train import make_config

from gptmini import GPT
from gptmini.checkpoint import load_checkpoint
from gptmini.config import TrainConfig
from gptmini.loss import IGNORE, chunked_lm_loss
from gptmini.trainer import train


def plain_loss(h, weight, targets, vocab_size, cap):
    """The textbook path, written out: every logit, soft-capped, then F.cross_entropy."""
    z = (h @ weight.t())[:, :vocab_size]
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z, targets, ignore_index=IGNORE)


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("padded", [0, 5])
def test_loss_and_gradients_equal_the_plain_path(chunk, cap, padded):
    torch.manual_seed(0)
    N, C, V = 23, 16, 40
    h = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V + padded, C, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[[2, 11]] = IGNORE  # positions without a target count for nothing
    ours = chunked_lm_loss(h, weight, targets, V, cap, chunk)
    (ours * 2.5).backward()  # the upstream gradient is applied (as a GradScaler's scale is)
    got = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    want = plain_loss(h, weight, targets, V, cap)
    (want * 2.5).backward()
    torch.testing.assert_close(ours, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[0], h.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[1], weight.grad, atol=1e-10, rtol=1e-10)
    if padded:
        assert not got[1][V:].any()  # padding rows are never predicted: no gradient


def test_without_gradients_only_the_loss_is_computed():
    h, weight, targets = torch.randn(10, 8), torch.randn(30, 8), torch.randint(0, 30, (10,))
    with torch.no_grad():
        torch.testing.assert_close(chunked_lm_loss(h, weight, targets, 30, None, 4),
                                   plain_loss(h, weight, targets, 30, None))


@pytest.mark.parametrize("fields", [{}, dict(logit_softcap=5.0, vocab_multiple=16, pos_encoding="rope")])
def test_the_model_gives_the_plain_loss_and_gradients_with_its_tied_head(fields):
    torch.manual_seed(0)
    model = GPT(tiny_config("sdpa", **fields))
    idx = torch.randint(0, 37, (3, 16))
    targets = torch.randint(0, 37, (3, 16))
    plain = model(idx, targets)
    plain.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = model(idx, targets, loss_chunk=10)
    fused.loss.backward()
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_training_with_a_chunked_loss_follows_the_plain_run(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 100)
    common = ("train.max_iters=3", "train.final_eval=false", "train.eval_interval=3", "train.attn_interval=0",
              "train.sample_tokens=0")
    train(make_config(corpus, tmp_path / "data", *common), tmp_path / "plain")
    train(make_config(corpus, tmp_path / "data", *common, "train.loss_chunk=50"), tmp_path / "chunked")
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("plain", "chunked"))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4, msg=key)
    assert abs(a["best_val_loss"] - b["best_val_loss"]) < 1e-4


def test_loss_chunk_must_be_positive():
    with pytest.raises(ValueError, match=r"^train.loss_chunk=0 "):
        TrainConfig(loss_chunk=0)
