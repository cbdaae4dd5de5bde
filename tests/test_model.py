"""The GPT model: parameter count, initialisation, errors, and whole-model equivalences across variants."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from gptmini import GPT, AttentionConfig, ModelConfig
from gptmini.attention import ATTENTION_REGISTRY, weight_compatible_variants

sys.path.insert(0, str(Path(__file__).parent))
from model_helpers import tiny_config  # noqa: E402

ALL = sorted(ATTENTION_REGISTRY)


def tiny(name: str = "sdpa", **overrides) -> ModelConfig:
    """The shared tiny config (tests/model_helpers.py) with a longer block, a window of 5 and 41 tokens."""
    return tiny_config(name, window=5, **{"block_size": 24, "vocab_size": 41, **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def test_gpt2_small_has_124_439_808_parameters():
    cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_parameters() == 124_439_808
    assert model.lm_head.weight is model.wte.weight  # tied head


@pytest.mark.parametrize("name", [n for n in ALL if ATTENTION_REGISTRY[n].canonical_layout])  # mla: test_mla.py
def test_parameter_count_is_formula(name):
    cfg = tiny(name)
    C, L, V, T = 32, 2, 41, 24
    kv = 2 * 8 if name == "gqa" else C  # gqa: 2 key/value heads of size 8
    attn = C * (C + 2 * kv) + (C + 2 * kv) + C * C + C
    if name == "diff":  # mha's projections, plus four λ vectors of head_dim and the head norm's gain of 2*head_dim
        attn += 4 * 8 + 2 * 8
    mlp = C * 4 * C + 4 * C + 4 * C * C + C
    block = attn + mlp + 4 * C  # two LayerNorms with bias
    assert build(cfg).num_parameters() == V * C + T * C + L * block + 2 * C


def test_gpt2_initialisation():
    cfg = ModelConfig(n_layer=8, n_head=8, n_embd=256, block_size=64, vocab_size=512)
    model = build(cfg)
    residual = 0.02 / (2 * 8) ** 0.5
    for name, p in model.named_parameters():
        if name.endswith(("out_proj.weight", "mlp.proj.weight")):
            assert p.std().item() == pytest.approx(residual, rel=0.05), name
        elif name.endswith("weight") and p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "ln" in name:
            assert torch.all(p == 1), name


def test_loss_is_cross_entropy():
    model = build(tiny())
    idx = torch.randint(0, 41, (3, 10))
    targets = torch.randint(0, 41, (3, 10))
    out = model(idx, targets)
    by_hand = -torch.log_softmax(out.logits, -1).gather(-1, targets[..., None]).mean()
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert out.logits.shape == (3, 10, 41)
    assert out.attentions is None


@pytest.mark.parametrize("src", weight_compatible_variants())
def test_whole_model_portable_to_mha(src):
    model = build(tiny(src))
    ref = build(tiny("mha"), seed=1)
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 41, (2, 24))
    with torch.no_grad():
        out, ref_out = model(idx, return_weights=True), ref(idx, return_weights=True)
    assert torch.allclose(out.logits, ref_out.logits, atol=1e-5)
    assert len(out.attentions) == 2
    for w, w_ref in zip(out.attentions, ref_out.attentions, strict=True):
        assert w.shape == (2, 4, 24, 24)
        assert torch.allclose(w, w_ref, atol=1e-5)


# torch_mha refuses RoPE by design (test_attention.py::test_torch_mha_refuses_rope).
CACHE_CASES = [(n, pos) for n in ALL for pos in ("learned", "rope") if (n, pos) != ("torch_mha", "rope")]


@pytest.mark.parametrize(("name", "pos"), CACHE_CASES)
def test_kv_cache_generation_matches_full_forward(name, pos):
    model = build(tiny(name, pos_encoding=pos))
    idx = torch.randint(0, 41, (2, 24))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.make_kv_cache(batch_size=2)
        steps = [model(idx[:, :7], kv_cache=cache).logits]  # prefill
        for t in range(7, 24):
            steps.append(model(idx[:, t : t + 1], kv_cache=cache).logits)  # one token per step
    assert cache.pos == 24
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_model_causality(name):
    model = build(tiny(name))
    a = torch.randint(0, 41, (1, 20))
    b = a.clone()
    b[0, 12:] = (b[0, 12:] + 1) % 41
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert torch.allclose(la[:, :12], lb[:, :12], atol=1e-6)
    assert not torch.allclose(la[:, 12:], lb[:, 12:], atol=1e-4)


def test_gqa_cache_is_smaller():
    model = build(tiny("gqa"))
    cache = model.make_kv_cache(batch_size=1)
    assert len(cache.layers) == 2
    assert cache.layer(0).k.shape == (1, 2, 24, 8)  # 2 key/value heads instead of 4
    assert cache.nbytes() == build(tiny("sdpa")).make_kv_cache(batch_size=1).nbytes() // 2


def test_input_longer_than_block_size():
    model = build(tiny())
    with pytest.raises(ValueError, match=r"sequence of 25 tokens is longer than model.block_size=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_embd": 30, "n_head": 4}, r"model.n_embd=30 is not divisible by model.n_head=4"),
        ({"attention": AttentionConfig("gqa", n_kv_head=3)}, r"n_kv_head=3 must be a positive divisor of .*n_head=4"),
        ({"n_layer": 0}, r"model.n_layer=0 must be a positive integer"),
        ({"pos_encoding": "alibi"}, r"model.pos_encoding='alibi' is unknown; valid: learned, rope"),
        ({"dropout": 1.5}, r"model.dropout=1.5 must be in \[0, 1\)"),
        ({"attention": {"name": "swa", "window": 0}}, r"model.attention.window=0 must be a positive integer"),
    ],
)
def test_config_errors_name_the_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_training_step_reduces_loss_for_every_trainable_variant():
    """A few optimizer steps on one batch lower the loss: gradients flow through every layer."""
    for name in [n for n in ALL if n != "flex"]:
        model = build(tiny(name)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        idx = torch.randint(0, 41, (4, 24))
        first = None
        for _ in range(5):
            loss = model(idx[:, :-1], idx[:, 1:]).loss
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < first - 0.1, name
        assert all(p.grad is not None for p in model.parameters()), name


def test_config_roundtrip_through_plain_dict():
    cfg = tiny("gqa", pos_encoding="rope")
    again = ModelConfig(**dataclasses.asdict(cfg))
    assert again == cfg


def test_a_padded_vocabulary_computes_the_unpadded_model():
    plain = GPT(tiny_config("sdpa", vocab_size=37)).eval()
    padded = GPT(tiny_config("sdpa", vocab_size=37, vocab_multiple=16)).eval()
    assert padded.config.padded_vocab == 48 and padded.wte.weight.shape == (48, 32)
    assert padded.lm_head.weight is padded.wte.weight and not padded.wte.weight[37:].any()  # zero padding rows
    with torch.no_grad():
        for name, p in padded.state_dict().items():
            source = plain.state_dict()[name]
            p[: source.size(0)].copy_(source)
    idx = torch.randint(0, 37, (2, 16))
    ours, theirs = padded(idx, targets=idx), plain(idx, targets=idx)
    assert ours.logits.shape == (2, 16, 37)  # a padding id can never be sampled
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)
    assert ModelConfig(vocab_size=50257, vocab_multiple=64).padded_vocab == 50304
    with pytest.raises(ValueError, match=r"^model.vocab_multiple=0 "):
        ModelConfig(vocab_multiple=0)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_last_only_gives_the_last_position_of_the_full_forward(pos):
    model = build(tiny(pos_encoding=pos, vocab_multiple=16, logit_softcap=5.0))
    idx = torch.randint(0, 41, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, last = model(idx).logits, model(idx, last_only=True).logits
    assert last.shape == (3, 1, 41)  # padding and softcap applied as in the full forward
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="last_only=True computes no loss"):
        model(idx, targets=idx, last_only=True)
