"""model.attention.gate (the output gate G1 of Qiu et al., 2025) and model.attention.sinks (a learned logit per head
in every softmax denominator, as in gpt-oss), for every variant that reads them, against a float64 reference
written here from the equations:

    p = softmax([q kᵀ/√d (masked), s_h])[:-1]      the sink column takes mass and brings no value
    y = p v, heads side by side;  y' = y ⊙ sigmoid(x W_g + b_g);  out = y' W_o + b_o

Variants are chosen by their `reads` flags, so a new one that reads gate or sinks joins every test here.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from model_helpers import tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptmini import GPT
from gptmini.attention import ATTENTION_REGISTRY, KVCache, build_attention, check_attention_config
from gptmini.attention import variants as variants_module
from gptmini.checkpoint import CheckpointError, load_for_inference, save_checkpoint
from gptmini.config import AttentionConfig
from gptmini.export import check_exportable
from gptmini.sampling import Decoder, generate

GATE = [n for n, cls in ATTENTION_REGISTRY.items() if "gate" in cls.reads]
SINKS = [n for n, cls in ATTENTION_REGISTRY.items() if "sinks" in cls.reads]
# (variant, gate, sinks): each option alone and both together, wherever the variant reads them.
CASES = [(n, g, s) for n in ATTENTION_REGISTRY for g, s in ((True, False), (False, True), (True, True))
         if (not g or n in GATE) and (not s or n in SINKS)]
BOTH = [n for n in GATE if n in SINKS]
# The reference below reads the canonical state dict and one softmax per head: it models the variants with that
# layout and those weights. mla, diff and linear pin gate and sinks against their own papers' references
# (tests/test_mla.py, test_diff_attention.py, test_linear_attention.py).
MODELLED = [n for n, cls in ATTENTION_REGISTRY.items()
            if cls.canonical_layout and cls.softmax and cls.weights_are_probabilities]
REF_CASES = [case for case in CASES if case[0] in MODELLED]
IDS = [f"{n}-{'gate' if g else ''}{'+' if g and s else ''}{'sinks' if s else ''}" for n, g, s in REF_CASES]


def options_config(name: str, gate: bool, sinks: bool, **overrides):
    cfg = tiny_config(name, window=4, **overrides)
    return dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, gate=gate, sinks=sinks))


def make(name: str, gate: bool, sinks: bool, **overrides) -> torch.nn.Module:
    """The variant with random weights, sink logits spread around 0 and gate biases away from 0."""
    torch.manual_seed(0)
    module = build_attention(options_config(name, gate, sinks, **overrides)).eval()
    with torch.no_grad():
        if module.sinks is not None:
            module.sinks.copy_(torch.linspace(-1.5, 2.0, module.n_head))
        if module.gate_proj is not None:
            module.gate_proj.bias.normal_(0.0, 1.0)
    return module


def reference(sd: dict[str, torch.Tensor], x: torch.Tensor, n_head: int, window: int | None):
    """(out (B, T, C), weights (B, H, T, T), the sink's share (B, H, T)) from the canonical state dict alone."""
    B, T, C = x.shape
    hd = C // n_head
    n_kv = (sd["qkv.weight"].shape[0] - C) // (2 * hd)
    qkv = x @ sd["qkv.weight"].T + sd.get("qkv.bias", 0)
    q, k, v = qkv.split([C, n_kv * hd, n_kv * hd], dim=-1)
    q = q.view(B, T, n_head, hd).transpose(1, 2)
    k, v = (t.view(B, T, n_kv, hd).transpose(1, 2).repeat_interleave(n_head // n_kv, dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j < (window or T))), float("-inf"))
    sink = sd["sinks"].view(1, n_head, 1, 1) if "sinks" in sd else torch.tensor(float("-inf"), dtype=x.dtype)
    full = torch.softmax(torch.cat([scores, sink.expand(B, n_head, T, 1)], dim=-1), dim=-1)  # (B, H, T, T+1)
    weights, share = full[..., :T], full[..., T]
    y = (weights @ v).transpose(1, 2).reshape(B, T, C)
    if "gate_proj.weight" in sd:
        y = y * torch.sigmoid(x @ sd["gate_proj.weight"].T + sd.get("gate_proj.bias", 0))
    return y @ sd["out_proj.weight"].T + sd.get("out_proj.bias", 0), weights, share


def reference_for(module, x: torch.Tensor):
    sd = {key: value.double() for key, value in module.state_dict().items()}
    return reference(sd, x.double(), module.n_head, module.window)


@pytest.mark.parametrize(("name", "gate", "sinks"), REF_CASES, ids=IDS)
def test_outputs_and_weights_match_the_reference(name, gate, sinks):
    module = make(name, gate, sinks)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        y_w, w = module(x, return_weights=True)
        y, _ = module(x)  # the fast path (sdpa's kernels, flex's kernel)
    y_ref, w_ref, share = reference_for(module, x)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y_w.double(), y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(w.double(), w_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(w.double().sum(-1), 1 - share, atol=1e-6, rtol=0)
    if sinks:
        assert share.min() > 0.01  # the sink takes a visible share, so the checks above can tell
    else:
        assert share.max() == 0


@pytest.mark.parametrize("name", [n for n in BOTH if ATTENTION_REGISTRY[n].trains_on_cpu and n in MODELLED])
def test_gradients_match_the_reference(name):
    module = make(name, True, True).train()  # dropout 0: deterministic
    x = torch.randn(2, 9, 32, requires_grad=True)
    target = torch.randn(2, 9, 32)
    (module(x)[0] * target).sum().backward()
    sd = {key: value.detach().double().requires_grad_(True) for key, value in module.state_dict().items()}
    x_ref = x.detach().double().requires_grad_(True)
    (reference(sd, x_ref, module.n_head, module.window)[0] * target.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-5, rtol=0)
    grads = {n: p.grad for n, p in module.named_parameters()}
    module._to_canonical(grads, "")
    assert grads.keys() == sd.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad.double(), sd[key].grad, atol=1e-5, rtol=0, msg=key)
    assert module.sinks.grad.abs().min() > 0  # every head's sink receives a gradient


@pytest.mark.parametrize("name", BOTH)
def test_kv_cache_decoding_matches_the_full_forward(name):
    module = make(name, True, True)
    x = torch.randn(2, 10, 32)
    cache = KVCache([module.new_cache(2, 16, torch.device("cpu"), torch.float32)])
    with torch.no_grad():
        full, _ = module(x)
        steps = [module(x[:, :4], kv_cache=cache.layer(0))[0]]
        cache.pos += 4
        for t in range(4, 10):
            steps.append(module(x[:, t : t + 1], kv_cache=cache.layer(0))[0])
            cache.pos += 1
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def gpt(name: str, gate: bool = True, sinks: bool = True, **overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(options_config(name, gate, sinks, **overrides)).eval()
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.sinks is not None:
                block.attn.sinks.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("name", [n for n in BOTH if ATTENTION_REGISTRY[n].static_cache])
def test_static_cache_gives_the_growing_caches_and_the_uncached_tokens(name):
    model = gpt(name, pos_encoding="rope")
    idx = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(1))
    runs = [generate(model, idx, 14, temperature=0.0, **kw) for kw in ({"kv_cache": False}, {}, {"static": True})]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    decoder = Decoder(model, 2, None, static=True)
    ids = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        steps = [decoder(ids[:, :4])] + [decoder(ids[:, t : t + 1]) for t in range(4, 12)]
        full = model(ids).logits
    for t, logits in zip(range(3, 12), steps, strict=True):
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)


def test_the_sdpa_fast_path_keeps_its_causal_kernel(monkeypatch):
    """With sinks the full-sequence pass is still one is_causal call on the fused (flash) kernel, with one more key
    and query and one more head dimension; without them the call is exactly the plain one."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, v.shape, kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(variants_module.F, "scaled_dot_product_attention", spy)
    x = torch.randn(2, 7, 32)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # no fallback to the unfused math kernel
        make("sdpa", False, False)(x)
        make("sdpa", False, True)(x)
    (q0, k0, v0, plain), (q1, k1, v1, sinks) = calls
    assert plain == {"attn_mask": None, "dropout_p": 0.0, "is_causal": True, "enable_gqa": False}
    assert q0 == k0 == v0 == (2, 4, 7, 8)
    assert sinks["is_causal"] and sinks["attn_mask"] is None and sinks["scale"] == pytest.approx(8**-0.5)
    assert q1 == k1 == v1 == (2, 4, 8, 9)


@pytest.mark.parametrize("name", BOTH)
def test_checkpoint_round_trip(tmp_path, name):
    model = gpt(name)
    sd = model.state_dict()
    assert {"blocks.0.attn.gate_proj.weight", "blocks.0.attn.gate_proj.bias", "blocks.0.attn.sinks"} <= set(sd)
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": sd, "config": {"model": dataclasses.asdict(model.config)},
                     "tokenizer": {"kind": "bytes"}}, path)
    idx = torch.randint(0, 37, (2, 12))
    loaded = load_for_inference(path).model
    assert loaded.config.attention == model.config.attention
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model(idx).logits, atol=0, rtol=0)
    # Run as its own variant or another weight-compatible one (a YAML group says gate: false, sinks: false):
    # the weights fix both, so the checkpoint's own values stay on.
    others = [name] + ([v for v in BOTH if ATTENTION_REGISTRY[v].weight_compatible]
                       if ATTENTION_REGISTRY[name].weight_compatible else [])
    for other in others:
        yaml_like = dataclasses.replace(model.config.attention, name=other, gate=False, sinks=False)
        swapped = load_for_inference(path, attention=yaml_like).model
        assert swapped.config.attention.gate and swapped.config.attention.sinks, other
        with torch.no_grad():
            torch.testing.assert_close(swapped(idx).logits, model(idx).logits, atol=1e-5, rtol=0)


def test_checkpoints_refuse_what_their_weights_cannot_serve(tmp_path):
    path = tmp_path / "gated.pt"
    model = gpt("sdpa", True, False)
    save_checkpoint({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.config)},
                     "tokenizer": {"kind": "bytes"}}, path)
    with pytest.raises(CheckpointError, match=r"model/attention=torch_mha cannot run weights trained with "
                                              r"model.attention.gate=true: torch_mha does not read it"):
        load_for_inference(path, attention=AttentionConfig("torch_mha"))
    with pytest.raises(CheckpointError, match=r"model.attention.sinks=true does not match the checkpoint's "
                                              r"sinks=false; attention sinks are fixed by the weights"):
        load_for_inference(path, attention=AttentionConfig("mha", sinks=True))


@pytest.mark.parametrize("name", [n for n in SINKS if ATTENTION_REGISTRY[n].trains_on_cpu and n in MODELLED])
def test_a_learned_sink_learns(name):
    """Asked for a zero output, attention can only shrink it through the sinks: every head's sink logit rises."""
    module = make(name, False, True)
    with torch.no_grad():
        module.out_proj.bias.zero_()
    start = module.sinks.detach().clone()
    optimizer = torch.optim.Adam([module.sinks], lr=0.1)
    x = torch.randn(4, 12, 32)
    for _ in range(10):
        optimizer.zero_grad()
        loss = module(x)[0].square().mean()
        loss.backward()
        assert module.sinks.grad.abs().min() > 0
        optimizer.step()
    assert (module.sinks.detach() > start + 0.5).all(), (start, module.sinks)  # Adam: about lr per step


@pytest.mark.parametrize("key", ["gate", "sinks"])
def test_variants_that_cannot_have_them_refuse_them(key):
    for name, cls in ATTENTION_REGISTRY.items():
        if key not in cls.reads:  # torch_mha: nn.MultiheadAttention has its own softmax and output projection
            with pytest.raises(ValueError, match=rf"model.attention.{key}=true is ignored by attention variant "
                                                 rf"'{name}'"):
                check_attention_config(AttentionConfig(name, **{key: True}))
    assert [n for n, cls in ATTENTION_REGISTRY.items() if key not in cls.reads] != list(ATTENTION_REGISTRY)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_switches_must_be_booleans(value):
    with pytest.raises(ValueError, match=rf"model.attention.sinks={value!r} must be true or false"):
        AttentionConfig("sdpa", sinks=value)


@pytest.mark.parametrize("key", ["gate", "sinks"])
def test_gpt2_export_refuses_them(key):
    cfg = options_config("sdpa", key == "gate", key == "sinks", vocab_size=50257)
    with pytest.raises(ValueError, match=rf"^cannot export a model with model.attention.{key}=true as a Hugging "
                                         rf"Face GPT-2: it has no "):
        check_exportable(cfg, {"kind": "tiktoken", "encoding": "gpt2"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU (python -m pytest -m gpu)")
@pytest.mark.parametrize("name", BOTH)
def test_gate_and_sinks_on_the_gpu_match_the_reference(name):
    """The GPU kernels (sdpa's fused ones with the widened head, flex's compiled kernel and its log-sum-exp),
    forward and backward, against the float64 reference; head size 16, as flex's GPU kernel needs."""
    torch.manual_seed(0)
    module = make(name, True, True, n_embd=64).cuda().train()
    x = torch.randn(2, 16, 64, device="cuda", requires_grad=True)
    target = torch.randn(2, 16, 64)
    y = module(x)[0]
    (y * target.cuda()).sum().backward()
    sd = {key: value.detach().cpu().double().requires_grad_(True) for key, value in module.state_dict().items()}
    x_ref = x.detach().cpu().double().requires_grad_(True)
    y_ref = reference(sd, x_ref, module.n_head, module.window)[0]
    (y_ref * target.double()).sum().backward()
    torch.testing.assert_close(y.detach().cpu().double(), y_ref.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.grad.cpu().double(), x_ref.grad, atol=1e-4, rtol=0)
    torch.testing.assert_close(module.sinks.grad.cpu().double(), sd["sinks"].grad, atol=1e-4, rtol=0)
