"""Pillow drawing shared by the attention pictures: a colour scale with its labels, and a grid of numbers.

A heat map without a colour scale cannot be read ("is yellow 0.9 or 0.09?"), so every picture gptmini draws
carries one. Pillow only (TensorBoard's image summaries need it anyway): no plotting library is required.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from gptmini.heatmap import colorize, gradient

if TYPE_CHECKING:  # Pillow loads when a picture is drawn: a run that draws none never imports it
    from PIL import Image, ImageFont

BAR_W = 12  # width of the colour bar itself
SCALE_W = BAR_W + 56  # the bar, a gap and its tick labels
FONT_H = 11


def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    from PIL import ImageFont

    return ImageFont.load_default()


def colour_scale(height: int, ticks: list[str], signed: bool = False) -> Image.Image:
    """A (SCALE_W x height) colour bar, labelled top to bottom with `ticks` (evenly spaced; first = maximum)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SCALE_W, height), "white")
    bar = (gradient(max(height - FONT_H, 1), BAR_W, signed).permute(1, 2, 0) * 255).round().byte().numpy()
    img.paste(Image.fromarray(bar), (0, FONT_H // 2))
    draw = ImageDraw.Draw(img)
    span = max(height - FONT_H, 1) - 1
    for i, tick in enumerate(ticks):
        y = FONT_H // 2 + round(i * span / max(len(ticks) - 1, 1))
        draw.line([(BAR_W, y), (BAR_W + 3, y)], fill="black")
        draw.text((BAR_W + 8, y - FONT_H // 2), tick, fill="black", font=font())  # apart from the tick mark
    return img


def scale_ticks(scale: str, signed: bool) -> list[str]:
    """The labels of a heat map's colour scale, top to bottom, for `gptmini.heatmap.scaled`'s scalings."""
    if scale == "row":
        return ["+row max", "0", "-row max"] if signed else ["row max", "0"]
    return ["1", "0", "-1"] if signed else ["1", "0.5", "0"]


def with_colour_scale(rgb: torch.Tensor, scale: str, signed: bool) -> np.ndarray:
    """A (3, H, W) heat map -> an (H, W + SCALE_W, 3) uint8 image with its colour scale on the right."""
    from PIL import Image

    tile = (rgb.permute(1, 2, 0) * 255).round().byte().numpy()  # (H, W, 3)
    img = Image.new("RGB", (tile.shape[1] + SCALE_W, tile.shape[0]), "white")
    img.paste(Image.fromarray(tile), (0, 0))
    img.paste(colour_scale(tile.shape[0], scale_ticks(scale, signed), signed), (tile.shape[1] + 4, 0))
    return np.array(img)


CELL_W, CELL_H = 44, 22  # one head's cell in a value grid: room for "-0.93"
LABEL_W = 30  # room for "L11" on the left


def value_grid(values: torch.Tensor, title: str, low: float, high: float, signed: bool = False,
               fmt: str = "{:.2f}") -> Image.Image:
    """values (L, H) -> a layers x heads grid, each cell coloured on [low, high] with its value written in it,
    a title above and a colour scale on the right. NaN cells (not measured) are grey and read "n/a"."""
    from PIL import Image, ImageDraw

    L, H = values.shape
    width, height = LABEL_W + H * CELL_W + 6 + SCALE_W, 2 * FONT_H + 6 + L * CELL_H
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((2, 1), title, fill="black", font=font())
    top = 2 * FONT_H + 4
    span = max(high - low, 1e-12)
    unit = (values - low) / span * (2 if signed else 1) - (1 if signed else 0)  # (L, H) in [0, 1] or [-1, 1]
    colours = (colorize(unit.nan_to_num(0.0), signed).permute(1, 2, 0) * 255).round().byte()  # (L, H, 3)
    for h in range(H):
        draw.text((LABEL_W + h * CELL_W + CELL_W // 2 - 6, FONT_H + 2), f"H{h}", fill="black", font=font())
    for layer in range(L):
        y = top + layer * CELL_H
        draw.text((2, y + (CELL_H - FONT_H) // 2), f"L{layer}", fill="black", font=font())
        for h in range(H):
            v = float(values[layer, h])
            x = LABEL_W + h * CELL_W
            fill = (200, 200, 200) if v != v else tuple(int(c) for c in colours[layer, h])
            draw.rectangle([x, y, x + CELL_W - 2, y + CELL_H - 2], fill=fill)
            text = "n/a" if v != v else fmt.format(v)
            light = sum(fill) / 3 < 110  # white text on dark cells
            draw.text((x + 4, y + (CELL_H - FONT_H) // 2), text, fill="white" if light else "black", font=font())
    ticks = [fmt.format(high), fmt.format((low + high) / 2), fmt.format(low)]
    img.paste(colour_scale(L * CELL_H, ticks, signed), (LABEL_W + H * CELL_W + 6, top))
    return img
