"""Run logging: a log file, TensorBoard scalars and text, and attention weights drawn as heat-map images.

Heat maps are rendered with torch alone (a small built-in colour map, nearest-neighbour upscaling), so they
need no plotting library; TensorBoard stores them as PNG.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Anchor colours of a perceptually ordered map (dark blue -> teal -> yellow), interpolated linearly.
_COLORMAP = torch.tensor(
    [
        [0.267, 0.005, 0.329],
        [0.283, 0.141, 0.458],
        [0.254, 0.265, 0.530],
        [0.207, 0.372, 0.553],
        [0.164, 0.471, 0.558],
        [0.128, 0.567, 0.551],
        [0.135, 0.659, 0.518],
        [0.267, 0.749, 0.441],
        [0.478, 0.821, 0.318],
        [0.741, 0.873, 0.150],
        [0.993, 0.906, 0.144],
    ]
)


def colorize(values: Tensor) -> Tensor:
    """(H, W) values in [0, 1] -> (3, H, W) RGB floats in [0, 1]."""
    x = values.clamp(0, 1) * (len(_COLORMAP) - 1)
    lo = x.floor().long().clamp(max=len(_COLORMAP) - 2)
    frac = (x - lo).unsqueeze(-1)  # (H, W, 1)
    rgb = _COLORMAP[lo] * (1 - frac) + _COLORMAP[lo + 1] * frac  # (H, W, 3)
    return rgb.permute(2, 0, 1)


def heatmap(weights: Tensor, min_size: int = 256) -> Tensor:
    """One head's (Tq, Tk) attention weights -> a (3, H, W) image, each weight a square block of pixels.

    Rows are normalised by their maximum so that long contexts with small weights stay visible.
    """
    w = weights.detach().float().cpu()
    w = w / w.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    scale = max(1, -(-min_size // max(w.shape)))  # ceil division
    w = w.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)
    return colorize(w)


def heatmap_grid(weights: Tensor, min_size: int = 128, pad: int = 4) -> Tensor:
    """(H, Tq, Tk) weights of one layer -> one (3, h, H*w + gaps) image with the heads side by side."""
    tiles = [heatmap(w, min_size) for w in weights]
    gap = torch.ones(3, tiles[0].shape[1], pad)
    parts = [tiles[0]]
    for tile in tiles[1:]:
        parts += [gap, tile]
    return torch.cat(parts, dim=2)


def setup_logger(run_dir: Path, name: str = "gptmini") -> logging.Logger:
    """A logger writing to <run_dir>/train.log and to stderr; one file handler per run directory."""
    logger = logging.getLogger(f"{name}.{run_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        run_dir.mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(fmt)
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(file_handler)
        logger.addHandler(console)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


class TensorBoard:
    """One SummaryWriter per run directory; a no-op on non-zero ranks."""

    def __init__(self, log_dir: Path, enabled: bool = True) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int, code: bool = True) -> None:
        if self.writer is not None:
            body = "```\n" + text.replace("```", "'''") + "\n```" if code else text
            self.writer.add_text(tag, body, step)

    def attention(self, attentions: list[Tensor], step: int) -> None:
        """Per layer: one image per head `attn/layer{l}/head{h}` and the grid `attn/layer{l}/all`."""
        if self.writer is None:
            return
        for layer, weights in enumerate(attentions):
            heads = weights[0]  # (H, Tq, Tk) of the first sequence
            for h, w in enumerate(heads):
                self.writer.add_image(f"attn/layer{layer}/head{h}", heatmap(w), step)
            self.writer.add_image(f"attn/layer{layer}/all", heatmap_grid(heads), step)

    def hparams(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """Flattened config and final metrics, written into this run's own events file."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in _flatten(config).items()}
        exp, ssi, sei = hparams(flat, metrics)
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
