"""Settings of the commands that read runs and checkpoints without training them: export and compare.

Kept apart from the training settings in `gptmini.config` (which re-exports them) so that each file reads in one
sitting; like the rest of the package, it imports nothing of gptmini outside `gptmini.config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gptmini.config.values import DTYPE_NAMES, check_choice


@dataclass
class ExportConfig:
    """Everything `python -m gptmini.export` reads: a checkpoint and the Hugging Face folder to write."""

    ckpt: str = "???"  # a run directory (its best checkpoint, else its last) or a checkpoint file
    out: str = "???"  # a new (or empty) folder
    dtype: str = "float32"  # of the tensors in model.safetensors: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, DTYPE_NAMES)


@dataclass
class CompareConfig:
    """What `python -m gptmini.compare PATH...` reads: the runs (bare arguments become `paths`), what to measure."""

    paths: list[str] = field(default_factory=list)  # run directories, sweep directories or globs of them
    target: float | None = None  # also report each run's time to reach this val loss
    baseline: str | None = None  # the group p-values are computed against (its label, a key=value, or a value)
    out: str = "."  # folder for comparison.md, comparison.csv, comparison.png (default: the current folder)

    def __post_init__(self) -> None:
        if self.target is not None and not math.isfinite(self.target):
            raise ValueError(f"target={self.target} must be a finite number (a val loss)")
