"""Sampling: greedy, top-k, top-p on hand-made distributions, and KV-cache decoding within and past block_size."""

from __future__ import annotations

import math

import pytest
import torch

from gptmini import GPT, AttentionConfig, ModelConfig
from gptmini.attention import ATTENTION_REGISTRY
from gptmini.sampling import filter_logits, generate, next_token


def tiny(name: str = "sdpa", **kw) -> GPT:
    attn = {"gqa": AttentionConfig("gqa", n_kv_head=2), "swa": AttentionConfig("swa", window=4)}.get(
        name, AttentionConfig(name)
    )
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=12, vocab_size=29, attention=attn, **kw)
    return GPT(cfg).eval()


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[False, True, False, True, False]]  # 0.4 + 0.3 reaches 0.7
    kept = torch.isfinite(filter_logits(logits, top_p=0.71))
    assert kept.tolist() == [[False, True, False, True, True]]  # needs 0.15 too
    kept = torch.isfinite(filter_logits(logits, top_p=0.3))
    assert kept.tolist() == [[False, True, False, False, False]]  # the top token alone reaches it
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(4, 29)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(next_token(logits, 0.0, None, None, gen)[:, 0], logits.argmax(-1))
    assert torch.equal(next_token(logits, 1.0, 1, None, gen)[:, 0], logits.argmax(-1))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    gen = torch.Generator().manual_seed(0)
    draws = next_token(probs.log().expand(20000, 3), 1.0, None, None, gen)[:, 0]
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)


def test_greedy_equals_argmax_decoding_by_the_full_model():
    model = tiny()
    idx = torch.tensor([[1, 2, 3]])
    out = generate(model, idx, 6, temperature=0.0)
    expected = idx
    for _ in range(6):
        nxt = model(expected).logits[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_kv_cache_on_and_off_agree_past_block_size(name):
    model = tiny(name)
    idx = torch.tensor([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]])
    with_cache = generate(model, idx, 20, temperature=0.0, kv_cache=True)  # 25 tokens > block_size 12
    without = generate(model, idx, 20, temperature=0.0, kv_cache=False)
    assert with_cache.shape == (2, 25)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("name", ["mha", "sdpa", "gqa", "swa", "wrapper"])
def test_kv_cache_on_and_off_agree_past_block_size_with_rope(name):
    model = tiny(name, pos_encoding="rope")
    idx = torch.tensor([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]])
    with_cache = generate(model, idx, 20, temperature=0.0, kv_cache=True)
    assert torch.equal(with_cache, generate(model, idx, 20, temperature=0.0, kv_cache=False))


def test_prompt_longer_than_block_size_and_zero_new_tokens():
    model = tiny()
    idx = torch.arange(15)[None] % 29  # (1, 15) > block_size 12: only the last 12 are seen
    with_cache = generate(model, idx, 6, temperature=0.0, kv_cache=True)
    assert with_cache.shape == (1, 21)
    assert torch.equal(with_cache, generate(model, idx, 6, temperature=0.0, kv_cache=False))
    assert torch.equal(with_cache[:, 15:16], model(idx[:, -12:]).logits[:, -1:].argmax(-1))
    assert torch.equal(generate(model, idx, 0), idx)


def test_same_seed_same_tokens():
    model = tiny()
    idx = torch.tensor([[1, 2]])
    a = generate(model, idx, 15, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate(model, idx, 15, temperature=1.0, generator=torch.Generator().manual_seed(7))
    c = generate(model, idx, 15, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    cold = torch.softmax(filter_logits(logits / 0.5), -1)
    assert cold[0, 2].item() == pytest.approx(math.exp(6) / (math.exp(2) + math.exp(4) + math.exp(6)), rel=1e-5)


def test_temperature_is_applied_before_top_p():
    """p = [.5, .3, .2] at temperature 0.5 is [.66, .24, .11]: token 0 alone reaches top_p=0.6. Filtering first
    (at temperature 1, where .5 < .6) would keep token 1 too and draw it about a quarter of the time."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(4000, 3)
    sharpened = torch.softmax(logits[0] / 0.5, -1)
    assert sharpened[0] > 0.6 > torch.tensor([0.5, 0.3, 0.2])[0]  # the reference: why only token 0 survives
    draws = next_token(logits, 0.5, None, 0.6, torch.Generator().manual_seed(0))
    assert draws.shape == (4000, 1) and (draws == 0).all()


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_a_vanishing_temperature_samples_the_argmax(top_p):
    """temperature=1e-300 overflowed logits / T to inf, and softmax to NaN (a traceback in torch.multinomial);
    its limit is greedy decoding."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -7.0, -6.0]])
    draws = next_token(logits, 1e-300, None, top_p, torch.Generator().manual_seed(0))
    assert draws[:, 0].tolist() == [1, 0]
