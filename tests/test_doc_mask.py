"""Document masking (model.doc_mask): each token attends only to earlier tokens of its own document, a document
opening at each end-of-text id. Every variant with the `doc_mask` flag is pinned against a float64 reference
written here from the masked-softmax equation, and against itself run on each document alone; at the model level
the previous document changes no logit of the next one (and does with the mask off), a one-document window keeps
its loss, evaluation masks too, RoPE positions restart with model.doc_rope_reset, and decoding is unchanged."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptmini.attention import ATTENTION_REGISTRY, build_attention, causal_keep_mask
from gptmini.config import ModelConfig
from gptmini.config_checks import check_model_config
from gptmini.evaluate import evaluate_split
from gptmini.model import GPT, document_offsets
from gptmini.run_setup import with_data_ids
from gptmini.tokenizer import ByteTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from model_helpers import tiny_config  # noqa: E402

ALL = sorted(ATTENTION_REGISTRY)
# Chosen by the capability flag, never by name: a new variant that sets doc_mask joins every test below.
DOC = [n for n in ALL if ATTENTION_REGISTRY[n].doc_mask]
WEIGHT_COMPATIBLE_DOC = [n for n in DOC if ATTENTION_REGISTRY[n].weight_compatible]
EOT = 0  # the tiny models' end-of-text id
T = 16  # tiny_config's block_size


def positional(name: str) -> str:
    return "rope" if ATTENTION_REGISTRY[name].applies_rope else "learned"


def model(name: str, doc_mask: bool = True, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    fields = dict(pos_encoding=positional(name), doc_mask=doc_mask, eot_id=EOT if doc_mask else None)
    return GPT(tiny_config(name, **(fields | overrides))).eval()


def same_weights(m: GPT, **changes) -> GPT:
    """A model with `m`'s weights and config fields changed (doc_mask adds no parameter)."""
    other = GPT(dataclasses.replace(m.config, **changes)).eval()
    other.load_state_dict(m.state_dict())
    return other


def tokens(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


def random_row(seed: int, eots: tuple[int, ...]) -> list[int]:
    """T random non-eot tokens with end-of-text at the positions `eots`."""
    row = torch.randint(1, 37, (T,), generator=torch.Generator().manual_seed(seed))
    row[list(eots)] = EOT
    return row.tolist()


# ----------------------------------------------------------------------------------------------------------
# Document numbers and the mask


def test_documents_open_at_end_of_text():
    m = model("mha")
    idx = tokens([5, EOT, 3, 4, EOT, EOT, 7, 8], [EOT, 1, 2, 3, 4, 5, 6, EOT])
    assert m.documents(idx).tolist() == [[0, 1, 1, 1, 2, 3, 3, 3], [1, 1, 1, 1, 1, 1, 1, 2]]
    assert document_offsets(m.documents(idx)).tolist() == [[0, 0, 1, 2, 0, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 0]]


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("q_len", [5, 2])
def test_keep_mask_is_causal_within_each_document(q_len, window):
    docs = tokens([0, 0, 1, 1, 1], [0, 1, 1, 2, 2])
    keep = causal_keep_mask(q_len, 5, torch.device("cpu"), window, docs)
    assert keep.shape == (2, 1, q_len, 5)
    for b in range(2):
        for i in range(q_len):
            p = 5 - q_len + i  # the query's absolute position
            for j in range(5):
                seen = j <= p and docs[b, j] == docs[b, p] and (window is None or p - j < window)
                assert bool(keep[b, 0, i, j]) == bool(seen), (b, i, j)


# ----------------------------------------------------------------------------------------------------------
# One attention layer


def reference_attention(sd: dict[str, torch.Tensor], x: torch.Tensor, docs: torch.Tensor, n_head: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, over keys j <= i of the query's document only, in float64 loops, from
    the canonical state dict: out_proj(concat_h sum_j a_hij v_hj)."""
    x = x.double()
    B, L, C = x.shape
    hd = C // n_head
    q, k, v = (x @ sd["qkv.weight"].double().T + sd["qkv.bias"].double()).split(C, dim=-1)  # (B, L, C) each
    y = torch.zeros(B, L, C, dtype=torch.float64)
    for b in range(B):
        for h in range(n_head):
            cols = slice(h * hd, (h + 1) * hd)
            for i in range(L):
                js = [j for j in range(i + 1) if docs[b, j] == docs[b, i]]
                s = torch.stack([q[b, i, cols] @ k[b, j, cols] for j in js]) / math.sqrt(hd)
                a = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                y[b, i, cols] = sum(a[n] * v[b, j, cols] for n, j in enumerate(js))
    return y @ sd["out_proj.weight"].double().T + sd["out_proj.bias"].double()


DOCS = tokens([0, 0, 0, 1, 1, 1, 1, 2, 2, 3], [0, 1, 1, 1, 1, 1, 1, 1, 2, 2])  # (B, L): each row its own boundaries


def layer(name: str):
    torch.manual_seed(0)
    return build_attention(tiny_config(name, window=4)).eval()


@pytest.mark.parametrize("name", WEIGHT_COMPATIBLE_DOC)
@pytest.mark.parametrize("weights", [False, True])
def test_layer_matches_the_masked_softmax_reference(name, weights):
    module = layer(name)
    x = torch.randn(2, DOCS.size(1), 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, w = module(x, return_weights=weights, docs=DOCS)
    expected = reference_attention(module.state_dict(), x, DOCS, module.n_head)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-5)
    if weights and module.returns_weights:  # no weight crosses a document boundary
        crossing = DOCS[:, :, None] != DOCS[:, None, :]  # (B, L, L)
        assert w[crossing[:, None].expand_as(w)].abs().max() == 0


@pytest.mark.parametrize("name", DOC)
def test_layer_equals_each_document_run_alone(name):
    """What the layer gives each document inside the window is what it gives that document alone (gqa's shared
    heads and swa's window included)."""
    module = layer(name)
    x = torch.randn(2, DOCS.size(1), 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, _ = module(x, docs=DOCS)
        for b in range(2):
            for d in DOCS[b].unique():
                span = (DOCS[b] == d).nonzero().flatten()
                alone, _ = module(x[b : b + 1, span])
                torch.testing.assert_close(y[b : b + 1, span], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DOC)
def test_layer_without_docs_attends_across_documents(name):
    """The other side of the test above, so it can fail: with docs=None the first document leaks into the next."""
    module = layer(name)
    x = torch.randn(2, DOCS.size(1), 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        masked, _ = module(x, docs=DOCS)
        plain, _ = module(x)
    assert (masked[0, 3:] - plain[0, 3:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("name", DOC)
def test_previous_document_changes_no_logit_of_the_next(name):
    m = model(name)
    first = tokens(random_row(0, (6,)), random_row(1, (3, 11)))
    second = first.clone()
    second[0, :6] = torch.randint(1, 37, (6,), generator=torch.Generator().manual_seed(5))  # all of document 0
    second[1, :3] = torch.randint(1, 37, (3,), generator=torch.Generator().manual_seed(6))
    assert (second != first).sum() >= 8
    with torch.no_grad():
        a, b = m(first).logits, m(second).logits  # (B, T, V)
        # from the end-of-text that opens the next document on, nothing changes
        torch.testing.assert_close(a[0, 6:], b[0, 6:], rtol=0, atol=1e-5)
        torch.testing.assert_close(a[1, 3:], b[1, 3:], rtol=0, atol=1e-5)
        assert (a[0, :6] - b[0, :6]).abs().max() > 1e-3  # the changed document itself did change
        # the same weights without the mask: the change reaches the next document
        off = same_weights(m, doc_mask=False, eot_id=None)
        assert (off(first).logits[0, 6:] - off(second).logits[0, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", DOC)
@pytest.mark.parametrize("loss_chunk", [None, 5])
def test_one_document_window_has_the_unmasked_loss(name, loss_chunk):
    m = model(name)
    off = same_weights(m, doc_mask=False, eot_id=None)
    idx = tokens(random_row(0, ()), random_row(1, (0,)))  # no end-of-text; one at the start (it opens the document)
    targets = tokens(random_row(2, ()), random_row(3, ()))
    with torch.no_grad():
        masked = m(idx, targets, loss_chunk=loss_chunk).loss
        plain = off(idx, targets, loss_chunk=loss_chunk).loss
    torch.testing.assert_close(masked, plain, rtol=1e-6, atol=1e-6)


def per_document_reference_loss(m: GPT, stream: np.ndarray, window: int) -> float:
    """Mean cross-entropy over non-overlapping windows, every document inside a window run alone through the
    model without the mask (RoPE is relative, so where a document sits does not matter)."""
    off = same_weights(m, doc_mask=False, eot_id=None)
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, window):
        x = torch.from_numpy(stream[start : start + window].astype(np.int64))
        y = torch.from_numpy(stream[start + 1 : start + window + 1].astype(np.int64))
        x = x[: len(y)]
        opens = [0] + [i for i in range(1, len(x)) if x[i] == EOT]
        for lo, hi in zip(opens, [*opens[1:], len(x)], strict=True):
            with torch.no_grad():
                logits = off(x[None, lo:hi]).logits[0]
            total += F.cross_entropy(logits.double(), y[lo:hi], reduction="sum").item()
            count += hi - lo
    return total / count


@pytest.mark.parametrize("name", ["mha", "sdpa"])
def test_evaluation_masks_by_document(name):
    """gptmini.evaluate.evaluate_split (the final evaluation and `python -m gptmini.evaluate`) goes through
    GPT.forward: its loss is the loss of each document run alone, and not the unmasked one."""
    m = model(name, pos_encoding="rope")
    rng = np.random.default_rng(0)
    stream = rng.integers(1, 37, 60).astype(np.uint16)
    stream[[5, 13, 14, 30, 47]] = EOT
    masked = evaluate_split(m, stream, T, batch_size=2)
    assert masked == pytest.approx(per_document_reference_loss(m, stream, T), rel=1e-5)
    assert abs(evaluate_split(same_weights(m, doc_mask=False, eot_id=None), stream, T) - masked) > 1e-4


def test_training_run_records_the_end_of_text_id_and_evaluates_with_the_mask(tmp_path):
    """train.py end to end on a folder of documents: the checkpoint records the data's end-of-text id, and
    `python -m gptmini.evaluate` (through load_for_inference and GPT.forward) measures with the mask."""
    from data_helpers import make_docs
    from test_train import make_config

    from gptmini.checkpoint import load_checkpoint, load_for_inference
    from gptmini.config import EvalOptions, EvaluateConfig
    from gptmini.data import load_prepared
    from gptmini.evaluate import run_evaluation
    from gptmini.trainer import train

    make_docs(tmp_path / "corpus", 12)
    cfg = make_config(tmp_path / "corpus", tmp_path / "data", "model.doc_mask=true", "model.pos_encoding=rope",
                      "model.doc_rope_reset=true", "data.val_fraction=0.5", "train.max_iters=4",
                      "train.eval_interval=2", "train.attn_interval=0", "train.sample_tokens=0")
    train(cfg, tmp_path / "run")
    prepared = load_prepared(tmp_path / "data" / "text")
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["config"]["model"]
    assert (saved["doc_mask"], saved["doc_rope_reset"], saved["eot_id"]) == (True, True, prepared.tokenizer.eot_id)
    loaded = load_for_inference(tmp_path / "run").model
    val = prepared.val_tokens()
    assert (np.asarray(val) == prepared.tokenizer.eot_id).sum() > 0  # the val split holds several documents
    result = run_evaluation(EvaluateConfig(ckpt=str(tmp_path / "run"), eval=EvalOptions(device="cpu")), stream=None)
    window = loaded.config.block_size
    masked = evaluate_split(loaded, val, window)
    assert result.loss == pytest.approx(masked, rel=1e-6)
    plain = same_weights(loaded, doc_mask=False, doc_rope_reset=False, eot_id=None)
    assert abs(evaluate_split(plain, val, window) - masked) > 1e-4


# ----------------------------------------------------------------------------------------------------------
# RoPE restarted at each document


ROPE_DOC = [n for n in DOC if ATTENTION_REGISTRY[n].applies_rope]


@pytest.mark.parametrize("name", ROPE_DOC)
def test_rope_reset_gives_a_document_the_same_logits_wherever_it_starts(name):
    m = model(name, doc_rope_reset=True)
    doc = [EOT, *random_row(4, ())[:7]]  # a document of 8 tokens
    early = tokens(doc + random_row(5, ())[:8])
    late = tokens(random_row(6, ())[:5] + doc + random_row(7, ())[:3])
    with torch.no_grad():
        torch.testing.assert_close(m(early).logits[0, :8], m(late).logits[0, 5:13], rtol=1e-5, atol=1e-5)
        # the rotary tables the layers get: those of positions 0..7 for the document, in either window
        _, (cos, sin) = m.embed(late, None, None, m.documents(late))
    assert cos.shape == (1, 1, T, 4)
    torch.testing.assert_close(cos[0, 0, 5:13], m.rope_cos[:8], rtol=0, atol=0)
    torch.testing.assert_close(sin[0, 0, 5:13], m.rope_sin[:8], rtol=0, atol=0)
    # without the reset the document sits at positions 5..12 (so the table check above can fail)
    _, (cos_abs, _) = same_weights(m, doc_rope_reset=False).embed(late, None, None, m.documents(late))
    assert not torch.equal(cos_abs[5:13], m.rope_cos[:8])


# ----------------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("name", DOC)
def test_decoding_with_a_cache_is_unchanged(name):
    """With a kv_cache the input is one document: prefill and each decoded token give what the unmasked model
    gives, and for a one-document prompt what the masked model gives without a cache."""
    m = model(name)
    off = same_weights(m, doc_mask=False, eot_id=None)
    prompt = tokens([EOT, 3, 4, 5, 6, 7])
    with torch.no_grad():
        cache, off_cache = m.make_kv_cache(1), off.make_kv_cache(1)
        prefill = m(prompt, kv_cache=cache).logits
        torch.testing.assert_close(prefill, off(prompt, kv_cache=off_cache).logits)
        torch.testing.assert_close(prefill, m(prompt).logits, rtol=1e-5, atol=1e-5)
        step = m(tokens([9]), kv_cache=cache).logits[0, -1]
        torch.testing.assert_close(step, m(torch.cat([prompt, tokens([9])], 1)).logits[0, -1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("overrides, message", [
    (dict(doc_rope_reset=True, pos_encoding="rope"), "model.doc_rope_reset=true restarts rotary positions at each "
     "document: it needs model.doc_mask=true and model.pos_encoding=rope (got doc_mask=false, pos_encoding=rope)"),
    (dict(doc_rope_reset=True, doc_mask=True), "it needs model.doc_mask=true and model.pos_encoding=rope (got "
     "doc_mask=true, pos_encoding=learned)"),
    (dict(eot_id=3), "model.eot_id=3 is read only with model.doc_mask=true; remove it"),
    (dict(doc_mask=True, eot_id=37), "model.eot_id=37 must be an integer in [0, 36] or null (set from the data)"),
    (dict(doc_mask="yes"), "model.doc_mask='yes' must be true or false"),
])
def test_config_refusals(overrides, message):
    """Each a one-line ValueError naming the key typed (the first row in full)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**({"vocab_size": 37} | overrides))


def test_model_without_eot_id_is_refused():
    with pytest.raises(ValueError, match=r"^model.doc_mask=true needs model.eot_id"):
        GPT(tiny_config("mha", doc_mask=True))


def test_variant_that_cannot_mask_by_document_is_refused(monkeypatch):
    monkeypatch.setattr(ATTENTION_REGISTRY["torch_mha"], "doc_mask", False)
    cfg = tiny_config("torch_mha", doc_mask=True, eot_id=EOT)
    message = r"^model.doc_mask=true is not supported by attention variant 'torch_mha' .*; use model.doc_mask=false"
    with pytest.raises(ValueError, match=message):
        check_model_config(cfg)  # where every command's config enters
    with pytest.raises(ValueError, match=message):
        GPT(cfg)  # and a model built in Python
    check_model_config(dataclasses.replace(cfg, doc_mask=False, eot_id=None))


def test_eot_id_comes_from_the_data():
    tokenizer = ByteTokenizer()
    cfg = with_data_ids(ModelConfig(doc_mask=True), tokenizer)
    assert (cfg.vocab_size, cfg.eot_id) == (257, 256)
    assert with_data_ids(ModelConfig(), tokenizer).eot_id is None  # no document masking: none recorded
    with pytest.raises(ValueError, match=r"^model.eot_id=5 is not the data's end-of-text id 256"):
        with_data_ids(ModelConfig(doc_mask=True, eot_id=5), tokenizer)
