"""The GPU lane: `python -m pytest -m gpu` on a machine with a CUDA or ROCm GPU. Elsewhere every test here skips.

What only a GPU can show: every attention variant forward and backward in bf16 against `mha` in fp32 (flex with
its compiled kernel), the attention-kernel probe for real (a fused kernel, not math, at GPT-2's head size), the
compiled decode path giving the eager path's tokens, and a short compiled bf16 training run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import tiny_config
from test_train import make_config

from gptmini.attention import ATTENTION_REGISTRY, build_attention, weight_compatible_variants
from gptmini.backend_probe import probe_attention_kernel
from gptmini.checkpoint import load_checkpoint
from gptmini.config import GenerateConfig
from gptmini.generate_command import run_generation
from gptmini.trainer import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU (python -m pytest -m gpu)"),
]
CUDA = torch.device("cuda")
# 4 heads of 64 (GPT-2's head size): every fused kernel and flex's Inductor kernel serve it.
GPU_SHAPE = dict(n_embd=256, n_head=4, block_size=128)


def canonical_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.float() for n, p in module.named_parameters()}
    module._to_canonical(grads, "")
    return grads


@pytest.mark.parametrize("name", weight_compatible_variants())
def test_every_full_attention_variant_in_bf16_matches_mha_in_fp32(name):
    torch.manual_seed(0)
    module = build_attention(tiny_config(name, **GPU_SHAPE)).to(CUDA).train()
    ref = build_attention(tiny_config("mha", **GPU_SHAPE)).to(CUDA).train()
    ref.load_state_dict(module.state_dict())
    x = torch.randn(2, 128, 256, device=CUDA)
    target = torch.randn_like(x)
    x_bf16, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(x_bf16)[0]
    y_ref = ref(x_ref)[0]  # fp32
    (y.float() * target).sum().backward()
    (y_ref * target).sum().backward()
    scale = y_ref.abs().max()
    assert (y.float() - y_ref).abs().max() < 3e-2 * scale, name
    assert (x_bf16.grad - x_ref.grad).abs().max() < 3e-2 * x_ref.grad.abs().max(), name
    mine, theirs = canonical_grads(module), canonical_grads(ref)
    for key in theirs:
        assert (mine[key] - theirs[key]).abs().max() < 5e-2 * theirs[key].abs().max(), (name, key)


@pytest.mark.parametrize("name", [n for n, cls in ATTENTION_REGISTRY.items() if not cls.weight_compatible])
def test_variants_of_their_own_run_forward_and_backward_in_bf16(name):
    """gqa, swa, mla, linear, diff: no mha reference for their weights; finite outputs and gradients in bf16."""
    module = build_attention(tiny_config(name, window=16, **GPU_SHAPE)).to(CUDA).train()
    x = torch.randn(2, 128, 256, device=CUDA, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(x)[0]
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_the_probe_finds_a_fused_kernel_at_gpt2_head_size():
    module = build_attention(tiny_config("sdpa", dropout=0.0, **GPU_SHAPE)).to(CUDA)
    report = probe_attention_kernel(module, CUDA, torch.bfloat16, 128)
    assert report.backend in ("flash", "cuDNN", "memory-efficient"), report.line()


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    return path


def test_a_short_compiled_bf16_run_learns_and_reports_its_kernel(tmp_path, corpus):
    cfg = make_config(corpus, tmp_path / "data", "train.device=cuda", "train.dtype=bfloat16", "train.compile=true",
                      "model.n_embd=128", "model.n_head=2", "train.max_iters=40", "train.eval_interval=20")
    result = train(cfg, tmp_path / "run")
    assert result.step == 40 and result.final_val_loss < 2.0
    assert "attention kernel: " in (tmp_path / "run" / "train.log").read_text()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 40


def test_compiled_decoding_gives_the_eager_tokens(tmp_path, corpus):
    train(make_config(corpus, tmp_path / "data", "train.device=cuda", "train.max_iters=30"), tmp_path / "run")
    common = dict(ckpt=str(tmp_path / "run"), prompt="the quick", max_new_tokens=40, temperature=0.0, device="cuda")
    eager = run_generation(GenerateConfig(**common), stream=None)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = run_generation(GenerateConfig(**common, compile=True), stream=None)
    assert compiled == eager  # 9 prompt + 40 new tokens > block 32: the decode step, then the sliding window
    assert counters["frames"]["ok"] == 3  # prefill, decode step, full window: each compiled once, no recompiles


def test_the_chunked_loss_in_bf16_matches_the_plain_loss():
    from gptmini import GPT

    torch.manual_seed(0)
    model = GPT(tiny_config("sdpa", vocab_size=50257, vocab_multiple=64, **GPU_SHAPE)).to(CUDA)
    idx = torch.randint(0, 50257, (4, 128), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = model(idx, idx).loss
        plain.backward()
        want = model.lm_head.weight.grad.clone()
        model.zero_grad()
        fused = model(idx, idx, loss_chunk=128).loss
        fused.backward()
    assert abs(fused.item() - plain.item()) < 1e-2
    assert (model.lm_head.weight.grad - want).abs().max() < 5e-2 * want.abs().max()
