"""The rolling cache (issue 25, item 3): a windowed layer keeps only its last `window` keys and values, so a RoPE
model whose every layer is windowed decodes past block_size at one position per token, with a cache that stays
the same size however long it generates.

The reference recomputes every step from scratch, in plain float64 tensors written here from the equations (layer
norm, rotary phases of each token's own absolute position, windowed causal softmax, GELU MLP): the last tokens that
can still reach the next one through the windows of every layer, at their own positions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptmini.attention import RollingLayerKVCache
from gptmini.config import AttentionConfig, ModelConfig
from gptmini.model import GPT
from gptmini.sampling import generate

BLOCK = 16


def rope_model(layers: list[str], pos: str = "rope", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    fields = dict(n_layer=len(layers), n_head=2, n_embd=16, block_size=BLOCK, vocab_size=23, pos_encoding=pos,
                  attention=AttentionConfig(layers=layers))
    return GPT(ModelConfig(**(fields | overrides))).eval()


def reference_logits(sd: dict[str, torch.Tensor], tokens: list[int], start: int, windows: list[int], n_head: int,
                     base: float = 10000.0) -> torch.Tensor:
    """The next-token logits after `tokens`, which sit at absolute positions start, start + 1, ...: float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = sd["wte.weight"][torch.tensor(tokens)]  # (T, C)
    T, C = x.shape
    hd = C // n_head
    pos = torch.arange(start, start + T, dtype=torch.float64)
    inv = 1.0 / base ** (torch.arange(hd // 2, dtype=torch.float64) / (hd // 2))
    cos, sin = torch.outer(pos, inv).cos(), torch.outer(pos, inv).sin()  # (T, hd/2)

    def rotate(t: torch.Tensor) -> torch.Tensor:  # (H, T, hd), the two halves of each head rotated
        a, b = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def norm(t: torch.Tensor, name: str) -> torch.Tensor:
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for layer, window in enumerate(windows):
        p = f"blocks.{layer}."
        h = norm(x, p + "ln_1")
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).split(C, dim=-1)
        q, k, v = (t.view(T, n_head, hd).transpose(0, 1) for t in (q, k, v))  # (H, T, hd)
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(hd)  # (H, T, T)
        scores = scores.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, C)
        x = x + y @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = norm(x, p + "ln_2") @ sd[p + "mlp.fc.weight"].T + sd[p + "mlp.fc.bias"]
        x = x + F.gelu(h) @ sd[p + "mlp.proj.weight"].T + sd[p + "mlp.proj.bias"]
    return norm(x[-1], "ln_f") @ sd["wte.weight"].T  # (V,)


@pytest.mark.parametrize("layers", [["swa:3", "swa:5"], ["swa:4", "swa:4", "swa:2"]])
def test_tokens_past_block_size_match_a_recompute_from_the_last_windows(layers):
    model = rope_model(layers).double()
    windows = [b.attn.window for b in model.blocks]
    reach = sum(w - 1 for w in windows) + 1  # the last tokens the next one can still depend on
    prompt = [3, 1, 4, 1, 5, 9, 2]
    new = 4 * BLOCK  # many windows, far past block_size
    out = generate(model, torch.tensor([prompt]), new, temperature=0.0)[0].tolist()
    tokens = list(prompt)
    sd = model.state_dict()
    for _ in range(new):
        start = max(len(tokens) - reach, 0)
        logits = reference_logits(sd, tokens[start:], start, windows, model.config.n_head)
        tokens.append(int(logits.argmax()))
    assert out == tokens
    full = reference_logits(sd, tokens, 0, windows, model.config.n_head)  # the cut really is exact
    torch.testing.assert_close(full, reference_logits(sd, tokens[-reach:], len(tokens) - reach, windows, 2))


def test_each_step_past_block_size_is_one_position():
    model = rope_model(["swa:3", "swa:5"])
    lengths = []
    forward = model.forward
    model.forward = lambda idx, *a, **kw: (lengths.append(idx.size(1)), forward(idx, *a, **kw))[1]
    generate(model, torch.tensor([[1, 2, 3]]), 3 * BLOCK, temperature=0.0)
    assert lengths == [3] + [1] * (3 * BLOCK - 1)  # the prompt, then one position per token: no recompute


def test_the_cache_stays_the_size_of_the_windows():
    model = rope_model(["swa:3", "swa:5"])
    cache = model.make_kv_cache(2, rolling=True)
    assert all(isinstance(layer, RollingLayerKVCache) for layer in cache.layers)
    expected = 2 * 2 * 2 * (3 + 5) * 8 * 4  # (k, v) x batch x heads x (window sum) x head_dim x float32 bytes
    sizes = []
    model(torch.randint(0, 23, (2, 6)), kv_cache=cache)
    for _ in range(4 * BLOCK):
        model(torch.randint(0, 23, (2, 1)), kv_cache=cache)
        sizes.append(cache.nbytes())
    assert set(sizes) == {expected}
    assert cache.pos == 6 + 4 * BLOCK


def test_a_prompt_chunk_through_the_ring_sees_the_same_keys_as_one_at_a_time():
    """A multi-token chunk after the ring has wrapped equals feeding its tokens one by one."""
    model = rope_model(["swa:3", "swa:5"]).double()
    idx = torch.randint(0, 23, (1, 30))
    chunked, single = model.make_kv_cache(1, rolling=True), model.make_kv_cache(1, rolling=True)
    model(idx[:, :20], kv_cache=chunked)
    chunk = model(idx[:, 20:], kv_cache=chunked).logits  # (1, 10, V)
    ones = [model(idx[:, t : t + 1], kv_cache=single).logits for t in range(30)]
    torch.testing.assert_close(chunk, torch.cat(ones[20:], dim=1))


def test_rope_tables_grow_and_keep_their_first_rows():
    model = rope_model(["swa:3"])
    cos, sin = model.rope_cos.clone(), model.rope_sin.clone()
    model.extend_rope(5 * BLOCK)
    assert model.rope_cos.size(0) >= 5 * BLOCK
    assert torch.equal(model.rope_cos[:BLOCK], cos) and torch.equal(model.rope_sin[:BLOCK], sin)


@pytest.mark.parametrize(("layers", "pos"), [(["swa:3", "sdpa"], "rope"), (["swa:3", "swa:4"], "learned")])
def test_only_all_windowed_rope_models_roll(layers, pos):
    """A full-attention layer, or learned positions (no rows past block_size): the context slides as before, and
    the cache stops at block_size."""
    model = rope_model(layers, pos)
    assert not model.rolls_past_block()
    cache = model.make_kv_cache(1, rolling=True)
    assert cache.bounded == (pos == "learned")  # windows everywhere, but no learned position past block_size
    model(torch.randint(0, 23, (1, BLOCK)), kv_cache=cache)
    with pytest.raises(ValueError, match="longer than model.block_size=16"):
        model(torch.randint(0, 23, (1, 1)), kv_cache=cache)
    idx = torch.randint(0, 23, (1, 4))
    assert torch.equal(generate(model, idx, 2 * BLOCK, temperature=0.0),
                       generate(model, idx, 2 * BLOCK, temperature=0.0, kv_cache=False))
