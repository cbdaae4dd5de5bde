"""Attention weights for a prompt, drawn as a labelled grid of heat maps (rows: layers, columns: heads).

"Who looks at whom, and how much": row i of a heat map is token i's attention over the tokens before it.
Drawn with Pillow (which TensorBoard's image summaries need anyway), so no plotting library is required.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from gptmini.logging import TensorBoard, heatmap
from gptmini.model import GPT
from gptmini.tokenizer import Tokenizer

LABEL_CHARS = 8  # token labels are cut to this many characters
CHAR_W, CHAR_H = 6, 11  # Pillow's default bitmap font
MARGIN = LABEL_CHARS * CHAR_W + 8  # room for the labels on the left and on top
TITLE_H = CHAR_H + 6
GAP = 10


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Printable, short labels: whitespace made visible, long tokens cut."""
    labels = []
    for i in ids:
        text = tokenizer.decode([i]).replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·")
        labels.append(text[:LABEL_CHARS] or "∅")
    return labels


def select(n: int, chosen: list[int] | None, what: str) -> list[int]:
    if chosen is None:
        return list(range(n))
    bad = [c for c in chosen if not 0 <= c < n]
    if bad:
        raise ValueError(f"attention_{what}={bad} out of range; valid: 0..{n - 1}")
    return list(chosen)


def grid_size(n_layers: int, n_heads: int, cell: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid image."""
    width = MARGIN + n_heads * (cell + GAP)
    height = MARGIN + n_layers * (cell + TITLE_H + GAP)
    return width, height


def cell_size(n_tokens: int) -> int:
    scale = max(4, -(-256 // n_tokens))  # at least 256 px per map and 4 px per token
    return n_tokens * scale


def render_grid(
    weights: list[torch.Tensor], labels: list[str], layers: list[int], heads: list[int]
) -> Image.Image:
    """weights: per layer (H, T, T). Returns an RGB image with a heat map per (layer, head)."""
    T = len(labels)
    cell = cell_size(T)
    step = cell // T
    img = Image.new("RGB", grid_size(len(layers), len(heads), cell), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for r, layer in enumerate(layers):
        top = MARGIN + r * (cell + TITLE_H + GAP)
        for c, head in enumerate(heads):
            left = MARGIN + c * (cell + GAP)
            rgb = heatmap(weights[layer][head], min_size=cell)  # (3, cell, cell)
            tile = (rgb.permute(1, 2, 0) * 255).round().byte().numpy()
            img.paste(Image.fromarray(tile), (left, top + TITLE_H))
            draw.text((left, top), f"layer {layer} head {head}", fill="black", font=font)
        # Query tokens down the left of each row.
        for i, label in enumerate(labels):
            y = top + TITLE_H + i * step + (step - CHAR_H) // 2
            draw.text((4, y), label, fill="black", font=font)
    # Key tokens along the top, written vertically.
    for c in range(len(heads)):
        left = MARGIN + c * (cell + GAP)
        for j, label in enumerate(labels):
            text_img = Image.new("RGB", (MARGIN - 4, CHAR_H), "white")
            ImageDraw.Draw(text_img).text((0, 0), label, fill="black", font=font)
            rotated = text_img.rotate(90, expand=True)
            img.paste(rotated, (left + j * step + (step - CHAR_H) // 2, 2))
    return img


@torch.no_grad()
def save_prompt_attention(
    model: GPT,
    tokenizer: Tokenizer,
    idx: torch.Tensor,
    png_path: str | Path | None,
    tb_dir: str | Path | None = None,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
) -> list[torch.Tensor]:
    """Forward idx (1, T), then write the attention grid as a PNG and/or TensorBoard images."""
    out = model(idx, return_weights=True)
    weights = [w[0].float().cpu() for w in out.attentions]  # per layer (H, T, T)
    layers = select(len(weights), layers, "layers")
    heads = select(weights[0].size(0), heads, "heads")
    if png_path:
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        labels = token_labels(tokenizer, idx[0].tolist())
        render_grid(weights, labels, layers, heads).save(png_path)
    if tb_dir:
        tb = TensorBoard(Path(tb_dir))
        tb.attention([weights[layer][heads][None] for layer in layers], step=0)
        tb.close()
    return weights
