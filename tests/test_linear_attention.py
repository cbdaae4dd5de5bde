"""`linear` attention (Katharopoulos et al., 2020) against its paper's equations written out here in float64, one
position at a time; its three forms (chunked, recurrent, explicit) against each other; its constant-size decoding
cache; and a linear checkpoint through training, generate.py and the evaluation command."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

from gptmini import GPT
from gptmini import data as data_lib
from gptmini.attention import KVCache, LinearAttention, LinearStateCache, build_attention, check_attention_config
from gptmini.attention.linear import (
    chunked_linear_attention,
    explicit_linear_attention,
    feature_map,
    recurrent_linear_attention,
)
from gptmini.checkpoint import load_checkpoint, load_for_inference, save_checkpoint
from gptmini.cli import to_dataclass
from gptmini.config import AttentionConfig, EvalOptions, EvaluateConfig, RunConfig, register_configs
from gptmini.evaluate import run_evaluation
from gptmini.gpt2_format import gpt2_refusal
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from model_helpers import tiny_config  # noqa: E402
from test_evaluate import hand_loss  # noqa: E402
from test_generate import gen_config, generate_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
C, H, HD = 32, 4, 8  # tiny_config's width and heads


def make(chunk: int = 64, **overrides) -> LinearAttention:
    torch.manual_seed(0)
    module = build_attention(tiny_config("linear", **overrides)).double().eval()
    module.chunk_size = chunk
    return module


def rope_tables(T: int, hd: int = HD) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, hd/2) of angle t / 10000^(i / (hd/2)), as the model builds them."""
    half = hd // 2
    angles = torch.outer(torch.arange(T, dtype=torch.float64), 10000.0 ** (-torch.arange(half) / half))
    return angles.cos(), angles.sin()


# ----------------------------------------------------------------------------------------------------------
# The reference: the paper's equations (their eq. 4-6 with phi(x) = elu(x) + 1), position by position


def phi(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1, written from its definition: x + 1 for x > 0, exp(x) otherwise."""
    return torch.where(x > 0, x + 1, torch.exp(x))


def prepare(x: torch.Tensor, t: int, qk_norm: bool, rope, gain: torch.Tensor | None = None) -> torch.Tensor:
    """One head's query or key (hd,) at position t: RMS-normalised (times the gain), rotated pairwise
    (i, i + hd/2), then phi."""
    if qk_norm:
        x = x / x.square().mean().sqrt() * (gain if gain is not None else 1.0)
    if rope is not None:
        cos, sin = rope[0][t], rope[1][t]
        a, b = x[: HD // 2], x[HD // 2 :]
        x = torch.cat([a * cos - b * sin, b * cos + a * sin])
    return phi(x)


def reference(params: dict[str, torch.Tensor], x: torch.Tensor, qk_norm: bool = False, rope=None):
    """y (B, T, C) and the implied weights (B, H, T, T) from canonical parameters, in float64:
    y_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / sum_{j<=i} phi(q_i).phi(k_j), per head, then gate and out_proj."""
    B, T, _ = x.shape
    gain = params.get("qk_gain")  # model.qk_norm_gain: one gain per head dimension, queries and keys alike
    qkv = x @ params["qkv.weight"].T + params["qkv.bias"]
    q, k, v = qkv.split(C, dim=-1)
    rows, weights = [], torch.zeros(B, H, T, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            heads = []
            for h in range(H):
                sl = slice(h * HD, (h + 1) * HD)
                qi = prepare(q[b, i, sl], i, qk_norm, rope, gain)
                scores = [qi @ prepare(k[b, j, sl], j, qk_norm, rope, gain) for j in range(i + 1)]
                den = sum(scores)
                heads.append(sum(s * v[b, j, sl] for j, s in enumerate(scores)) / den)
                weights[b, h, i, : i + 1] = torch.stack([s / den for s in scores]).detach()
            rows.append(torch.cat(heads))
    y = torch.stack(rows).view(B, T, C)
    if "gate_proj.weight" in params:
        y = y * torch.sigmoid(x @ params["gate_proj.weight"].T + params["gate_proj.bias"])
    return y @ params["out_proj.weight"].T + params["out_proj.bias"], weights


CASES = [  # chunk size (T = 11 is a multiple of none but 1 and 11), positions, gate, QK-norm (with a learned gain)
    (1, "learned", False, False),
    (3, "learned", True, False),
    (4, "rope", False, True),
    (11, "learned", False, True),
    (5, "learned", False, "gain"),
    (64, "rope", True, False),
]


@pytest.mark.parametrize(("chunk", "pos", "gate", "qk_norm"), CASES)
def test_outputs_and_weights_match_the_paper_equations(chunk, pos, gate, qk_norm):
    module = make(chunk, pos_encoding=pos, qk_norm=bool(qk_norm), qk_norm_gain=qk_norm == "gain",
                  attention=AttentionConfig("linear", gate=gate))
    if module.qk_gain is not None:
        with torch.no_grad():
            module.qk_gain.copy_(torch.rand(HD) * 3)
    x = torch.randn(2, 11, C, dtype=torch.float64)
    rope = rope_tables(11) if pos == "rope" else None
    with torch.no_grad():
        y, none = module(x, rope=rope)  # the chunked form
        y_w, w = module(x, return_weights=True, rope=rope)  # the explicit form
        y_ref, w_ref = reference(module.state_dict(), x, bool(qk_norm), rope)
    assert none is None and w.shape == (2, H, 11, 11)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y_w, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=0)
    assert torch.allclose(w.sum(-1), torch.ones(2, H, 11, dtype=torch.float64))  # rows are distributions
    visible = torch.ones(11, 11, dtype=torch.bool).tril()
    assert torch.all(w[..., ~visible] == 0) and torch.all(w[..., visible] > 0)  # causal, every visible key weighed


@pytest.mark.parametrize(("chunk", "gate"), [(2, True), (4, False), (64, False)])
def test_gradients_match_the_paper_equations(chunk, gate):
    module = make(chunk, attention=AttentionConfig("linear", gate=gate)).train()  # dropout 0: the chunked form
    x = torch.randn(2, 9, C, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 9, C, dtype=torch.float64)
    (module(x)[0] * target).sum().backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(True)
    (reference(params, x_ref)[0] * target).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, atol=1e-5, rtol=0, msg=name)


# ----------------------------------------------------------------------------------------------------------
# The three forms


def features(T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, T, 5, dtype=torch.float64, generator=g) for _ in range(3))
    return feature_map(q), feature_map(k), v


@pytest.mark.parametrize("T", [1, 7, 16, 23])
@pytest.mark.parametrize("chunk", [1, 2, 5, 8, 64])
def test_chunked_recurrent_and_explicit_forms_agree(T, chunk):
    q, k, v = features(T)
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    y_explicit, _ = explicit_linear_attention(q, k, v, keep, nn.Dropout(0.0))
    zeros = (torch.zeros(2, 3, 5, 5, dtype=torch.float64), torch.zeros(2, 3, 5, dtype=torch.float64))
    y_rec, (S, z) = recurrent_linear_attention(q, k, v, zeros)
    y_chunk, (S_c, z_c) = chunked_linear_attention(q, k, v, chunk)
    torch.testing.assert_close(y_chunk, y_explicit, atol=1e-12, rtol=0)
    torch.testing.assert_close(y_rec, y_explicit, atol=1e-12, rtol=0)
    torch.testing.assert_close(S_c, k.transpose(-2, -1) @ v)  # the state is the sum over every position
    torch.testing.assert_close((S, z), (S_c, z_c))


@pytest.mark.parametrize("split", [1, 4, 9])
def test_a_state_carries_the_past(split):
    """Chunked or recurrent from the state after the first `split` positions = the whole sequence at once."""
    q, k, v = features(13, seed=1)
    whole, state = chunked_linear_attention(q, k, v, 4)
    head, mid = chunked_linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], 3)
    tail, end = chunked_linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], 5, mid)
    tail_rec, end_rec = recurrent_linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], mid)
    torch.testing.assert_close(torch.cat([head, tail], dim=2), whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat([head, tail_rec], dim=2), whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(end, state)
    torch.testing.assert_close(end_rec, state)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_causality_inside_and_across_chunks(chunk):
    """Output 5 (the middle of a chunk of 4) depends on inputs 0..5 and on none after."""
    module = make(chunk)
    x = torch.randn(2, 12, C, dtype=torch.float64, requires_grad=True)
    module(x)[0][:, 5].sum().backward()
    assert torch.all(x.grad[:, 6:] == 0)
    assert all(x.grad[:, t].abs().sum() > 0 for t in range(6))


# ----------------------------------------------------------------------------------------------------------
# Dropout, sinks, gate, export


def test_dropout_in_training_acts_on_the_implied_weights():
    """With model.dropout > 0 in training the explicit form runs: the output is the dropped weights times V."""
    module = make(dropout=0.5).train()
    x = torch.randn(2, 10, C, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(3)
        y, _ = module(x)
        torch.manual_seed(3)
        y_w, w = module(x, return_weights=True)
        v = (x @ module.state_dict()["qkv.weight"].T + module.qkv.bias)[..., 2 * C :]
        v = v.view(2, 10, H, HD).transpose(1, 2)  # (B, H, T, hd)
        by_hand = module.out_proj((w @ v).transpose(1, 2).reshape(2, 10, C))
        module.eval()
        y_eval, w_eval = module(x, return_weights=True)
    torch.testing.assert_close(y, y_w)
    torch.testing.assert_close(y, by_hand)
    assert (w == 0).logical_and(w_eval > 0).any()  # some weights were dropped ...
    kept = w != 0
    torch.testing.assert_close(w[kept], w_eval[kept] / 0.5)  # ... the others scaled by 1 / (1 - p)
    assert not torch.allclose(y, y_eval)


def test_sinks_are_refused_because_there_is_no_softmax():
    with pytest.raises(ValueError, match=r"^model.attention.sinks=true is ignored by attention variant 'linear' "
                                         r"\(linear attention has no softmax.*remove the setting"):
        check_attention_config(AttentionConfig("linear", sinks=True))


def test_gate_is_read_and_has_its_own_weights():
    gated = make(attention=AttentionConfig("linear", gate=True))
    assert set(gated.state_dict()) == {"qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias",
                                       "gate_proj.weight", "gate_proj.bias"}
    check_attention_config(AttentionConfig("linear", gate=True))  # read, so not refused


def test_hugging_face_export_is_refused():
    setting, why = gpt2_refusal(tiny_config("linear"))
    assert setting == "model.attention.name=linear" and "full multi-head attention" in why


# ----------------------------------------------------------------------------------------------------------
# The decoding cache


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize(("prefill", "chunk"), [(1, 4), (6, 4), (9, 64)])
def test_cached_decoding_matches_the_full_forward(pos, prefill, chunk):
    torch.manual_seed(0)
    model = GPT(tiny_config("linear", pos_encoding=pos, block_size=24)).double().eval()
    for block in model.blocks:
        block.attn.chunk_size = chunk
    idx = torch.randint(0, 37, (2, 24))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.make_kv_cache(batch_size=2)
        for _ in range(2):  # the second time through a reset cache: it starts afresh
            cache.reset()
            steps = [model(idx[:, :prefill], kv_cache=cache).logits]
            steps += [model(idx[:, t : t + 1], kv_cache=cache).logits for t in range(prefill, 24)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)
    assert all(isinstance(layer, LinearStateCache) for layer in cache.layers)


def test_the_cache_is_the_same_size_at_any_length():
    torch.manual_seed(0)
    model = GPT(tiny_config("linear"))
    per_layer = 4 * (2 * H * HD * HD + 2 * H * HD)  # float32 S (B, H, hd, hd) and z (B, H, hd), batch 2
    assert model.make_kv_cache(2, max_len=10).nbytes() == model.make_kv_cache(2, max_len=10_000).nbytes()
    assert model.make_kv_cache(2, max_len=10_000).nbytes() == 2 * per_layer
    module = build_attention(tiny_config("linear")).eval()
    cache = KVCache([module.new_cache(2, 10, torch.device("cpu"), torch.float32)])
    before = [t.shape for t in cache.layer(0).tensors()]
    with torch.no_grad():
        module(torch.randn(2, 10_000, C), kv_cache=cache.layer(0))  # far past the max_len it was made for
        cache.pos += 10_000
        module(torch.randn(2, 1, C), kv_cache=cache.layer(0))
    assert [t.shape for t in cache.layer(0).tensors()] == before and cache.nbytes() == per_layer
    sdpa = GPT(tiny_config("sdpa"))
    assert sdpa.make_kv_cache(2, max_len=1000).nbytes() == 100 * sdpa.make_kv_cache(2, max_len=10).nbytes()


def test_weights_from_a_cache_only_before_it_holds_anything():
    module = make()
    x = torch.randn(1, 6, C, dtype=torch.float64)
    cache = KVCache([module.new_cache(1, 16, torch.device("cpu"), torch.float64)])
    with torch.no_grad():
        _, w = module(x, kv_cache=cache.layer(0), return_weights=True)  # an empty cache: the prompt's weights
        torch.testing.assert_close(w, module(x, return_weights=True)[1])
        cache.pos += 6
        y, _ = module(x[:, :1], kv_cache=cache.layer(0))  # the state written by the weights path is right
        torch.testing.assert_close(y, module(torch.cat([x, x[:, :1]], dim=1))[0][:, -1:])
        with pytest.raises(ValueError, match=r"'linear' keeps a running state, not past keys.*7 cached positions"):
            cache.pos += 1
            module(x[:, :1], kv_cache=cache.layer(0), return_weights=True)


# ----------------------------------------------------------------------------------------------------------
# A linear checkpoint through the commands


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory) -> tuple[Path, RunConfig]:
    """A 2-layer gated linear model trained 20 steps (block_size 16) on a repetitive corpus; (run, its config)."""
    tmp = tmp_path_factory.mktemp("linear")
    corpus = tmp / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("train", overrides=[
            "data=text", f"data.path={corpus}", f"data_dir={tmp / 'data'}", "model/attention=linear",
            "model.attention.gate=true", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
            "model.block_size=16", "train.batch_size=8", "train.max_iters=20", "train.warmup_iters=5",
            "train.lr=3e-3", "train.eval_interval=0", "train.attn_interval=10", "train.sample_tokens=0",
            "train.final_eval=false", "train.device=cpu",
        ])
    cfg = to_dataclass(cfg)
    train(cfg, tmp / "run")
    return tmp / "run", cfg


def test_checkpoint_round_trip(linear_run, tmp_path):
    run, _ = linear_run
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["config"]["model"]["attention"]["name"] == "linear"
    model = load_for_inference(run).model
    assert isinstance(model.blocks[0].attn, LinearAttention)
    save_checkpoint({**state, "model": model.state_dict()}, tmp_path / "again.pt")
    again = load_for_inference(tmp_path / "again.pt").model
    idx = torch.randint(0, 20, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, model(idx).logits, atol=0, rtol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_generate_same_text_with_and_without_the_cache_past_block_size(linear_run):
    run, _ = linear_run
    on, _ = generate_text(run, prompt="the quick ", temperature=0.0, max_new_tokens=40, kv_cache=True)
    off, _ = generate_text(run, prompt="the quick ", temperature=0.0, max_new_tokens=40, kv_cache=False)
    assert on == off and len(on[0]) > 16 + 5
    with pytest.raises(ValueError, match=r"model/attention=sdpa cannot run weights trained with 'linear'"):
        generate_text(run, "model/attention=sdpa")
    assert gen_config(run, "model/attention=linear").model.attention.name == "linear"


def test_evaluate_matches_the_hand_computed_loss(linear_run):
    run, cfg = linear_run
    out = run_evaluation(EvaluateConfig(ckpt=str(run), eval=EvalOptions(window=8, device="cpu")), stream=None)
    model = load_for_inference(run).model
    val = data_lib.prepare(cfg.data, cfg.data_dir, log=lambda _: None).val_tokens()
    assert out.loss == pytest.approx(hand_loss(model, val, 8), rel=1e-6)
    assert out.loss < math.log(model.config.vocab_size) - 0.5  # it learned something in 20 steps


@pytest.mark.slow
def test_the_commands_run_a_linear_checkpoint(linear_run, tmp_path):
    run, _ = linear_run
    gen = subprocess.run([sys.executable, str(ROOT / "generate.py"), f"ckpt={run}", "prompt='the '",
                          "max_new_tokens=20", "temperature=0", "device=cpu"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("the ") and len(gen.stdout.strip()) >= 20
    ev = subprocess.run([sys.executable, "-m", "gptmini.evaluate", f"ckpt={run}", "eval.window=8",
                         "eval.device=cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert re.search(r"^val loss \d+\.\d{4}, perplexity \d+\.\d{4}", ev.stdout, re.M), ev.stdout
