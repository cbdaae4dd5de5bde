"""Devices, precision and hardware facts: which accelerator, which backend (ROCm or CUDA), its peak FLOPs.

ROCm builds of PyTorch expose AMD GPUs under the `cuda` device name; `torch.version.hip` tells them apart.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense peak TFLOP/s (half precision with tensor/matrix cores, fp32) by GPU name, from the vendors' data sheets.
# Matched by substring against the device name, first match wins, so more specific names come first.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    # AMD Instinct (ROCm)
    ("MI355X", 2500.0, 157.3),
    ("MI325X", 1307.4, 163.4),
    ("MI300X", 1307.4, 163.4),
    ("MI300A", 980.6, 122.6),
    ("MI250X", 191.5, 47.9),  # per GCD: PyTorch sees each of the two dies as one device
    ("MI250", 181.0, 45.3),  # per GCD
    ("MI210", 181.0, 45.3),
    ("MI100", 184.6, 23.1),
    # AMD Radeon (ROCm)
    ("Radeon PRO W7900", 122.6, 61.3),
    ("RX 7900 XTX", 122.8, 61.4),
    ("RX 7900 XT", 103.0, 51.5),
    # NVIDIA
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),
    ("GH200", 989.4, 66.9),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A10G", 125.0, 31.2),
    ("A10", 125.0, 31.2),
    ("L40S", 362.1, 91.6),
    ("L4", 121.0, 30.3),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
]


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    backend: str  # e.g. "ROCm 6.2 (HIP 6.2.41133), AMD Instinct MI300X" or "CUDA 12.8, NVIDIA H100" or "CPU"
    name: str  # the accelerator's name as the driver reports it ("cpu" on CPU)


def resolve_device(requested: str = "auto") -> torch.device:
    """auto picks cuda (NVIDIA or AMD ROCm), then mps, then cpu."""
    if requested not in DEVICES:
        raise ValueError(f"train.device={requested!r} is unknown; valid: {', '.join(DEVICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA or ROCm GPU is visible to this torch build")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("train.device=mps but MPS is not available on this machine")
    return torch.device(requested)


def describe(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.version.hip:
            backend = f"ROCm (HIP {torch.version.hip}), {name}"
        else:
            backend = f"CUDA {torch.version.cuda}, {name}"
        return DeviceInfo(device, backend, name)
    if device.type == "mps":
        return DeviceInfo(device, f"MPS, {platform.machine()}", "mps")
    return DeviceInfo(device, f"CPU, {platform.processor() or platform.machine()}", "cpu")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the GPU supports it, else fp16 (with a gradient scaler); fp32 on CPU and MPS."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if requested not in DTYPES:
        raise ValueError(f"train.dtype={requested!r} is unknown; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for half dtypes; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(name: str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s for MFU, or None when the device is not in the table (MFU is then reported as unknown)."""
    for key, half, single in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return (single if dtype == torch.float32 else half) * 1e12
    return None


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's 12·L·C·T (PaLM, app. B)."""
    return 6 * n_params + 12 * n_layer * n_embd * block_size


def mfu(tokens_per_s: float, flops_token: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_s * flops_token / peak
