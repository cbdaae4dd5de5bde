"""Pretrained GPT-2 weights through the product's entry points, with transformers as the oracle, offline.

A tiny random GPT-2 with GPT-2's 50257-token vocabulary stands in for OpenAI's weights (saved as a Hugging Face
folder): `model.init_from=<folder>` trains from it, the run resumes without the folder, and `ckpt=<folder>` samples
and measures it as transformers computes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import hf_gpt2, save_hf
from test_train import make_config

from gptmini import data as data_lib
from gptmini.checkpoint import load_checkpoint
from gptmini.config import AttentionConfig, DataConfig, EvalOptions, EvaluateConfig, GenerateConfig, ModelOverride
from gptmini.evaluate import run_evaluation
from gptmini.generate_command import run_generation
from gptmini.pretrained import key_map
from gptmini.tokenizer import build_tokenizer
from gptmini.trainer import train

transformers = pytest.importorskip("transformers", reason="the oracle tests need transformers (the dev extra)")

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n" * 40


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> tuple[object, Path]:
    model = hf_gpt2(vocab_size=50257, seed=3)
    return model, save_hf(model, tmp_path_factory.mktemp("hf") / "gpt2-tiny")


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def finetune_config(corpus: Path, data_dir: Path, folder: Path, *overrides: str):
    return make_config(corpus, data_dir, "data.tokenizer=tiktoken", "data.split=position",
                       f"model.init_from={folder}", "model.block_size=32", "model.dropout=0.0",
                       "train.lr=1e-4", "train.warmup_iters=0", "train.max_iters=4", "train.eval_interval=0",
                       "train.attn_interval=0", "train.sample_tokens=0", "train.final_eval=false", *overrides)


def hf_state(model) -> dict[str, torch.Tensor]:
    """transformers' tensors under gptmini's names, in gptmini's (out, in) orientation."""
    hf = model.transformer.state_dict()
    return {ours: (hf[name].t() if transposed else hf[name]) for name, ours, transposed in key_map(2)}


def test_training_starts_from_the_weights_and_resumes_without_them(tmp_path, corpus, hf_model, tiktoken_cache):
    model, original = hf_model
    folder = Path(shutil.copytree(original, tmp_path / "weights"))
    run = tmp_path / "run"
    first = train(finetune_config(corpus, tmp_path / "data", folder, "train.stop_after=2"), run)
    assert first.step == 2
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    cfg = saved["config"]["model"]
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"]) == (2, 4, 64, 50257)
    assert (cfg["mlp"], cfg["init_from"], cfg["block_size"]) == ("gelu_tanh", str(folder), 32)
    # Two AdamW steps at lr 1e-4 move each weight by at most ~2e-4: the run started from GPT-2's weights,
    # not from a random initialisation (which differs from them by ~0.1).
    reference = hf_state(model)
    for name, tensor in reference.items():
        start = tensor[:32] if name == "wpe.weight" else tensor
        assert (saved["model"][name] - start).abs().max() < 1e-3, name
    assert not torch.equal(saved["model"]["blocks.0.attn.qkv.weight"], reference["blocks.0.attn.qkv.weight"])

    shutil.rmtree(folder)  # a checkpoint does not need the weights' folder any more
    second = train(finetune_config(corpus, tmp_path / "data", folder), run)
    assert second.step == 4
    log = (run / "train.log").read_text()
    assert f"initialised from pretrained GPT-2 weights: {folder}" in log and "resumed from" in log

    samples = run_generation(GenerateConfig(ckpt=str(run), prompt="First", max_new_tokens=5, device="cpu"),
                             stream=None)
    assert samples[0].startswith("First") and len(samples[0]) > len("First")
    result = run_evaluation(EvaluateConfig(ckpt=str(run), eval=EvalOptions(device="cpu")), stream=None)
    assert 0 < result.loss < 20


def test_a_pretrained_model_needs_gpt2_tokens_before_any_data_is_prepared(tmp_path, corpus, hf_model):
    cfg = finetune_config(corpus, tmp_path / "data", hf_model[1], "data.tokenizer=char")
    with pytest.raises(ValueError, match=r"^model.init_from=.* needs data tokenized with tiktoken gpt2 .* uses char$"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kv_cache", [True, False])
def test_sampling_a_hugging_face_folder_matches_transformers_greedy(tmp_path, hf_model, tiktoken_cache, kv_cache):
    model, folder = hf_model
    prompt = "Before we proceed"
    cfg = GenerateConfig(ckpt=str(folder), prompt=prompt, max_new_tokens=12, temperature=0.0, device="cpu",
                         kv_cache=kv_cache, model=ModelOverride(AttentionConfig("mha")),
                         attention_map=str(tmp_path / "map.png"))
    ours = run_generation(cfg, stream=None)[0]
    tok = build_tokenizer("tiktoken", "gpt2")
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        theirs = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    eot = theirs[0].tolist().index(50256) if 50256 in theirs[0, ids.size(1):].tolist() else None
    assert ours == tok.decode(theirs[0, :eot].tolist())
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluating_a_hugging_face_folder_matches_transformers(tmp_path, corpus, hf_model, tiktoken_cache):
    model, folder = hf_model
    data = DataConfig(name="text", source="files", path=str(corpus), tokenizer="tiktoken", split="position")
    cfg = EvaluateConfig(ckpt=str(folder), data=data, data_dir=str(tmp_path / "data"),
                         eval=EvalOptions(window=16, device="cpu"))
    ours = run_evaluation(cfg, stream=None)
    tokens = torch.from_numpy(data_lib.prepare(data, tmp_path / "data").val_tokens().astype("int64"))
    total, n = 0.0, len(tokens) - 1
    with torch.no_grad():
        for start in range(0, n, 16):  # non-overlapping windows, every target position once
            x, y = tokens[start:min(start + 16, n)], tokens[start + 1:min(start + 17, n + 1)]
            total += F.cross_entropy(model(x[None]).logits[0], y, reduction="sum").item()
    assert ours.positions == n and abs(ours.loss - total / n) < 1e-4


def test_evaluating_pretrained_weights_needs_data(hf_model):
    with pytest.raises(ValueError, match=r"^ckpt=.* is pretrained weights, with no training data to fall back on"):
        run_evaluation(EvaluateConfig(ckpt=str(hf_model[1]), eval=EvalOptions(device="cpu")), stream=None)


def test_the_finetune_recipe_trains_from_a_folder_with_a_local_corpus(tmp_path, corpus, hf_model, tiktoken_cache):
    from test_recipe import run_config

    run = run_config("experiment=finetune_shakespeare", f"data.path={corpus}", f"data_dir={tmp_path / 'data'}",
                     f"model.init_from={hf_model[1]}", "model.block_size=32", "train.batch_size=2",
                     "train.grad_accum=1", "train.max_iters=3", "train.eval_interval=3", "train.eval_iters=1",
                     "train.sample_tokens=4", "train.device=cpu")
    assert (run.optim.name, run.train.lr, run.train.min_lr_ratio, run.model.dropout) == ("adamw", 3e-5, 1.0, 0.1)
    assert (run.data.name, run.data.tokenizer, run.data.encoding) == ("shakespeare", "tiktoken", "gpt2")
    result = train(run, tmp_path / "run")
    assert result.step == 3 and 0 < result.final_val_loss < 20
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
