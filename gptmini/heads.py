"""What did the heads learn? `python -m gptmini.heads ckpt=RUN_DIR` prints a score per layer and head and writes
`heads.png` (one layers x heads grid per metric, values in the cells, with colour scales).

The probe is fixed, so two runs of the command (or two checkpoints of one run) are measured on the same text:
`heads.probe_rows` windows of `heads.probe_tokens` tokens from the start of the checkpoint's validation split
(or of `data=...`), or the text of `prompt=...`. The induction score uses `heads.induction_len` random tokens
repeated twice, drawn from `heads.seed`. The metrics are defined in `gptmini.head_metrics`.
    python -m gptmini.heads ckpt=runs/first
    python -m gptmini.heads ckpt=gpt2 prompt="'The cat sat on the mat. The cat sat on the mat.'" out=gpt2_heads.png
"""

from __future__ import annotations

import io
import sys
from typing import TextIO

import numpy as np
import torch

from gptmini.checkpoint import load_for_inference
from gptmini.config import HeadsConfig
from gptmini.device import resolve_device
from gptmini.evaluate import checkpoint_data
from gptmini.head_metrics import HeadReport, format_table, measure_heads, report_image
from gptmini.model import GPT
from gptmini.paths import check_output_file, write_atomic
from gptmini.pretrained import is_pretrained_ref
from gptmini.tokenizer import Tokenizer


def run_heads(cfg: HeadsConfig, stream: TextIO | None = sys.stdout) -> HeadReport:
    """Load the checkpoint, build the fixed probe, measure every head, print the table, write the picture."""
    if cfg.out:
        check_output_file(cfg.out, "out", reads=(cfg.ckpt,))
    if cfg.prompt is None and cfg.data is None and is_pretrained_ref(cfg.ckpt):
        raise ValueError(
            f"ckpt={cfg.ckpt} is pretrained weights, with no validation text to probe; give the probe text with "
            f"prompt='...' or name the data, e.g. data=text data.path=corpus.txt data.tokenizer=tiktoken"
        )
    device = resolve_device(cfg.heads.device, key="heads.device")
    model, tokenizer, saved, path = load_for_inference(cfg.ckpt, device)
    block = model.config.block_size
    n = cfg.heads.induction_len
    if n is not None and 2 * n > block:
        raise ValueError(f"heads.induction_len={n} repeated twice is longer than the model's block_size={block}; "
                         f"use at most {block // 2}")
    probe = probe_ids(cfg, model, tokenizer, saved)
    report = measure_heads(model, probe, n, cfg.heads.induction_batch, cfg.heads.seed)
    if stream is not None:
        stream.write(f"heads of {path}: probe {probe.size(0)} x {probe.size(1)} tokens, induction on random tokens "
                     f"repeated twice\n{format_table(report)}\n")
    if cfg.out:
        png = io.BytesIO()
        report_image(report).save(png, format="PNG")
        write_atomic(cfg.out, png.getvalue(), "out")
        if stream is not None:
            stream.write(f"wrote {cfg.out}\n")
    return report


def probe_ids(cfg: HeadsConfig, model: GPT, tokenizer: Tokenizer, saved: dict) -> torch.Tensor:
    """The probe batch (rows, T): the prompt's tokens (its last block_size), or consecutive windows of the
    validation split from its start; the same every time."""
    opts, block = cfg.heads, model.config.block_size
    T = min(opts.probe_tokens, block)
    if cfg.prompt is not None:
        ids = tokenizer.encode(cfg.prompt)[-block:]
        if len(ids) < 2:
            raise ValueError(f"prompt={cfg.prompt!r} is {len(ids)} token(s); the probe needs at least 2")
        return torch.tensor([ids])
    tokens = validation_tokens(cfg, tokenizer, saved)
    rows = min(opts.probe_rows, len(tokens) // T)
    if rows < 1:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than heads.probe_tokens={T}; "
                         f"lower heads.probe_tokens or give prompt='...'")
    windows = np.asarray(tokens[: rows * T], dtype=np.int64).reshape(rows, T)
    return torch.from_numpy(windows)  # (rows, T)


def validation_tokens(cfg: HeadsConfig, tokenizer: Tokenizer, saved: dict) -> np.ndarray:
    """The val split of `data=...`, else of the data the checkpoint was trained with (prepared or reused)."""
    return checkpoint_data(cfg.data, cfg.data_dir, tokenizer, saved, "val").val_tokens()


if __name__ == "__main__":
    from gptmini.cli import run_command

    run_command("heads", run_heads)
