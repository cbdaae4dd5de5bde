"""Tiny random Hugging Face GPT-2 models: the oracle of the pretrained-weights and fine-tuning tests."""

from __future__ import annotations

from pathlib import Path

import torch

SIZES = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64)


def hf_gpt2(vocab_size: int = 211, seed: int = 0, **config):
    """A random tiny GPT-2 in eval mode, its biases and layer-norm gains randomised too (so a swapped or
    untransposed tensor cannot hide behind zeros and ones)."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(**{**SIZES, "vocab_size": vocab_size, **config})
    hf_cfg._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder
