"""The README's extension examples (Architecture: an attention variant, a data source, an optimizer) run as printed:
each registers, its YAML fits the config schema, and the thing it adds works when named by config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gptmini.attention import ATTENTION_REGISTRY
from gptmini.config import VARIANT_DEFAULTS, AttentionConfig, DataConfig, ModelConfig, OptimConfig, RunConfig
from gptmini.data import SOURCE_REGISTRY, prepare
from gptmini.model import GPT
from gptmini.optim import OPTIMIZER_REGISTRY, make_optimizer, skips_on_device

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def example(name: str) -> str:
    """The fenced block right after `<!-- example: NAME -->` in the README."""
    found = re.search(rf"<!-- example: {re.escape(name)}(?:: [^>]*)? -->\n```\w+\n(.*?)```", README, re.S)
    assert found, f"README has no example {name!r}"
    return found.group(1)


def run_example(name: str, registry: dict, key: str) -> None:
    assert key not in registry
    exec(compile(example(name), f"README example {name}", "exec"), {})
    assert key in registry


@pytest.fixture
def cleanup():
    yield
    for registry, key in ((ATTENTION_REGISTRY, "plain_sdpa"), (VARIANT_DEFAULTS, "plain_sdpa"),
                          (SOURCE_REGISTRY, "lines"), (OPTIMIZER_REGISTRY, "sgd")):
        registry.pop(key, None)


def test_the_attention_example_computes_what_sdpa_computes(cleanup):
    run_example("attention", ATTENTION_REGISTRY, "plain_sdpa")
    attention = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AttentionConfig),
                                                    OmegaConf.create(example("attention yaml"))))
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=32, attention=attention))
    reference = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=32))
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(0, 32, (2, 16))
    assert torch.allclose(model(idx).logits, reference(idx).logits, atol=1e-5)
    assert not ATTENTION_REGISTRY["plain_sdpa"].returns_weights


def test_the_source_example_prepares_a_corpus(tmp_path, cleanup):
    run_example("source", SOURCE_REGISTRY, "lines")
    corpus = tmp_path / "poem.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(30)))
    yaml = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(example("source yaml")))
    cfg = OmegaConf.to_object(OmegaConf.merge(yaml, {"path": str(corpus)}))
    prepared = prepare(cfg, tmp_path / "data", log=lambda _: None)
    assert prepared.meta["train_tokens"] > 0 and prepared.meta["val_tokens"] > 0


def test_the_optimizer_example_steps_and_is_known_to_need_the_host(cleanup):
    run_example("optimizer", OPTIMIZER_REGISTRY, "sgd")
    optim = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig),
                                                OmegaConf.create(example("optimizer yaml"))))
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    opt = make_optimizer(model, RunConfig(optim=optim), torch.device("cpu"))
    before = model.wte.weight.detach().clone()
    idx = torch.randint(0, 32, (2, 8))
    model(idx, idx).loss.backward()
    opt.step()
    assert not torch.equal(before, model.wte.weight) and not skips_on_device(opt)
