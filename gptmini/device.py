"""Devices, precision and hardware facts: which accelerator, which backend (ROCm or CUDA), its peak FLOPs.

ROCm builds of PyTorch expose AMD GPUs under the `cuda` device name; `torch.version.hip` tells them apart.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from gptmini.config import DEVICES, DTYPE_NAMES, check_choice

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names live with the settings (gptmini.config)

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


def resolve_device(requested: str = "auto", key: str = "train.device") -> torch.device:
    """auto picks cuda (NVIDIA or AMD ROCm), then mps, then cpu. `key` is the setting's name in messages."""
    check_choice(key, requested, DEVICES)  # TrainConfig's check; generate and evaluate arrive here unchecked
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}=cuda but no CUDA or ROCm GPU is visible to this torch build")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{key}=mps but MPS is not available on this machine")
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
    return DeviceInfo(device, f"CPU, {describe_cpu()}", "cpu")


# ----------------------------------------------------------------------------------------------------------
# Native bfloat16: where bf16 matmuls run in hardware, rather than converted to fp32 and back (slower than fp32)

_X86_BF16 = ("avx512_bf16", "amx_bf16")  # the names in torch.cpu.get_capabilities() and in /proc/cpuinfo flags
_ARM_BF16 = ("bf16", "sve_bf16")  # torch.cpu.get_capabilities(); /proc/cpuinfo says "bf16" in its Features
CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def cpu_capabilities() -> dict[str, object]:
    """The CPU's features as torch detects them (cpuinfo), or from /proc/cpuinfo on a torch without that API."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        with contextlib.suppress(Exception):
            return dict(get())
    caps: dict[str, object] = {"architecture": platform.machine()}
    with contextlib.suppress(OSError):
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features"):
                caps.update(dict.fromkeys(value.split(), True))
            elif key == "model name":
                caps.setdefault("cpu_name", value.strip())
    return caps


def cpu_has_native_bf16(caps: dict[str, object] | None = None) -> bool:
    """True on CPUs with bf16 dot-product instructions: x86 AVX512-BF16 or AMX-BF16, Arm BF16 (e.g. Neoverse
    V1/V2, Apple M2 and later). Elsewhere (e.g. AVX2-only AMD EPYC) bf16 matmuls are emulated and slow."""
    caps = cpu_capabilities() if caps is None else caps
    return any(bool(caps.get(flag)) for flag in (*_X86_BF16, *_ARM_BF16))


def describe_cpu(caps: dict[str, object] | None = None) -> str:
    """The CPU's model name and the vector extension torch dispatches to, e.g. "AMD EPYC (AVX2)"."""
    caps = cpu_capabilities() if caps is None else caps
    name = str(caps.get("cpu_name") or platform.processor() or platform.machine() or "unknown CPU")
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def gpu_has_native_bf16(device: torch.device) -> bool:
    """True on CUDA and ROCm GPUs that compute bf16 in hardware (NVIDIA Ampere and later, AMD CDNA2 and later)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no `including_emulation`
        return torch.cuda.is_bf16_supported()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 matmuls natively, and why, in words (for a start-up note)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cuda"
        if gpu_has_native_bf16(device):
            return True, f"GPU {name} supports bf16"
        return False, f"GPU {name} has no native bf16"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return True, f"CPU {describe_cpu()} has native bf16"
        return False, f"CPU {describe_cpu()} has no native bf16"
    return False, f"{device.type} is not known to gain from bf16"


# bf16 autocast on a CPU with native bf16 pays only for wide enough layers: for narrow ones the casts of weights,
# activations and gradients cost more than the faster matmuls save. Measured side by side on a 2-core AMX Xeon
# (benchmarks/train.py --dtypes float32 bfloat16, 4 layers, 16 x 128 tokens; benchmarks/RESULTS.md, "CPU speed"):
# n_embd 128 is 7-18 % slower in bf16, 160 1.1x faster, 192 1.3x, 256 1.7x, 384 (the baby model) 2.1x.
CPU_BF16_MIN_EMBD = 192


def cpu_autocast_dtype(native: bool, n_embd: int | None, min_embd: int = CPU_BF16_MIN_EMBD) -> tuple[str, str]:
    """What `dtype=auto` picks on a CPU, from plain facts: whether it computes bf16 natively and the model's width;
    ("bfloat16" | "float32", the reason in words). Without a width (no model yet) it stays in float32."""
    if not native:
        return "float32", "no native bf16 on this CPU"
    if n_embd is None:
        return "float32", "model width unknown"
    if n_embd < min_embd:
        return "float32", f"native bf16, but n_embd={n_embd} < {min_embd}: too narrow for bf16 to pay"
    return "bfloat16", f"native bf16 and n_embd={n_embd} >= {min_embd}"


def dtype_choice(requested: str, device: torch.device, n_embd: int | None = None,
                 key: str = "train.dtype") -> tuple[torch.dtype, str]:
    """The dtype `requested` means on `device` for a model `n_embd` wide, and why, in words (for a start-up line).

    auto: bf16 where the GPU supports it, else fp16 (with a gradient scaler); on CPUs bf16 autocast where the CPU
    computes bf16 natively and the model is wide enough (`cpu_autocast_dtype`), else fp32; fp32 on MPS.
    """
    if requested != "auto":
        check_choice(key, requested, ("auto", *DTYPE_NAMES))
        return DTYPES[requested], f"set by {key}={requested}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU supports bf16"
        return torch.float16, "auto: the GPU has no bf16"
    if device.type == "cpu":
        name, why = cpu_autocast_dtype(cpu_has_native_bf16(), n_embd)
        return DTYPES[name], f"auto: {why}"
    return torch.float32, f"auto: {device.type} is not known to gain from bf16"


def resolve_dtype(requested: str, device: torch.device, key: str = "train.dtype",
                  n_embd: int | None = None) -> torch.dtype:
    """The dtype of `dtype_choice` alone."""
    return dtype_choice(requested, device, n_embd, key)[0]


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


def available_memory(device: torch.device) -> int | None:
    """Bytes that a new allocation on `device` can still get: free GPU memory, or the OS's MemAvailable on Linux
    CPUs; None where neither can be read (the caller then skips its bound rather than guessing)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------------------------------------
# Peak memory: what a run needed at most, so that runs can be compared on memory as well as on loss and speed

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_memory_bytes(device: torch.device) -> int | None:
    """The most memory this process has held on `device` since the last `reset_peak_memory` (or its start).

    GPUs (CUDA and ROCm): the peak of tensors allocated by PyTorch (`max_memory_allocated`), the figure that
    decides whether a bigger batch fits. CPU: the peak resident set size (Linux `VmHWM`; elsewhere
    `ru_maxrss`), which counts everything the process holds, Python and the data included. None where neither
    can be read (MPS keeps no peak): a report then shows the figure as unknown rather than a wrong one.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type != "cpu":
        return None
    with contextlib.suppress(OSError, ValueError):
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)  # macOS: bytes; Linux/BSD: kB


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak afresh, so that a run's figure is its training, not the data preparation or
    model loading before it. On Linux CPUs this resets `VmHWM` (`/proc/self/clear_refs`); where that is not
    allowed the peak simply keeps counting from the process start (never an understatement)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        with contextlib.suppress(OSError):
            _PROC_CLEAR_REFS.write_text("5")
