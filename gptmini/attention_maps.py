"""Attention weights for a prompt, drawn as a labelled grid of heat maps (rows: layers, columns: heads).

"Who looks at whom, and how much": row i of a heat map is token i's attention over the tokens before it, each
row scaled to its own maximum (`scale="row"`, brightest: the token it attends to most) or the probabilities as
they are (`scale="absolute"`); signed weights get a diverging map. A colour scale beside each row of maps says
which. The future, masked, is grey. Key tokens are written above the maps one upright character under the other,
so that every label reads as it does on the left. Drawn with Pillow (which TensorBoard's image summaries need
anyway), so no plotting library is required.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from gptmini.drawing import SCALE_W, colour_scale, scale_ticks
from gptmini.heatmap import heatmap, is_signed
from gptmini.model import GPT
from gptmini.paths import write_atomic
from gptmini.run_log import TensorBoard, attention_tag
from gptmini.tokenizer import Tokenizer

LABEL_CHARS = 8  # token labels are cut to this many characters
CHAR_W, CHAR_H = 6, 11  # Pillow's default bitmap font
MARGIN = LABEL_CHARS * CHAR_W + 8  # room for the query labels on the left
TOP = LABEL_CHARS * CHAR_H + 6  # room for the key labels on top, one character per line
TITLE_H = CHAR_H + 6
GAP = 10
MIN_TOKEN_PX = CHAR_H + 1  # each token gets at least a label's height, so no two labels overlap
MIN_CELL_PX = 256  # short prompts still get a heat map this large
MAX_PIXELS = 80_000_000  # about 240 MB of RGB: refuse larger grids rather than exhaust memory
MASKED = (224, 224, 224)  # future positions, which causal attention never sees


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Printable, short labels: whitespace made visible, long tokens cut."""
    labels = []
    for i in ids:
        text = tokenizer.decode([i]).replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·")
        labels.append(text[:LABEL_CHARS] or "''")  # the default font has no glyph for ∅
    return labels


def select(n: int, chosen: list[int] | None, what: str) -> list[int]:
    """The layer or head indices to draw: all of them by default, else `chosen`, each checked."""
    if chosen is None:
        return list(range(n))
    chosen = list(chosen)
    bad = [c for c in chosen if not 0 <= c < n]
    if bad or not chosen:
        raise ValueError(f"attention_{what}={chosen} {'selects nothing' if not chosen else 'is out of range'}; "
                         f"valid: indices 0..{n - 1}")
    return chosen


def grid_size(n_layers: int, n_heads: int, cell: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid image."""
    width = MARGIN + n_heads * (cell + GAP) + SCALE_W
    height = TOP + n_layers * (cell + TITLE_H + GAP)
    return width, height


def cell_size(n_tokens: int) -> int:
    """Side in pixels of one heat map: a whole number of pixels per token, enough for a label, >= MIN_CELL_PX."""
    scale = max(MIN_TOKEN_PX, -(-MIN_CELL_PX // n_tokens))
    return n_tokens * scale


def render_grid(
    weights: list[torch.Tensor], labels: list[str], layers: list[int], heads: list[int], scale: str = "row"
) -> Image.Image:
    """weights: per layer (H, T, T). Returns an RGB image with a heat map per (layer, head) and a colour scale
    beside each layer's row of maps."""
    T = len(labels)
    cell = cell_size(T)
    step = cell // T
    size = grid_size(len(layers), len(heads), cell)
    if size[0] * size[1] > MAX_PIXELS:
        raise ValueError(
            f"the attention map of {T} tokens x {len(layers)} layers x {len(heads)} heads would be "
            f"{size[0]}x{size[1]} pixels; use a shorter prompt or choose attention_layers=[...] / attention_heads=[...]"
        )
    img = Image.new("RGB", size, "white")
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # (T, T) keys after the query
    future = future.repeat_interleave(step, 0).repeat_interleave(step, 1)  # (cell, cell)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    signed = any(is_signed(weights[layer][heads]) for layer in layers)
    bar = colour_scale(cell, scale_ticks(scale, signed), signed)
    for r, layer in enumerate(layers):
        top = TOP + r * (cell + TITLE_H + GAP)
        for c, head in enumerate(heads):
            left = MARGIN + c * (cell + GAP)
            rgb = heatmap(weights[layer][head], min_size=cell, scale=scale, signed=signed)  # (3, cell, cell)
            tile = (rgb.permute(1, 2, 0) * 255).round().byte()  # (cell, cell, 3)
            tile[future] = torch.tensor(MASKED, dtype=torch.uint8)
            img.paste(Image.fromarray(tile.numpy()), (left, top + TITLE_H))
            draw.text((left, top), f"layer {layer} head {head}", fill="black", font=font)
        img.paste(bar, (MARGIN + len(heads) * (cell + GAP), top + TITLE_H))
        for i, label in enumerate(labels):  # query tokens down the left of each row
            draw.text((4, top + TITLE_H + i * step + (step - CHAR_H) // 2), label, fill="black", font=font)
    for c in range(len(heads)):  # key tokens along the top: upright characters, one under the other
        left = MARGIN + c * (cell + GAP)
        for j, label in enumerate(labels):
            x = left + j * step + step // 2
            for k, char in enumerate(label):
                y = TOP - 4 - (len(label) - k) * CHAR_H  # the last character just above the map
                draw.text((x, y), char, fill="black", font=font, anchor="mt")
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
    scale: str = "row",
) -> list[torch.Tensor]:
    """Forward idx (1, T), then write the attention grid as a PNG and/or to TensorBoard; return the weights.

    A prompt longer than `block_size` is cut to its last `block_size` tokens, the context the model sees.
    TensorBoard gets the labelled grid (`attn/prompt`), one heat map per chosen layer and head
    (`attn/layer{l}/head{h}`, real indices) and the prompt's tokens as text (`attn/tokens`). `scale`: `row` or
    `absolute` (gptmini.heatmap.scaled).
    """
    layers = select(model.config.n_layer, layers, "layers")
    idx = idx[:1, -model.config.block_size :]  # (1, T)
    out = model(idx, return_weights=True)
    weights = [w[0].float().cpu() for w in out.attentions]  # per layer (H, T, T)
    heads = select(weights[0].size(0), heads, "heads")  # the maps returned: n_head/2 for differential attention
    labels = token_labels(tokenizer, idx[0].tolist())
    grid = render_grid(weights, labels, layers, heads, scale) if png_path or tb_dir else None
    if png_path:
        png = io.BytesIO()
        grid.save(png, format="PNG")
        write_atomic(png_path, png.getvalue(), "attention_map")
    if tb_dir:
        tb = TensorBoard(Path(tb_dir))
        try:
            tb.image("attn/prompt", np.array(grid), 0, dataformats="HWC")
            for layer in layers:
                for head in heads:
                    tb.heatmap(attention_tag(layer, head), weights[layer][head], 0, scale)
            tb.text("attn/tokens", " | ".join(labels), 0)
        finally:
            tb.close()
    return weights
