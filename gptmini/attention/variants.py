"""The attention variants that run everywhere: mha (the reference), wrapper, fused_qkv, einsum, sdpa (the
default), gqa, swa and torch_mha. `flex` lives in gptmini.attention.flex."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gptmini.attention.cache import LayerKVCache, RollingLayerKVCache, StaticLayerKVCache
from gptmini.attention.core import (
    Attention,
    PackedQKVBase,
    SeparateQKVBase,
    math_attention,
    merge_heads,
    register_attention,
    softmax_with_sinks,
)
from gptmini.config import AttentionConfig, ModelConfig


@register_attention("mha")
class MultiHeadAttention(SeparateQKVBase):
    """The textbook split-head module, written out step by step. This is the reference every variant is
    tested against."""

    doc_mask = True
    reads = fixed_by_weights = ("gate", "sinks")

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
        # True above the diagonal: the future positions each query must not see. Not persistent: never saved.
        mask = torch.triu(torch.ones(config.block_size, config.block_size, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
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
        if docs is None:
            masked = self.mask[start : start + T, : start + T]  # (T, start+T)
        else:  # model.doc_mask: also every key of another document
            masked = ~self.keep_mask(T, start + T, x.device, docs)  # (B, 1, T, start+T)
        scores = scores.masked_fill(masked, float("-inf"))
        weights = softmax_with_sinks(scores, self.sinks)  # (B, H, T, start+T): plain softmax without sinks
        weights = self.attn_dropout(weights)
        y = weights @ v  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.project_out(y, x), (weights if return_weights else None)


class CausalHead(nn.Module):
    """One head of causal attention, as in the first chapter of every attention tutorial."""

    def __init__(self, n_embd: int, head_dim: int, bias: bool, dropout: nn.Dropout) -> None:
        super().__init__()
        self.query = nn.Linear(n_embd, head_dim, bias=bias)
        self.key = nn.Linear(n_embd, head_dim, bias=bias)
        self.value = nn.Linear(n_embd, head_dim, bias=bias)
        self.dropout = dropout

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, sink: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`sink` (1,): this head's learned sink logit (model.attention.sinks), or None."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, Tq, Tk)
        scores = scores.masked_fill(~keep, float("-inf"))
        weights = self.dropout(softmax_with_sinks(scores[:, None], sink)[:, 0])  # (B, Tq, Tk)
        return weights @ v, weights  # (B, Tq, hd)


@register_attention("wrapper")
class WrapperAttention(Attention):
    """`n_head` independent single-head modules; their outputs are concatenated, then projected."""

    reads = fixed_by_weights = ("gate", "sinks")

    # Each head's projections, in the order the canonical `qkv` stacks them.
    _LAYERS = ("query", "key", "value")
    doc_mask = True

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
        self.heads = nn.ModuleList(
            CausalHead(config.n_embd, self.head_dim, config.bias, self.attn_dropout)
            for _ in range(config.n_head)
        )

    def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
        # Heads stacked before RoPE, so per-row tables (model.doc_rope_reset: (B, 1, T, hd/2)) broadcast.
        q = self.position_qk(torch.stack([h.query(x) for h in self.heads], dim=1), rope)  # (B, H, T, hd)
        k = self.position_qk(torch.stack([h.key(x) for h in self.heads], dim=1), rope)  # (B, H, T, hd)
        v = torch.stack([h.value(x) for h in self.heads], dim=1)  # (B, H, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, H, Tk, hd)
        keep = self.keep_mask(x.size(1), k.size(2), x.device, docs)  # (T, Tk), or (B, 1, T, Tk) with docs
        if docs is not None:
            keep = keep[:, 0]  # (B, T, Tk): each head's scores are (B, T, Tk)
        sinks = [None] * self.n_head if self.sinks is None else self.sinks.split(1)  # n_head x (1,)
        outs = [head(q[:, i], k[:, i], v[:, i], keep, sink) for i, (head, sink) in enumerate(zip(self.heads, sinks,
                                                                                                  strict=True))]
        y = torch.cat([o for o, _ in outs], dim=-1)  # (B, T, C)
        weights = torch.stack([w for _, w in outs], dim=1) if return_weights else None
        return self.project_out(y, x), weights

    def _to_canonical(self, sd, prefix):
        for suffix in ("weight", "bias"):
            blocks = []
            for layer in self._LAYERS:
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
            for layer, block in zip(self._LAYERS, fused.chunk(3, dim=0), strict=True):
                for i, part in enumerate(block.chunk(self.n_head, dim=0)):
                    sd[f"{prefix}heads.{i}.{layer}.{suffix}"] = part


@register_attention("fused_qkv")
class FusedQKV(PackedQKVBase):
    """The `fused_qkv` variant: as `mha`, with one (C, 3C) projection instead of three."""

    doc_mask = True
    reads = fixed_by_weights = ("gate", "sinks")

    def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
        q, k, v = self.project(x, kv_cache, rope)  # (B, H, T, hd), (B, H, Tk, hd) x2
        y, weights = math_attention(
            q, k, v, self.keep_mask(q.size(2), k.size(2), x.device, docs), self.attn_dropout, self.sinks
        )
        return self.project_out(merge_heads(y), x), (weights if return_weights else None)


@register_attention("einsum")
class EinsumAttention(SeparateQKVBase):
    """As `mha`, with every contraction (projections, output gate included) written as `torch.einsum`."""

    reads = fixed_by_weights = ("gate", "sinks")

    doc_mask = True

    def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
        B, T, C = x.shape
        H, hd = self.n_head, self.head_dim

        def project(layer: nn.Linear) -> Tensor:
            w = layer.weight.view(H, hd, C)
            out = torch.einsum("btc,hdc->bhtd", x, w)  # (B, H, T, hd)
            return out if layer.bias is None else out + layer.bias.view(1, H, 1, hd)

        def linear(t: Tensor, layer: nn.Linear) -> Tensor:
            out = torch.einsum("btc,oc->bto", t, layer.weight)  # (B, T, C)
            return out if layer.bias is None else out + layer.bias

        q, k, v = project(self.q_proj), project(self.k_proj), project(self.v_proj)
        q, k = self.position_qk(q, rope), self.position_qk(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        keep = self.keep_mask(T, k.size(2), x.device, docs)  # (T, Tk), or (B, 1, T, Tk) with docs
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(hd)  # (B, H, T, Tk)
        weights = self.attn_dropout(softmax_with_sinks(scores.masked_fill(~keep, float("-inf")), self.sinks))
        y = torch.einsum("bhqk,bhkd->bqhd", weights, v).reshape(B, T, C)  # (B, T, C)
        if self.gate_proj is not None:  # Attention.project_out's gate, as an einsum
            y = y * torch.sigmoid(linear(x, self.gate_proj))
        return linear(y, self.out_proj), (weights if return_weights else None)


@register_attention("sdpa")
class SDPAttention(PackedQKVBase):
    """PyTorch's fused `scaled_dot_product_attention`: flash / memory-efficient kernels on CUDA and ROCm.
    The default. Also the base of `gqa` and `swa`, which only change the key/value heads or the mask."""

    static_cache = True  # decodes with a StaticKVCache (the compiled, CUDA-graph-friendly decode path)
    doc_mask = True  # an explicit boolean mask then; the is_causal fast path stays for one document
    reads = fixed_by_weights = ("gate", "sinks")

    def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
        q, k, v = self.project(x, kv_cache, rope)  # (B, H, T, hd), (B, H_kv, Tk, hd) x2
        if return_weights:
            y, weights = self.weights_path(q, k, v, docs)
            return self.project_out(merge_heads(y), x), weights
        T, Tk = q.size(2), k.size(2)
        dropout_p = self.attn_dropout.p if self.training else 0.0
        if isinstance(kv_cache, StaticLayerKVCache):
            mask, causal = kv_cache.keep_mask(self.window), False  # (T, max_len): the filled positions only
        elif docs is not None:
            mask, causal = self.keep_mask(T, Tk, x.device, docs), False  # (B, 1, T, Tk): within each document
        elif T == Tk and self.window is None:
            mask, causal = None, True  # the fast path: no mask tensor at all
        elif T == 1 and self.window is None:
            mask, causal = None, False  # one new token sees the whole cache
        else:
            mask, causal = self.keep_mask(T, Tk, x.device), False
        y = sdpa_with_sinks(
            q, k, v, mask, causal, dropout_p, self.sinks, enable_gqa=self.n_kv_head != self.n_head
        )  # (B, H, T, hd)
        return self.project_out(merge_heads(y), x), None


def sdpa_with_sinks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    causal: bool,
    dropout_p: float,
    sinks: Tensor | None,
    enable_gqa: bool = False,
) -> Tensor:
    """F.scaled_dot_product_attention (q (B, H, T, hd), k, v (B, H_kv, Tk, hd) -> (B, H, T, hd)), with each head's
    sink logit (sinks (H,); None: plain SDPA, untouched) in every softmax denominator: exact, on the same kernels.

    The sink is one more key, placed first, whose value is zero. Its score must be the head's sink logit whatever
    the query, so queries and keys get one more head dimension: each query carries its head's sink times √hd
    there (per query head, so grouped key/value heads work), real keys 0 and the sink key 1; `scale` stays
    1/√hd. Values get zero columns up to the same width (the fused kernels want one head size; off the CPU it is
    rounded up to a multiple of 8), dropped from the output. On the causal fast path one more query goes first
    too, so that is_causal's top-left alignment lets query i see the sink and keys 0..i; that query sees only the
    sink (output 0) and its row is dropped.
    """
    if sinks is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=enable_gqa
        )
    hd = q.size(-1)
    width = hd + 1 if q.device.type == "cpu" else (hd // 8 + 1) * 8  # the sink's column, then zero padding
    scale = 1.0 / math.sqrt(hd)
    lead = 1 if causal else 0  # the extra query in front, on the causal path
    q = _widened(q, width, lead)  # (B, H, lead+T, width)
    q[:, :, lead:, hd] = sinks.to(q.dtype).view(-1, 1) / scale  # each query head's sink logit times √hd
    k = _widened(k, width, 1)  # (B, H_kv, 1+Tk, width): the sink key first ...
    k[:, :, 0, hd] = 1.0  # ... (0, ..., 0, 1, 0, ...)
    v = _widened(v, width, 1)  # (B, H_kv, 1+Tk, width): the sink adds no value
    if mask is not None:
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], 1), mask], dim=-1)  # (..., T, 1+Tk): all see the sink
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=enable_gqa
    )  # (B, H, lead+T, width)
    return y[:, :, lead:, :hd]


def _widened(x: Tensor, width: int, lead: int) -> Tensor:
    """x (B, h, n, d) in a zero tensor (B, h, lead+n, width): `lead` zero rows in front, zero columns after. One
    copy of x (F.pad and torch.cat would fill, then copy again)."""
    B, h, n, d = x.shape
    out = x.new_empty(B, h, lead + n, width)
    out[:, :, :lead].zero_()
    out[:, :, lead:, d:].zero_()
    out[:, :, lead:, :d] = x
    return out


@register_attention("gqa")
class GroupedQueryAttention(SDPAttention):
    """Grouped-query attention: `n_kv_head` key/value heads shared by groups of query heads
    (`n_kv_head=1` is multi-query attention). The KV cache shrinks by n_head / n_kv_head."""

    weight_compatible = False
    reads = fixed_by_weights = ("n_kv_head", "gate", "sinks")

    @classmethod
    def with_defaults(cls, attention: AttentionConfig, model: ModelConfig) -> AttentionConfig:
        """n_kv_head defaults to the largest divisor of n_head up to half of it (fewer heads than mha)."""
        if attention.n_kv_head is not None:
            return attention
        n_head = model.n_head
        kv = max([d for d in range(1, n_head // 2 + 1) if n_head % d == 0], default=1)
        return dataclasses.replace(attention, n_kv_head=kv)

    def kv_heads(self, config: ModelConfig) -> int:
        return config.n_kv_head


@register_attention("swa")
class SlidingWindowAttention(SDPAttention):
    """Causal attention over the last `window` tokens only (Mistral-style local attention)."""

    weight_compatible = False
    reads = ("window", "gate", "sinks")
    needs = ("window",)
    fixed_by_weights = ("gate", "sinks")
    rolling_cache = True  # new_cache(rolling=True): only the last `window` keys and values (RollingLayerKVCache)
    DEFAULT_WINDOW = 64  # model.attention.window when the config leaves it null

    @classmethod
    def with_defaults(cls, attention: AttentionConfig, model: ModelConfig) -> AttentionConfig:
        if attention.window is not None:
            return attention
        return dataclasses.replace(attention, window=cls.DEFAULT_WINDOW)

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
        assert config.attention.window is not None, "ModelConfig fills swa's window; check_attention_config needs one"
        self.window = config.attention.window

    def new_cache(self, batch_size, max_len, device, dtype, static=False, rolling=False):
        """`rolling`: a cache of the last `window` positions only, whatever the length decoded."""
        if rolling and not static:
            return RollingLayerKVCache(batch_size, self.n_kv_head, self.window, self.head_dim, device, dtype)
        return super().new_cache(batch_size, max_len, device, dtype, static=static)


@register_attention("torch_mha")
class TorchMultiheadAttention(Attention):
    """`torch.nn.MultiheadAttention`, used as is: its own in- and out-projections are the only ones.

    nn.MultiheadAttention projects keys and values itself, so for generation this variant caches the layer
    inputs (as a single "head" of width C) and lets the module re-project them.
    """

    applies_rope = applies_qk_norm = False  # ... and queries and keys, so nothing can touch them in between
    doc_mask = True  # through attn_mask, one (T, Tk) mask per batch row and head

    # canonical name -> nn.MultiheadAttention's name
    _NAMES = (
        ("qkv.weight", "mha.in_proj_weight"),
        ("qkv.bias", "mha.in_proj_bias"),
        ("out_proj.weight", "mha.out_proj.weight"),
        ("out_proj.bias", "mha.out_proj.bias"),
    )

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
        for option, setting, able, off in (
            ("RoPE", config.pos_encoding == "rope", self.applies_rope, "pos_encoding=learned"),
            ("QK-norm", config.qk_norm, self.applies_qk_norm, "model.qk_norm=false"),
        ):
            if setting and not able:
                raise ValueError(
                    f"attention variant 'torch_mha' cannot apply {option} (nn.MultiheadAttention projects Q and K "
                    f"internally); use {off} or another variant"
                )
        del self.out_proj  # nn.MultiheadAttention brings its own
        self.mha = nn.MultiheadAttention(
            config.n_embd, config.n_head, dropout=config.dropout, bias=config.bias, batch_first=True
        )

    def new_cache(self, batch_size, max_len, device, dtype, static=False):
        """nn.MultiheadAttention projects keys and values itself: the cache keeps the layer inputs, as one "head"
        of width C, and the module re-projects them each step."""
        return LayerKVCache(batch_size, 1, max_len, self.n_embd, device=device, dtype=dtype)

    def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
        T = x.size(1)
        context = x
        if kv_cache is not None:
            context, _ = kv_cache.update(x.unsqueeze(1), x.unsqueeze(1))  # (B, 1, Tk, C)
            context = context.squeeze(1)  # (B, Tk, C)
        Tk = context.size(1)
        block = ~self.keep_mask(T, Tk, x.device, docs)  # True = may not attend: (T, Tk), or (B, 1, T, Tk)
        if docs is not None:  # nn.MultiheadAttention takes (B * n_head, T, Tk), batch-major
            block = block.expand(-1, self.n_head, -1, -1).reshape(-1, T, Tk)  # (B*H, T, Tk)
        y, weights = self.mha(
            x,
            context,
            context,
            attn_mask=block,
            need_weights=return_weights,
            average_attn_weights=False,
            is_causal=(T == Tk and not return_weights and docs is None),
        )
        return y, weights

    def _to_canonical(self, sd, prefix):
        _rename(sd, prefix, {theirs: ours for ours, theirs in self._NAMES})

    def _from_canonical(self, sd, prefix):
        _rename(sd, prefix, dict(self._NAMES))


def _rename(sd: dict[str, Tensor], prefix: str, names: dict[str, str]) -> None:
    for old, new in names.items():
        if prefix + old in sd:
            sd[prefix + new] = sd.pop(prefix + old)
