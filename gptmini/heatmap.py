"""Attention weights as heat-map images, rendered with torch alone (no plotting library).

A small built-in colour map and nearest-neighbour upscaling; TensorBoard stores the images as PNG and
`gptmini.attention_maps` pastes them into labelled grids (with `gptmini.drawing`'s colour scale beside them).

Two scalings, because each answers a different question: `row` (each query row divided by its largest weight)
shows *where* every token looks, even in long contexts where all weights are small; `absolute` shows the
probabilities themselves, so a diffuse head looks dim. Weights that go negative (differential attention,
linear attention without a softmax) are drawn with a diverging map, white at zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALES = ("row", "absolute")
SIGNED_TOL = 1e-6  # a weight below -SIGNED_TOL makes a map signed (softmax weights are never negative)

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
# Diverging map for signed weights: blue (negative) -> white (zero) -> red (positive).
_DIVERGING = torch.tensor(
    [
        [0.020, 0.188, 0.380],
        [0.263, 0.576, 0.765],
        [0.820, 0.898, 0.941],
        [1.000, 1.000, 1.000],
        [0.992, 0.859, 0.780],
        [0.839, 0.376, 0.302],
        [0.404, 0.000, 0.122],
    ]
)


def _interpolate(x: Tensor, anchors: Tensor) -> Tensor:
    """(H, W) values in [0, 1] -> (3, H, W) colours interpolated between the anchor rows."""
    x = x.clamp(0, 1) * (len(anchors) - 1)
    lo = x.floor().long().clamp(max=len(anchors) - 2)
    frac = (x - lo).unsqueeze(-1)  # (H, W, 1)
    rgb = anchors[lo] * (1 - frac) + anchors[lo + 1] * frac  # (H, W, 3)
    return rgb.permute(2, 0, 1)


def colorize(values: Tensor, signed: bool = False) -> Tensor:
    """(H, W) values in [0, 1] (signed: in [-1, 1], zero white) -> (3, H, W) RGB floats in [0, 1]."""
    if signed:
        return _interpolate((values + 1) / 2, _DIVERGING)
    return _interpolate(values, _COLORMAP)


def is_signed(weights: Tensor) -> bool:
    """True when some weight is negative: then no probability reading applies and the diverging map is used."""
    return bool((weights < -SIGNED_TOL).any())


def scaled(weights: Tensor, scale: str = "row", signed: bool | None = None) -> tuple[Tensor, bool]:
    """(Tq, Tk) weights -> (values in [0, 1], or [-1, 1] when signed; signed).

    `row`: each row divided by its largest |weight|. `absolute`: the weights as they are, clamped to [0, 1]
    (signed: [-1, 1]), so the colours mean the same probability in every map. `signed` forces the diverging
    reading (maps drawn side by side share one colour scale); None decides from these weights.
    """
    if scale not in SCALES:
        raise ValueError(f"attention scale {scale!r} is unknown; valid: {', '.join(SCALES)}")
    w = weights.detach().float().cpu()
    signed = is_signed(w) if signed is None else signed
    if scale == "row":
        w = w / w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return w.clamp(-1 if signed else 0, 1), signed


def heatmap(weights: Tensor, min_size: int = 256, scale: str = "row", signed: bool | None = None) -> Tensor:
    """One head's (Tq, Tk) attention weights -> a (3, H, W) image, each weight a square block of pixels."""
    w, signed = scaled(weights, scale, signed)
    factor = max(1, -(-min_size // max(w.shape)))  # ceil division
    w = w.repeat_interleave(factor, dim=0).repeat_interleave(factor, dim=1)
    return colorize(w, signed)


def heatmap_grid(weights: Tensor, min_size: int = 128, pad: int = 4, scale: str = "row") -> Tensor:
    """(H, Tq, Tk) weights of one layer -> one (3, h, H*w + gaps) image with the heads side by side."""
    signed = is_signed(weights)  # one colour map for the whole layer
    tiles = [heatmap(w, min_size, scale, signed) for w in weights]
    gap = torch.ones(3, tiles[0].shape[1], pad)
    parts = [tiles[0]]
    for tile in tiles[1:]:
        parts += [gap, tile]
    return torch.cat(parts, dim=2)


def gradient(height: int, width: int, signed: bool = False) -> Tensor:
    """A vertical colour bar (3, height, width): the top row is the map's maximum, the bottom row its minimum."""
    top_to_bottom = torch.linspace(1, -1 if signed else 0, height)[:, None].expand(height, width)  # (h, w)
    return colorize(top_to_bottom, signed)
