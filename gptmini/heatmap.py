"""Attention weights as heat-map images, rendered with torch alone (no plotting library).

A small built-in colour map and nearest-neighbour upscaling; TensorBoard stores the images as PNG and
`gptmini.attention_maps` pastes them into labelled grids.
"""

from __future__ import annotations

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


