"""Autoregressive sampling with a KV cache: the prompt is prefilled in one pass, then one token per step."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from gptmini.model import GPT


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Keep the `top_k` most likely tokens and/or the smallest set whose probability reaches `top_p`.

    logits (B, V); removed entries become -inf.
    """
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p  # the set stops at the first token that reaches p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    """(B, V) logits -> (B, 1) token ids. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate_stream(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
) -> Iterator[Tensor]:
    """Yield (B, 1) new tokens one at a time, continuing idx (B, T).

    Past `block_size` the context slides: the cache is rebuilt from the last `block_size` tokens (learned
    positions cannot be shifted in place), so cached and uncached decoding agree everywhere.
    """
    block = model.config.block_size
    cache = model.make_kv_cache(idx.size(0)) if kv_cache else None
    context = idx[:, -block:]
    logits = model(context, kv_cache=cache).logits[:, -1]  # prefill: (B, V)
    for i in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        yield token
        if i == max_new_tokens - 1:
            break
        context = torch.cat([context, token], dim=1)[:, -block:]  # (B, <= block)
        if cache is None:
            logits = model(context).logits[:, -1]
        elif cache.pos < block:
            logits = model(token, kv_cache=cache).logits[:, -1]
        else:  # the window is full: slide it by one and prefill again
            cache.reset()
            logits = model(context, kv_cache=cache).logits[:, -1]


def generate(model: GPT, idx: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
    """idx (B, T) -> (B, T + max_new_tokens)."""
    new = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, *new], dim=1) if new else idx
