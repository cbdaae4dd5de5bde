"""gptmini.pretrained against transformers' own GPT-2 as the oracle, offline.

Tiny random GPT2LMHeadModels are saved with `save_pretrained` (safetensors) or in the legacy pytorch_model.bin
layout; loaded into gptmini's GPT they must give transformers' logits. The real `gpt2` weights are used only when
they already sit in the local Hugging Face cache; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hf_helpers import hf_gpt2, save_hf

from gptmini.attention import ATTENTION_REGISTRY, weight_compatible_variants
from gptmini.config import AttentionConfig, ModelConfig
from gptmini.config_checks import check_model_config
from gptmini.model import GPT
from gptmini.pretrained import (
    PretrainedError,
    build_gpt,
    check_pretrained_tokenizer,
    data_tokenizer_spec,
    is_gpt2_tokenizer,
    is_pretrained_ref,
    load_hf_gpt2,
    load_pretrained,
    load_pretrained_for_inference,
    resolve_pretrained,
)

transformers = pytest.importorskip("transformers", reason="the oracle tests need transformers (the dev extra)")

TOL = 1e-4


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(cfg: ModelConfig, sd: dict, idx: torch.Tensor) -> torch.Tensor:
    model = GPT(cfg)
    model.load_state_dict(sd)
    with torch.no_grad():
        return model.eval()(idx).logits


def tokens(vocab: int, T: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[object, Path]:
    model = hf_gpt2()
    return model, save_hf(model, tmp_path_factory.mktemp("hf") / "tiny")


def cpu_runnable(name: str) -> None:
    cfg = ModelConfig(attention=AttentionConfig(name), n_head=4, n_embd=64)
    try:
        ATTENTION_REGISTRY[name].check_device(cfg, torch.device("cpu"), training=False)
    except ValueError as err:
        pytest.skip(f"{name} cannot run inference on CPU: {err}")


@pytest.mark.parametrize("variant", weight_compatible_variants())
def test_logits_match_transformers_for_every_weight_compatible_variant(tiny, variant):
    cpu_runnable(variant)
    model, folder = tiny
    cfg, sd = load_hf_gpt2(str(folder), AttentionConfig(variant))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (2, 4, 64, 64, 211)
    assert cfg.mlp == "gelu_tanh" and cfg.bias and cfg.pos_encoding == "learned" and cfg.attention.name == variant
    idx = tokens(211)
    delta = (our_logits(cfg, sd, idx) - hf_logits(model, idx)).abs().max().item()
    assert delta < TOL, f"{variant}: max |logits - transformers| = {delta:.2e}"


def test_exact_gelu_and_the_tied_head(tmp_path):
    model = hf_gpt2(activation_function="gelu", seed=3)
    cfg, sd = load_hf_gpt2(str(save_hf(model, tmp_path / "m")))
    assert cfg.mlp == "gelu"
    assert sd["lm_head.weight"] is sd["wte.weight"]
    gpt = GPT(cfg)
    gpt.load_state_dict(sd)
    assert gpt.lm_head.weight is gpt.wte.weight  # still tied after loading
    idx = tokens(211, T=17)
    assert (our_logits(cfg, sd, idx) - hf_logits(model, idx)).abs().max().item() < TOL


@pytest.mark.parametrize("variant", ["mha", "torch_mha", "wrapper", "sdpa"])
def test_build_gpt_skips_only_the_random_init(tiny, variant):
    model, folder = tiny
    cfg, sd = load_hf_gpt2(str(folder), AttentionConfig(variant))
    initialisers = dict(vars(torch.nn.init))
    gpt = build_gpt(cfg, sd)
    assert dict(vars(torch.nn.init)) == initialisers  # restored
    assert gpt.lm_head.weight is gpt.wte.weight and gpt.num_parameters() == GPT(cfg).num_parameters()
    assert all(torch.isfinite(t).all() for t in [*gpt.parameters(), *gpt.buffers()])
    idx = tokens(211, T=20)
    with torch.no_grad():
        assert torch.equal(gpt.eval()(idx).logits, our_logits(cfg, sd, idx))
    gpt.train()(idx, targets=idx).loss.backward()
    assert gpt.wte.weight.grad is not None


def legacy_bin(model, folder: Path) -> Path:
    """The pytorch_model.bin layout of the original hub uploads: no `transformer.` prefix, the causal-mask buffers
    attn.bias and attn.masked_bias saved, lm_head.weight present."""
    folder.mkdir()
    P = model.config.n_positions
    sd = {k.removeprefix("transformer."): v.clone() for k, v in model.state_dict().items()}
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P, dtype=torch.uint8)).view(1, 1, P, P)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    sd["lm_head.weight"] = sd["wte.weight"].clone()
    torch.save(sd, folder / "pytorch_model.bin")
    model.config.to_json_file(folder / "config.json")
    return folder


def test_pytorch_model_bin_layout(tiny, tmp_path):
    model, _ = tiny
    cfg, sd = load_hf_gpt2(str(legacy_bin(model, tmp_path / "bin")))
    idx = tokens(211)
    assert (our_logits(cfg, sd, idx) - hf_logits(model, idx)).abs().max().item() < TOL


def test_sharded_safetensors(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    cfg, sd = load_hf_gpt2(str(tmp_path / "sharded"))
    idx = tokens(211, T=9)
    assert (our_logits(cfg, sd, idx) - hf_logits(model, idx)).abs().max().item() < TOL


def test_a_pickle_that_is_not_plain_tensors_is_never_unpickled(tiny, tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "evil"
    folder.mkdir()
    tiny[0].config.to_json_file(folder / "config.json")
    torch.save({"wte.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(PretrainedError, match=r"cannot read pytorch_model.bin as tensors"):
        load_hf_gpt2(str(folder))
    assert not marker.exists()


def copy_folder(src: Path, dst: Path, config: dict | None = None, drop: str | None = None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != drop:
            (dst / f.name).write_bytes(f.read_bytes())
    if config is not None:
        hf = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**hf, **config}))
    return dst


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, r"model_type='bert', not gpt2"),
    ({"activation_function": "relu"}, r"activation_function='relu'"),
    ({"layer_norm_epsilon": 1e-6}, r"layer_norm_epsilon=1e-06 \(gptmini's layer norms use 1e-5\)"),
    ({"tie_word_embeddings": False}, r"tie_word_embeddings=false"),
    ({"n_inner": 100}, r"n_inner=100"),
    ({"scale_attn_by_inverse_layer_idx": True}, r"scale_attn_by_inverse_layer_idx=true"),
    ({"n_embd": 32}, r"wte.weight has shape \(211, 64\), config.json implies \(211, 32\)"),
    ({"n_layer": 3}, r"describes [\d,]+ parameters \(n_layer=3, .*more than the [\d,]+ its weight files hold"),
    ({"n_layer": 1}, r"unexpected tensors for a GPT-2 \(h.1."),
])
def test_folders_gptmini_cannot_reproduce_are_refused_in_one_line(tiny, tmp_path, change, message):
    folder = copy_folder(tiny[1], tmp_path / "changed", config=change)
    with pytest.raises(PretrainedError, match=message) as err:
        load_hf_gpt2(str(folder))
    assert "\n" not in str(err.value) and f"model.init_from={folder}" in str(err.value)


def test_missing_files_and_folders(tiny, tmp_path):
    with pytest.raises(PretrainedError, match=r"lacks model.safetensors or pytorch_model.bin"):
        load_hf_gpt2(str(copy_folder(tiny[1], tmp_path / "noweights", drop="model.safetensors")))
    with pytest.raises(PretrainedError, match=r"lacks config.json"):
        load_hf_gpt2(str(copy_folder(tiny[1], tmp_path / "noconfig", drop="config.json")))
    with pytest.raises(PretrainedError, match=r"model.init_from=.*nowhere: no such folder"):
        load_hf_gpt2(str(tmp_path / "nowhere"))
    with pytest.raises(PretrainedError, match=r"^ckpt=.*nowhere: no such folder"):
        resolve_pretrained(str(tmp_path / "nowhere"), key="ckpt")


def fake_hub_cache(cache: Path, repo: str, src: Path) -> Path:
    """What huggingface_hub's cache holds after a download of `repo`: refs/main -> snapshots/<commit>/."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots").mkdir()
    return copy_folder(src, root / "snapshots" / commit)


@pytest.mark.parametrize("repo", ["openai-community/gpt2", "gpt2"])
def test_a_name_resolves_through_the_hub_cache(tiny, tmp_path, repo):
    snapshot = fake_hub_cache(tmp_path / "cache", repo, tiny[1])
    assert resolve_pretrained("gpt2", cache_dir=tmp_path / "cache", download=False) == snapshot
    cfg, _ = load_hf_gpt2("gpt2", cache_dir=tmp_path / "cache", download=False)
    assert cfg.n_embd == 64


def test_a_name_not_cached_with_the_hub_unreachable_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network here
    for download in (False, True):
        with pytest.raises(PretrainedError) as err:
            resolve_pretrained("gpt2-medium", cache_dir=tmp_path / "empty", download=download)
        message = str(err.value)
        assert message.startswith("model.init_from=gpt2-medium: not in the local Hugging Face cache and the hub is "
                                  "unreachable (")
        assert message.endswith("download once with network, or pass a local folder") and "\n" not in message


def test_is_pretrained_ref(tiny, tmp_path):
    assert is_pretrained_ref("gpt2") and is_pretrained_ref("gpt2-xl") and is_pretrained_ref(str(tiny[1]))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert not is_pretrained_ref(str(tmp_path / "run")) and not is_pretrained_ref("gpt3")


# ----------------------------------------------------------------------------------------------------------
# model.init_from: what the weights can serve


def test_init_from_spelling_is_validated():
    for good in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "./gpt2-finetuned", "/abs/folder", "~/hf/gpt2"):
        assert ModelConfig(init_from=good).init_from == good
    for bad in ("gpt3", "gpt2-small", "", " gpt2/"):
        with pytest.raises(ValueError, match=r"^model.init_from=.* is unknown; valid: gpt2, gpt2-medium, gpt2-large, "
                                             r"gpt2-xl, or the path of a local Hugging Face GPT-2 folder"):
            ModelConfig(init_from=bad)


@pytest.mark.parametrize("setting, message", [
    (dict(pos_encoding="rope"), "model.pos_encoding=rope"),
    (dict(qk_norm=True), "model.qk_norm=true"),
    (dict(logit_softcap=30.0), "model.logit_softcap=30.0"),
    (dict(mlp="relu2"), "model.mlp=relu2"),
    (dict(bias=False), "model.bias=false"),
    (dict(zero_init_proj=True), "model.zero_init_proj=true"),
    (dict(attention=AttentionConfig("gqa", n_kv_head=2)), "model.attention.name=gqa"),
    (dict(attention=AttentionConfig("swa", window=8)), "model.attention.name=swa"),
    (dict(block_size=2048), "model.block_size=2048: the weights have 1024 positions"),
])
def test_requests_the_weights_cannot_serve_are_refused_where_the_config_enters(setting, message):
    with pytest.raises(ValueError, match=rf"^model.init_from=gpt2 cannot be combined with {message}") as err:
        check_model_config(ModelConfig(init_from="gpt2", **setting))
    assert "\n" not in str(err.value)


def test_the_tokenizer_must_be_tiktoken_gpt2(tiktoken_cache):
    from gptmini.tokenizer import CharTokenizer, TiktokenTokenizer

    check_pretrained_tokenizer("gpt2", TiktokenTokenizer("gpt2").spec())
    check_pretrained_tokenizer("gpt2", data_tokenizer_spec("tiktoken", "r50k_base"))
    assert not is_gpt2_tokenizer(None)
    for spec, used in [(CharTokenizer("ab\n").spec(), "char"), (data_tokenizer_spec("bytes"), "bytes"),
                       (data_tokenizer_spec("tiktoken", "cl100k_base"), "tiktoken cl100k_base")]:
        expected = (r"^model.init_from=gpt2 needs data tokenized with tiktoken gpt2 "
                    rf"\(data.tokenizer=tiktoken data.encoding=gpt2\); this data uses {used}$")
        with pytest.raises(ValueError, match=expected):
            check_pretrained_tokenizer("gpt2", spec)


def test_load_pretrained_keeps_the_run_options_and_crops_positions(gpt2_vocab_folder, tiny):
    model, folder = gpt2_vocab_folder
    requested = ModelConfig(init_from=str(folder), block_size=32, dropout=0.1, attention=AttentionConfig("mha"))
    cfg, sd = load_pretrained(requested)
    assert (cfg.block_size, cfg.dropout, cfg.attention.name, cfg.init_from) == (32, 0.1, "mha", str(folder))
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.mlp) == (2, 64, 50257, "gelu_tanh")
    assert sd["wpe.weight"].shape == (32, 64)
    idx = tokens(50257, T=32)
    assert (build_gpt(cfg, sd).eval()(idx).logits - hf_logits(model, idx)).abs().max().item() < TOL
    with pytest.raises(ValueError, match=r"model.block_size=128: the weights have 64 positions; use at most 64"):
        load_pretrained(dataclasses.replace(requested, block_size=128))
    with pytest.raises(PretrainedError, match=r"^model.init_from=.*: its 211-token vocabulary is not GPT-2's"):
        load_pretrained(dataclasses.replace(requested, init_from=str(tiny[1])))


def test_a_padded_vocabulary_pads_the_pretrained_embedding_with_zero_rows(gpt2_vocab_folder):
    model, folder = gpt2_vocab_folder
    cfg, sd = load_pretrained(ModelConfig(init_from=str(folder), block_size=64, vocab_multiple=64))
    gpt = build_gpt(cfg, sd).eval()
    assert gpt.wte.weight.shape == (50304, 64) and not gpt.wte.weight[50257:].any()
    idx = tokens(50257)
    assert (gpt(idx).logits - hf_logits(model, idx)).abs().max().item() < TOL


@pytest.fixture(scope="module")
def gpt2_vocab_folder(tmp_path_factory) -> tuple[object, Path]:
    model = hf_gpt2(vocab_size=50257, seed=5)
    return model, save_hf(model, tmp_path_factory.mktemp("hf") / "vocab50257")


def test_load_for_inference_pairs_the_weights_with_the_gpt2_tokenizer(gpt2_vocab_folder, tiny, tiktoken_cache):
    model, folder = gpt2_vocab_folder
    loaded = load_pretrained_for_inference(str(folder))
    assert loaded.path == folder and not loaded.model.training
    assert loaded.tokenizer.spec() == {"kind": "tiktoken", "encoding": "gpt2"}
    assert loaded.config["model"]["mlp"] == "gelu_tanh" and loaded.config["data"]["encoding"] == "gpt2"
    idx = torch.tensor([loaded.tokenizer.encode("Hello, world! It's a test.")])
    with torch.no_grad():
        delta = (loaded.model(idx).logits - hf_logits(model, idx)).abs().max().item()
    assert delta < TOL
    with pytest.raises(PretrainedError, match=r"^ckpt=.*: its 211-token vocabulary is not GPT-2's \(50257 tokens\)"):
        load_pretrained_for_inference(str(tiny[1]))


def test_a_foreign_vocab_json_is_refused(gpt2_vocab_folder, tiktoken_cache, tmp_path):
    folder = copy_folder(gpt2_vocab_folder[1], tmp_path / "foreign")
    (folder / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(PretrainedError, match=r"its vocab.json is not GPT-2's"):
        load_pretrained_for_inference(str(folder))


# ----------------------------------------------------------------------------------------------------------
# The real weights, only when already cached


def cached_gpt2() -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, "model.safetensors"), str)
               for repo in ("openai-community/gpt2", "gpt2"))


@pytest.mark.slow
@pytest.mark.skipif(not cached_gpt2(), reason="the gpt2 weights are not in the local Hugging Face cache "
                                              "(this test never downloads them)")
def test_real_gpt2_matches_transformers(tiktoken_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_pretrained_for_inference("gpt2", download=False)
    assert loaded.model.num_parameters() == 124_439_808
    hf = transformers.GPT2LMHeadModel.from_pretrained(loaded.path, attn_implementation="eager").eval()
    idx = torch.tensor([loaded.tokenizer.encode("The capital of France is Paris. The capital of Germany is")])
    with torch.no_grad():
        ours, theirs = loaded.model(idx).logits, hf(idx).logits
    delta = (ours - theirs).abs().max().item()
    assert delta < 1e-3 * max(1.0, theirs.abs().max().item()), f"max |logits - transformers| = {delta:.2e}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
