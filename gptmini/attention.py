"""Causal multi-head self-attention in interchangeable implementations.

Every variant computes the same thing: causal self-attention over `n_head` heads, dropout on the attention
weights (after the softmax), and an output projection. They differ only in how. All share

    Variant(config: ModelConfig)
    forward(x, kv_cache=None, return_weights=False, rope=None) -> (y, weights | None)

and are found by name in `ATTENTION_REGISTRY` (see `build_attention`).

State dicts are portable. Every variant saves its parameters in one canonical layout,

    qkv.weight  (C + 2*C_kv, C)   query, key and value projections stacked, in that order
    qkv.bias    (C + 2*C_kv,)     when config.bias
    out_proj.weight (C, C), out_proj.bias (C,)

(the same layout as `nn.MultiheadAttention.in_proj_weight`), and converts to and from its own internal layout in
state-dict hooks. So a model trained with `sdpa` loads into `mha` to look at its attention weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gptmini.config import ModelConfig

Rope = tuple[Tensor, Tensor]  # (cos, sin), each (T, head_dim // 2), for the positions of the current input


# ----------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values for every layer, filled left to right during generation.

    `pos` counts the positions already filled. The model reads it to place new tokens, each layer writes its
    keys and values at [pos, pos + T), and the model advances `pos` once the whole stack has run.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, H_kv, max_len, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def layer(self, index: int) -> LayerKVCache:
        return LayerKVCache(self, index)

    def reset(self) -> None:
        self.pos = 0


class LayerKVCache:
    """One layer's view of a `KVCache`."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache, self.index = cache, index

    @property
    def pos(self) -> int:
        return self.cache.pos

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, hd) at the current position; return all keys and values so far."""
        start, end = self.cache.pos, self.cache.pos + k.size(-2)
        if end > self.cache.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.cache.max_len} allocated")
        self.cache.k[self.index, :, :, start:end] = k
        self.cache.v[self.index, :, :, start:end] = v
        return self.cache.k[self.index, :, :, :end], self.cache.v[self.index, :, :, :end]


# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def apply_rope(x: Tensor, rope: Rope | None) -> Tensor:
    """Rotary position embedding on (..., T, hd), rotating the two halves of the head (GPT-NeoX layout)."""
    if rope is None:
        return x
    cos, sin = rope  # (T, hd/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


def normalize_heads(x: Tensor) -> Tensor:
    """QK-norm: each head's query or key vector (..., T, hd) scaled to unit RMS; no learned parameters, so state
    dicts are unchanged and stay portable between variants."""
    return F.rms_norm(x, (x.size(-1),))


def causal_keep_mask(q_len: int, k_len: int, device: torch.device, window: int | None = None) -> Tensor:
    """Bool (q_len, k_len), True where query i may attend to key j.

    Queries are the last `q_len` of `k_len` positions (the cache holds the earlier ones), so query i sits at
    absolute position k_len - q_len + i and sees keys j <= that position (and, with a window, j > pos - window).
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    keep = k_pos <= q_pos
    if window is not None:
        keep &= q_pos - k_pos < window
    return keep


def math_attention(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor, dropout: nn.Dropout
) -> tuple[Tensor, Tensor]:
    """Explicit softmax(QKᵀ/√d)V that also returns the weights; used whenever weights are asked for.

    q (B, H, Tq, hd); k, v (B, H, Tk, hd) with as many heads as q; keep (Tq, Tk) bool.
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = dropout(F.softmax(scores.float(), dim=-1).type_as(q))  # (B, H, Tq, Tk)
    return weights @ v, weights  # (B, H, Tq, hd)


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, n_head*hd) -> (B, n_head, T, hd)"""
    B, T, _ = x.shape
    return x.view(B, T, n_head, -1).transpose(1, 2)


def merge_heads(y: Tensor) -> Tensor:
    """(B, H, T, hd) -> (B, T, H*hd)"""
    B, H, T, hd = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, H * hd)


# ----------------------------------------------------------------------------------------------------------
# Registry

ATTENTION_REGISTRY: dict[str, type[Attention]] = {}

# Variants whose state dicts are interchangeable and whose outputs agree for equal weights (see module doc).
WEIGHT_COMPATIBLE = ("wrapper", "mha", "fused_qkv", "einsum", "sdpa", "torch_mha", "flex")


def register_attention(name: str) -> Callable[[type[Attention]], type[Attention]]:
    def add(cls: type[Attention]) -> type[Attention]:
        ATTENTION_REGISTRY[name] = cls
        cls.name = name
        return cls

    return add


def build_attention(config: ModelConfig) -> Attention:
    """The attention module named by `config.attention.name`."""
    name = config.attention.name
    if name not in ATTENTION_REGISTRY:
        raise ValueError(
            f"unknown attention variant {name!r}; valid names: {', '.join(sorted(ATTENTION_REGISTRY))}"
        )
    return ATTENTION_REGISTRY[name](config)


class Attention(nn.Module):
    """Base class: configuration, output projection, dropout and the canonical state-dict layout."""

    name = "base"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = self.kv_heads(config)
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.block_size = config.block_size
        self.window: int | None = None  # only `swa` limits how far back a query sees
        self.bias = config.bias
        self.qk_norm = config.qk_norm
        self.attn_dropout = nn.Dropout(config.dropout)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # What one layer keeps per position in a KVCache: (heads, width). torch_mha caches its inputs instead.
        self.cache_heads, self.cache_head_dim = self.n_kv_head, self.head_dim
        self.register_state_dict_post_hook(_save_hook)
        self.register_load_state_dict_pre_hook(_load_hook)

    def kv_heads(self, config: ModelConfig) -> int:
        """Key/value heads; only `gqa` uses fewer than the query heads."""
        return config.n_head

    def position_qk(self, x: Tensor, rope: Rope | None) -> Tensor:
        """What happens to queries and keys (..., T, hd) before the dot product: QK-norm (when on), then RoPE."""
        return apply_rope(normalize_heads(x) if self.qk_norm else x, rope)

    # Subclasses whose internal layout differs from the canonical one override these two.
    def _to_canonical(self, sd: dict[str, Tensor], prefix: str) -> None:
        """Rewrite this module's entries of `sd` (keys start with `prefix`) into the canonical layout."""

    def _from_canonical(self, sd: dict[str, Tensor], prefix: str) -> None:
        """Rewrite canonical entries of `sd` into this module's own layout, in place."""

    def check_device(self, device: torch.device, training: bool) -> None:
        """Raise if this variant cannot run on `device` (in training mode when `training`)."""

    def keep_mask(self, q_len: int, k_len: int, device: torch.device) -> Tensor:
        return causal_keep_mask(q_len, k_len, device, self.window)

    def forward(
        self,
        x: Tensor,
        kv_cache: LayerKVCache | None = None,
        return_weights: bool = False,
        rope: Rope | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


def _save_hook(module: Attention, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    module._to_canonical(state_dict, prefix)


def _load_hook(module: Attention, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if prefix + "qkv.weight" in state_dict:
        module._from_canonical(state_dict, prefix)


class FusedQKVAttention(Attention):
    """Shared by the variants that keep the canonical fused projection: one matmul for Q, K and V."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        kv_dim = self.n_kv_head * self.head_dim
        self.qkv = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)

    def project(
        self, x: Tensor, kv_cache: LayerKVCache | None, rope: Rope | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, hd) and k, v (B, H_kv, T_total, hd), with RoPE applied and the cache updated."""
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([self.n_embd, kv_dim, kv_dim], dim=2)  # (B, T, C), (B, T, C_kv) x2
        q, k, v = split_heads(q, self.n_head), split_heads(k, self.n_kv_head), split_heads(v, self.n_kv_head)
        q, k = self.position_qk(q, rope), self.position_qk(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        return q, k, v

    def weights_path(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The explicit math path, used when the caller wants the attention weights."""
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, Tk, hd)
        return math_attention(q, k, v, self.keep_mask(q.size(2), k.size(2), q.device), self.attn_dropout)


# ----------------------------------------------------------------------------------------------------------
# The variants


@register_attention("mha")
class MultiHeadAttention(Attention):
    """The textbook split-head module, written out step by step. This is the reference every variant is
    tested against."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        C = config.n_embd
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)
        # True above the diagonal: the future positions each query must not see.
        mask = torch.triu(torch.ones(config.block_size, config.block_size, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x, kv_cache=None, return_weights=False, rope=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        q, k = self.position_qk(q, rope), self.position_qk(k, rope)
        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(k, v)  # (B, H, start+T, hd)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, H, T, start+T)
        scores = scores.masked_fill(self.mask[start : start + T, : start + T], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = self.attn_dropout(weights)
        y = weights @ v  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.out_proj(y), (weights if return_weights else None)

    def _to_canonical(self, sd, prefix):
        for suffix in ("weight", "bias"):
            parts = [sd.pop(f"{prefix}{p}_proj.{suffix}", None) for p in "qkv"]
            if parts[0] is not None:
                sd[f"{prefix}qkv.{suffix}"] = torch.cat(parts, dim=0)

    def _from_canonical(self, sd, prefix):
        for suffix in ("weight", "bias"):
            fused = sd.pop(f"{prefix}qkv.{suffix}", None)
            if fused is not None:
                for p, part in zip("qkv", fused.chunk(3, dim=0), strict=True):
                    sd[f"{prefix}{p}_proj.{suffix}"] = part


class CausalHead(nn.Module):
    """One head of causal attention, as in the first chapter of every attention tutorial."""

    def __init__(self, n_embd: int, head_dim: int, bias: bool, dropout: nn.Dropout) -> None:
        super().__init__()
        self.query = nn.Linear(n_embd, head_dim, bias=bias)
        self.key = nn.Linear(n_embd, head_dim, bias=bias)
        self.value = nn.Linear(n_embd, head_dim, bias=bias)
        self.dropout = dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, Tq, Tk)
        scores = scores.masked_fill(~keep, float("-inf"))
        weights = self.dropout(torch.softmax(scores, dim=-1))
        return weights @ v, weights  # (B, Tq, hd)


@register_attention("wrapper")
class WrapperAttention(Attention):
    """`n_head` independent single-head modules; their outputs are concatenated, then projected."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.heads = nn.ModuleList(
            CausalHead(config.n_embd, self.head_dim, config.bias, self.attn_dropout)
            for _ in range(config.n_head)
        )

    def forward(self, x, kv_cache=None, return_weights=False, rope=None):
        qs = [self.position_qk(h.query(x), rope) for h in self.heads]  # n_head x (B, T, hd)
        k = torch.stack([self.position_qk(h.key(x), rope) for h in self.heads], dim=1)  # (B, H, T, hd)
        v = torch.stack([h.value(x) for h in self.heads], dim=1)  # (B, H, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, H, Tk, hd)
        keep = self.keep_mask(x.size(1), k.size(2), x.device)
        outs = [
            head(q, k[:, i], v[:, i], keep) for i, (head, q) in enumerate(zip(self.heads, qs, strict=True))
        ]
        y = torch.cat([o for o, _ in outs], dim=-1)  # (B, T, C)
        weights = torch.stack([w for _, w in outs], dim=1) if return_weights else None
        return self.out_proj(y), weights

    _LAYERS = (("query", 0), ("key", 1), ("value", 2))

    def _to_canonical(self, sd, prefix):
        for suffix in ("weight", "bias"):
            blocks = []
            for layer, _ in self._LAYERS:
                parts = [sd.pop(f"{prefix}heads.{i}.{layer}.{suffix}", None) for i in range(self.n_head)]
                if parts[0] is None:
                    break
                blocks.append(torch.cat(parts, dim=0))
            if blocks:
                sd[f"{prefix}qkv.{suffix}"] = torch.cat(blocks, dim=0)

    def _from_canonical(self, sd, prefix):
        for suffix in ("weight", "bias"):
            fused = sd.pop(f"{prefix}qkv.{suffix}", None)
            if fused is None:
                continue
            for (layer, _), block in zip(self._LAYERS, fused.chunk(3, dim=0), strict=True):
                for i, part in enumerate(block.chunk(self.n_head, dim=0)):
                    sd[f"{prefix}heads.{i}.{layer}.{suffix}"] = part


@register_attention("fused_qkv")
class FusedQKV(FusedQKVAttention):
    """As `mha`, with one (C, 3C) projection instead of three."""

    def forward(self, x, kv_cache=None, return_weights=False, rope=None):
        q, k, v = self.project(x, kv_cache, rope)  # (B, H, T, hd), (B, H, Tk, hd) x2
        y, weights = math_attention(
            q, k, v, self.keep_mask(q.size(2), k.size(2), x.device), self.attn_dropout
        )
        return self.out_proj(merge_heads(y)), (weights if return_weights else None)


@register_attention("einsum")
class EinsumAttention(MultiHeadAttention):
    """As `mha`, with every contraction (projections included) written as `torch.einsum`."""

    def forward(self, x, kv_cache=None, return_weights=False, rope=None):
        B, T, C = x.shape
        H, hd = self.n_head, self.head_dim

        def project(layer: nn.Linear) -> Tensor:
            w = layer.weight.view(H, hd, C)
            out = torch.einsum("btc,hdc->bhtd", x, w)  # (B, H, T, hd)
            return out if layer.bias is None else out + layer.bias.view(1, H, 1, hd)

        q, k, v = project(self.q_proj), project(self.k_proj), project(self.v_proj)
        q, k = self.position_qk(q, rope), self.position_qk(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        keep = self.keep_mask(T, k.size(2), x.device)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(hd)  # (B, H, T, Tk)
        weights = self.attn_dropout(torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1))
        y = torch.einsum("bhqk,bhkd->bqhd", weights, v).reshape(B, T, C)  # (B, T, C)
        out = torch.einsum("btc,oc->bto", y, self.out_proj.weight)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return out, (weights if return_weights else None)


@register_attention("sdpa")
class SDPAttention(FusedQKVAttention):
    """PyTorch's fused `scaled_dot_product_attention`: flash / memory-efficient kernels on CUDA and ROCm.
    The default. Also the base of `gqa` and `swa`, which only change the key/value heads or the mask."""

    def forward(self, x, kv_cache=None, return_weights=False, rope=None):
        q, k, v = self.project(x, kv_cache, rope)  # (B, H, T, hd), (B, H_kv, Tk, hd) x2
        if return_weights:
            y, weights = self.weights_path(q, k, v)
            return self.out_proj(merge_heads(y)), weights
        T, Tk = q.size(2), k.size(2)
        dropout_p = self.attn_dropout.p if self.training else 0.0
        if T == Tk and self.window is None:
            mask, causal = None, True  # the fast path: no mask tensor at all
        elif T == 1 and self.window is None:
            mask, causal = None, False  # one new token sees the whole cache
        else:
            mask, causal = self.keep_mask(T, Tk, x.device), False
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=causal,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, hd)
        return self.out_proj(merge_heads(y)), None


@register_attention("gqa")
class GroupedQueryAttention(SDPAttention):
    """Grouped-query attention: `n_kv_head` key/value heads shared by groups of query heads
    (`n_kv_head=1` is multi-query attention). The KV cache shrinks by n_head / n_kv_head."""

    def kv_heads(self, config: ModelConfig) -> int:
        return config.n_kv_head


@register_attention("swa")
class SlidingWindowAttention(SDPAttention):
    """Causal attention over the last `window` tokens only (Mistral-style local attention)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if config.attention.window is None:
            raise ValueError("attention variant 'swa' needs model.attention.window (a positive integer)")
        self.window = config.attention.window


@register_attention("torch_mha")
class TorchMultiheadAttention(Attention):
    """`torch.nn.MultiheadAttention`, used as is: its own in- and out-projections are the only ones.

    nn.MultiheadAttention projects keys and values itself, so for generation this variant caches the layer
    inputs (as a single "head" of width C) and lets the module re-project them.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if config.pos_encoding == "rope":
            raise ValueError(
                "attention variant 'torch_mha' cannot apply RoPE (nn.MultiheadAttention projects Q and K "
                "internally); use pos_encoding=learned or another variant"
            )
        if config.qk_norm:
            raise ValueError(
                "attention variant 'torch_mha' cannot apply QK-norm (nn.MultiheadAttention projects Q and K "
                "internally); use model.qk_norm=false or another variant"
            )
        del self.out_proj  # nn.MultiheadAttention brings its own
        self.mha = nn.MultiheadAttention(
            config.n_embd, config.n_head, dropout=config.dropout, bias=config.bias, batch_first=True
        )
        self.cache_heads, self.cache_head_dim = 1, config.n_embd

    def forward(self, x, kv_cache=None, return_weights=False, rope=None):
        T = x.size(1)
        context = x
        if kv_cache is not None:
            context, _ = kv_cache.update(x.unsqueeze(1), x.unsqueeze(1))  # (B, 1, Tk, C)
            context = context.squeeze(1)  # (B, Tk, C)
        Tk = context.size(1)
        block = ~self.keep_mask(T, Tk, x.device)  # True = may not attend
        y, weights = self.mha(
            x,
            context,
            context,
            attn_mask=block,
            need_weights=return_weights,
            average_attn_weights=False,
            is_causal=(T == Tk and not return_weights),
        )
        return y, weights

    # canonical name -> nn.MultiheadAttention's name
    _NAMES = (
        ("qkv.weight", "mha.in_proj_weight"),
        ("qkv.bias", "mha.in_proj_bias"),
        ("out_proj.weight", "mha.out_proj.weight"),
        ("out_proj.bias", "mha.out_proj.bias"),
    )

    def _to_canonical(self, sd, prefix):
        _rename(sd, prefix, {theirs: ours for ours, theirs in self._NAMES})

    def _from_canonical(self, sd, prefix):
        _rename(sd, prefix, dict(self._NAMES))


def _rename(sd: dict[str, Tensor], prefix: str, names: dict[str, str]) -> None:
    for old, new in names.items():
        if prefix + old in sd:
            sd[prefix + new] = sd.pop(prefix + old)


@register_attention("flex")
class FlexAttention(FusedQKVAttention):
    """FlexAttention with a causal block mask (compiled kernels on GPUs).

    torch 2.13 has no FlexAttention backward on CPU and no dropout inside it: training on CPU, or with
    dropout > 0, is refused with a message; inference works everywhere.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self._block_masks: dict[tuple[int, int, str], Any] = {}

    def check_device(self, device, training):
        if training and torch.device(device).type == "cpu":
            raise ValueError(
                "attention variant 'flex' cannot train on CPU: torch has no FlexAttention backward on CPU; "
                "use a GPU, or another variant such as model/attention=sdpa (inference with flex works on CPU)"
            )
        if training and self.attn_dropout.p > 0:
            raise ValueError(
                f"attention variant 'flex' has no attention dropout; set model.dropout=0 "
                f"(got {self.attn_dropout.p}) or use another variant"
            )

    def block_mask(self, q_len: int, k_len: int, device: torch.device) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        if q_len == 1:
            return None  # a single new token may see every cached position
        key = (q_len, k_len, str(device))
        if key not in self._block_masks:
            offset = k_len - q_len

            def causal(b, h, q_idx, kv_idx):
                return q_idx + offset >= kv_idx

            self._block_masks[key] = create_block_mask(causal, None, None, q_len, k_len, device=device)
        return self._block_masks[key]

    def forward(self, x, kv_cache=None, return_weights=False, rope=None):
        if torch.is_grad_enabled() and x.device.type == "cpu":
            raise RuntimeError(
                "attention variant 'flex' has no backward on CPU in this torch: run inference under "
                "torch.no_grad(), or train with a GPU or another variant such as model/attention=sdpa"
            )
        if self.training:
            self.check_device(x.device, training=True)
        q, k, v = self.project(x, kv_cache, rope)  # (B, H, T, hd), (B, H, Tk, hd) x2
        if return_weights:
            y, weights = self.weights_path(q, k, v)
            return self.out_proj(merge_heads(y)), weights
        y = _flex_kernel(x.device.type)(q, k, v, block_mask=self.block_mask(q.size(2), k.size(2), x.device))
        return self.out_proj(merge_heads(y)), None


@functools.cache
def _flex_kernel(device_type: str) -> Callable[..., Tensor]:
    """flex_attention, compiled into a fused kernel on GPUs; eager (unfused, for inference) on CPU."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cpu":
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention
    return torch.compile(flex_attention, dynamic=False)
