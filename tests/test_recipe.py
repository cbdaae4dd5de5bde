"""The modern-recipe options each compute what they claim, against references written out here; the Muon
optimizer orthogonalises; the WSD schedule has its shape; the experiment configs compose and train."""

from __future__ import annotations

import dataclasses
import io
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from gptmini.attention import ATTENTION_REGISTRY, build_attention, normalize_heads, weight_compatible_variants
from gptmini.checkpoint import load_checkpoint
from gptmini.cli import to_dataclass
from gptmini.config import AttentionConfig, OptimConfig, RunConfig, TrainConfig
from gptmini.model import GPT, MLP
from gptmini.optim import (
    NS_COEFFS,
    Muon,
    MuonWithAdamW,
    lr_at,
    make_optimizer,
    newton_schulz,
    ns_dtype,
    ns_dtype_note,
    set_lr,
)
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from cpu_helpers import AVX2_EPYC, GRAVITON3, SAPPHIRE_RAPIDS  # noqa: E402
from model_helpers import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Every variant that can take QK-norm (its applies_qk_norm flag; torch_mha projects Q and K inside
# nn.MultiheadAttention).
QK_NORM_VARIANTS = sorted(n for n, cls in ATTENTION_REGISTRY.items() if cls.applies_qk_norm)
# ... of them, those whose weights are one softmax per head, compared here with mha's (linear:
# tests/test_linear_attention.py; diff: tests/test_diff_attention.py).
QK_NORM_SOFTMAX = [n for n in QK_NORM_VARIANTS
                   if ATTENTION_REGISTRY[n].softmax and ATTENTION_REGISTRY[n].weights_are_probabilities]


cfg = tiny_config  # cfg(name, **overrides): the shared tiny model config (tests/model_helpers.py)


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).add(torch.finfo(x.dtype).eps).sqrt()


# ----------------------------------------------------------------------------------------------------------
# QK-norm


def qk_norm_reference(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Causal attention from the canonical weights, each head's q and k divided by their RMS, no RoPE."""
    sd = attn.state_dict()
    B, T, C = x.shape
    H, hd = attn.n_head, C // attn.n_head
    qkv = x @ sd["qkv.weight"].T + sd["qkv.bias"]  # (B, T, 3C)
    q, k, v = (t.reshape(B, T, H, hd).transpose(1, 2) for t in qkv.split(C, dim=-1))  # (B, H, T, hd)
    q, k = q / rms(q), k / rms(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return y @ sd["out_proj.weight"].T + sd["out_proj.bias"]


def test_normalize_heads_gives_unit_rms_per_head_vector():
    x = torch.randn(2, 4, 7, 8) * torch.linspace(0.1, 30, 8)
    y = normalize_heads(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(2, 4, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(y, x / rms(x))  # a rescaling of each vector, direction unchanged


def test_qk_norm_matches_reference_written_out():
    torch.manual_seed(0)
    attn = build_attention(cfg("mha", qk_norm=True)).eval()
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(attn(x)[0], qk_norm_reference(attn, x), atol=1e-5, rtol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_each_query_head():
    """Scaling one head's query rows changes nothing with QK-norm, and changes the output without it."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    for qk_norm, should_change in ((True, False), (False, True)):
        attn = build_attention(cfg("sdpa", qk_norm=qk_norm, bias=False)).eval()
        before = attn(x)[0]
        with torch.no_grad():
            attn.qkv.weight[8:16] *= 7.0  # query rows of head 1
            attn.qkv.weight[32 + 16 : 32 + 24] *= 0.2  # key rows of head 2
        changed = not torch.allclose(attn(x)[0], before, atol=1e-5)
        assert changed == should_change, qk_norm


def repeat_kv(sd: dict[str, torch.Tensor], n_head: int, n_kv_head: int) -> dict[str, torch.Tensor]:
    """A gqa state dict as the equivalent multi-head one: each key/value head repeated for its query group."""
    C = sd["out_proj.weight"].shape[0]
    hd, groups = C // n_head, n_head // n_kv_head
    out = dict(sd)
    for suffix in ("weight", "bias"):
        q, k, v = sd[f"qkv.{suffix}"].split([C, n_kv_head * hd, n_kv_head * hd], dim=0)
        k, v = (t.reshape(n_kv_head, hd, *t.shape[1:]).repeat_interleave(groups, 0).reshape(C, *t.shape[1:])
                for t in (k, v))
        out[f"qkv.{suffix}"] = torch.cat([q, k, v], dim=0)
    return out


@pytest.mark.parametrize("name", QK_NORM_SOFTMAX)
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_qk_norm_in_every_variant_matches_mha(name, pos):
    """Same canonical weights, same outputs: QK-norm adds no parameters, so state dicts stay portable."""
    torch.manual_seed(0)
    over = {"attention": AttentionConfig("swa", window=16)} if name == "swa" else {}  # window >= T: plain causal
    variant = build_attention(cfg(name, qk_norm=True, pos_encoding=pos, **over)).eval()
    plain = build_attention(cfg(name, qk_norm=False, pos_encoding=pos, **over))
    assert variant.state_dict().keys() == plain.state_dict().keys()
    ref_sd = repeat_kv(variant.state_dict(), 4, 2) if name == "gqa" else variant.state_dict()
    ref = build_attention(cfg("mha", qk_norm=True, pos_encoding=pos)).eval()
    ref.load_state_dict(ref_sd)
    x = torch.randn(2, 9, 32)
    rope = None
    if pos == "rope":
        angles = torch.outer(torch.arange(9.0), 1.0 / 10000 ** (torch.arange(4.0) / 4))  # (T, hd/2)
        rope = (angles.cos(), angles.sin())
    with torch.no_grad():
        want_y, want_w = ref(x, rope=rope, return_weights=True)
        y, w = variant(x, rope=rope, return_weights=True)
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, want_w, atol=1e-5, rtol=1e-5)
    if pos == "learned":  # and mha itself is the written-out reference
        torch.testing.assert_close(want_y, qk_norm_reference(ref, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", QK_NORM_SOFTMAX)
def test_qk_norm_gain_scales_every_variants_normalised_queries_and_keys(name):
    """With gain g, q and k become g * q/rms(q), g * k/rms(k): the reference with the gain written out, g random."""
    torch.manual_seed(0)
    over = {"attention": AttentionConfig("swa", window=16)} if name == "swa" else {}
    variant = build_attention(cfg(name, qk_norm=True, qk_norm_gain=True, **over)).eval()
    assert isinstance(variant.qk_gain, torch.nn.Parameter) and torch.equal(variant.qk_gain, torch.ones(8))
    with torch.no_grad():
        variant.qk_gain.copy_(torch.rand(8) * 3)
    ref = build_attention(cfg("mha", qk_norm=True, qk_norm_gain=True)).eval()
    ref.load_state_dict(repeat_kv(variant.state_dict(), 4, 2) if name == "gqa" else variant.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        y = variant(x)[0]
        sd = ref.state_dict()  # the written-out reference, the gain applied after the normalisation
        B, T, C = x.shape
        qkv = x @ sd["qkv.weight"].T + sd["qkv.bias"]
        q, k, v = (t.reshape(B, T, 4, 8).transpose(1, 2) for t in qkv.split(C, dim=-1))
        q, k = q / rms(q) * sd["qk_gain"], k / rms(k) * sd["qk_gain"]
        scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(torch.ones(T, T).bool().triu(1), -math.inf)
        want = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C) @ sd["out_proj.weight"].T + sd["out_proj.bias"]
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_qk_norm_gain_learns_goes_to_adamw_undecayed_and_needs_qk_norm():
    run = RunConfig(model=cfg("sdpa", qk_norm=True, qk_norm_gain=True), optim=OptimConfig(name="muon",
                                                                                          weight_decay=0.1))
    model = GPT(run.model)
    optimizer = make_optimizer(model, run, torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    gains = {id(p) for n, p in model.named_parameters() if n.endswith("qk_gain")}
    assert len(gains) == 2  # one per layer
    assert gains <= {id(p) for g in optimizer.adamw.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    idx = torch.randint(0, 37, (2, 12))
    model(idx, targets=idx).loss.backward()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "qk_gain" in n)
    with pytest.raises(ValueError, match=r"^model.qk_norm_gain=true .* needs model.qk_norm=true$"):
        cfg("sdpa", qk_norm_gain=True)


@pytest.mark.parametrize("src", [n for n in weight_compatible_variants() if ATTENTION_REGISTRY[n].applies_qk_norm])
def test_qk_norm_model_state_dict_portable_to_mha(src):
    torch.manual_seed(0)
    model = GPT(cfg(src, qk_norm=True, pos_encoding="rope")).eval()
    ref = GPT(cfg("mha", qk_norm=True, pos_encoding="rope")).eval()
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, ref(idx).logits, atol=1e-5, rtol=1e-5)


def test_qk_norm_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(cfg("sdpa", qk_norm=True, pos_encoding="rope")).eval()
    idx = torch.randint(0, 37, (2, 10))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.make_kv_cache(2)
        steps = [model(idx[:, :4], kv_cache=cache).logits]
        steps += [model(idx[:, t : t + 1], kv_cache=cache).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_torch_mha_refuses_qk_norm():
    with pytest.raises(ValueError, match="'torch_mha' cannot apply QK-norm.*model.qk_norm=false"):
        build_attention(cfg("torch_mha", qk_norm=True))


# ----------------------------------------------------------------------------------------------------------
# ReLU², zero-initialised projections, logit soft-cap


def gelu_tanh(h):  # GPT-2's formula, written out (transformers' gelu_new)
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


@pytest.mark.parametrize(("kind", "act"), [("relu2", lambda h: torch.relu(h) ** 2), ("gelu", F.gelu),
                                           ("gelu_tanh", gelu_tanh)])
def test_mlp_activation(kind, act):
    torch.manual_seed(0)
    mlp = MLP(cfg(mlp=kind))
    x = torch.randn(3, 5, 32)
    h = x @ mlp.fc.weight.T + mlp.fc.bias
    torch.testing.assert_close(mlp(x), act(h) @ mlp.proj.weight.T + mlp.proj.bias)
    if kind == "relu2":
        assert (act(h) >= 0).all() and (act(h) == 0).any()


def test_unknown_mlp_is_refused():
    with pytest.raises(ValueError, match="model.mlp='swish' is unknown; valid: gelu, gelu_tanh, relu2"):
        cfg(mlp="swish")


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_zero_init_projections(name):
    torch.manual_seed(0)
    model = GPT(cfg(name, zero_init_proj=True)).eval()
    projections = {n: p for n, p in model.named_parameters() if n.endswith(("out_proj.weight", "mlp.proj.weight"))}
    assert len(projections) == 2 * model.config.n_layer
    assert all(torch.count_nonzero(p) == 0 for p in projections.values())
    others = [p for n, p in model.named_parameters() if n not in projections and n.endswith("weight") and p.dim() == 2]
    assert all(p.std() > 0.01 for p in others)
    # Every block starts as the identity: the logits are the head applied to the embeddings alone.
    idx = torch.randint(0, 37, (2, 8))
    with torch.no_grad():
        x = model.wte(idx) + (model.wpe(torch.arange(8)) if model.wpe is not None else 0)
        torch.testing.assert_close(model(idx).logits, model.lm_head(model.ln_f(x)))
    default = GPT(cfg(name))
    assert all(torch.count_nonzero(p) > 0 for n, p in default.named_parameters() if n in projections)


def test_logit_softcap_bounds_logits_and_is_cap_tanh():
    torch.manual_seed(0)
    capped = GPT(cfg(logit_softcap=5.0)).eval()
    plain = GPT(cfg()).eval()
    with torch.no_grad():
        capped.wte.weight.mul_(40.0)  # large enough that raw logits go far past the cap
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 37, (2, 12))
    targets = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        raw = plain(idx).logits
        out = capped(idx, targets)
    assert raw.abs().max() > 10.0
    assert out.logits.abs().max() < 5.0
    torch.testing.assert_close(out.logits, 5.0 * torch.tanh(raw / 5.0))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 37), targets.reshape(-1)))


def test_bad_softcap_is_refused():
    with pytest.raises(ValueError, match="model.logit_softcap=0.0 must be a positive number"):
        cfg(logit_softcap=0.0)


# ----------------------------------------------------------------------------------------------------------
# Muon


def test_newton_schulz_on_diagonal_matrices_is_the_scalar_polynomial():
    """For diag(s) the iteration acts on each singular value alone: s <- a·s + b·s³ + c·s⁵, after s / ‖s‖."""
    s = torch.tensor([3.0, 1.0, 0.5, 0.05])
    out = newton_schulz(torch.diag(s), steps=5)
    a, b, c = NS_COEFFS
    x = s / s.norm()
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    torch.testing.assert_close(out, torch.diag(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (48, 40), (3, 24, 40)])
def test_newton_schulz_orthogonalises(shape, dtype):
    torch.manual_seed(0)
    g = torch.randn(shape) * torch.logspace(-1, 1, shape[-1])  # columns of very different sizes
    sv_in = torch.linalg.svdvals(g)
    assert (sv_in.amax(-1) / sv_in.amin(-1) > 10).all()  # the input is far from orthogonal...
    o = newton_schulz(g, dtype=dtype)
    assert o.dtype == torch.float32 and o.shape == g.shape
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv  # ...the output has every direction about the same size
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh  # the exactly orthogonal matrix nearest to g
    cos = (o * polar).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.97).all(), cos


def test_muon_step_is_an_orthogonal_update_of_the_learning_rate_size():
    torch.manual_seed(0)
    for shape, scale in (((40, 20), math.sqrt(2.0)), ((20, 40), 1.0)):
        w = torch.nn.Parameter(torch.randn(shape))
        before = w.detach().clone()
        opt = Muon([w], lr=0.1, momentum=0.9)
        w.grad = torch.randn(shape) * torch.logspace(-1, 1, shape[1])
        opt.step()
        delta = (before - w.detach()) / 0.1
        sv = torch.linalg.svdvals(delta)
        assert sv.min() > 0.6 * scale and sv.max() < 1.25 * scale, sv
        # First step: the momentum is the gradient, so the update is NS(g) up to the shape scale.
        torch.testing.assert_close(delta, scale * newton_schulz(w.grad), atol=1e-5, rtol=1e-5)


def test_muon_batches_a_matrix_with_its_transpose_and_scales_only_the_tall_one():
    torch.manual_seed(0)
    tall, wide = torch.nn.Parameter(torch.zeros(40, 20)), torch.nn.Parameter(torch.zeros(20, 40))
    opt = Muon([tall, wide], lr=1.0, momentum=0.9)
    tall.grad, wide.grad = torch.randn(40, 20), torch.randn(20, 40)
    opt.step()
    torch.testing.assert_close(-tall.detach(), math.sqrt(2.0) * newton_schulz(tall.grad), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(-wide.detach(), newton_schulz(wide.grad), atol=1e-5, rtol=1e-5)


def test_muon_split_orthogonalises_each_part_on_its_own():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(24, 8))
    opt = Muon([{"params": [w], "split": [8, 8, 8]}], lr=1.0)
    g = torch.randn(24, 8)
    g[8:16] *= 100.0  # one part dominates: orthogonalised together it would swamp the others
    w.grad = g.clone()
    opt.step()
    for part, grad in zip((-w.detach()).split(8), g.split(8), strict=True):
        torch.testing.assert_close(part, newton_schulz(grad), atol=1e-5, rtol=1e-5)


def run_config(*overrides: str) -> RunConfig:
    from gptmini.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return to_dataclass(compose("train", overrides=list(overrides)))


@pytest.mark.parametrize("name", ["sdpa", "mha", "gqa", "torch_mha"])
def test_muon_gets_exactly_the_hidden_matrices(name):
    model_overrides = {"gqa": ["model.attention.n_kv_head=2"]}.get(name, [])
    run = run_config("optim.name=muon", f"model/attention={name}", *model_overrides)
    model = GPT(dataclasses.replace(run.model, vocab_size=50))
    opt = make_optimizer(model, run, torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")}
    assert muon.isdisjoint(adamw) and muon | adamw == set(names.values())
    assert "wte.weight" in adamw and "wpe.weight" in adamw  # embeddings (and the tied head) stay on AdamW
    assert all(model.get_parameter(n).dim() == 1 for n in adamw - {"wte.weight", "wpe.weight"})
    fused = [g for g in opt.muon.param_groups if g["split"]]
    if name in ("sdpa", "gqa", "torch_mha"):
        kv = 128 // 4 * (2 if name == "gqa" else 4)
        assert fused and fused[0]["split"] == [128, kv, kv]
    assert {g["base_lr"] for g in opt.muon.param_groups} == {run.optim.muon.lr}
    assert {g["base_lr"] for g in opt.adamw.param_groups} == {run.train.lr}


def test_muon_with_adamw_trains_and_resumes_exactly():
    run = run_config("optim.name=muon", "model.n_layer=1", "model.n_embd=32", "model.block_size=8")
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(run.model, vocab_size=20))
    idx = torch.randint(0, 20, (4, 8))

    def step(m, opt, i):
        set_lr(opt, i, run)
        m(idx, idx).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    opt = make_optimizer(model, run, torch.device("cpu"))
    first = model(idx, idx).loss.item()
    for i in range(3):
        step(model, opt, i)
    assert model(idx, idx).loss.item() < first
    clone = GPT(dataclasses.replace(run.model, vocab_size=20))
    clone.load_state_dict(model.state_dict())
    opt2 = make_optimizer(clone, run, torch.device("cpu"))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # as in a checkpoint, read back with weights_only=True
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for i in range(3, 5):
        step(model, opt, i)
        step(clone, opt2, i)
    for (n, a), b in zip(model.state_dict().items(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    plain = make_optimizer(clone, run_config(), torch.device("cpu"))
    with pytest.raises(ValueError, match="not Muon"):
        opt2.load_state_dict(plain.state_dict())


def test_set_lr_scales_every_group_from_its_own_peak():
    run = run_config("optim.name=muon", "optim.muon.lr=0.05", "train.lr=0.002", "train.warmup_iters=10")
    opt = make_optimizer(GPT(dataclasses.replace(run.model, vocab_size=20)), run, torch.device("cpu"))
    assert set_lr(opt, 4, run) == pytest.approx(0.002 * 0.5)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.001, 0.025])


@pytest.mark.parametrize(("caps", "want"), [(AVX2_EPYC, torch.float32), (SAPPHIRE_RAPIDS, torch.bfloat16),
                                            (GRAVITON3, torch.bfloat16)])
def test_ns_dtype_auto_follows_the_cpu(cpu, caps, want):
    cpu(caps)
    assert ns_dtype("auto", torch.device("cpu")) == want
    note = ns_dtype_note("auto", torch.device("cpu"))
    dtype = str(want).removeprefix("torch.")
    assert note.startswith(f"muon Newton-Schulz dtype: {dtype} (auto: CPU {caps['cpu_name']} (")
    assert note.endswith("has native bf16)" if want == torch.bfloat16 else "has no native bf16)")
    run = run_config("optim.name=muon")  # auto by default
    opt = make_optimizer(GPT(dataclasses.replace(run.model, vocab_size=20)), run, torch.device("cpu"))
    assert opt.muon.ns_dtype == want


def test_ns_dtype_auto_on_gpus(monkeypatch):
    import gptmini.device

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(gptmini.device, "gpu_has_native_bf16", lambda device, native=native: native)
        assert ns_dtype("auto", torch.device("cuda")) == want
    assert ns_dtype("auto", torch.device("mps")) == torch.float32


def test_ns_dtype_explicit_choices(cpu):
    cpu(AVX2_EPYC)
    assert ns_dtype("float32", torch.device("cpu")) == torch.float32
    assert ns_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # as asked, with a hint in the note
    assert "set by optim.muon.ns_dtype=bfloat16; CPU AMD EPYC 7763" in ns_dtype_note("bfloat16", torch.device("cpu"))
    assert "float32 or auto may be faster" in ns_dtype_note("bfloat16", torch.device("cpu"))
    with pytest.raises(ValueError, match="optim.muon.ns_dtype='float16' is unknown; valid: auto, float32, bfloat16"):
        ns_dtype("float16", torch.device("cpu"))
    run = run_config("optim.name=muon", "optim.muon.ns_dtype=bfloat16")
    opt = make_optimizer(GPT(dataclasses.replace(run.model, vocab_size=20)), run, torch.device("cpu"))
    assert opt.muon.ns_dtype == torch.bfloat16


@pytest.mark.parametrize(("text", "native"), [
    ("processor\t: 0\nmodel name\t: AMD EPYC 7763\nflags\t\t: fpu sse2 avx avx2 fma\n", False),
    ("processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n", False),
])
def test_cpuinfo_fallback_finds_native_bf16(monkeypatch, tmp_path, text, native):
    """On a torch without torch.cpu.get_capabilities, the flags come from /proc/cpuinfo."""
    import gptmini.device

    (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.setattr(gptmini.device, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    caps = gptmini.device.cpu_capabilities.__wrapped__()  # uncached
    assert gptmini.device.cpu_has_native_bf16(caps) is native
    if "model name" in text:
        assert gptmini.device.describe_cpu(caps).startswith(text.split(": ")[2].split("\n")[0])


def test_real_cpu_detection_agrees_with_torch():
    import gptmini.device

    caps = torch.cpu.get_capabilities()
    assert gptmini.device.cpu_has_native_bf16() == bool(caps.get("avx512_bf16") or caps.get("amx_bf16")
                                                         or caps.get("bf16") or caps.get("sve_bf16"))
    assert gptmini.device.describe_cpu().endswith(f"({torch.backends.cpu.get_cpu_capability()})")


def test_speedrun_cpu_leaves_the_ns_dtype_to_the_hardware():
    assert run_config("experiment=speedrun_cpu").optim.muon.ns_dtype == "auto"


def test_unknown_optimizer_and_schedule_are_refused():
    model = GPT(cfg())
    with pytest.raises(ValueError, match="optim.name='sgd' is unknown; valid: adamw, muon"):
        make_optimizer(model, run_config("optim.name=sgd"), torch.device("cpu"))
    with pytest.raises(ValueError, match="train.lr_schedule='step' is unknown; valid: cosine, wsd"):
        make_optimizer(model, run_config("train.lr_schedule=step"), torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------
# Warm-up / stable / decay schedule


def test_wsd_schedule_shape():
    run = RunConfig(train=TrainConfig(lr=1.0, max_iters=100, warmup_iters=10, lr_schedule="wsd", decay_frac=0.2,
                                      min_lr_ratio=0.1))
    lrs = [lr_at(s, run) for s in range(101)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up
    assert lrs[10:80] == pytest.approx([1.0] * 70)  # stable at the peak
    assert lrs[80:] == pytest.approx([1.0 - 0.9 * (s - 80) / 20 for s in range(80, 101)])  # linear decay
    assert lrs[100] == pytest.approx(0.1)
    cosine = RunConfig(train=dataclasses.replace(run.train, lr_schedule="cosine"))
    assert lr_at(50, cosine) < 0.9  # the cosine is already well down where WSD is still flat


# ----------------------------------------------------------------------------------------------------------
# Experiment configs


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("to be, or not to be, that is the question.\n" * 200)
    return path


TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=4",
        "train.max_iters=6", "train.warmup_iters=2", "train.eval_window=16"]


@pytest.mark.parametrize("experiment", ["speedrun_cpu", "baseline_cpu", "speedrun_gpu", "baseline_gpu", "gpt2_gpu"])
def test_experiment_composes_and_trains_a_few_steps(tmp_path, corpus, experiment):
    overrides = [f"experiment={experiment}", "data=text", f"data.path={corpus}", f"data_dir={tmp_path / 'data'}",
                 *TINY, "train.device=cpu"]
    if experiment.endswith("_gpu"):  # the GPU recipes in miniature on the CPU: fp32, eager
        overrides += ["train.dtype=float32", "train.compile=false", "model.dropout=0.0", "train.final_eval=true"]
    run = run_config(*overrides)
    assert run.data.path == str(corpus) and run.train.max_iters == 6
    result = train(run, tmp_path / "run")
    assert result.step == 6 and math.isfinite(result.final_val_loss)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 6 and state["config"]["optim"]["name"] == run.optim.name
    log_lines = (tmp_path / "run" / "train.log").read_text().strip().splitlines()
    assert log_lines[-1].endswith(f"final val loss {result.final_val_loss:.4f} (whole split, window 16)")


def test_speedrun_cpu_is_the_modern_recipe_without_periodic_work():
    run = run_config("experiment=speedrun_cpu")
    m, o, t = run.model, run.optim, run.train
    assert (m.pos_encoding, m.qk_norm, m.mlp, m.zero_init_proj) == ("rope", True, "relu2", True)
    assert o.name == "muon" and t.lr_schedule == "wsd"
    assert run.data.name == "shakespeare_char" and m.block_size == 64 and t.eval_window == 64
    assert (t.eval_interval, t.attn_interval, t.sample_tokens) == (0, 0, 0) and t.ckpt_interval >= t.max_iters
    assert t.device == "cpu" and t.dtype == "float32"
    base = run_config("experiment=baseline_cpu")
    assert (base.model.n_layer, base.model.n_head, base.model.n_embd, base.model.block_size) == (4, 4, 128, 64)
    assert (base.train.batch_size, base.train.max_iters, base.train.lr, base.optim.name) == (12, 2000, 1e-3, "adamw")
