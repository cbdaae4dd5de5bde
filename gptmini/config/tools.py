"""Settings of the commands that read runs and checkpoints without training them: export, compare and heads.

Kept apart from the training settings in `gptmini.config` (which re-exports them) so that each file reads in one
sitting; like the rest of the package, it imports nothing of gptmini outside `gptmini.config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gptmini.config.data import DataConfig
from gptmini.config.values import DTYPE_NAMES, MAX_SEED, check_choice, check_int


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


@dataclass
class HeadsOptions:
    """How `python -m gptmini.heads` probes the heads (the metrics: gptmini.head_metrics)."""

    probe_tokens: int = 128  # tokens per probe row (cut to the model's block_size)
    probe_rows: int = 4  # rows of validation text, consecutive windows from the split's start
    induction_len: int | None = None  # random tokens repeated twice for the induction score (default min(32, block/2))
    induction_batch: int = 4  # rows of repeated random tokens
    seed: int = 0  # of the random tokens: the same seed, the same probe
    device: str = "auto"

    def __post_init__(self) -> None:
        check_int("heads.probe_tokens", self.probe_tokens, 2)
        for name in ("probe_rows", "induction_batch"):
            check_int(f"heads.{name}", getattr(self, name), 1)
        check_int("heads.induction_len", self.induction_len, 1, none_ok=True, note=" (min(32, block_size / 2))")
        check_int("heads.seed", self.seed, 0, MAX_SEED)


@dataclass
class HeadsConfig:
    """Everything `python -m gptmini.heads` reads: a checkpoint, the probe text, and where the picture goes."""

    ckpt: str = "???"  # a run directory, a checkpoint file, a GPT-2 name or a Hugging Face folder
    out: str | None = "heads.png"  # the metric grids as one PNG (null: print the table only)
    prompt: str | None = None  # probe this text instead of the validation split
    data: DataConfig | None = None  # default: the data the checkpoint was trained on
    data_dir: str | None = None  # default: the checkpoint's data_dir
    heads: HeadsOptions = field(default_factory=HeadsOptions)
