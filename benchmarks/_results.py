"""Shared by the benchmark scripts: the machine description and section-wise updates of RESULTS.md.

Each benchmark owns one section of RESULTS.md, delimited by HTML comments, and replaces only that section,
so running one benchmark never erases another's figures.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import torch

from gptmini.device import cpu_has_native_bf16, describe_cpu

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """One line naming the device, the torch build and the date."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.version.hip:
            backend = f"ROCm/HIP {torch.version.hip}"
        else:
            backend = f"CUDA {torch.version.cuda}"
        device = f"{name} ({backend})"
    else:
        bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
        device = f"CPU {describe_cpu()}, {bf16}, {os.cpu_count()} cores"
    today = datetime.date.today().isoformat()
    return f"{device}; torch {torch.__version__}; Python {platform.python_version()}; {today}"


def write_section(key: str, markdown: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section `key` of RESULTS.md with `markdown`."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by the scripts in `benchmarks/`.\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
