"""What did the heads learn? Per-head scores in the manner of TransformerLens / CircuitsVis, built in.

For every layer and head, on a fixed probe batch (rows of validation text):

- `entropy`: of each query's attention row, divided by log(number of keys it can see), so 1 is uniform over
  the visible context and 0 is one key, whatever the position (an unnormalised entropy grows with position);
- `sink`: mass on the first position, where many heads park attention they do not need;
- `previous`: mass on the token just before the query; `self`: mass on the query's own position;
- `distance`: mean attention distance in tokens, sum_j w_ij (i - j);
- `induction` (Olsson et al., 2022), on random tokens repeated twice: the mean weight from each token of the
  second copy to the position just after that token's first occurrence (where an induction head looks to
  predict what comes next);
- `learned_sink`: the share a learned sink logit takes (`learned_sink_share`), for variants that have one.

Query 0 is left out of every mean: it sees only itself, so every head would score 1 on sink and self there.

Weights that are not probabilities (a variant returning signed weights, e.g. differential attention, or
unnormalised implied weights, e.g. linear attention) follow one rule: `sink`, `previous`, `self` and
`induction` are the weights as returned (a negative previous-token score says the head subtracts that token),
while `entropy` and `distance`, which need a distribution, are computed on each row's |w| / sum |w|.
`HeadReport.notes` says so for each layer it applies to.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from gptmini.attention import causal_keep_mask
from gptmini.drawing import font, value_grid
from gptmini.heatmap import SIGNED_TOL
from gptmini.run_log import TensorBoard

if TYPE_CHECKING:  # Pillow loads when a picture is drawn (train.attn_interval): not on every run's start-up
    from PIL import Image

# name -> how the table and the summary call it
METRICS = {"entropy": "entropy", "sink": "sink", "previous": "previous-token", "self": "self",
           "distance": "distance", "induction": "induction", "learned_sink": "learned sink"}
# A head is named in the summary when its score reaches this (the strongest few per metric).
NOTABLE = {"induction": 0.4, "previous": 0.5, "sink": 0.5, "self": 0.5, "learned_sink": 0.5}
NOTABLE_PER_METRIC = 3
SUM_TOL = 1e-3  # a visible row summing this far from 1 is not a probability distribution
DEFAULT_INDUCTION_LEN = 32
DEFAULT_INDUCTION_BATCH = 4


@dataclass
class HeadReport:
    """Scores per metric, each (n_layer, heads returned: n_head, or n_head/2 for diff); `notes` explain layers
    whose weights are not probabilities."""

    scores: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)
    signed: bool = False  # some layer returned negative weights


def weight_kind(w: Tensor, keep: Tensor) -> str:
    """`signed`, `unnormalised` or `probabilities` for one layer's weights (B, H, T, T) under keep (T, T)."""
    if bool((w < -SIGNED_TOL).any()):
        return "signed"
    sums = w.masked_fill(~keep, 0).sum(-1)  # (B, H, T)
    return "unnormalised" if bool(((sums - 1).abs() > SUM_TOL).any()) else "probabilities"


def layer_scores(w: Tensor, keep: Tensor) -> dict[str, Tensor]:
    """One layer's weights (B, H, T, T), keep (T, T) bool (True: key visible to query) -> metric -> (H,)."""
    T = w.size(-1)
    w = w.float().masked_fill(~keep, 0.0)  # (B, H, T, T)
    rows = torch.arange(1, T)  # queries 1..T-1 (query 0 sees only itself)
    mag = w.abs()
    p = mag / mag.sum(-1, keepdim=True).clamp_min(1e-12)  # (B, H, T, T) rows of |w| summing to 1
    visible = keep.sum(-1).float()  # (T,) keys each query sees
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (B, H, T)
    wide = rows[visible[rows] > 1]  # rows with more than one visible key: the normalised entropy is defined
    pos = torch.arange(T, dtype=torch.float32)
    distance = (p * (pos[:, None] - pos[None, :]).clamp_min(0)).sum(-1)  # (B, H, T)
    return {
        "entropy": (entropy[..., wide] / visible[wide].log()).mean((0, 2)),
        "sink": w[..., rows, 0].mean((0, 2)),
        "previous": w[..., rows, rows - 1].mean((0, 2)),
        "self": w[..., rows, rows].mean((0, 2)),
        "distance": distance[..., rows].mean((0, 2)),
    }


def learned_sink_share(attn: nn.Module, w: Tensor, keep: Tensor) -> Tensor | None:
    """The share of attention a learned sink takes, per head (H,); None for a module without learned sinks.

    The one place to extend for `model.attention.sinks`: it activates when the attention module exposes a
    `sinks` attribute (per-head sink logits, as in gpt-oss) and assumes the convention that the returned weights
    leave the sink out, so each row's shortfall from 1 is what the sink took. A variant whose weights are not one
    softmax per head (`weights_are_probabilities` False) has no such reading: None.
    """
    if getattr(attn, "sinks", None) is None or not getattr(attn, "weights_are_probabilities", True):
        return None  # no sinks, or weights that combine maps (diff's A1 - λA2): no row shortfall to read
    rows = torch.arange(1, w.size(-1))
    share = 1 - w.float().masked_fill(~keep, 0.0).sum(-1)  # (B, H, T)
    return share[..., rows].mean((0, 2))


def induction_tokens(vocab_size: int, length: int, batch: int, seed: int) -> Tensor:
    """(batch, 2 * length) rows of `length` random tokens repeated twice; within a row the tokens are distinct
    when the vocabulary allows, so "that token's first occurrence" is one position."""
    g = torch.Generator().manual_seed(seed)
    if vocab_size >= length:
        first = torch.stack([torch.randperm(vocab_size, generator=g)[:length] for _ in range(batch)])
    else:
        first = torch.randint(vocab_size, (batch, length), generator=g)
    return torch.cat([first, first], dim=1)  # (B, 2n)


def induction_score(w: Tensor, length: int) -> Tensor:
    """w (B, H, 2n, 2n) on induction_tokens -> (H,): query n + i (the second copy of token i) to key i + 1."""
    i = torch.arange(length)
    return w.float()[..., length + i, i + 1].mean((0, 2))


def model_weights(model: nn.Module, idx: Tensor) -> list[Tensor]:
    """Per layer (B, H, T, T) float weights on the CPU; a one-line error for a variant that returns none."""
    out = model(idx.to(next(model.parameters()).device), return_weights=True).attentions
    for layer, w in enumerate(out):
        if w is None:
            name = getattr(model.blocks[layer].attn, "name", type(model.blocks[layer].attn).__name__)
            raise ValueError(f"attention variant {name!r} returns no attention weights (layer {layer}), which head "
                             f"diagnostics need; run the checkpoint with model/attention=mha")
    return [w.detach().float().cpu() for w in out]


def keep_mask(model: nn.Module, layer: int, T: int) -> Tensor:
    """(T, T) bool: which keys each query of this layer can see (the variant's own mask: swa has a window)."""
    attn = model.blocks[layer].attn
    if hasattr(attn, "keep_mask"):
        return attn.keep_mask(T, T, torch.device("cpu")).cpu()
    return causal_keep_mask(T, T, torch.device("cpu"))


@torch.no_grad()
def measure_heads(model: nn.Module, probe: Tensor, induction_len: int | None = None,
                  induction_batch: int = DEFAULT_INDUCTION_BATCH, seed: int = 0) -> HeadReport:
    """Every metric for every layer and head of `model` on probe (T,) or (B, T) token ids; eval mode throughout,
    the model's training mode restored. Deterministic: the induction tokens come from `seed`.

    Every rank of a sharded (FSDP) model must call it: the forward passes are collective."""
    probe = probe[None] if probe.dim() == 1 else probe  # (B, T)
    if probe.size(1) < 2:
        raise ValueError(f"the probe has {probe.size(1)} token(s); head diagnostics need at least 2")
    n = induction_len or min(DEFAULT_INDUCTION_LEN, model.config.block_size // 2)
    was_training = model.training
    model.eval()
    try:
        probe_w = model_weights(model, probe)
        rand_w = model_weights(model, induction_tokens(model.config.vocab_size, n, induction_batch, seed))
    finally:
        model.train(was_training)
    per_layer: dict[str, list[Tensor]] = {name: [] for name in METRICS}
    notes, signed = [], False
    for layer, (w, rw) in enumerate(zip(probe_w, rand_w, strict=True)):
        keep = keep_mask(model, layer, w.size(-1))
        for name, value in layer_scores(w, keep).items():
            per_layer[name].append(value)
        per_layer["induction"].append(induction_score(rw, n))
        share = learned_sink_share(model.blocks[layer].attn, w, keep)
        per_layer["learned_sink"].append(share if share is not None else torch.full((w.size(1),), float("nan")))
        kind = weight_kind(w, keep) if share is None else "probabilities"
        signed |= kind == "signed"
        if kind != "probabilities":
            notes.append(f"layer {layer}: the weights are {kind}, not probabilities; entropy and distance are "
                         f"computed on |w| / sum|w| per row, sink, previous-token, self and induction are the "
                         f"weights as returned")
    scores = {name: torch.stack(values) for name, values in per_layer.items()}  # (L, H) each
    if bool(scores["learned_sink"].isnan().all()):
        del scores["learned_sink"]  # no learned sinks in this model
    return HeadReport(scores, notes, signed)


def notable_heads(report: HeadReport) -> list[str]:
    """The strongest heads per metric, e.g. `L1H3 induction 0.81`, `L0H0 previous-token 0.93`."""
    found = []
    for name, threshold in NOTABLE.items():
        if name not in report.scores:
            continue
        values = report.scores[name]  # (L, H)
        order = values.flatten().nan_to_num(float("-inf")).argsort(descending=True)[:NOTABLE_PER_METRIC]
        for flat in order.tolist():
            layer, head = divmod(flat, values.size(1))
            if values[layer, head] >= threshold:
                found.append(f"L{layer}H{head} {METRICS[name]} {values[layer, head]:.2f}")
    return found


def format_table(report: HeadReport) -> str:
    """One row per head, one column per metric; then the notable heads and the notes."""
    names = list(report.scores)
    widths = [max(len(METRICS[n]), 6) + 2 for n in names]
    lines = ["head  " + "".join(f"{METRICS[n]:>{w}}" for n, w in zip(names, widths, strict=True))]
    L, H = report.scores[names[0]].shape
    for layer in range(L):
        for head in range(H):
            values = (report.scores[n][layer, head].item() for n in names)
            cells = "".join(f"{v:>{w}.3f}" for v, w in zip(values, widths, strict=True))
            lines.append(f"{f'L{layer}H{head}':<6}{cells}")
    found = notable_heads(report)
    lines.append("notable: " + (", ".join(found) if found else "none above the thresholds"))
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def metric_image(report: HeadReport, name: str) -> Tensor:
    """One metric's layers x heads grid (values in the cells, a colour scale) as a (3, h, w) uint8 tensor."""
    values = report.scores[name]  # (L, H)
    finite = values[values.isfinite()]
    signed = bool((finite < -SIGNED_TOL).any())
    if name == "distance":
        low, high = 0.0, max(float(finite.max()) if finite.numel() else 1.0, 1.0)
    else:
        low, high = (-1.0, 1.0) if signed else (0.0, 1.0)
    img = value_grid(values, f"{METRICS[name]} (layers x heads)", low, high, signed,
                     "{:.1f}" if name == "distance" else "{:.2f}")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, h, w)


def log_head_diagnostics(tb: TensorBoard, model: nn.Module, probe_ids: Tensor, step: int,
                         induction_len: int | None = None, seed: int = 0) -> HeadReport:
    """At `train.attn_interval`: one TensorBoard image per metric (`heads/<metric>`) and the table with the
    notable heads as text (`heads/summary`). Call it on every rank (the forwards are collective); only a
    writing TensorBoard writes."""
    report = measure_heads(model, probe_ids, induction_len, seed=seed)
    for name in report.scores:
        tb.image(f"heads/{name}", metric_image(report, name), step)
    tb.text("heads/summary", format_table(report), step)
    return report


def report_image(report: HeadReport, columns: int = 2) -> Image.Image:
    """Every metric's grid in one picture (`heads.png`), `columns` grids per row, the notable heads below."""
    from PIL import Image, ImageDraw

    tiles = [Image.fromarray(metric_image(report, name).permute(1, 2, 0).numpy()) for name in report.scores]
    w = max(t.width for t in tiles) + 12
    h = max(t.height for t in tiles) + 12
    rows = -(-len(tiles) // columns)
    found = notable_heads(report)
    text = ["notable: " + (", ".join(found) if found else "none above the thresholds")] + report.notes
    lines = [part for line in text for part in textwrap.wrap(line, max(20, columns * w // 6 - 2))]
    img = Image.new("RGB", (columns * w, rows * h + 14 * len(lines) + 6), "white")
    for k, tile in enumerate(tiles):
        img.paste(tile, ((k % columns) * w + 6, (k // columns) * h + 6))
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        draw.text((6, rows * h + 2 + 14 * k), line, fill="black", font=font())
    return img
