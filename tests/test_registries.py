"""Every extension point is a registry: a toy attention variant, data source or optimizer registered here is usable
by config with no other edit, and what the rest of gptmini must know about it it reads from the class."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gptmini.attention import ATTENTION_REGISTRY, SDPAttention, check_attention_config, register_attention
from gptmini.checkpoint import CheckpointError, swap_attention
from gptmini.config import VARIANT_DEFAULTS, AttentionConfig, ModelConfig
from gptmini.kernels import probe_attention_kernel
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import corpus, make_config  # noqa: E402, F401  (corpus is a fixture)


@pytest.fixture
def blind_variant():
    """`blind`: sdpa that cannot return its weights, reads model.attention.window (default 5), keeps its own
    weights (not interchangeable) and reports a compiled backend of its own."""

    @register_attention("blind")
    class Blind(SDPAttention):
        returns_weights = False
        weight_compatible = False
        reads = ("window",)
        compiled_backend = "blind-kernel"

        @classmethod
        def with_defaults(cls, attention, n_head):
            return attention if attention.window is not None else AttentionConfig(attention.name, window=5)

        def forward(self, x, kv_cache=None, return_weights=False, rope=None):
            return super().forward(x, kv_cache, False, rope)  # never the weights

    yield Blind
    del ATTENTION_REGISTRY["blind"], VARIANT_DEFAULTS["blind"]


def test_a_registered_variant_is_configured_by_its_flags(blind_variant):
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, attention=AttentionConfig("blind"))
    assert cfg.attention.window == 5  # its own default, through ModelConfig
    with pytest.raises(ValueError, match="n_kv_head=2 is ignored by attention variant 'blind'"):
        check_attention_config(AttentionConfig("blind", n_kv_head=2))
    with pytest.raises(CheckpointError, match="cannot run weights trained with 'blind'"):
        swap_attention(AttentionConfig("blind", window=5), AttentionConfig("mha"))
    assert swap_attention(AttentionConfig("blind", window=3), AttentionConfig("blind")).window == 3


def test_the_kernel_probe_asks_the_variant_for_its_compiled_backend(blind_variant):
    import torch

    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, attention=AttentionConfig("blind"))
    module = blind_variant(config)
    report = probe_attention_kernel(module, torch.device("cpu"), torch.float32, 8, record=lambda fn: [])
    assert report.backend == "blind-kernel"


def test_a_variant_without_weights_trains_with_no_attention_maps(tmp_path, corpus, blind_variant):  # noqa: F811
    cfg = make_config(corpus, tmp_path / "data", "model.attention.name=blind", "train.max_iters=4",
                      "train.attn_interval=2", "train.eval_interval=0", "train.sample_tokens=0",
                      "train.final_eval=false")
    assert train(cfg, tmp_path / "run").step == 4
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("attention maps: none (attention variant 'blind' returns no weights; "
                     "train.attn_interval=2 is ignored)") == 1
