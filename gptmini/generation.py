"""Sampling from a checkpoint, as a library: `load_for_inference` and `run_generation(config)`.

The model, its tokenizer and vocabulary all come from the checkpoint; the data folder is not needed.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TextIO

import torch

from gptmini.attention import WEIGHT_COMPATIBLE
from gptmini.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from gptmini.config import AttentionConfig, GenerateConfig, ModelConfig
from gptmini.device import autocast, resolve_device, resolve_dtype
from gptmini.model import GPT
from gptmini.sampling import generate_stream
from gptmini.tokenizer import Tokenizer, tokenizer_from_spec


def load_for_inference(
    ckpt: str | Path, device: torch.device | str = "cpu", attention: AttentionConfig | None = None
) -> tuple[GPT, Tokenizer]:
    """Rebuild model and tokenizer from a checkpoint (optionally with another attention variant)."""
    path = find_checkpoint(ckpt)
    state = load_checkpoint(path)
    try:
        model_cfg = ModelConfig(**state["config"]["model"])
        tokenizer = tokenizer_from_spec(state["tokenizer"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{str(path)!r} lacks a valid model config or tokenizer ({err})") from None
    if attention is not None:
        trained = model_cfg.attention.name
        if attention.name not in WEIGHT_COMPATIBLE or trained not in WEIGHT_COMPATIBLE:
            if attention.name != trained:
                raise ValueError(
                    f"model/attention={attention.name} cannot load weights trained with {trained!r}; "
                    f"weight-compatible variants: {', '.join(WEIGHT_COMPATIBLE)}"
                )
        model_cfg = dataclasses.replace(model_cfg, attention=attention)
    model = GPT(model_cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise CheckpointError(f"{str(path)!r}: its tensors do not fit its config ({detail})") from None
    return model.to(device).eval(), tokenizer


def run_generation(cfg: GenerateConfig, stream: TextIO | None = sys.stdout) -> list[str]:
    """Sample `num_samples` continuations (one batch), streaming the first to `stream` token by token."""
    cfg.validate()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer = load_for_inference(cfg.ckpt, device, cfg.model.attention)
    prompt = Path(cfg.prompt_file).read_text() if cfg.prompt_file else cfg.prompt
    # An empty prompt starts from end-of-text, like a fresh document.
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)  # (N, T)

    if cfg.attention_map or cfg.attention_tb:
        from gptmini.attention_maps import save_prompt_attention

        save_prompt_attention(model, tokenizer, idx[:1], cfg.attention_map, cfg.attention_tb,
                              cfg.attention_layers, cfg.attention_heads)

    if cfg.compile:
        model = torch.compile(model)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    new_ids: list[list[int]] = [[] for _ in range(cfg.num_samples)]
    printed = 0
    done = torch.zeros(cfg.num_samples, dtype=torch.bool, device=device)
    with autocast(device, dtype):
        for token in generate_stream(model, idx, cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_k=cfg.top_k, top_p=cfg.top_p, generator=gen, kv_cache=cfg.kv_cache):
            for row, tok in enumerate(token[:, 0].tolist()):
                if not done[row]:
                    new_ids[row].append(tok)
            done |= token[:, 0] == tokenizer.eot_id
            if cfg.stop is not None:
                for row in range(cfg.num_samples):
                    done[row] |= cfg.stop in tokenizer.decode(new_ids[row])
            if stream is not None:  # stream the first sample as it grows
                text = _clean(tokenizer, new_ids[0], cfg.stop)
                stream.write(text[printed:])
                stream.flush()
                printed = len(text)
            if bool(done.all()):
                break
    samples = [prompt + _clean(tokenizer, ids_, cfg.stop) for ids_ in new_ids]
    if stream is not None:
        stream.write("\n")
    if cfg.out:
        Path(cfg.out).write_text("\n\n---\n\n".join(samples) + "\n")
    return samples


def _clean(tokenizer: Tokenizer, ids: list[int], stop: str | None) -> str:
    """Decoded text up to (not including) end-of-text or the stop string."""
    if tokenizer.eot_id in ids:
        ids = ids[: ids.index(tokenizer.eot_id)]
    text = tokenizer.decode(ids)
    if stop is not None and stop in text:
        text = text[: text.index(stop)]
    return text
