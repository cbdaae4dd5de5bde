"""gptmini: a small, fast, hackable GPT training framework.

from gptmini import GPT, ModelConfig
model = GPT(ModelConfig(vocab_size=65, attention=AttentionConfig(name="mha")))
"""

from gptmini.attention import (
    ATTENTION_REGISTRY,
    WEIGHT_COMPATIBLE,
    Attention,
    KVCache,
    build_attention,
    register_attention,
)
from gptmini.config import AttentionConfig, ModelConfig
from gptmini.model import GPT, GPTOutput

__all__ = [
    "ATTENTION_REGISTRY",
    "WEIGHT_COMPATIBLE",
    "GPT",
    "Attention",
    "AttentionConfig",
    "GPTOutput",
    "KVCache",
    "ModelConfig",
    "build_attention",
    "register_attention",
]
__version__ = "0.1.0"
