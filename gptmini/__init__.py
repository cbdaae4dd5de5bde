"""gptmini: a small, fast, hackable GPT training framework.

    from gptmini import GPT, AttentionConfig, ModelConfig
    model = GPT(ModelConfig(vocab_size=65, attention=AttentionConfig(name="mha")))

Training: `gptmini.trainer.train(run_config, run_dir)`; sampling: `gptmini.generate_command.run_generation(config)`;
checkpoints: `gptmini.checkpoint.load_for_inference(path)` (a run, a checkpoint file, or "gpt2" / a Hugging Face
GPT-2 folder); pretrained GPT-2 in: `gptmini.pretrained.load_hf_gpt2("gpt2")` -> (ModelConfig, state dict);
out: `gptmini.export.export_hf(...)`.
"""

import os

# ROCm: consumer Radeon GPUs (RDNA) get PyTorch's fast SDPA kernels (AOTriton flash / memory-efficient) only with
# this set before torch loads; without it they silently run the math kernel. Set it by default (a value the user
# set wins); it must come before the first `import torch`, which is why it is the first thing the package does.
# CUDA builds ignore it. gptmini.backend_probe reports which kernel really runs.
os.environ.setdefault("TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL", "1")

from gptmini import phases  # noqa: E402, F401  (imports nothing heavy; notes when loading began)
from gptmini.startup import defer_interrupts  # noqa: E402  (imports nothing heavy)

defer_interrupts()  # a command's Ctrl-C while torch loads is reported by gptmini.cli, in one line

from gptmini.attention import (  # noqa: E402  (after the environment above, on purpose)
    ATTENTION_REGISTRY,
    Attention,
    KVCache,
    build_attention,
    register_attention,
    weight_compatible_variants,
)
from gptmini.config import AttentionConfig, ModelConfig  # noqa: E402
from gptmini.model import GPT, GPTOutput  # noqa: E402

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
