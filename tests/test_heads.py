"""Head diagnostics (gptmini.head_metrics): exact scores on hand-built weights, the signed-weight rule, the
learned-sink hook, the TensorBoard images, and the heat maps' scalings and colour scales."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from model_helpers import tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from gptmini import GPT
from gptmini.attention import causal_keep_mask
from gptmini.drawing import SCALE_W
from gptmini.head_metrics import (
    HeadReport,
    format_table,
    induction_score,
    induction_tokens,
    layer_scores,
    log_head_diagnostics,
    measure_heads,
    notable_heads,
    report_image,
    weight_kind,
)
from gptmini.heatmap import colorize, heatmap, scaled
from gptmini.run_log import TensorBoard

T = 9
KEEP = causal_keep_mask(T, T, torch.device("cpu"))  # (T, T)
ROWS = torch.arange(1, T)


def previous_head() -> torch.Tensor:
    """(T, T): every query on the token before it (query 0, with nothing before it, on itself)."""
    w = torch.zeros(T, T)
    w[0, 0] = 1
    w[ROWS, ROWS - 1] = 1
    return w


def first_head() -> torch.Tensor:
    w = torch.zeros(T, T)
    w[:, 0] = 1
    return w


def uniform_head(keep: torch.Tensor = KEEP) -> torch.Tensor:
    return keep.float() / keep.sum(-1, keepdim=True)


def test_hand_built_heads_score_exactly():
    w = torch.stack([previous_head(), first_head(), uniform_head()])[None]  # (1, 3, T, T)
    s = layer_scores(w, KEEP)
    exact = {
        "previous": [1, 1 / (T - 1), None],  # the first head is on the previous token only for query 1
        "sink": [1 / (T - 1), 1, None],
        "entropy": [0, 0, 1],  # uniform over the visible keys is 1 at every position
        "self": [0, 0, None],
        "distance": [1, T / 2, (T / 2) / 2],  # query i: i away from the first token, i / 2 on average if uniform
    }
    for name, values in exact.items():
        for head, value in enumerate(values):
            if value is not None:
                assert s[name][head].item() == pytest.approx(value, abs=1e-6), (name, head)
    harmonic = sum(1 / (i + 1) for i in range(1, T)) / (T - 1)  # uniform: 1/(i+1) on each of sink, prev, self
    for name in ("sink", "previous", "self"):
        assert s[name][2].item() == pytest.approx(harmonic, abs=1e-6)
    assert weight_kind(w, KEEP) == "probabilities"


def test_entropy_is_normalised_by_the_keys_each_query_sees():
    """A sliding window of 3: uniform over the window is entropy 1, although the rows see 2 or 3 keys, not i+1."""
    keep = causal_keep_mask(T, T, torch.device("cpu"), window=3)
    s = layer_scores(uniform_head(keep)[None, None], keep)
    assert s["entropy"].item() == pytest.approx(1.0, abs=1e-6)
    half = torch.zeros(T, T)  # half on the previous token, half on itself: log 2 / log(visible)
    half[0, 0] = 1
    half[ROWS, ROWS] = half[ROWS, ROWS - 1] = 0.5
    expected = sum(np.log(2) / np.log(i + 1) for i in range(1, T)) / (T - 1)
    assert layer_scores(half[None, None], KEEP)["entropy"].item() == pytest.approx(expected, abs=1e-6)


def test_induction_score_on_a_hand_built_induction_head():
    n = 5
    w = torch.zeros(2 * n, 2 * n)
    w[torch.arange(n), 0] = 1  # first copy: on the first token
    w[n + torch.arange(n), torch.arange(n) + 1] = 1  # second copy: just after the first occurrence
    assert induction_score(w[None, None], n).item() == pytest.approx(1.0, abs=1e-6)
    shifted = w.roll(-1, dims=1)  # one position early: the first occurrence itself, not the next token
    assert induction_score(shifted[None, None], n).item() == pytest.approx(0.0, abs=1e-6)
    keep = causal_keep_mask(2 * n, 2 * n, torch.device("cpu"))
    assert induction_score(uniform_head(keep)[None, None], n).item() < 0.15


def test_induction_tokens_repeat_distinct_tokens_deterministically():
    x = induction_tokens(50, 8, 3, seed=7)
    assert x.shape == (3, 16) and torch.equal(x[:, :8], x[:, 8:])
    assert all(len(set(row[:8].tolist())) == 8 for row in x)
    assert torch.equal(x, induction_tokens(50, 8, 3, seed=7)) and not torch.equal(x, induction_tokens(50, 8, 3, 8))


def test_signed_weights_keep_their_sign_and_entropy_reads_magnitudes():
    """A differential-style head: +1 on the previous token, -0.5 on the first. The position scores are the
    weights as returned; entropy and distance are those of |w| / sum |w| per row."""
    w = previous_head()
    w[2:, 0] = -0.5
    s = layer_scores(w[None, None], KEEP)
    assert weight_kind(w[None, None], KEEP) == "signed"
    assert s["previous"].item() == pytest.approx(1.0, abs=1e-6)
    assert s["sink"].item() == pytest.approx((1 - 0.5 * (T - 2)) / (T - 1), abs=1e-6)  # query 1: +1, then -0.5
    p = torch.tensor([1 / 1.5, 0.5 / 1.5])  # rows 2..: |w| is 1 and 0.5
    row_entropy = -(p * p.log()).sum().item()
    expected = sum(row_entropy / np.log(i + 1) for i in range(2, T)) / (T - 1)  # row 1 has one key: entropy 0
    assert s["entropy"].item() == pytest.approx(expected, abs=1e-6)
    unnormalised = previous_head() * 2  # non-negative, but rows sum to 2 (implied weights)
    assert weight_kind(unnormalised[None, None], KEEP) == "unnormalised"
    assert layer_scores(unnormalised[None, None], KEEP)["entropy"].item() == pytest.approx(0.0, abs=1e-6)


class FakeAttention(nn.Module):
    def __init__(self, sinks: torch.Tensor | None = None) -> None:
        super().__init__()
        self.sinks = sinks

    def keep_mask(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        return causal_keep_mask(q_len, k_len, device)


class FakeModel(nn.Module):
    """Returns the same hand-made weights (H, T', T') for any input, cut to its length: a stand-in for attention
    variants that do not exist yet (signed, implied, with learned sinks)."""

    def __init__(self, weights: list[torch.Tensor | None], sinks: bool = False) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.weights = weights
        self.config = SimpleNamespace(block_size=64, vocab_size=100)
        self.blocks = [SimpleNamespace(attn=FakeAttention(torch.zeros(2) if sinks else None)) for _ in weights]

    def forward(self, idx: torch.Tensor, return_weights: bool = False) -> SimpleNamespace:
        B, n = idx.shape
        cut = [None if w is None else w[:, :n, :n].expand(B, -1, -1, -1) for w in self.weights]
        return SimpleNamespace(attentions=cut)


def big(head: torch.Tensor, size: int = 64) -> torch.Tensor:
    """A (size, size) version of a (T, T) pattern builder's rule, for the fake model's longer inputs."""
    w = torch.zeros(size, size)
    if head is previous_head:
        w[0, 0] = 1
        w[torch.arange(1, size), torch.arange(size - 1)] = 1
    else:
        w[:, 0] = 1
    return w


def test_measure_heads_notes_signed_layers_and_keeps_training_mode():
    signed = big(previous_head).clone()
    signed[2:, 0] = -0.5
    model = FakeModel([torch.stack([big(previous_head), big(first_head)]), signed[None].expand(2, -1, -1)])
    model.train()
    report = measure_heads(model, torch.arange(T), induction_len=4)
    assert model.training
    assert set(report.scores) == {"entropy", "sink", "previous", "self", "distance", "induction"}
    assert report.scores["previous"].shape == (2, 2)
    assert report.signed and len(report.notes) == 1 and report.notes[0].startswith("layer 1: the weights are signed")
    table = format_table(report)
    assert "L0H0" in table and "L1H1" in table and "note: layer 1" in table
    assert "L0H0 previous-token 1.00" in notable_heads(report) and "L0H1 sink 1.00" in notable_heads(report)


def test_learned_sink_share_activates_when_the_module_has_sinks():
    w = big(first_head) * 0.7  # the sink took 0.3 of every row: the returned weights leave it out
    report = measure_heads(FakeModel([w[None].expand(2, -1, -1)], sinks=True), torch.arange(T), induction_len=4)
    assert report.scores["learned_sink"] == pytest.approx(torch.full((1, 2), 0.3), abs=1e-6)
    assert not report.notes  # rows short of 1 are explained by the sink, not "unnormalised"
    assert "L0H0 learned sink 0.30" not in notable_heads(report)  # below the 0.5 threshold
    without = measure_heads(FakeModel([w[None].expand(2, -1, -1)]), torch.arange(T), induction_len=4)
    assert "learned_sink" not in without.scores and "unnormalised" in without.notes[0]


def test_a_variant_without_weights_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"returns no attention weights \(layer 0\).*model/attention=mha"):
        measure_heads(FakeModel([None]), torch.arange(T), induction_len=4)
    with pytest.raises(ValueError, match="the probe has 1 token"):
        measure_heads(FakeModel([big(first_head)[None]]), torch.arange(1), induction_len=4)


def test_log_head_diagnostics_writes_one_image_per_metric_and_a_summary(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config("mha"))  # 2 layers x 4 heads, block 16
    probe = torch.randint(37, (12,))
    tb = TensorBoard(tmp_path)
    first = log_head_diagnostics(tb, model, probe, step=5)
    tb.close()
    again = measure_heads(model, probe)
    assert all(torch.equal(first.scores[k], again.scores[k]) for k in first.scores)  # a fixed probe
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    metrics = ("entropy", "sink", "previous", "self", "distance", "induction")
    assert set(acc.Tags()["images"]) == {f"heads/{m}" for m in metrics}
    image = acc.Images("heads/induction")[0]
    assert image.step == 5 and image.encoded_image_string.startswith(b"\x89PNG")
    assert image.width > 4 * 44 + SCALE_W  # four head columns and the colour scale
    assert "heads/summary/text_summary" in acc.Tags()["tensors"]
    assert report_image(first).size[0] > 2 * image.width  # heads.png: two grids per row


def test_heatmap_scalings_and_the_diverging_map():
    w = torch.tensor([[1.0, 0.0], [0.2, 0.1]])
    row, signed = scaled(w, "row")
    assert not signed and torch.allclose(row, torch.tensor([[1.0, 0.0], [1.0, 0.5]]))
    absolute, _ = scaled(w, "absolute")
    assert torch.equal(absolute, w)  # the probabilities themselves
    s, signed = scaled(torch.tensor([[0.5, -0.25]]), "row")
    assert signed and torch.allclose(s, torch.tensor([[1.0, -0.5]]))
    white = colorize(torch.zeros(1, 1), signed=True)[:, 0, 0]
    assert torch.allclose(white, torch.ones(3))  # zero is white on the diverging map
    assert heatmap(torch.tensor([[0.5, -0.25]]), min_size=4).shape == (3, 2, 4)
    with pytest.raises(ValueError, match="attention scale 'log' is unknown; valid: row, absolute"):
        scaled(w, "log")


def test_report_table_names_no_heads_when_none_stand_out():
    flat = torch.full((1, 2), 0.1)
    report = HeadReport({"entropy": flat, "sink": flat, "previous": flat, "self": flat, "distance": flat,
                         "induction": flat})
    assert notable_heads(report) == [] and "notable: none above the thresholds" in format_table(report)
