"""Multi-head latent attention (`mla`, DeepSeek-V2 section 2.1), pinned against the paper's equations written out
here in float64, its absorbed decoding form against the explicit one, and an exact `mha` layer built inside it."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gptmini import GPT
from gptmini.attention import (
    KVCache,
    LatentCache,
    StaticKVCache,
    build_attention,
    causal_keep_mask,
    check_attention_config,
)
from gptmini.config import AttentionConfig, ModelConfig

sys.path.insert(0, str(Path(__file__).parent))
from model_helpers import tiny_config  # noqa: E402

EPS = 1e-6  # the latents' RMSNorm epsilon


def mla_config(pos: str = "rope", q_rank: int | None = 12, **overrides) -> ModelConfig:
    """4 heads of 8, kv_rank 10, rope_dim 4 (with RoPE), block 16; `overrides` replace AttentionConfig or
    ModelConfig fields."""
    att = {k: overrides.pop(k) for k in ("kv_rank", "rope_dim", "gate", "sinks") if k in overrides}
    attention = AttentionConfig("mla", **{"kv_rank": 10, "q_rank": q_rank, **att})
    return tiny_config("mla", pos_encoding=pos, attention=attention, **overrides)


def make(cfg: ModelConfig, seed: int = 0, double: bool = True) -> torch.nn.Module:
    """The module with every parameter random (norm weights, biases and sinks too, so each term shows)."""
    torch.manual_seed(seed)
    module = build_attention(cfg).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    return module.double() if double else module


# ----------------------------------------------------------------------------------------------------------
# The reference: DeepSeek-V2 eqs. (9)-(19), in plain float64 tensors


def reference(p: dict[str, Tensor], x: Tensor, cfg: ModelConfig, docs: Tensor | None = None):
    """(output (B, T, C), weights (B, H, T, T)) from the parameters `p` (the module's names), for inputs at
    positions 0..T-1."""
    B, T, C = x.shape
    H, hd = cfg.n_head, cfg.head_dim
    r = cfg.attention.rope_dim if cfg.pos_encoding == "rope" else 0

    def lin(name: str, z: Tensor) -> Tensor:
        b = p.get(f"{name}.bias")
        return z @ p[f"{name}.weight"].T + (0 if b is None else b)

    def rms_norm(z: Tensor, w: Tensor) -> Tensor:
        return z / torch.sqrt((z * z).mean(-1, keepdim=True) + EPS) * w

    def rotate(z: Tensor) -> Tensor:  # RoPE over the last dim: pair i with i + r/2, angle pos * base^(-2i/r)
        i = torch.arange(r // 2, dtype=torch.float64)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * cfg.rope_base ** (-2 * i / r)  # (T, r/2)
        cos, sin = angle.cos(), angle.sin()
        if z.dim() == 4:  # (B, T, H, r): the same angle for every head
            cos, sin = cos[:, None], sin[:, None]
        a, b = z[..., : r // 2], z[..., r // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    c_kv = rms_norm(lin("kv_down", x), p["kv_norm.weight"])  # eq. (9)
    k_c = lin("k_up", c_kv).view(B, T, H, hd)  # eq. (10)
    v_c = lin("v_up", c_kv).view(B, T, H, hd)  # eq. (11)
    c_q = rms_norm(lin("q_down", x), p["q_norm.weight"]) if "q_down.weight" in p else x  # eq. (12)
    q_c = lin("q_up", c_q).view(B, T, H, hd)  # eq. (13)
    scores = torch.einsum("bthd,bshd->bhts", q_c, k_c)
    if r:
        q_r = rotate(lin("q_rope", c_q).view(B, T, H, r))  # eq. (14)
        k_r = rotate(lin("k_rope", x))  # eq. (15): one key for all heads
        scores = scores + torch.einsum("bthd,bsd->bhts", q_r, k_r)  # eqs. (16)-(17): [q_C; q_R] . [k_C; k_R]
    scores = scores / math.sqrt(hd + r)
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    if docs is not None:
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    e = torch.exp(scores - scores.amax(-1, keepdim=True)) * allowed  # eq. (18), softmax over j <= t
    denom = e.sum(-1, keepdim=True)
    if "sinks" in p:  # one more logit per head in the denominator, with no value
        denom = denom + torch.exp(p["sinks"].view(1, H, 1, 1) - scores.amax(-1, keepdim=True))
    weights = e / denom
    o = torch.einsum("bhts,bshd->bthd", weights, v_c).reshape(B, T, C)
    if "gate_proj.weight" in p:
        o = o * torch.sigmoid(lin("gate_proj", x))
    return lin("out_proj", o), weights  # eq. (19)


def params(module: torch.nn.Module, grad: bool = False) -> dict[str, Tensor]:
    return {n: t.detach().clone().double().requires_grad_(grad) for n, t in module.named_parameters()}


CASES = [  # (pos, q_rank, bias, gate, sinks)
    ("rope", 12, True, False, False),
    ("rope", None, False, False, False),
    ("learned", 12, True, False, False),
    ("learned", None, True, True, True),
    ("rope", 12, True, True, True),
]


@pytest.mark.parametrize(("pos", "q_rank", "bias", "gate", "sinks"), CASES)
def test_outputs_and_weights_match_the_paper_equations(pos, q_rank, bias, gate, sinks):
    cfg = mla_config(pos, q_rank, bias=bias, gate=gate, sinks=sinks)
    module = make(cfg)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    with torch.no_grad():
        y, w = module(x, return_weights=True)
        y_fast, none = module(x)  # the fused path (math path with sinks)
    y_ref, w_ref = reference(params(module), x, cfg)
    assert none is None and w.shape == (2, 4, 11, 11)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("pos", "q_rank", "bias", "gate", "sinks"), [CASES[0], CASES[4]])
def test_gradients_match_the_paper_equations(pos, q_rank, bias, gate, sinks):
    cfg = mla_config(pos, q_rank, bias=bias, gate=gate, sinks=sinks)
    module = make(cfg).train()  # dropout 0: deterministic
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    target = torch.randn(2, 9, 32, dtype=torch.float64)
    (module(x)[0] * target).sum().backward()
    p = params(module, grad=True)
    (reference(p, x_ref, cfg)[0] * target).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)
    for name, param in module.named_parameters():
        torch.testing.assert_close(param.grad, p[name].grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_causality(pos):
    module = make(mla_config(pos))
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        y, y2 = module(x)[0], module(x2)[0]
    assert torch.equal(y[:, :6], y2[:, :6]) or torch.allclose(y[:, :6], y2[:, :6], atol=1e-12)
    assert not torch.allclose(y[:, 6:], y2[:, 6:], atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Decoding: the latent cache and the absorbed form


@pytest.mark.parametrize(("pos", "q_rank", "bias", "gate", "sinks"), CASES)
def test_absorbed_form_equals_the_explicit_form(pos, q_rank, bias, gate, sinks):
    module = make(mla_config(pos, q_rank, bias=bias, gate=gate, sinks=sinks))
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    docs = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    with torch.no_grad():
        tables = module.rope_tables(torch.arange(10))
        q_c, q_r = module.queries(x, tables)
        c_kv, k_rope = module.latents(x, tables)
        for d in (None, docs):
            keep = causal_keep_mask(10, 10, x.device, docs=d)
            y_abs, w_abs = module.absorbed(q_c, q_r, c_kv, k_rope, keep)
            y_exp, w_exp = module.explicit(q_c, q_r, c_kv, k_rope, d, want_weights=True)
            torch.testing.assert_close(y_abs, y_exp, atol=1e-10, rtol=0)
            torch.testing.assert_close(w_abs, w_exp, atol=1e-10, rtol=0)


def decode(module, x: Tensor, prefill: int, static: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Prefill `prefill` positions, then one at a time; the outputs and the weights of each call."""
    B, T, _ = x.shape
    layer = module.new_cache(B, 16, x.device, x.dtype, static=static)
    cache = (StaticKVCache if static else KVCache)([layer])
    outs, weights = [], []
    for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]:
        if static:
            cache.input_pos = torch.arange(start, end)
        y, w = module(x[:, start:end], kv_cache=layer, return_weights=True)
        outs.append(y)
        weights.append(w)
        cache.pos += end - start
    return torch.cat(outs, dim=1), weights


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize(("pos", "q_rank", "bias", "gate", "sinks"), CASES)
def test_cached_decoding_equals_the_full_forward(pos, q_rank, bias, gate, sinks, static):
    module = make(mla_config(pos, q_rank, bias=bias, gate=gate, sinks=sinks))
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        full, w_full = module(x, return_weights=True)
        steps, weights = decode(module, x, prefill=4, static=static)
    torch.testing.assert_close(steps, full, atol=1e-10, rtol=0)
    width = 16 if static else 10  # the static cache is read whole, its unfilled positions masked
    for t, w in zip(range(4, 10), weights[1:], strict=True):
        torch.testing.assert_close(w[:, :, 0, : t + 1], w_full[:, :, t, : t + 1], atol=1e-10, rtol=0)
        assert w.shape[-1] == (width if static else t + 1) and torch.all(w[..., t + 1 :] == 0)


def test_the_cache_holds_only_the_latent_and_the_shared_rotary_key():
    cfg = mla_config("rope", kv_rank=10, rope_dim=4)
    model = GPT(cfg)
    cache = model.make_kv_cache(batch_size=3)
    layer = cache.layer(0)
    assert isinstance(layer, LatentCache)
    assert layer.c_kv.shape == (3, 16, 10) and layer.k_rope.shape == (3, 16, 4)
    assert cache.nbytes() == 2 * 3 * 16 * (10 + 4) * 4  # 2 layers, float32: 14 numbers a position
    mha_bytes = GPT(tiny_config("mha")).make_kv_cache(batch_size=3).nbytes()
    assert mha_bytes == 2 * 3 * 16 * 2 * 32 * 4  # keys and values of every head
    assert model.make_kv_cache(1, static=True).layer(0).c_kv.shape == (1, 16, 10)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_whole_model_cached_and_static_generation_equal_the_full_forward(pos):
    torch.manual_seed(0)
    model = GPT(mla_config(pos, sinks=True, gate=True)).eval()
    idx = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        full = model(idx).logits
        for static in (False, True):
            cache = model.make_kv_cache(2, static=static)
            kw = (lambda s, e: {"input_pos": torch.arange(s, e)}) if static else (lambda s, e: {})
            steps = [model(idx[:, :5], kv_cache=cache, **kw(0, 5)).logits]
            if static:
                cache.advance(5)
            for t in range(5, 16):
                steps.append(model(idx[:, t : t + 1], kv_cache=cache, **kw(t, t + 1)).logits)
                if static:
                    cache.advance(1)
            torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# An exact mha layer inside mla


def test_mla_with_full_ranks_represents_an_mha_layer_exactly():
    """kv_rank = q_rank = n_embd, learned positions: identity down-projections and unit norm weights make both
    latents the input itself when the input has unit RMS (a LayerNorm's output does), so W_UQ, W_UK, W_UV take
    mha's query, key and value projections and mla computes mha."""
    torch.manual_seed(3)
    cfg = mla_config("learned", q_rank=32, kv_rank=32)
    mla = build_attention(cfg).double().eval()
    mha = build_attention(tiny_config("mha")).double().eval()
    with torch.no_grad():
        for down in (mla.kv_down, mla.q_down):
            down.weight.copy_(torch.eye(32))
            down.bias.zero_()
        for mine, theirs in ((mla.q_up, mha.q_proj), (mla.k_up, mha.k_proj), (mla.v_up, mha.v_proj),
                             (mla.out_proj, mha.out_proj)):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        x = F.layer_norm(torch.randn(2, 12, 32, dtype=torch.float64) * 3 + 1, (32,))  # unit RMS per token
        y, w = mla(x, return_weights=True)
        y_ref, w_ref = mha(x, return_weights=True)
    # exact up to the norms' epsilons (LayerNorm's 1e-5 leaves an RMS of 1 - 5e-6, RMSNorm adds 1e-6)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Documents, dropout, state dict, config


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_documents_attend_only_within_themselves(pos):
    cfg = mla_config(pos)
    module = make(cfg)
    assert type(module).doc_mask
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    docs = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    with torch.no_grad():
        y, w = module(x, return_weights=True, docs=docs)
        y_fast, _ = module(x, docs=docs)
    y_ref, w_ref = reference(params(module), x, cfg, docs=docs)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-6, rtol=0)
    assert torch.all(w[0, :, 4:, :4] == 0)
    assert not torch.allclose(y[0, 4:], module(x)[0][0, 4:].detach(), atol=1e-3)  # the mask changed something


def test_parameter_count_and_state_dict_keys():
    C, H, hd, r_kv, r_q, r = 32, 4, 8, 10, 12, 4
    module = build_attention(mla_config("rope", q_rank=r_q, kv_rank=r_kv, rope_dim=r, gate=True, sinks=True))
    shapes = {n: tuple(t.shape) for n, t in module.state_dict().items()}
    assert shapes == {
        "kv_down.weight": (r_kv, C), "kv_down.bias": (r_kv,), "kv_norm.weight": (r_kv,),
        "k_up.weight": (H * hd, r_kv), "k_up.bias": (H * hd,), "v_up.weight": (H * hd, r_kv), "v_up.bias": (H * hd,),
        "q_down.weight": (r_q, C), "q_down.bias": (r_q,), "q_norm.weight": (r_q,),
        "q_up.weight": (H * hd, r_q), "q_up.bias": (H * hd,),
        "q_rope.weight": (H * r, r_q), "q_rope.bias": (H * r,), "k_rope.weight": (r, C), "k_rope.bias": (r,),
        "out_proj.weight": (C, C), "out_proj.bias": (C,), "gate_proj.weight": (C, C), "gate_proj.bias": (C,),
        "sinks": (H,),
    }


def test_defaults_and_their_record():
    cfg = tiny_config("mla", pos_encoding="rope")
    assert (cfg.attention.kv_rank, cfg.attention.q_rank, cfg.attention.rope_dim) == (16, None, 4)  # C/2, -, hd/2
    assert tiny_config("mla").attention.rope_dim is None  # learned positions: no rotary part
    assert tiny_config("mla", n_embd=48, n_head=4, pos_encoding="rope").attention.rope_dim == 6  # hd 12 -> 6
    assert tiny_config("mla", n_embd=24, n_head=2, pos_encoding="rope").attention.rope_dim == 6  # hd 12 -> 6
    assert tiny_config("mla", n_embd=40, n_head=4, pos_encoding="rope").attention.rope_dim == 4  # hd 10 -> 5 -> 4


@pytest.mark.parametrize(("attention", "model", "message"), [
    (dict(kv_rank=33), {}, r"^model.attention.kv_rank=33 is wider than model.n_embd=32"),
    (dict(q_rank=40), {}, r"^model.attention.q_rank=40 is wider than model.n_embd=32"),
    (dict(rope_dim=3), dict(pos_encoding="rope"), r"^model.attention.rope_dim=3 must be even"),
    (dict(rope_dim=4), {}, r"^model.attention.rope_dim=4 sizes a rotary part, which needs model.pos_encoding=rope"),
    ({}, dict(qk_norm=True), r"^attention variant 'mla' cannot apply QK-norm"),
])
def test_bad_settings_are_refused_in_one_line(attention, model, message):
    with pytest.raises(ValueError, match=message) as err:
        build_attention(tiny_config("mla", attention=AttentionConfig("mla", **attention), **model))
    assert "\n" not in str(err.value)


def test_other_variants_refuse_the_mla_settings():
    for key, value in (("kv_rank", 8), ("q_rank", 8), ("rope_dim", 4)):
        with pytest.raises(ValueError, match=rf"model.attention.{key}={value} is ignored by attention variant "
                                             rf"'sdpa'; only mla reads it"):
            check_attention_config(AttentionConfig("sdpa", **{key: value}))


def test_dropout_drops_weights_on_both_paths():
    module = make(mla_config("rope", dropout=0.5), double=False)
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        _, w_eval = module(x, return_weights=True)
        module.train()
        torch.manual_seed(1)
        _, w_train = module(x, return_weights=True)
        y_train, _ = module(x)
        module.eval()
        y_eval, _ = module(x)
    kept, visible = w_train != 0, w_eval > 0
    assert kept[visible].float().mean().item() == pytest.approx(0.5, abs=0.1)
    torch.testing.assert_close(w_train[kept], w_eval[kept] / 0.5, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y_train, y_eval, atol=1e-3)


def test_a_float32_module_matches_its_float64_self():
    cfg = mla_config("rope", sinks=True)
    m32, m64 = make(cfg, double=False), make(cfg)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m32(x.float())[0].double(), m64(x)[0], atol=1e-4, rtol=1e-4)
    assert dataclasses.asdict(cfg.attention)["name"] == "mla"


# ----------------------------------------------------------------------------------------------------------
# A tiny run: training with attention maps, the checkpoint, generate and evaluate


@pytest.fixture(scope="module")
def mla_run(tmp_path_factory) -> Path:
    from test_train import make_config  # the shared tiny-run config

    from gptmini.trainer import train

    root = tmp_path_factory.mktemp("mla_run")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    cfg = make_config(corpus, root / "data", "model/attention=mla", "model.pos_encoding=rope",
                      "model.attention.q_rank=16", "model.attention.gate=true", "model.block_size=16",
                      "train.max_iters=6", "train.attn_interval=3", "train.eval_interval=0", "train.sample_tokens=0",
                      "train.ckpt_interval=6", "train.final_eval=false")
    train(cfg, root / "run")
    return root / "run"


def test_a_tiny_run_draws_attention_maps_and_its_checkpoint_round_trips(mla_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gptmini.checkpoint import load_checkpoint, load_for_inference

    acc = EventAccumulator(str(mla_run), size_guidance={"images": 0})
    acc.Reload()
    assert {"attn/layer0/head0", "attn/layer1/head1", "attn/layer1/all"} <= set(acc.Tags()["images"])
    assert len(acc.Images("attn/layer0/head0")) == 2  # steps 3 and 6
    state = load_checkpoint(mla_run / "checkpoints" / "last.pt")
    attention = state["config"]["model"]["attention"]
    assert (attention["name"], attention["kv_rank"], attention["q_rank"], attention["rope_dim"]) == ("mla", 16, 16, 8)
    model = load_for_inference(mla_run).model
    assert type(model.blocks[0].attn).__name__ == "MultiHeadLatentAttention"
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    assert "blocks.0.attn.kv_down.weight" in state["model"] and "blocks.0.attn.qkv.weight" not in state["model"]


def test_generate_on_an_mla_checkpoint(mla_run):
    from test_generate import generate_text

    prompt = "the qu"
    on, _ = generate_text(mla_run, prompt=prompt, temperature=0.0, max_new_tokens=30, kv_cache=True)
    off, _ = generate_text(mla_run, prompt=prompt, temperature=0.0, max_new_tokens=30, kv_cache=False)
    again, _ = generate_text(mla_run, "model/attention=mla", prompt=prompt, temperature=0.0, max_new_tokens=30)
    assert on == off == again and on[0].startswith(prompt) and len(on[0]) > 16  # past block_size 16
    with pytest.raises(ValueError, match=r"model.attention.kv_rank=8 does not match the checkpoint's kv_rank=16"):
        generate_text(mla_run, "model/attention=mla", "model.attention.kv_rank=8")
    with pytest.raises(ValueError, match=r"model/attention=sdpa cannot run weights trained with 'mla'"):
        generate_text(mla_run, "model/attention=sdpa")


def test_evaluate_on_an_mla_checkpoint(mla_run):
    from test_evaluate import hand_loss

    from gptmini import data as data_lib
    from gptmini.checkpoint import load_checkpoint, load_for_inference
    from gptmini.config import DataConfig, EvalOptions, EvaluateConfig
    from gptmini.evaluate import run_evaluation

    out = run_evaluation(EvaluateConfig(ckpt=str(mla_run), eval=EvalOptions(window=8, device="cpu")), stream=None)
    model = load_for_inference(mla_run).model
    saved = load_checkpoint(mla_run / "checkpoints" / "last.pt")["config"]
    val = data_lib.prepare(DataConfig(**saved["data"]), saved["data_dir"], log=lambda _: None).val_tokens()
    assert out.loss == pytest.approx(hand_loss(model, val, 8), rel=1e-6)
