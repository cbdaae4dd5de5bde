"""The attention-kernel probe: op names -> backend (mocked), a real probe on CPU, the warning, the trainer's report,
and the ROCm environment default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from model_helpers import tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import make_config

from gptmini import run_setup
from gptmini.attention import build_attention
from gptmini.backend_probe import (
    ROCM_EXPERIMENTAL,
    KernelReport,
    backend_from_ops,
    math_fallback_warning,
    probe_attention_kernel,
)
from gptmini.checkpoint import load_checkpoint
from gptmini.trainer import train

CUDA = torch.device("cuda")


@pytest.mark.parametrize("op, backend", [
    ("aten::_scaled_dot_product_flash_attention", "flash"),
    ("aten::_scaled_dot_product_efficient_attention", "memory-efficient"),
    ("aten::_scaled_dot_product_cudnn_attention", "cuDNN"),
    ("aten::_scaled_dot_product_attention_math", "math"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "flash (CPU)"),
])
def test_the_op_the_dispatcher_chose_names_the_backend(op, backend):
    # The public entry point shows up in every trace; the kernel's own op decides.
    assert backend_from_ops(["aten::linear", "aten::scaled_dot_product_attention", op, "aten::view"]) == (backend, op)


def test_a_fused_kernel_wins_over_the_ops_around_it_and_no_sdpa_is_said():
    names = ["aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_flash_attention"]
    assert backend_from_ops(names)[0] == "flash"
    assert backend_from_ops(["aten::matmul", "aten::softmax"]) == ("none (explicit matmul + softmax)", None)
    assert backend_from_ops(["aten::linear", "FlexAttentionAutogradOp"]) == ("flex", "FlexAttentionAutogradOp")


def fake_record(names: list[str]):
    def record(fn):
        fn()  # the probe's call still runs, as under the real profiler
        return names
    return record


def test_probe_reports_what_the_recorded_ops_say_and_leaves_no_trace():
    attn = build_attention(tiny_config("sdpa", dropout=0.5)).eval()
    rng = torch.get_rng_state()
    report = probe_attention_kernel(attn, torch.device("cpu"), torch.float32, 16,
                                    record=fake_record(["aten::_scaled_dot_product_attention_math"]))
    assert report.backend == "math" and report.is_math_fallback
    assert "sdpa, float32, T=16, head_dim=8, 4 heads, dropout 0.5" == report.detail
    assert torch.equal(torch.get_rng_state(), rng) and not attn.training  # RNG and mode restored


def test_compiled_flex_is_reported_as_flex_though_its_kernels_have_generated_names():
    attn = build_attention(tiny_config("flex")).eval()
    report = probe_attention_kernel(attn, torch.device("cpu"), torch.float32, 16, training=False,
                                    record=fake_record(["Torch-Compiled Region", "triton_tem_fused_0"]))
    assert report.backend == "flex" and report.op is None and not report.is_math_fallback
    mha = probe_attention_kernel(build_attention(tiny_config("mha")), torch.device("cpu"), torch.float32, 16,
                                 record=fake_record(["Torch-Compiled Region", "triton_tem_fused_0"]))
    assert mha.backend == "none (explicit matmul + softmax)"  # only flex's own module gets the name


def test_real_probe_on_cpu_finds_the_sdpa_call_and_none_for_explicit_attention():
    sdpa = probe_attention_kernel(build_attention(tiny_config("sdpa")), torch.device("cpu"), torch.float32, 16)
    assert sdpa.op is not None and sdpa.op.startswith("aten::_scaled_dot_product_")
    assert sdpa.line().startswith(f"attention kernel: {sdpa.backend} ({sdpa.op}); sdpa, float32, T=16")
    mha = probe_attention_kernel(build_attention(tiny_config("mha")), torch.device("cpu"), torch.float32, 16)
    assert mha.backend == "none (explicit matmul + softmax)" and mha.op is None
    flex = probe_attention_kernel(build_attention(tiny_config("flex")), torch.device("cpu"), torch.float32, 16,
                                  training=False)  # CPU flex runs inference only
    assert flex.backend == "flex"


def test_math_fallback_warns_on_gpus_only_and_names_the_rocm_switch(monkeypatch):
    math = KernelReport("math", "aten::_scaled_dot_product_attention_math", "sdpa, bfloat16, T=256, head_dim=8")
    flash = KernelReport("flash", "aten::_scaled_dot_product_flash_attention", "sdpa, bfloat16, T=256, head_dim=64")
    assert math_fallback_warning(flash, CUDA) is None and math_fallback_warning(math, torch.device("cpu")) is None
    monkeypatch.setattr(torch.version, "hip", None)
    cuda_line = math_fallback_warning(math, CUDA)
    assert cuda_line.startswith("warning: attention runs PyTorch's math kernel") and "head_dim=8" in cuda_line
    assert "\n" not in cuda_line and ROCM_EXPERIMENTAL not in cuda_line
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setenv(ROCM_EXPERIMENTAL, "0")
    assert f"set {ROCM_EXPERIMENTAL}=1 before torch starts" in math_fallback_warning(math, CUDA)


def test_the_trainer_logs_the_kernel_and_writes_it_to_tensorboard_without_changing_the_run(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 100)
    overrides = ("model.dropout=0.2", "train.max_iters=4", "train.final_eval=false", "train.eval_interval=0",
                 "train.attn_interval=0", "train.sample_tokens=0")
    train(make_config(corpus, tmp_path / "data", *overrides), tmp_path / "plain")
    monkeypatch.setattr(run_setup, "wants_kernel_probe", lambda device: True)  # as on a GPU
    train(make_config(corpus, tmp_path / "data", *overrides), tmp_path / "probed")
    plain, probed = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["model"] for r in ("plain", "probed"))
    assert all(torch.equal(plain[k], probed[k]) for k in plain)  # the probe's dropout draw shifted no random number
    log = (tmp_path / "probed" / "train.log").read_text()
    assert "attention kernel: " in log and "attention kernel: " not in (tmp_path / "plain" / "train.log").read_text()
    acc = EventAccumulator(str(tmp_path / "probed"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "system/attention_kernel/text_summary" in acc.Tags()["tensors"]


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_importing_gptmini_enables_rocm_experimental_kernels_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != ROCM_EXPERIMENTAL}
    if preset is not None:
        env[ROCM_EXPERIMENTAL] = preset
    # Record the variable at the moment torch starts loading: it only counts if it was set by then.
    code = (
        "import importlib.abc, os, sys\n"
        "class Spy(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and not hasattr(self, 'seen'):\n"
        f"            self.seen = os.environ.get('{ROCM_EXPERIMENTAL}')\n"
        "spy = Spy()\n"
        "sys.meta_path.insert(0, spy)\n"
        "import gptmini\n"
        "print(spy.seen)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
