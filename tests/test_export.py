"""gptmini.export: the folders it writes load in transformers and compute what gptmini computes, offline.

The oracle is transformers itself: GPT2LMHeadModel.from_pretrained on the exported folder gives gptmini's logits,
GPT2Tokenizer/GPT2TokenizerFast on the generated tokenizer files give tiktoken's ids, and a Hugging Face folder
exported back after a trip through gptmini holds the same tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptmini.attention import weight_compatible_variants
from gptmini.config import AttentionConfig, ModelConfig
from gptmini.export import check_exportable, export_hf, gpt2_merges, gpt2_vocab
from gptmini.model import GPT
from gptmini.pretrained import load_hf_gpt2

transformers = pytest.importorskip("transformers", reason="the oracle tests need transformers (the dev extra)")
from safetensors.torch import load_file  # noqa: E402  (after the skip: both come with the dev extra)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
GPT2 = {"kind": "tiktoken", "encoding": "gpt2"}
TEXTS = ["Hello, world!", "  two leading spaces\tand a tab\n\nnew lines\r\n", "It's we'll they'RE I'd",
         "naïve café — “quotes” 日本語のテキスト 🎉🎉 ∑x²", "trailing spaces   ", "\n", "1234567 + 89 = ?",
         "def f(x):\n    return x  # comment\n", " "]


def tiny_gpt(seed: int = 0, vocab_size: int = 50257, **fields) -> GPT:
    """A random gptmini GPT (2 layers, 4 heads, width 64, 64 positions) with randomised biases and norm gains."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64, "vocab_size": vocab_size,
                         "mlp": "gelu_tanh", **fields})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(vocab: int, T: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))


def max_delta(model: GPT, folder: Path, idx: torch.Tensor) -> float:
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return (model(idx).logits - hf(idx).logits).abs().max().item()


_EXPORTED: dict[str, tuple[GPT, Path]] = {}


@pytest.fixture
def exported(tmp_path_factory, tiktoken_cache) -> tuple[GPT, Path]:
    """A tiny gelu_tanh model over the gpt2 vocabulary, exported once for the module's tests."""
    if "gpt2" not in _EXPORTED:
        model = tiny_gpt()
        out = tmp_path_factory.mktemp("export") / "gpt2-tiny"
        export_hf(model, GPT2, out)
        _EXPORTED["gpt2"] = model, out
    return _EXPORTED["gpt2"]


def test_the_folder_loads_in_transformers_with_the_same_logits(exported):
    model, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "merges.txt",
                                                      "model.safetensors", "tokenizer_config.json", "vocab.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == "gelu_new"
    assert "transformer.wte.weight" in load_file(out / "model.safetensors")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # tied: from_pretrained ties it to wte
    assert max_delta(model, out, ids(50257)) < TOL
    assert not list(out.parent.glob(".*tmp*"))  # the temporary folder was renamed into place
    modes = {p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(modes) == 1, "model.safetensors as readable as the other files"


@pytest.mark.parametrize("fields", [dict(mlp="gelu"), dict(bias=False), dict(attention=AttentionConfig("torch_mha")),
                                    dict(attention=AttentionConfig("mha"), vocab_size=300),
                                    dict(vocab_size=300, vocab_multiple=64)])  # padding rows are not exported
def test_other_exportable_models(tmp_path, fields):
    model = tiny_gpt(seed=2, **fields)
    export_hf(model, None, tmp_path / "out")  # no tokenizer spec: weights only
    assert not (tmp_path / "out" / "vocab.json").exists()
    assert max_delta(model, tmp_path / "out", ids(model.config.vocab_size)) < TOL


def test_round_trip_hf_gptmini_hf_gptmini_is_bit_identical(tmp_path):
    torch.manual_seed(4)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=211)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    hf.save_pretrained(tmp_path / "hf")
    cfg, sd = load_hf_gpt2(str(tmp_path / "hf"), AttentionConfig("mha"))
    model = GPT(cfg)
    model.load_state_dict(sd)
    export_hf(model, None, tmp_path / "again")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    cfg2, sd2 = load_hf_gpt2(str(tmp_path / "again"))
    assert dataclasses.replace(cfg2, attention=cfg.attention) == cfg
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_tokenizer_files_encode_and_decode_as_tiktoken(exported):
    from gptmini.tokenizer import TiktokenTokenizer

    _, out = exported
    enc = TiktokenTokenizer("gpt2").enc
    for cls in (transformers.GPT2Tokenizer, transformers.GPT2TokenizerFast, transformers.AutoTokenizer):
        tok = cls.from_pretrained(out)
        assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
        for text in TEXTS:
            expected = enc.encode_ordinary(text)
            assert tok.encode(text, add_special_tokens=False) == expected, (cls.__name__, text)
            assert tok.decode(expected) == text, (cls.__name__, text)


def tiktoken_cached(url: str) -> Path | None:
    """A file tiktoken downloaded once (its cache names files by the SHA-1 of their URL)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    path = Path(cache) / hashlib.sha1(url.encode()).hexdigest() if cache else None
    return path if path is not None and path.is_file() else None


def test_tokenizer_files_are_openais_originals(tiktoken_cache):
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    merges, encoder = tiktoken_cached(base + "vocab.bpe"), tiktoken_cached(base + "encoder.json")
    if merges is None or encoder is None:
        pytest.skip("OpenAI's vocab.bpe/encoder.json are not in the tiktoken cache to compare with")
    assert gpt2_merges() == merges.read_text(encoding="utf-8")
    assert gpt2_vocab() == json.loads(encoder.read_text(encoding="utf-8"))


@pytest.mark.parametrize("fields, spec, message", [
    (dict(pos_encoding="rope"), None, r"model.pos_encoding=rope as a Hugging Face GPT-2: it has learned positions"),
    (dict(qk_norm=True), None, r"model.qk_norm=true"),
    (dict(mlp="relu2"), None, r"model.mlp=relu2"),
    (dict(logit_softcap=15.0), None, r"model.logit_softcap=15.0"),
    (dict(attention=AttentionConfig("gqa", n_kv_head=2)), None, r"model.attention.name=gqa"),
    (dict(attention=AttentionConfig("swa", window=8)), None, r"model.attention.name=swa"),
    (dict(attention=AttentionConfig("mla", kv_rank=8)), None, r"model.attention.name=mla as a Hugging Face GPT-2"),
    (dict(attention=AttentionConfig("linear")), None, r"model.attention.name=linear .*full multi-head attention"),
    (dict(attention=AttentionConfig("diff")), None, r"model.attention.name=diff"),
    ({}, {"kind": "char", "chars": "ab"}, r"over the char tokenizer"),
    ({}, {"kind": "bytes"}, r"over the bytes tokenizer"),
    ({}, {"kind": "tiktoken", "encoding": "cl100k_base"}, r"over the tiktoken cl100k_base tokenizer"),
    (dict(vocab_size=300), GPT2, r"model.vocab_size=300: the gpt2 tokenizer has 50257 ids"),
])
def test_models_gpt2_cannot_express_are_refused_in_one_line(tmp_path, fields, spec, message):
    cfg = ModelConfig(**{"n_head": 4, "n_embd": 64, "vocab_size": 50257, **fields})
    with pytest.raises(ValueError, match=message) as err:
        check_exportable(cfg, spec)
    assert str(err.value).startswith("cannot export") and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message):
        export_hf(GPT(dataclasses.replace(cfg, n_layer=1, n_embd=16)), spec, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder


def test_an_existing_folder_is_never_overwritten(tmp_path):
    model = tiny_gpt(vocab_size=50)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"^out=.*full exists and is not empty; choose a new folder or remove it"):
        export_hf(model, None, tmp_path / "full")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^out=.*file is a file; choose a new folder"):
        export_hf(model, None, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    export_hf(model, None, tmp_path / "empty", dtype=torch.bfloat16)  # an empty folder is fine
    assert load_file(tmp_path / "empty" / "model.safetensors")["transformer.wte.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "empty" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_exports_a_checkpoint(tmp_path, tiktoken_cache):
    from gptmini.checkpoint import save_checkpoint

    model = tiny_gpt(seed=6)
    save_checkpoint({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.config)},
                     "tokenizer": GPT2}, tmp_path / "ckpt.pt")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gptmini.export", *args], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "TIKTOKEN_CACHE_DIR": str(tiktoken_cache)}, timeout=300)

    done = cli(f"ckpt={tmp_path / 'ckpt.pt'}", f"out={tmp_path / 'hf'}")
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stdout and max_delta(model, tmp_path / "hf", ids(50257)) < TOL
    again = cli(f"ckpt={tmp_path / 'ckpt.pt'}", f"out={tmp_path / 'hf'}")
    assert again.returncode == 2 and again.stderr.startswith("error: out=") and len(again.stderr.splitlines()) == 1
    bad = cli(f"ckpt={tmp_path / 'ckpt.pt'}", f"out={tmp_path / 'x'}", "dtype=int8")
    assert bad.returncode == 2 and "dtype='int8' is unknown" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_every_weight_compatible_variant_exports_the_same_tensors(tmp_path):
    source = tiny_gpt(seed=7, vocab_size=40, attention=AttentionConfig("mha"))
    reference = None
    for name in weight_compatible_variants():
        model = GPT(dataclasses.replace(source.config, attention=AttentionConfig(name)))
        model.load_state_dict(source.state_dict())
        export_hf(model, None, tmp_path / name)
        tensors = load_file(tmp_path / name / "model.safetensors")
        reference = reference or tensors
        assert all(torch.equal(reference[k], tensors[k]) for k in reference), name
