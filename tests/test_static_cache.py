"""The static KV cache and the compiled decode step: the same tokens as the growing cache and as no cache."""

from __future__ import annotations

import pytest
import torch
from model_helpers import tiny_config

from gptmini import ATTENTION_REGISTRY, GPT
from gptmini.sampling import Decoder, generate

STATIC = [n for n, cls in ATTENTION_REGISTRY.items() if cls.static_cache]  # asked of the flag, never by name


def model_for(name: str, pos: str) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(name, window=5, pos_encoding=pos)).eval()


@pytest.mark.parametrize("name", STATIC)
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_static_decoding_gives_the_growing_caches_and_the_uncached_tokens(name, pos):
    model = model_for(name, pos)
    idx = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(1))  # batch 2
    # 20 new tokens: 11 within block 16, the rest with a full window that slides (the cache is dropped there).
    runs = {mode: generate(model, idx, 20, temperature=0.0, **kw)
            for mode, kw in {"none": dict(kv_cache=False), "growing": {}, "static": dict(static=True)}.items()}
    assert torch.equal(runs["static"], runs["growing"]) and torch.equal(runs["static"], runs["none"])


@pytest.mark.parametrize("name", STATIC)
def test_static_step_logits_match_the_full_forward(name):
    model = model_for(name, "rope")
    idx = torch.randint(0, 37, (3, 12))
    decoder = Decoder(model, 3, None, static=True)
    with torch.no_grad():
        steps = [decoder(idx[:, :4])] + [decoder(idx[:, t : t + 1]) for t in range(4, 12)]  # prefill, then 1 by 1
        full = model(idx).logits  # (3, 12, V)
    for t, logits in zip(range(3, 12), steps, strict=True):
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)
    assert decoder.pos == 12


def test_sampled_tokens_are_the_same_with_the_same_generator():
    model = model_for("sdpa", "learned")
    idx = torch.zeros(2, 1, dtype=torch.long)
    a = generate(model, idx, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = generate(model, idx, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3), static=True)
    assert torch.equal(a, b)


def test_variants_without_a_static_cache_say_so():
    with pytest.raises(ValueError, match=r"attention variant 'mha' has no static KV cache"):
        model_for("mha", "learned").make_kv_cache(1, static=True)


@pytest.mark.slow
def test_the_compiled_decode_step_and_window_give_the_eager_tokens_without_recompiling():
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    model = model_for("sdpa", "rope")
    idx = torch.randint(0, 37, (2, 3), generator=torch.Generator().manual_seed(2))
    n = 20  # 3 + 20 > block 16: the cached steps, then the full window sliding
    eager = generate(model, idx, n, temperature=0.0, kv_cache=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, idx, n, temperature=0.0, static=True, compile=True)
    assert torch.equal(compiled, eager)
    # prefill, the decode step, the full window: one graph each, whatever the position (a recompile per step
    # would still give the right tokens, slowly, until Dynamo's recompile limit fell back to eager)
    assert counters["frames"]["ok"] == 3
    long = torch.randint(0, 37, (2, 18), generator=torch.Generator().manual_seed(3))  # fills the block at once
    compiled = generate(model, long, 4, temperature=0.0, static=True, compile=True)
    assert torch.equal(compiled, generate(model, long, 4, temperature=0.0, kv_cache=False))
    assert counters["frames"]["ok"] == 3  # no new graph: the prompt's window, made contiguous, has the same strides
