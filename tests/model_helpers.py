"""Small model configs shared by the attention, model and recipe tests."""

from __future__ import annotations

from gptmini.config import AttentionConfig, ModelConfig


def tiny_config(name: str = "mha", window: int = 3, **overrides) -> ModelConfig:
    """A 2-layer, 4-head, 32-wide model with attention variant `name`, block 16 and a 37-token vocabulary.

    gqa gets 2 key/value heads and swa a `window`; `overrides` replace any ModelConfig field.
    """
    attention = {"gqa": AttentionConfig("gqa", n_kv_head=2), "swa": AttentionConfig("swa", window=window)}.get(
        name
    ) or AttentionConfig(name)
    fields = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=37, dropout=0.0, attention=attention)
    return ModelConfig(**(fields | overrides))
