"""Differential attention (`diff`, Ye et al., ICLR 2025) against a reference written here from the paper's equations:

    A1 = softmax(Q1 K1ᵀ / √d),  A2 = softmax(Q2 K2ᵀ / √d),  head = (A1 - λ A2) V
    λ = exp(λ_q1·λ_k1) - exp(λ_q2·λ_k2) + λ_init,  λ_init = 0.8 - 0.6 exp(-0.3 (l - 1))
    out = W_o concat_i[(1 - λ_init) RMSNorm(head_i)]

in plain float64 tensors, one head, one map and one query at a time; the module runs in float64 too.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptmini import GPT
from gptmini import data as data_lib
from gptmini.attention import KVCache, StaticKVCache, build_attention
from gptmini.checkpoint import load_checkpoint, load_for_inference
from gptmini.config import AttentionConfig, EvalOptions, EvaluateConfig, ModelConfig
from gptmini.config_checks import check_model_config
from gptmini.evaluate import run_evaluation
from gptmini.export import check_exportable
from gptmini.head_metrics import measure_heads
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from model_helpers import tiny_config  # noqa: E402
from test_evaluate import hand_loss  # noqa: E402
from test_generate import expected_grid, generate_text  # noqa: E402
from test_train import make_config  # noqa: E402

C, N_HEAD, HD = 32, 4, 8  # tiny_config: 4 heads of 8, so 2 differential heads with values of 16


def diff_config(**overrides):
    attention = AttentionConfig("diff", gate=overrides.pop("gate", False), sinks=overrides.pop("sinks", False))
    return tiny_config("diff", attention=attention, **overrides)


def make(layer: int = 0, **overrides) -> nn.Module:
    """A float64 module with every parameter random (the norm gain, the sinks and the gate too)."""
    torch.manual_seed(layer)
    module = build_attention(diff_config(**overrides), layer).double().eval()
    with torch.no_grad():
        module.head_norm.weight.uniform_(0.5, 1.5)
        if module.sinks is not None:
            module.sinks.copy_(torch.linspace(-1.0, 2.0, N_HEAD))  # a different sink for each of the 4 maps
        if module.qk_gain is not None:
            module.qk_gain.uniform_(0.5, 3.0)
    return module


def rope_tables(T: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    half = HD // 2
    inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.outer(torch.arange(start, start + T, dtype=torch.float64), inv)  # (T, hd/2)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, rope) -> torch.Tensor:
    """RoPE on (T, hd), the two halves rotated as pairs (GPT-NeoX layout)."""
    if rope is None:
        return x
    cos, sin = rope
    a, b = x[:, : HD // 2], x[:, HD // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def softmax_row(logits: list[torch.Tensor], sink: torch.Tensor | None) -> list[torch.Tensor]:
    exps = [torch.exp(s) for s in logits]
    total = sum(exps) + (torch.exp(sink) if sink is not None else 0.0)
    return [e / total for e in exps]


def one_map(Q, K, b, keep, sink, mask):
    """One softmax map (T, T) of one batch row, query by query over the keys `keep` allows."""
    T = Q.size(0)
    rows = []
    for t in range(T):
        seen = [s for s in range(T) if keep(b, t, s)]
        probs = softmax_row([Q[t] @ K[s] / math.sqrt(HD) for s in seen], sink)
        row = [torch.zeros((), dtype=torch.float64)] * T
        for s, p in zip(seen, probs, strict=True):
            row[s] = p * (mask[t, s] if mask is not None else 1.0)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def normalise(x: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """QK-norm of (T, hd): x / rms(x), times the learned gain when there is one."""
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
    return x if gain is None else x * gain


def reference(p: dict[str, torch.Tensor], x: torch.Tensor, layer: int, rope=None, docs=None, masks=None,
              qk_norm: bool = False):
    """The paper's equations on the parameters `p` (canonical names): (out (B, T, C), maps (B, H/2, T, T)).
    `masks` (B, H, T, T): what dropout keeps of each softmax map, already divided by (1 - p). `qk_norm`: each
    query and key normalised (model.qk_norm, with p["qk_gain"] when model.qk_norm_gain) before RoPE."""
    B, T, _ = x.shape
    q, k, v = (x @ p["qkv.weight"].T + p["qkv.bias"]).split(C, dim=-1)  # (B, T, C) each
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * ((layer + 1) - 1))  # layer l = layer + 1, 1-based
    lam = torch.exp(p["lambda_q1"] @ p["lambda_k1"]) - torch.exp(p["lambda_q2"] @ p["lambda_k2"]) + lam_init
    keep = lambda b, t, s: s <= t and (docs is None or docs[b, s] == docs[b, t])  # noqa: E731
    outs, weights = [], []
    for b in range(B):
        heads, maps_b = [], []
        for i in range(N_HEAD // 2):
            maps = []
            for j in (0, 1):  # query/key head 2i + j is map j of differential head i
                h = 2 * i + j
                Q, K = (t[b, :, h * HD : (h + 1) * HD] for t in (q, k))
                if qk_norm:
                    Q, K = normalise(Q, p.get("qk_gain")), normalise(K, p.get("qk_gain"))
                Q, K = rotate(Q, rope), rotate(K, rope)
                sink = p["sinks"][h] if "sinks" in p else None
                maps.append(one_map(Q, K, b, keep, sink, masks[b, h] if masks is not None else None))
            W = maps[0] - lam * maps[1]  # (T, T)
            head = W @ v[b, :, 2 * i * HD : (2 * i + 2) * HD]  # (T, 2hd)
            head = head / torch.sqrt(head.pow(2).mean(-1, keepdim=True) + 1e-5) * p["head_norm.weight"]
            heads.append(head * (1 - lam_init))
            maps_b.append(W)
        outs.append(torch.cat(heads, dim=-1))
        weights.append(torch.stack(maps_b))
    y = torch.stack(outs)  # (B, T, C)
    if "gate_proj.weight" in p:
        y = y * torch.sigmoid(x @ p["gate_proj.weight"].T + p["gate_proj.bias"])
    return y @ p["out_proj.weight"].T + p["out_proj.bias"], torch.stack(weights)


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


CASES = [dict(), dict(pos="rope"), dict(sinks=True), dict(gate=True), dict(qk_norm=True, qk_norm_gain=True, pos="rope"),
         dict(layer=3, sinks=True, gate=True, pos="rope", qk_norm=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_outputs_and_weights_match_the_paper(case):
    case = dict(case)
    layer, pos = case.pop("layer", 1), case.pop("pos", "learned")
    module = make(layer, pos_encoding=pos, **case)
    x = torch.randn(2, 7, C, dtype=torch.float64)
    rope = rope_tables(7) if pos == "rope" else None
    with torch.no_grad():
        y, w = module(x, return_weights=True, rope=rope)
        y_fused, none = module(x, rope=rope)  # SDPA (no sinks) or the same explicit path
    y_ref, w_ref = reference(params(module), x, layer, rope, qk_norm=case.get("qk_norm", False))
    assert none is None and w.shape == (2, N_HEAD // 2, 7, 7)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y_fused, y_ref, atol=1e-6, rtol=0)


def test_gradients_match_the_paper():
    module = make(2, sinks=True, gate=True).train()  # dropout 0: train mode is deterministic
    x = torch.randn(2, 6, C, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 6, C, dtype=torch.float64)
    (module(x)[0] * target).sum().backward()
    p = {name: t.requires_grad_(True) for name, t in params(module).items()}
    x_ref = x.detach().clone().requires_grad_(True)
    (reference(p, x_ref, 2)[0] * target).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)
    grads = dict(module.named_parameters())
    assert grads.keys() == p.keys()
    for name, t in p.items():
        torch.testing.assert_close(grads[name].grad, t.grad, atol=1e-5, rtol=0, msg=name)
    assert all(p[f"lambda_{n}"].grad.abs().sum() > 0 for n in ("q1", "k1", "q2", "k2"))  # λ is learned


def test_fused_path_matches_the_paper_without_sinks_in_float32():
    module = make(1).float()
    x = torch.randn(3, 9, C)
    with torch.no_grad():
        y = module(x)[0]
    y_ref, _ = reference({k: v.double() for k, v in params(module).items()}, x.double(), 1)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=0)


def test_lambda_init_per_layer_and_the_lambda_vectors_init():
    torch.manual_seed(0)
    model = GPT(diff_config(n_layer=6, n_embd=256, n_head=4))  # head_dim 64
    # 0.8 - 0.6·exp(-0.3·(l - 1)) for l = 1..6, e.g. l = 2: 0.8 - 0.6 × 0.7408182207 = 0.3555090676
    expected = [0.2, 0.3555090676, 0.4707130183, 0.5560582042, 0.6192834729, 0.6661219039]
    for layer, block in enumerate(model.blocks):
        assert block.attn.lambda_init == pytest.approx(expected[layer], abs=1e-9)
        assert block.attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * ((layer + 1) - 1)))
        assert torch.equal(block.attn.head_norm.weight, torch.ones(128))
    # GPT.reset_parameters (the N(0, 0.02) of every Linear) leaves the λ vectors as the paper's code draws them.
    vectors = torch.cat([getattr(b.attn, f"lambda_{n}") for b in model.blocks for n in ("q1", "k1", "q2", "k2")])
    assert vectors.numel() == 6 * 4 * 64
    assert vectors.std().item() == pytest.approx(0.1, rel=0.1)
    assert vectors.mean().abs().item() < 0.02


def test_causality_and_document_masks():
    module = make(1)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 2, 2, 2]])
    x = torch.randn(2, 7, C, dtype=torch.float64)
    with torch.no_grad():
        y, w = module(x, return_weights=True, docs=docs)
        y_fused, _ = module(x, docs=docs)
        x2 = x.clone()
        x2[0, :3] = torch.randn(3, C, dtype=torch.float64)  # document 0 of row 0
        x2[:, 6:] = 0.0  # the future of position 5
        y2 = module(x2, docs=docs)[0]
    y_ref, w_ref = reference(params(module), x, 1, docs=docs)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y_fused, y_ref, atol=1e-6, rtol=0)
    assert torch.equal(w[0, :, 3:, :3], torch.zeros(2, 4, 3))  # document 1 never sees document 0
    assert torch.equal(w.triu(1), torch.zeros_like(w))  # nor any query its future
    torch.testing.assert_close(y2[0, 3:6], y[0, 3:6], atol=1e-12, rtol=0)
    torch.testing.assert_close(y2[1, :6], y[1, :6], atol=1e-12, rtol=0)
    assert not torch.allclose(y2[0, :3], y[0, :3])
    assert type(module).doc_mask


class FixedDropout(nn.Module):
    """Dropout with a known keep mask (B, H, T, T) of the softmax maps, scaled by 1 / (1 - p)."""

    def __init__(self, keep: torch.Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps * self.keep / (1 - self.p)


def test_dropout_falls_on_each_softmax_map():
    module = make(1, dropout=0.5)
    x = torch.randn(2, 6, C, dtype=torch.float64)
    keep = torch.rand(2, N_HEAD, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.5
    module.attn_dropout = FixedDropout(keep, 0.5)
    with torch.no_grad():
        y, w = module(x, return_weights=True)
    y_ref, w_ref = reference(params(module), x, 1, masks=keep.double() / 0.5)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    # The real dropout, on both paths: random in training, off in evaluation.
    real = make(1, dropout=0.5)
    with torch.no_grad():
        y_eval = real(x)[0]
        assert torch.allclose(real(x, return_weights=True)[0], y_eval, atol=1e-12)
        real.train()
        assert not torch.allclose(real(x)[0], y_eval, atol=1e-3)  # SDPA's dropout_p
        assert not torch.allclose(real(x, return_weights=True)[0], y_eval, atol=1e-3)


@pytest.mark.parametrize("static", [False, True])
def test_cached_decoding_matches_the_full_forward(static):
    module = make(2, pos_encoding="rope", sinks=not static, gate=True)
    x = torch.randn(2, 10, C, dtype=torch.float64)
    layer_cache = module.new_cache(2, 16, torch.device("cpu"), torch.float64, static=static)
    cache = (StaticKVCache if static else KVCache)([layer_cache])
    assert layer_cache.k.shape == (2, N_HEAD, 16, HD)  # n_head keys of head_dim; values the same, paired later
    with torch.no_grad():
        full = module(x, rope=rope_tables(10))[0]
        steps = []
        for start, end in [(0, 4), *((t, t + 1) for t in range(4, 10))]:
            if static:
                cache.input_pos = torch.arange(start, end)
            steps.append(module(x[:, start:end], kv_cache=layer_cache, rope=rope_tables(end - start, start))[0])
            cache.pos += end - start
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)


def test_odd_head_counts_are_refused_in_one_line():
    cfg = diff_config(n_head=3, n_embd=24)
    for check in (check_model_config, lambda c: build_attention(c), GPT):
        with pytest.raises(ValueError, match=r"^attention variant 'diff' pairs heads .*model.n_head=3 must be even$"):
            check(cfg)


def test_gpt2_export_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^cannot export.*model.attention.name=diff") as err:
        check_exportable(diff_config(vocab_size=50257), None)
    assert "\n" not in str(err.value)


def test_head_metrics_on_signed_maps_with_sinks():
    """n_head/2 heads per layer; no learned-sink share is read from A1 - λA2 (it is not one softmax)."""
    torch.manual_seed(0)
    model = GPT(diff_config(sinks=True)).eval()
    with torch.no_grad():
        for block in model.blocks:  # λ near 1.3 and sharp maps: some weights negative
            block.attn.lambda_q1.fill_(0.3)
            block.attn.lambda_k1.fill_(1.0)
            block.attn.qkv.weight.mul_(40)
    report = measure_heads(model, torch.randint(0, 37, (2, 12)), induction_len=6)
    assert set(report.scores) == {"entropy", "sink", "previous", "self", "distance", "induction"}
    assert all(s.shape == (2, N_HEAD // 2) and s.isfinite().all() for s in report.scores.values())
    assert report.signed and any("signed" in note for note in report.notes)


# ----------------------------------------------------------------------------------------------------------
# A diff run through the commands: train.py's maps, checkpoints, generate.py, python -m gptmini.evaluate


@pytest.fixture(scope="module")
def diff_run(tmp_path_factory) -> tuple[Path, object]:
    """2 layers of 2 differential heads (n_head=4) with the gate and sinks on, trained 10 steps; maps every 5."""
    tmp = tmp_path_factory.mktemp("diff")
    corpus = tmp / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    cfg = make_config(corpus, tmp / "data", "model/attention=diff", "model.attention.gate=true",
                      "model.attention.sinks=true", "model.n_head=4", "model.block_size=16", "train.max_iters=10",
                      "train.attn_interval=5", "train.eval_interval=5", "train.ckpt_interval=5",
                      "train.sample_tokens=0", "train.eval_window=8")
    result = train(cfg, tmp / "run")
    return tmp, cfg, result


@pytest.mark.slow
def test_training_draws_the_differential_maps_and_the_checkpoint_round_trips(diff_run):
    tmp, _, _ = diff_run
    acc = EventAccumulator(str(tmp / "run"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = set(acc.Tags()["images"])
    assert {f"attn/layer{layer}/head{h}" for layer in (0, 1) for h in (0, 1)} <= images
    assert "attn/layer0/head2" not in images  # n_head/2 maps per layer
    assert {"heads/entropy", "heads/induction"} <= images and "heads/learned_sink" not in images
    state = load_checkpoint(tmp / "run" / "checkpoints" / "last.pt")
    saved = state["config"]["model"]["attention"]
    assert (saved["name"], saved["gate"], saved["sinks"]) == ("diff", True, True)
    assert {"blocks.1.attn.lambda_q1", "blocks.1.attn.head_norm.weight", "blocks.1.attn.sinks"} <= set(state["model"])
    model = GPT(ModelConfig(**state["config"]["model"])).eval()
    model.load_state_dict(state["model"])  # strict: the λ vectors, head norm, gate and sinks all come back
    loaded = load_for_inference(tmp / "run" / "checkpoints" / "last.pt").model
    idx = torch.randint(0, 20, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx).logits, loaded(idx).logits)


@pytest.mark.slow
def test_generate_and_evaluate_commands_on_a_diff_checkpoint(diff_run, tmp_path):
    tmp, cfg, result = diff_run
    run = tmp / "run"
    texts = [generate_text(run, prompt="the quick ", temperature=0.0, max_new_tokens=30, kv_cache=on)[0]
             for on in (True, False)]  # 10 + 30 tokens: past block_size 16
    assert texts[0] == texts[1]
    png = tmp_path / "map.png"
    gen = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "generate.py"), f"ckpt={run}",
                          "prompt='the quick '", "max_new_tokens=5", "device=cpu", f"attention_map={png}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    with Image.open(png) as img:
        assert img.size == expected_grid(len("the quick "), 2, 2)[0]  # 2 layers x n_head/2 = 2 maps
    ev = subprocess.run([sys.executable, "-m", "gptmini.evaluate", f"ckpt={run}", "eval.window=8", "eval.device=cpu"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    model = load_for_inference(run, "cpu").model
    val = data_lib.prepare(cfg.data, cfg.data_dir, log=lambda _: None).val_tokens()
    loss = hand_loss(model, val, 8)
    assert f"val loss {loss:.4f}" in ev.stdout and abs(loss - result.final_val_loss) < 5e-5
    out = run_evaluation(EvaluateConfig(ckpt=str(run), eval=EvalOptions(window=8, device="cpu")), stream=None)
    assert out.loss == pytest.approx(loss, rel=1e-6)
    # The YAML's gate: false cannot be told from a typed false: the weights fix the gate, so it stays on.
    assert generate_text(run, "model/attention=diff", prompt="the quick ", temperature=0.0, max_new_tokens=30,
                         kv_cache=True)[0] == texts[0]
    with pytest.raises(ValueError, match=r"model/attention=sdpa cannot run weights trained with 'diff'"):
        generate_text(run, "model/attention=sdpa")
