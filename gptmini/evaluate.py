"""Evaluate a checkpoint on a whole split: `python -m gptmini.evaluate ckpt=RUN_DIR data=... eval.window=64`.

The loss is the mean cross-entropy over the split cut into non-overlapping windows of `eval.window` tokens,
every position with a next token counted exactly once (`gptmini.data.iter_windows`); each window starts with
an empty context, so a shorter window gives a higher loss. Training's final evaluation calls `evaluate_split`,
so the number a run prints at the end and the number this command prints are the same computation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F

from gptmini import data as data_lib
from gptmini.checkpoint import load_for_inference
from gptmini.config import DataConfig, EvaluateConfig
from gptmini.device import autocast, dtype_choice, resolve_device
from gptmini.pretrained import is_pretrained_ref
from gptmini.tokenizer import Tokenizer

EVAL_SPLITS = ("val", "train")  # eval.split: which prepared split is measured


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    tokens: np.ndarray,
    window: int,
    device: torch.device | str = "cpu",
    ctx: contextlib.AbstractContextManager | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> float:
    """Mean cross-entropy over the whole split in non-overlapping windows, every position counted once.

    `progress` shows a bar on a terminal: a whole split can take a minute, which should not look like a hang."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    n_batches = math.ceil(math.ceil((len(tokens) - 1) / window) / batch_size)
    batches = tqdm(data_lib.iter_windows(tokens, window, batch_size), total=n_batches, desc="evaluate",
                   unit="batch", leave=False, disable=not (progress and sys.stderr.isatty()))
    for x, y in batches:
        x, y = x.to(device), y.to(device)  # (b, window) each
        with ctx if ctx is not None else contextlib.nullcontext():
            logits = model(x).logits  # (b, window, vocab)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum")
        count += y.numel()
    model.train(was_training)
    return total.item() / max(1, count)  # one device sync, at the end


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    positions: int  # target positions scored
    window: int
    split: str
    checkpoint: Path


def run_evaluation(cfg: EvaluateConfig, stream: TextIO | None = sys.stdout) -> EvalResult:
    """Load the checkpoint, prepare (or reuse) the data, measure the split, print one line."""
    opts = cfg.eval
    if opts.split not in EVAL_SPLITS:
        raise ValueError(f"eval.split={opts.split!r} is unknown; valid: {', '.join(EVAL_SPLITS)}")
    if opts.batch_size < 1:
        raise ValueError(f"eval.batch_size={opts.batch_size} must be a positive integer")
    data_cfg, data_dir = cfg.data, cfg.data_dir
    if data_cfg is None and is_pretrained_ref(cfg.ckpt):
        raise ValueError(
            f"ckpt={cfg.ckpt} is pretrained weights, with no training data to fall back on; name the data to "
            f"measure, e.g. data=shakespeare data.path=input.txt"
        )
    device = resolve_device(opts.device, key="eval.device")
    dtype_choice(opts.dtype, device, key="eval.dtype")  # a bad value fails before the checkpoint loads
    model, tokenizer, saved, path = load_for_inference(cfg.ckpt, device)
    dtype, why = dtype_choice(opts.dtype, device, model.config.n_embd, key="eval.dtype")
    if opts.dtype == "auto" and stream is not None:
        print(f"dtype: {str(dtype).removeprefix('torch.')} ({why})", file=sys.stderr)
    block_size = model.config.block_size
    window = opts.window if opts.window is not None else block_size
    if not 1 <= window <= block_size:
        raise ValueError(f"eval.window={window} must be between 1 and the model's block_size={block_size}")

    prepared = checkpoint_data(data_cfg, data_dir, tokenizer, saved, opts.split)
    tokens = prepared.val_tokens() if opts.split == "val" else prepared.train_tokens()
    loss = evaluate_split(model, tokens, window, device, autocast(device, dtype), opts.batch_size,
                          progress=stream is not None)
    result = EvalResult(loss, math.exp(loss), len(tokens) - 1, window, opts.split, path)
    if stream is not None:
        stream.write(
            f"{opts.split} loss {loss:.4f}, perplexity {result.perplexity:.4f} (whole split, window {window}, "
            f"{result.positions:,} positions; {path})\n"
        )
    return result


def checkpoint_data(data_cfg: DataConfig | None, data_dir: str | None, tokenizer: Tokenizer, saved: dict,
                    split: str) -> data_lib.PreparedData:
    """The data a command measures a checkpoint on (evaluate, heads): the data named, read with the checkpoint's
    own tokenizer, or by default the data it was trained with; prepared (or reused) only once it passes."""
    if data_dir is None:
        data_dir = saved.get("data_dir", "data")
    if data_cfg is None:  # fall back on what the checkpoint was trained with
        known = {f.name for f in dataclasses.fields(DataConfig)}
        data_cfg = DataConfig(**{k: v for k, v in saved.get("data", {}).items() if k in known})
    else:
        data_cfg = other_text(data_cfg, data_dir, tokenizer, saved)
    return data_lib.prepare(data_cfg, data_dir, accept=lambda p: check_eval_data(p, tokenizer, data_cfg, data_dir,
                                                                                 split))


def other_text(data_cfg: DataConfig, data_dir: str, tokenizer: Tokenizer, saved: dict) -> DataConfig:
    """The data a user named, to be measured with the checkpoint's own tokenizer: a char model reads other text
    through its training vocabulary (characters it never saw are an error naming them). Preparing other text into
    the folder of the run's own training data would replace that data: refused, naming the fix."""
    trained, trained_dir = saved.get("data", {}), saved.get("data_dir", "data")
    corpus = ("source", "path", "url", "hub_name", "hub_subset")
    if data_cfg.name == trained.get("name") and str(data_dir) == str(trained_dir) and \
            any(getattr(data_cfg, k) != trained.get(k) for k in corpus):
        raise ValueError(
            f"data.name={data_cfg.name!r} in data_dir={str(data_dir)!r} holds the data this checkpoint was trained "
            f"on; preparing other text there would replace it: add data.name=<another name>"
        )
    spec = tokenizer.spec()
    if spec["kind"] == "char" and data_cfg.tokenizer == "char":
        return dataclasses.replace(data_cfg, vocabulary=spec["chars"])
    return data_cfg


def check_eval_data(prepared: data_lib.PreparedData, tokenizer: Tokenizer, data_cfg: DataConfig, data_dir: str,
                    split: str) -> None:
    """Asked before the data replaces a prepared dataset: data this command refuses never changes what is there."""
    if prepared.tokenizer.spec() != tokenizer.spec():
        raise ValueError(
            f"data {data_cfg.name!r} in {data_dir!r} is tokenized differently from the checkpoint's tokenizer "
            f"({tokenizer!r}); evaluate on the data the model was trained with, or data prepared with its tokenizer"
        )
    n_tokens = prepared.meta[f"{split}_tokens"]
    if n_tokens < 2:
        raise ValueError(f"the {split} split of {data_cfg.name!r} has {n_tokens} tokens; nothing to score")


if __name__ == "__main__":
    from gptmini.cli import run_command

    run_command("evaluate", run_evaluation)
