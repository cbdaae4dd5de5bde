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
    # Shifted so the largest is 0 (softmax is shift-invariant) and divided in float64, where a temperature like
    # 1e-300 is not 0: the others go to -inf and the draw to the argmax, instead of NaN probabilities.
    logits = logits.double()
    logits = ((logits - logits.amax(dim=-1, keepdim=True)) / temperature).float()
    logits = filter_logits(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def last_logits(model: GPT, tokens: Tensor, **kwargs) -> Tensor:
    """tokens (B, T) -> the logits (B, V) of the last position, all that sampling needs (the head runs for it
    alone)."""
    return model(tokens, last_only=True, **kwargs).logits[:, -1]


class Decoder:
    """The KV-cache path: the prompt in one pass (prefill), then one position per call (decode).

    `static` uses a StaticKVCache: every decode step has the same shapes and reads its position from a tensor, so
    `compile` can turn the step into one compiled graph (`mode="reduce-overhead"`: a CUDA graph on GPUs, where a
    batch-1 step is otherwise bound by kernel launches); prefill is compiled separately, for any prompt length.
    Without `static`, the growing cache of the eager path (every variant; `return_weights` needs it too)."""

    def __init__(self, model: GPT, batch_size: int, dtype: torch.dtype | None, static: bool = False,
                 compile: bool = False, rolling: bool = False) -> None:
        static = static or compile  # only the fixed-shape cache compiles into one graph
        self.model, self.static = model, static
        self.cache = model.make_kv_cache(batch_size, dtype=dtype, static=static, rolling=rolling)
        self.prefill_fn = self.decode_fn = self._forward
        if compile:
            self.decode_fn = torch.compile(self._forward, mode=one_shape_mode(model), dynamic=False)
            self.prefill_fn = torch.compile(self._forward, dynamic=True)

    @property
    def pos(self) -> int:
        return self.cache.pos

    def _forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        return last_logits(self.model, tokens, kv_cache=self.cache, input_pos=input_pos)

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) continue the cached positions -> the logits (B, V) of the last one."""
        if not self.static:
            return last_logits(self.model, tokens, kv_cache=self.cache)
        T = tokens.size(1)
        input_pos = torch.arange(self.cache.pos, self.cache.pos + T, device=tokens.device)  # (T,)
        logits = (self.decode_fn if T == 1 else self.prefill_fn)(tokens, input_pos)
        self.cache.advance(T)
        return logits.clone()  # a CUDA graph's output is overwritten by its next replay


def one_shape_mode(model: GPT) -> str | None:
    """The compile mode for a step whose shapes never change: a CUDA graph on GPUs, where a small step is bound by
    kernel launches; Inductor's default elsewhere."""
    return "reduce-overhead" if model.wte.weight.device.type == "cuda" else None


class ContextStep:
    """The uncached step: the whole context (B, T <= block_size) in one pass -> the logits (B, V) of its last position.

    Once the context fills `block_size` and slides, every step has the same shape, so with `compile` that step is
    one compiled graph (a CUDA graph on GPUs); shorter contexts, each a new shape, run eagerly."""

    def __init__(self, model: GPT, compile: bool = False) -> None:
        self.model = model
        self.full_fn = torch.compile(last_logits, mode=one_shape_mode(model), dynamic=False) if compile else None

    def __call__(self, context: Tensor) -> Tensor:
        if self.full_fn is None or context.size(1) < self.model.config.block_size:
            return last_logits(self.model, context)
        # contiguous: a context cut from a longer tensor has other strides, which Dynamo would compile again for
        logits = self.full_fn(self.model, context.contiguous())
        return logits.clone()  # a CUDA graph's output is overwritten by its next replay


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
    static: bool = False,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Yield (B, 1) new tokens one at a time, continuing idx (B, T) (all rows as one batch).

    Each token is predicted from at most the last `block_size` tokens, with or without the cache. With the
    cache, the prompt is prefilled in one pass and each new token costs one single-position forward, until the
    context fills `block_size`. From then on the context slides by one token per step and no cached key or value
    stays valid: with learned positions every token's position embedding changes, and in a multi-layer model
    (RoPE too) the hidden states of the tokens that attended to the one that just left change with it. So the
    context is recomputed in one pass per token, exactly as without the cache: cached and uncached decoding
    agree, and the cache saves work within the first `block_size` tokens only.
    Except for a RoPE model whose every layer is windowed (GPT.rolls_past_block): a rolling cache (each layer its
    last `window` keys and values) decodes on past block_size, one position per token, each query seeing its
    window's keys at their own positions, as in training (the uncached sliding path restarts positions at 0).
    `static` / `compile`: the fixed-shape cache and the compiled decode step (compile implies static; see Decoder);
    `compile` also compiles the full sliding context (see ContextStep).
    """
    if max_new_tokens <= 0:
        return
    block = model.config.block_size
    context = idx[:, -block:]  # (B, <= block)
    whole_context = ContextStep(model, compile)
    decoder = None
    rolling = kv_cache and not (static or compile) and model.rolls_past_block()
    if kv_cache and (context.size(1) < block or rolling):
        kind = idx.device.type  # under autocast, keep keys and values in the dtype they are computed in
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        decoder = Decoder(model, idx.size(0), dtype, static=static, compile=compile, rolling=rolling)
    logits = decoder(context) if decoder is not None else whole_context(context)  # prefill: (B, V)
    for i in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        yield token
        if i == max_new_tokens - 1:
            break
        context = torch.cat([context, token], dim=1)[:, -block:]  # (B, <= block)
        if decoder is not None and (decoder.pos < block or rolling):
            logits = decoder(token)  # one new position (past block_size too, with a rolling cache)
        else:  # no cache, or the context is full and slides: the whole context in one pass
            decoder = None
            logits = whole_context(context)


def generate(model: GPT, idx: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
    """idx (B, T) -> (B, T + max_new_tokens)."""
    new = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, *new], dim=1) if new else idx
