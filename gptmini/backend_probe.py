"""Which attention kernel really runs: PyTorch picks an SDPA backend per call, silently.

`scaled_dot_product_attention` dispatches to flash, memory-efficient, cuDNN or the plain math kernel depending on
the device, dtype, head size, mask and dropout, and falls back to math (slow, O(T^2) memory) without a word; on
ROCm, consumer Radeon GPUs get the fast AOTriton kernels only when TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1 was
set before torch started (the package sets it by default, see gptmini/__init__.py). `probe_attention_kernel` runs
one forward of the model's own attention module under the profiler and reads back the aten op the dispatcher
chose; the trainer logs it on GPUs and writes it to TensorBoard.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from gptmini.device import autocast

# The aten op the SDPA dispatcher ends in -> the backend's name. Checked in this order: a call that reaches a
# fused kernel shows that kernel's op, the math fallback shows only the last one.
SDPA_BACKENDS: tuple[tuple[str, str], ...] = (
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "flash (CPU)"),
    ("aten::_scaled_dot_product_flash_attention", "flash"),
    ("aten::_scaled_dot_product_cudnn_attention", "cuDNN"),
    ("aten::_scaled_dot_product_efficient_attention", "memory-efficient"),
    ("aten::_scaled_dot_product_fused_attention_overrideable", "fused (device-specific)"),
    ("aten::_efficient_attention_forward", "memory-efficient"),
    ("aten::_flash_attention_forward", "flash"),
    ("aten::_scaled_dot_product_attention_math", "math"),
)
FLEX_OPS = ("FlexAttention", "flex_attention")  # FlexAttention's own op: a kernel compiled for the mask
ROCM_EXPERIMENTAL = "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"


@dataclass(frozen=True)
class KernelReport:
    backend: str  # flash | memory-efficient | cuDNN | math | flash (CPU) | flex | none (explicit matmul + softmax)
    op: str | None  # the aten op it was read from
    detail: str  # the shape and dtype it was probed with

    @property
    def is_math_fallback(self) -> bool:
        return self.backend == "math"

    def line(self) -> str:
        source = f" ({self.op})" if self.op else ""
        return f"attention kernel: {self.backend}{source}; {self.detail}"


def backend_from_ops(op_names: Iterable[str]) -> tuple[str, str | None]:
    """The backend a profiled call used, from the names of the ops it ran."""
    names = set(op_names)
    for op, backend in SDPA_BACKENDS:
        if op in names:
            return backend, op
    flex = next((n for n in sorted(names) if any(f in n for f in FLEX_OPS)), None)
    if flex is not None:
        return "flex", flex
    return "none (explicit matmul + softmax)", None


def profiled_op_names(fn: Callable[[], object]) -> list[str]:
    """The names of every op `fn` runs (CPU-side dispatch events: they name the kernel on every device)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name for event in prof.events()]


def probe_attention_kernel(
    attention: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    seq_len: int,
    training: bool = True,
    record: Callable[[Callable[[], object]], list[str]] = profiled_op_names,
) -> KernelReport:
    """Run `attention` (one layer of the model, its own variant) once on a (1, seq_len, C) input in `dtype`
    autocast, as training would (grad on, dropout as configured), and report the SDPA backend it used.

    The random-number state is restored afterwards, so probing never changes what training computes."""
    n_embd = attention.n_embd
    detail = (f"{getattr(attention, 'name', type(attention).__name__)}, {str(dtype).removeprefix('torch.')}, "
              f"T={seq_len}, head_dim={attention.head_dim}, {attention.n_head} heads, "
              f"dropout {attention.attn_dropout.p if training else 0.0}")
    was_training = attention.training

    def call() -> None:
        x = torch.randn(1, seq_len, n_embd, device=device, requires_grad=training)
        with torch.set_grad_enabled(training), autocast(device, dtype):
            attention(x)

    devices = [device] if device.type == "cuda" else []
    try:
        attention.train(training)
        with torch.random.fork_rng(devices=devices):
            names = record(call)
    finally:
        attention.train(was_training)
    backend, op = backend_from_ops(names)
    compiled = getattr(attention, "compiled_backend", None)  # a variant's flag (gptmini.attention.Attention)
    if op is None and compiled is not None:
        backend = compiled  # compiled (GPUs): the profiler sees Inductor's generated kernels, not the variant's op
    return KernelReport(backend, op, detail)


def math_fallback_warning(report: KernelReport, device: torch.device) -> str | None:
    """One line when a GPU runs attention on the math kernel, with what to try; None otherwise."""
    if not report.is_math_fallback or device.type != "cuda":
        return None
    hint = "a head_dim of 64 or 128, bf16/fp16, and no dropout on attention allow the fused kernels"
    if torch.version.hip and os.environ.get(ROCM_EXPERIMENTAL) != "1":
        hint = f"on ROCm set {ROCM_EXPERIMENTAL}=1 before torch starts (gptmini does unless you set it); " + hint
    return f"warning: attention runs PyTorch's math kernel (slow, O(T^2) memory) for {report.detail}; {hint}"
