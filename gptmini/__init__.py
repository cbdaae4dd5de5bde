"""gptmini: a small, fast, hackable GPT training framework.

    from gptmini import GPT, AttentionConfig, ModelConfig
    model = GPT(ModelConfig(vocab_size=65, attention=AttentionConfig(name="mha")))

Training: `gptmini.trainer.train(run_config, run_dir)`; sampling: `gptmini.generation.run_generation(config)`;
checkpoints: `gptmini.checkpoint.load_for_inference(path)` (a run, a checkpoint file, or "gpt2" / a Hugging Face
GPT-2 folder); pretrained GPT-2 in: `gptmini.pretrained.load_hf_gpt2("gpt2")` -> (ModelConfig, state dict);
out: `gptmini.export.export_hf(...)`.
"""

from gptmini.attention import (
    ATTENTION_REGISTRY,
    Attention,
    KVCache,
    build_attention,
    register_attention,
    weight_compatible_variants,
)
from gptmini.config import AttentionConfig, ModelConfig
from gptmini.model import GPT, GPTOutput

__all__ = [
    "ATTENTION_REGISTRY",
    "weight_compatible_variants",
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
