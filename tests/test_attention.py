"""Every attention variant pinned against the `mha` reference, against nn.MultiheadAttention, against a
loop-based reference written independently here, and against the worked examples of the seed documents."""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gptmini.attention import (
    ATTENTION_REGISTRY,
    FusedQKV,
    KVCache,
    LayerKVCache,
    PackedQKVBase,
    SeparateQKVBase,
    WrapperAttention,
    apply_rope,
    build_attention,
    check_attention_config,
    math_attention,
    weight_compatible_variants,
)
from gptmini.config import AttentionConfig, ModelConfig

sys.path.insert(0, str(Path(__file__).parent))
from model_helpers import tiny_config  # noqa: E402

ALL = sorted(ATTENTION_REGISTRY)
# Variants are chosen by their capability flags, never by name, so a new variant joins every test that applies.
# flex has no backward on CPU in torch 2.13 (trains_on_cpu=False): its gradients are compared on a GPU (test_gpu.py).
# Variants whose returned weights combine softmax maps (diff: A1 - λ·A2 over n_head/2 heads) compute something else
# than mha with the same weights: tests/test_diff_attention.py pins them against their own reference.
SOFTMAX = [n for n in ALL if ATTENTION_REGISTRY[n].weights_are_probabilities]
GRAD_ON_CPU = [n for n in SOFTMAX if ATTENTION_REGISTRY[n].trains_on_cpu]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


config = tiny_config  # config(name, **overrides): the shared tiny model config (tests/model_helpers.py)


def make(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_attention(config(name, **overrides)).eval()


def canonical(module: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a dict keyed by the module's own parameter names into the canonical layout."""
    out = dict(tensors)
    module._to_canonical(out, "")
    return out


def expand_kv(sd: dict[str, torch.Tensor], n_head: int, n_kv_head: int) -> dict[str, torch.Tensor]:
    """A gqa state dict rewritten as the equivalent full multi-head one (each K/V head repeated per group)."""
    C = sd["out_proj.weight"].shape[0]
    hd, groups = C // n_head, n_head // n_kv_head
    out = dict(sd)
    for suffix in ("weight", "bias"):
        fused = sd.get(f"qkv.{suffix}")
        if fused is None:
            continue
        q, k, v = fused.split([C, n_kv_head * hd, n_kv_head * hd], dim=0)

        def rep(t):
            return t.reshape(n_kv_head, hd, *t.shape[1:]).repeat_interleave(groups, dim=0).reshape(C, *t.shape[1:])

        out[f"qkv.{suffix}"] = torch.cat([q, rep(k), rep(v)], dim=0)
    return out


def reference_for(name: str, module: nn.Module) -> nn.Module:
    """The `mha` module computing what `module` should compute (swa: see the loop reference instead)."""
    ref = make("mha")
    sd = module.state_dict()
    if name == "gqa":
        sd = expand_kv(sd, module.n_head, module.n_kv_head)
    ref.load_state_dict(sd)
    return ref


def loop_reference(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One head, one query at a time, straight from the definition, using only canonical weights."""
    sd = module.state_dict()
    C, H, Hkv = x.size(-1), module.n_head, module.n_kv_head
    hd = C // H
    window = module.window or x.size(1)
    w, b = sd["qkv.weight"], sd.get("qkv.bias")
    qkv = x @ w.T + (b if b is not None else 0)
    q, k, v = qkv.split([C, Hkv * hd, Hkv * hd], dim=-1)
    B, T, _ = x.shape
    out = torch.zeros(B, T, C)
    weights = torch.zeros(B, H, T, T)
    for bi in range(B):
        for h in range(H):
            kh = h // (H // Hkv)
            for t in range(T):
                lo = max(0, t - window + 1)
                qv = q[bi, t, h * hd : (h + 1) * hd]
                scores = [float(qv @ k[bi, j, kh * hd : (kh + 1) * hd]) / math.sqrt(hd) for j in range(lo, t + 1)]
                top = max(scores)
                exps = [math.exp(s - top) for s in scores]
                total = sum(exps)
                for j, e in zip(range(lo, t + 1), exps, strict=True):
                    weights[bi, h, t, j] = e / total
                    out[bi, t, h * hd : (h + 1) * hd] += (e / total) * v[bi, j, kh * hd : (kh + 1) * hd]
    proj = out @ sd["out_proj.weight"].T
    if "out_proj.bias" in sd:
        proj = proj + sd["out_proj.bias"]
    return proj, weights


# ----------------------------------------------------------------------------------------------------------
# The seed documents' worked examples


def test_seed_three_tokens_by_hand():
    """Q=K=V=X for A=[1,0,1,0], B=[0,1,0,1], C=[1,1,0,0]; the tables of the ROCm attention page."""
    x = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]])
    scores = x @ x.T / math.sqrt(4)
    assert torch.allclose(scores, torch.tensor([[1.0, 0, 0.5], [0, 1, 0.5], [0.5, 0.5, 1]]))

    y, w = math_attention(x[None, None], x[None, None], x[None, None], torch.ones(3, 3, dtype=torch.bool),
                          nn.Dropout(0.0))
    # Row-wise softmax computed by hand, independently of torch.
    e = [[math.exp(s) for s in row] for row in [[1, 0, 0.5], [0, 1, 0.5], [0.5, 0.5, 1]]]
    expected_w = torch.tensor([[v / sum(row) for v in row] for row in e])
    assert torch.allclose(w[0, 0], expected_w, atol=1e-6)
    assert torch.allclose(w[0, 0, 0], torch.tensor([0.5065, 0.1863, 0.3072]), atol=1e-4)
    assert torch.allclose(w.sum(-1), torch.ones(1, 1, 3))  # rows are proportions (the printed 0.833 is not)
    assert torch.allclose(y[0, 0], expected_w @ x, atol=1e-6)
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.8137, 0.4935, 0.5065, 0.1863]), atol=1e-4)


def test_seed_three_tokens_through_nn_multihead_attention():
    """Section 4 of the page: nn.MultiheadAttention with identity projections reproduces the hand tables."""
    x = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]])
    mha = nn.MultiheadAttention(4, 1, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.eye(4).repeat(3, 1))
        mha.out_proj.weight.copy_(torch.eye(4))
        out, w = mha(x[None], x[None], x[None])
    y, ref_w = math_attention(x[None, None], x[None, None], x[None, None], torch.ones(3, 3, dtype=torch.bool),
                              nn.Dropout(0.0))
    assert torch.allclose(w[0], ref_w[0, 0], atol=1e-6)
    assert torch.allclose(out[0], y[0, 0], atol=1e-6)


def test_seed_hello_shiny_sun_context_vector():
    """Unscaled dot-product attention for "shiny" gives the context vector ≈ [0.399, 0.385, 0.861]."""
    x = torch.tensor([[0.34, 0.22, 0.54], [0.53, 0.34, 0.98], [0.29, 0.54, 0.93]])
    q = x[1:2] * math.sqrt(3)  # undo math_attention's 1/√d so the scores are plain dot products
    y, w = math_attention(q[None, None], x[None, None], x[None, None], torch.ones(1, 3, dtype=torch.bool),
                          nn.Dropout(0.0))
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.3992, 0.3858, 0.8610]), atol=1e-3)
    assert w[0, 0, 0].argmax() == 1  # "shiny" attends most to itself


def test_causal_mha_on_seed_tokens_with_identity_projections():
    """With identity projections the causal module's weights are the hand table with the future masked."""
    cfg = ModelConfig(n_layer=1, n_head=1, n_embd=4, block_size=3, vocab_size=4, bias=False,
                      attention=AttentionConfig("mha"))
    attn = build_attention(cfg).eval()
    with torch.no_grad():
        for layer in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            layer.weight.copy_(torch.eye(4))
    x = torch.tensor([[[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]]])
    y, w = attn(x, return_weights=True)
    e = math.exp
    expected = torch.tensor([
        [1.0, 0, 0],
        [e(0) / (e(0) + e(1)), e(1) / (e(0) + e(1)), 0],
        [e(0.5) / (2 * e(0.5) + e(1)), e(0.5) / (2 * e(0.5) + e(1)), e(1) / (2 * e(0.5) + e(1))],
    ])
    assert torch.allclose(w[0, 0], expected, atol=1e-6)
    assert torch.allclose(y[0], expected @ x[0], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Every variant against the reference


# Windowed variants (swa) are pinned by the loop reference below; a variant that cannot apply RoPE (torch_mha)
# refuses it by design (test_torch_mha_refuses_rope).
# A variant with another kernel than softmax (softmax=False: linear) has its own reference (test_linear_attention.py).
# A variant whose weights combine maps (weights_are_probabilities=False: diff): tests/test_diff_attention.py.
# A variant with parameters of its own (canonical_layout=False: mla) is pinned by its own tests (tests/test_mla.py).
VS_MHA = [(n, pos) for n in SOFTMAX for pos in ("learned", "rope")
          if "window" not in ATTENTION_REGISTRY[n].reads and (pos == "learned" or ATTENTION_REGISTRY[n].applies_rope)
          and ATTENTION_REGISTRY[n].canonical_layout and ATTENTION_REGISTRY[n].softmax]


@pytest.mark.parametrize(("name", "pos"), VS_MHA)
def test_variant_matches_mha_outputs_and_weights(name, pos):
    module = make(name, pos_encoding=pos)
    ref = reference_for(name, module)
    x = torch.randn(3, 11, 32)
    rope = _rope(11, 8) if pos == "rope" else None
    with torch.no_grad():
        y, w = module(x, return_weights=True, rope=rope)
        y_plain, none = module(x, rope=rope)  # the normal (fused) path
        y_ref, w_ref = ref(x, return_weights=True, rope=rope)
    assert none is None
    assert w.shape == (3, 4, 11, 11)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(y_plain, y_ref, atol=1e-5)
    assert torch.allclose(w, w_ref, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in GRAD_ON_CPU
                                  if ATTENTION_REGISTRY[n].canonical_layout and ATTENTION_REGISTRY[n].softmax])
def test_variant_gradients_match_mha(name):
    module = make(name).train()  # dropout is 0, so train mode is deterministic
    if name == "swa":
        module.window = None  # an unbounded window is plain causal attention, comparable with mha
    ref = reference_for(name, module).train()
    x = torch.randn(2, 9, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    target = torch.randn(2, 9, 32)
    (module(x)[0] * target).sum().backward()
    (ref(x_ref)[0] * target).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    grads = canonical(module, {n: p.grad for n, p in module.named_parameters()})
    ref_grads = canonical(ref, {n: p.grad for n, p in ref.named_parameters()})
    if name == "gqa":  # each K/V head's gradient is the sum over the query heads of its group
        ref_w = ref_grads["qkv.weight"]
        C, hd = 32, 8
        for block in (1, 2):
            full = ref_w[block * C : (block + 1) * C].view(2, 2, hd, C).sum(1).reshape(16, C)
            mine = grads["qkv.weight"][C + (block - 1) * 16 : C + block * 16]
            assert torch.allclose(mine, full, atol=1e-5)
        assert torch.allclose(grads["qkv.weight"][:C], ref_w[:C], atol=1e-5)
        assert torch.allclose(grads["out_proj.weight"], ref_grads["out_proj.weight"], atol=1e-5)
        return
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        assert torch.allclose(grads[key], ref_grads[key], atol=1e-5), key


def test_mha_matches_nn_multihead_attention():
    module = make("mha")
    x = torch.randn(2, 10, 32)
    torch_mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        torch_mha.in_proj_weight.copy_(torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight]))
        torch_mha.in_proj_bias.copy_(torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias]))
        torch_mha.out_proj.weight.copy_(module.out_proj.weight)
        torch_mha.out_proj.bias.copy_(module.out_proj.bias)
        future = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)
        y_ref, w_ref = torch_mha(x, x, x, attn_mask=future, average_attn_weights=False)
        y, w = module(x, return_weights=True)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(w, w_ref, atol=1e-5)


@pytest.mark.parametrize("name", ["mha", "sdpa", "gqa", "swa", "wrapper"])
def test_against_loop_reference(name):
    module = make(name)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        y, w = module(x, return_weights=True)
        y_plain, _ = module(x)
    y_ref, w_ref = loop_reference(module, x)
    assert torch.allclose(w, w_ref, atol=1e-5)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(y_plain, y_ref, atol=1e-5)


def test_swa_masks_outside_the_window():
    module = make("swa")  # window 3
    with torch.no_grad():
        _, w = module(torch.randn(1, 8, 32), return_weights=True)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    outside = (j > i) | (i - j >= 3)
    assert torch.all(w[:, :, outside] == 0)
    assert torch.all(w[:, :, ~outside] > 0)


# ----------------------------------------------------------------------------------------------------------
# Causality, dropout, KV cache


@pytest.mark.parametrize("name", ALL)
def test_causality(name):
    module = make(name)
    x = torch.randn(2, 12, 32)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 6, 32)  # change everything after position 5
    with torch.no_grad():
        y, y2 = module(x)[0], module(x2)[0]
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-6)
    assert not torch.allclose(y[:, 6:], y2[:, 6:], atol=1e-3)


@pytest.mark.parametrize("name", [n for n in SOFTMAX if ATTENTION_REGISTRY[n].has_dropout])
def test_attention_dropout(name):
    p = 0.5
    module = make(name, dropout=p)
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        module.eval()
        y1, w_eval = module(x, return_weights=True)
        y2, _ = module(x)
        assert torch.allclose(y1, y2, atol=1e-6)  # the weights path and the fused path agree
        assert torch.equal(module(x)[0], y2)  # eval: deterministic
        module.train()
        torch.manual_seed(1)
        _, w_train = module(x, return_weights=True)
        y_train, _ = module(x)
    kept = w_train != 0
    visible = w_eval > 0
    assert (~kept & visible).any(), "dropout zeroed no attention weight"
    assert kept[visible].float().mean().item() == pytest.approx(1 - p, abs=0.1)
    assert torch.allclose(w_train[kept], w_eval[kept] / (1 - p), atol=1e-5)
    assert not torch.allclose(y_train, y2, atol=1e-3)  # the fused paths drop too


def test_flex_refuses_cpu_training_dropout_and_small_gpu_heads():
    module = make("flex")
    cfg = module.config
    with pytest.raises(ValueError, match="cannot train on CPU"):
        module.check_device(cfg, torch.device("cpu"), training=True)
    module.check_device(cfg, torch.device("cpu"), training=False)  # inference is fine
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        module(torch.randn(1, 4, 32, requires_grad=True))
    with pytest.raises(ValueError, match="model.dropout=0"):
        ATTENTION_REGISTRY["flex"].check_device(tiny_config("flex", dropout=0.1), torch.device("cuda"), True)
    small = tiny_config("flex", n_embd=32, n_head=4)  # head_dim 8: Inductor's flex kernel needs >= 16
    with pytest.raises(ValueError, match=r"head size of at least 16 on GPUs.*model.n_embd/model.n_head=32/4=8"):
        ATTENTION_REGISTRY["flex"].check_device(small, torch.device("cuda"), training=False)
    ATTENTION_REGISTRY["flex"].check_device(tiny_config("flex", n_embd=64, n_head=4), "cuda", training=True)


@pytest.mark.parametrize("name", ALL)
def test_kv_cache_decoding_matches_full_forward(name):
    module = make(name)
    x = torch.randn(2, 10, 32)
    cfg = config(name)
    cache = KVCache([module.new_cache(2, cfg.block_size, torch.device("cpu"), torch.float32)])
    layer = cache.layer(0)
    with torch.no_grad():
        full, _ = module(x)
        steps = [module(x[:, :4], kv_cache=layer)[0]]
        cache.pos += 4
        for t in range(4, 10):
            steps.append(module(x[:, t : t + 1], kv_cache=layer)[0])
            cache.pos += 1
        cache.reset()
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_kv_cache_overflow_is_an_error():
    cache = KVCache([LayerKVCache(1, 4, 5, 8)])
    layer = cache.layer(0)
    layer.update(torch.zeros(1, 4, 5, 8), torch.zeros(1, 4, 5, 8))
    cache.pos = 5
    with pytest.raises(ValueError, match="KV cache is full: 6 positions needed, 5 allocated"):
        layer.update(torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8))


# ----------------------------------------------------------------------------------------------------------
# State dicts, RoPE, errors


@pytest.mark.parametrize("src", weight_compatible_variants())
def test_state_dict_is_canonical(src):
    sd = make(src).state_dict()
    assert set(sd) == {"qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias"}
    assert sd["qkv.weight"].shape == (96, 32)


@pytest.mark.parametrize("src", weight_compatible_variants())
@pytest.mark.parametrize("dst", weight_compatible_variants())
def test_state_dict_portable_between_variants(src, dst):
    a, b = make(src), make(dst)
    torch.manual_seed(5)
    b.load_state_dict(a.state_dict())  # strict: every key maps
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        assert torch.allclose(a(x)[0], b(x)[0], atol=1e-5)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value)


def test_unbiased_state_dicts_are_portable():
    a, b = make("wrapper", bias=False), make("torch_mha", bias=False)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"qkv.weight", "out_proj.weight"}
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.allclose(a(x)[0], b(x)[0], atol=1e-5)


def _rope(T: int, hd: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    half = hd // 2
    inv = 1.0 / (10000 ** (torch.arange(half) / half))
    ang = torch.outer(torch.arange(start, start + T, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(8), torch.randn(8)
    def score(m, n):
        qm = apply_rope(q.view(1, 8), _rope(1, 8, start=m))
        kn = apply_rope(k.view(1, 8), _rope(1, 8, start=n))
        return float(qm @ kn.T)
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    # A rotation preserves the norm.
    assert apply_rope(q.view(1, 8), _rope(1, 8, start=7)).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_attention(dataclasses.replace(config(), attention=AttentionConfig("nope")))
    message = str(err.value)
    assert "'nope'" in message
    for name in ALL:
        assert name in message


def test_swa_without_a_window_gets_the_default_one():
    module = build_attention(config("mha", attention=AttentionConfig("swa")))
    assert module.window == 64  # SlidingWindowAttention.DEFAULT_WINDOW, filled in by ModelConfig and recorded there


def test_settings_a_variant_ignores_are_refused():
    for name in ALL:
        if "window" not in ATTENTION_REGISTRY[name].reads:
            with pytest.raises(ValueError, match=rf"model.attention.window=4 is ignored by attention variant '{name}'"):
                check_attention_config(AttentionConfig(name, window=4))
        if "n_kv_head" not in ATTENTION_REGISTRY[name].reads:
            with pytest.raises(ValueError, match=rf"model.attention.n_kv_head=4 is ignored by .*'{name}'.*only gqa"):
                check_attention_config(AttentionConfig(name, n_kv_head=4))


# ----------------------------------------------------------------------------------------------------------
# Structure


def test_base_classes_are_not_variants():
    """The shared bases are not registered; `fused_qkv` is the variant built on the packed one."""
    assert ATTENTION_REGISTRY["fused_qkv"] is FusedQKV and issubclass(FusedQKV, PackedQKVBase)
    assert not {PackedQKVBase, SeparateQKVBase} & set(ATTENTION_REGISTRY.values())
    assert {n for n, cls in ATTENTION_REGISTRY.items() if issubclass(cls, PackedQKVBase)} == {
        "fused_qkv", "sdpa", "gqa", "swa", "flex", "linear", "diff"}
    assert {n for n, cls in ATTENTION_REGISTRY.items() if issubclass(cls, SeparateQKVBase)} == {"mha", "einsum"}
    assert WrapperAttention._LAYERS == ("query", "key", "value")  # in the order the canonical qkv stacks them


def test_einsum_keeps_no_mask_buffer():
    """einsum builds its mask per call; mha's buffer is not persistent, so neither state dict has a mask."""
    assert dict(make("einsum").named_buffers()) == {}
    assert set(dict(make("mha").named_buffers())) == {"mask"} and "mask" not in make("mha").state_dict()
    einsum = make("einsum")
    einsum.load_state_dict(make("mha").state_dict(), strict=True)  # checkpoints of either load into the other


def test_attention_modules_stay_small():
    """No module of gptmini/attention/ over 450 lines, no function over 60."""
    folder = Path(__file__).resolve().parents[1] / "gptmini" / "attention"
    for path in sorted(folder.glob("*.py")):
        source = path.read_text()
        assert len(source.splitlines()) <= 450, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}: {node.name}"


def test_torch_mha_refuses_rope():
    with pytest.raises(ValueError, match="torch_mha.*RoPE"):
        build_attention(config("torch_mha", pos_encoding="rope"))


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_runs_on_device(device):
    module = make("sdpa").to(device)
    x = torch.randn(2, 16, 32, device=device)
    with torch.no_grad():
        y, _ = module(x)
        y_w, _ = module(x, return_weights=True)
    assert torch.allclose(y, y_w, atol=1e-4)
