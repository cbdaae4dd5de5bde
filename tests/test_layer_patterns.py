"""Per-layer attention patterns (issue 25, item 1): `model.attention.layers` gives each layer its own variant and,
for windowed variants, its own window; the list repeats to n_layer.

A pattern model must be exactly the stack of its single-variant layers (checked layer by layer against models built
from one variant each, on the same weights), survive the checkpoint, resume exactly, decode the same with and
without the KV cache, and refuse bad entries in one line naming model.attention.layers.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from gptmini.attention import ATTENTION_REGISTRY
from gptmini.checkpoint import CheckpointError, load_checkpoint, load_for_inference, save_checkpoint
from gptmini.config import AttentionConfig, ModelConfig
from gptmini.config_checks import check_model_config
from gptmini.gpt2_format import gpt2_refusal
from gptmini.model import GPT
from gptmini.sampling import generate
from gptmini.tokenizer import CharTokenizer
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_config  # noqa: E402

PATTERN = ["swa:3", "swa:3", "swa:3", "sdpa"]


def pattern_config(layers: list[str], pos: str = "rope", **overrides) -> ModelConfig:
    fields = dict(n_layer=4, n_head=4, n_embd=32, block_size=16, vocab_size=37, pos_encoding=pos,
                  attention=AttentionConfig(layers=layers))
    return ModelConfig(**(fields | overrides))


def single(config: ModelConfig, name: str, window: int | None = None, **attention) -> GPT:
    """A model whose every layer is `name` (window `window`), with `config`'s sizes."""
    return GPT(dataclasses.replace(config, attention=AttentionConfig(name, window=window, **attention))).eval()


def layer_outputs(model: GPT, idx: torch.Tensor, blocks: list | None = None) -> list[torch.Tensor]:
    """The residual stream after each block, running `blocks` (default: the model's own) on its embedding."""
    x, rope = model.embed(idx, None, None)
    outs = []
    for block in blocks or model.blocks:
        x, _ = block(x, rope=rope)
        outs.append(x)
    return outs


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_a_pattern_is_its_single_variant_layers_one_by_one(pos):
    torch.manual_seed(0)
    config = pattern_config(PATTERN, pos)
    model = GPT(config).eval()
    weights = model.state_dict()
    swa, sdpa = single(config, "swa", 3), single(config, "sdpa")
    for other in (swa, sdpa):
        other.load_state_dict(weights)
    by_hand = [swa.blocks[0], swa.blocks[1], swa.blocks[2], sdpa.blocks[3]]
    idx = torch.randint(0, 37, (2, 16))
    for i, (got, want) in enumerate(zip(layer_outputs(model, idx), layer_outputs(swa, idx, by_hand), strict=True)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"layer {i}")
    # the windows really differ from full attention (else the test above proves nothing about them)
    assert not torch.allclose(layer_outputs(model, idx)[0], layer_outputs(sdpa, idx)[0])
    assert [b.attn.window for b in model.blocks] == [3, 3, 3, None]


def test_two_window_sizes_and_a_short_list_repeat_to_n_layer():
    config = pattern_config(["swa:2", "swa:5"], n_layer=5)
    model = GPT(config)
    assert [b.attn.window for b in model.blocks] == [2, 5, 2, 5, 2]
    shared = pattern_config(["swa", "sdpa", "swa:7"], attention=AttentionConfig(layers=["swa", "sdpa", "swa:7"],
                                                                               window=4))
    assert [b.attn.window for b in GPT(shared).blocks] == [4, None, 7, 4]  # an entry's own window wins
    default = pattern_config(["swa", "sdpa"])
    assert [b.attn.window for b in GPT(default).blocks] == [64, None, 64, None]  # swa's own default


def test_shared_settings_go_to_the_layers_that_read_them():
    config = pattern_config(["swa:3", "gqa", "sdpa"], attention=AttentionConfig(layers=["swa:3", "gqa", "sdpa"],
                                                                              n_kv_head=1))
    model = GPT(config)
    assert [b.attn.n_kv_head for b in model.blocks] == [4, 1, 4, 4]
    assert model.blocks[1].attn.qkv.weight.shape == (32 + 2 * 8, 32)


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
@torch.no_grad()  # inference: flex has no backward on CPU
def test_every_registered_variant_may_sit_in_a_pattern(name):
    """[name, swa:3]: each layer equals that layer of a model built from its single variant, on the same weights."""
    cls = ATTENTION_REGISTRY[name]
    pos = "rope" if cls.applies_rope else "learned"
    torch.manual_seed(1)
    config = pattern_config([name, "swa:3"], pos, n_layer=2)
    model = GPT(config).eval()
    by_hand = [single(config, name).blocks[0], single(config, "swa", 3).blocks[1]]
    for block, weights in zip(by_hand, model.blocks, strict=True):
        block.load_state_dict(weights.state_dict())  # the canonical layout: each variant reads its own
    idx = torch.randint(0, 37, (1, 12))
    want = layer_outputs(model, idx, by_hand)
    for got, ref in zip(layer_outputs(model, idx), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def save(model: GPT, path: Path) -> Path:
    tokenizer = CharTokenizer("".join(chr(48 + i) for i in range(37)))
    save_checkpoint({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.config)},
                     "tokenizer": tokenizer.spec()}, path)
    return path


def test_the_pattern_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(2)
    model = GPT(pattern_config(["swa:2", "swa:5", "gqa"], attention=AttentionConfig(layers=["swa:2", "swa:5", "gqa"],
                                                                                  n_kv_head=2))).eval()
    path = save(model, tmp_path / "p.pt")
    assert load_checkpoint(path)["config"]["model"]["attention"]["layers"] == ["swa:2", "swa:5", "gqa"]
    loaded = load_for_inference(path).model
    assert loaded.config == model.config
    assert [(b.attn.name, b.attn.window, b.attn.n_kv_head) for b in loaded.blocks] == \
        [("swa", 2, 4), ("swa", 5, 4), ("gqa", None, 2), ("swa", 2, 4)]
    idx = torch.randint(0, 37, (1, 16))
    torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_a_weight_compatible_pattern_swaps_every_layer_and_others_are_refused(tmp_path):
    torch.manual_seed(3)
    model = GPT(pattern_config(["sdpa", "einsum", "fused_qkv"])).eval()
    path = save(model, tmp_path / "c.pt")
    swapped = load_for_inference(path, attention=AttentionConfig("mha")).model
    assert [b.attn.name for b in swapped.blocks] == ["mha"] * 4
    idx = torch.randint(0, 37, (1, 10))
    torch.testing.assert_close(swapped(idx).logits, model(idx).logits, rtol=1e-5, atol=1e-5)
    windowed = save(GPT(pattern_config(PATTERN)), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"model/attention=mha cannot run weights trained with 'swa' \(layer 0 "
                                              r"of model.attention.layers=\[swa:3,swa:3,swa:3,sdpa\]\)"):
        load_for_inference(windowed, attention=AttentionConfig("mha"))
    with pytest.raises(CheckpointError, match=r"model/attention=swa cannot run weights trained with 'sdpa' \(layer 3"):
        load_for_inference(windowed, attention=AttentionConfig("swa"))
    untyped = AttentionConfig(layers=["swa", "swa", "swa", "mha"])  # windows left out: the checkpoint's own stay
    same = load_for_inference(windowed, attention=untyped).model
    assert [(b.attn.name, b.attn.window) for b in same.blocks] == [("swa", 3)] * 3 + [("mha", None)]


def test_export_refuses_a_pattern_gpt2_cannot_hold():
    assert gpt2_refusal(pattern_config(PATTERN, "learned"))[0] == "model.attention.layers=[swa:3,swa:3,swa:3,sdpa]"
    assert gpt2_refusal(pattern_config(["sdpa", "mha"], "learned")) is None


@pytest.mark.parametrize("layers", [["swa:3", "gqa", "sdpa"], ["sdpa", "swa:5"]])
@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_kv_cache_decodes_the_same_tokens_as_no_cache(layers, pos):
    torch.manual_seed(4)
    attention = AttentionConfig(layers=layers, n_kv_head=2 if "gqa" in layers else None)
    model = GPT(pattern_config(layers, pos, attention=attention)).eval()
    idx = torch.randint(0, 37, (2, 5))
    cached = generate(model, idx, 40, temperature=0.0, kv_cache=True)  # past block_size (16) too
    uncached = generate(model, idx, 40, temperature=0.0, kv_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize(("layers", "message"), [
    (["swa:3", "nope"], r"model.attention.layers=\[swa:3,nope\]: 'nope' is not an attention variant; valid: mha"),
    (["sdpa:64"], r"model.attention.layers=\[sdpa:64\]: 'sdpa:64' gives a window to 'sdpa', which takes none"),
    (["swa:0"], r"model.attention.layers entry 'swa:0': the window '0' must be a positive integer"),
    (["swa:x"], r"model.attention.layers entry 'swa:x': the window 'x' must be a positive integer"),
    (["swa:-4"], r"model.attention.layers entry 'swa:-4': the window '-4' must be a positive integer"),
    (["3swa"], r"model.attention.layers entry '3swa' is not NAME or NAME:WINDOW"),
    ([], r"model.attention.layers=\[\] is empty"),
    (["sdpa"] * 5, r"model.attention.layers has 5 entries, more than model.n_layer=4"),
])
def test_bad_entries_are_refused_in_one_line(layers, message):
    with pytest.raises(ValueError, match=message) as err:
        check_model_config(pattern_config(layers))
    assert "\n" not in str(err.value)


def test_a_shared_setting_no_layer_reads_is_refused():
    with pytest.raises(ValueError, match=r"model.attention.n_kv_head=2 is ignored by every variant of "
                                         r"model.attention.layers=\[swa:3,sdpa\]"):
        GPT(pattern_config(["swa:3", "sdpa"], attention=AttentionConfig(layers=["swa:3", "sdpa"], n_kv_head=2)))


def test_resume_of_a_pattern_run_is_exact(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    common = ("model.n_layer=4", "model.n_embd=16", "model.block_size=16", "model.pos_encoding=rope",
              "model.dropout=0.1", "train.max_iters=6",
              "train.final_eval=false", "train.eval_interval=0", "train.attn_interval=3", "train.sample_tokens=0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    common += ("train.ckpt_interval=3", "train.warmup_iters=1", "train.batch_size=4")
    pattern = "model.attention.layers=[swa:4,swa:2,swa:4,sdpa]"  # as typed on a command line
    train(make_config(corpus, tmp_path / "data", *common, pattern), straight)
    assert train(make_config(corpus, tmp_path / "data", *common, pattern, "train.stop_after=3"), split).step == 3
    assert train(make_config(corpus, tmp_path / "data", *common, pattern), split).step == 6
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(split / "checkpoints" / "last.pt")
    assert a["config"]["model"]["attention"]["layers"] == ["swa:4", "swa:2", "swa:4", "sdpa"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    other = "model.attention.layers=[swa:4,swa:4,swa:4,sdpa]"  # another pattern: refused, as any model change
    with pytest.raises(CheckpointError, match="model.attention"):
        train(make_config(corpus, tmp_path / "data", *common, other, "train.max_iters=9"), split)
