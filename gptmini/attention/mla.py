"""The `mla` variant: multi-head latent attention (DeepSeek-V2, 2024, section 2.1).

Keys and values come from one small per-token latent c_KV = RMSNorm(W_DKV x) of `model.attention.kv_rank` dims,
up-projected per head (k_C = W_UK c_KV, v = W_UV c_KV); queries from x, or from their own latent
c_Q = RMSNorm(W_DQ x) of `model.attention.q_rank` dims (q_C = W_UQ c_Q). RoPE cannot sit on k_C (it would stand
between W_UK and the query and forbid folding them), so with model.pos_encoding=rope a separate rotary part is
concatenated: per-head rotary queries q_R = RoPE(W_QR c_Q) and ONE rotary key k_R = RoPE(W_KR x) of
`model.attention.rope_dim` dims shared by all heads; q = [q_C; q_R], k = [k_C; k_R], scores scaled by
1/sqrt(head_dim + rope_dim).

Decoding caches only c_KV and k_R (kv_rank + rope_dim numbers a token, against 2 * n_embd for `mha`), and uses the
absorbed form: W_UK is folded into the query (q_C . W_UK c = (W_UKᵀ q_C) . c), so scores are taken against the
latents themselves; W_UV is applied once to the attended latent (sum_j w_j W_UV c_j = W_UV sum_j w_j c_j), on its
way into the output projection. Training and prefill without a cache use the explicit form (and PyTorch's fused
kernel when no weights or sinks are asked for).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gptmini.attention.cache import LayerCache, StaticKVCache, static_keep_mask
from gptmini.attention.core import (
    Attention,
    Rope,
    apply_rope,
    math_attention,
    merge_heads,
    register_attention,
    softmax_with_sinks,
    split_heads,
)
from gptmini.config import AttentionConfig, ModelConfig

NORM_EPS = 1e-6  # the latents' RMSNorm epsilon (DeepSeek-V2's)


class LatentCache(LayerCache):
    """One mla layer's cache: the normalised key/value latent (B, max_len, kv_rank) and the shared rotary key
    (B, max_len, rope_dim; None with learned positions), filled left to right."""

    def __init__(
        self, batch_size: int, max_len: int, kv_rank: int, rope_dim: int | None, device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.c_kv = torch.zeros(batch_size, max_len, kv_rank, device=device, dtype=dtype)  # (B, max_len, r_kv)
        self.k_rope = (
            torch.zeros(batch_size, max_len, rope_dim, device=device, dtype=dtype) if rope_dim else None
        )  # (B, max_len, r_R)
        self.max_len = max_len

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.c_kv, self.k_rope) if t is not None]

    def positions(self, n: int, device: torch.device) -> Tensor:
        """(n,) absolute positions of the n inputs that continue the cache."""
        return torch.arange(self.pos, self.pos + n, device=device)

    def update(self, c_kv: Tensor, k_rope: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Store c_kv (B, T, r_kv) and k_rope (B, T, r_R) at the current position; return everything so far."""
        start, end = self.pos, self.pos + c_kv.size(1)
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.c_kv[:, start:end] = c_kv
        if self.k_rope is not None:
            self.k_rope[:, start:end] = k_rope
            return self.c_kv[:, :end], self.k_rope[:, :end]
        return self.c_kv[:, :end], None


class StaticLatentCache(LatentCache):
    """The fixed-shape LatentCache of compiled decoding: written in place at the owner's `input_pos`, read whole
    under a mask of the filled positions (see StaticKVCache)."""

    owner: StaticKVCache | None = None

    def positions(self, n: int, device: torch.device) -> Tensor:
        assert self.owner is not None
        return self.owner.input_pos  # (n,)

    def update(self, c_kv: Tensor, k_rope: Tensor | None) -> tuple[Tensor, Tensor | None]:
        assert self.owner is not None
        self.c_kv.index_copy_(1, self.owner.input_pos, c_kv.to(self.c_kv.dtype))
        if self.k_rope is not None:
            self.k_rope.index_copy_(1, self.owner.input_pos, k_rope.to(self.k_rope.dtype))
        return self.c_kv, self.k_rope  # (B, max_len, r_kv), (B, max_len, r_R)

    def keep_mask(self) -> Tensor:
        assert self.owner is not None
        return static_keep_mask(self.owner, None)  # (T, max_len)


@register_attention("mla")
class MultiHeadLatentAttention(Attention):
    """Multi-head latent attention: keys and values through a small normalised latent, decoded in absorbed form
    from a cache of latents (see the module docstring)."""

    weight_compatible = False  # parameters of its own (kv_down, k_up, ...), not the canonical qkv
    canonical_layout = False
    reads = ("kv_rank", "q_rank", "rope_dim", "gate", "sinks")
    needs = ("kv_rank",)
    fixed_by_weights = ("kv_rank", "q_rank", "rope_dim", "gate", "sinks")
    static_cache = True
    doc_mask = True
    # QK-norm on k_C would stand between W_UK and the score and forbid the absorbed form.
    applies_qk_norm = False

    @classmethod
    def with_defaults(cls, attention: AttentionConfig, model: ModelConfig) -> AttentionConfig:
        """kv_rank defaults to n_embd // 2 (the cache then holds under a quarter of what `mha` caches); rope_dim, with
        model.pos_encoding=rope, to half the head size rounded down to even (the paper's d_h^R = d_h / 2)."""
        fill: dict[str, int] = {}
        if attention.kv_rank is None:
            fill["kv_rank"] = max(1, model.n_embd // 2)
        if attention.rope_dim is None and model.pos_encoding == "rope":
            fill["rope_dim"] = max(2, model.head_dim // 4 * 2)
        return dataclasses.replace(attention, **fill) if fill else attention

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
        if config.qk_norm:
            raise ValueError(self.qk_norm_refusal())
        att, C, H, hd, bias = config.attention, config.n_embd, config.n_head, config.head_dim, config.bias
        assert att.kv_rank is not None, "ModelConfig fills mla's kv_rank; check_attention_config needs one"
        self.kv_rank, self.q_rank = att.kv_rank, att.q_rank
        self.rope_dim = att.rope_dim if config.pos_encoding == "rope" else None
        self.kv_down = nn.Linear(C, self.kv_rank, bias=bias)  # W_DKV
        self.kv_norm = nn.RMSNorm(self.kv_rank, eps=NORM_EPS)
        self.k_up = nn.Linear(self.kv_rank, H * hd, bias=bias)  # W_UK
        self.v_up = nn.Linear(self.kv_rank, H * hd, bias=bias)  # W_UV
        q_in = C
        self.q_down = self.q_norm = None
        if self.q_rank is not None:
            self.q_down = nn.Linear(C, self.q_rank, bias=bias)  # W_DQ
            self.q_norm = nn.RMSNorm(self.q_rank, eps=NORM_EPS)
            q_in = self.q_rank
        self.q_up = nn.Linear(q_in, H * hd, bias=bias)  # W_UQ (W_Q without a query latent)
        self.q_rope = self.k_rope = None
        if self.rope_dim is not None:
            self.q_rope = nn.Linear(q_in, H * self.rope_dim, bias=bias)  # W_QR
            self.k_rope = nn.Linear(C, self.rope_dim, bias=bias)  # W_KR: one rotary key for all heads
            half = self.rope_dim // 2
            inv_freq = 1.0 / (config.rope_base ** (torch.arange(half, dtype=torch.float32) / half))
            angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (T, r_R/2)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.scale = 1.0 / math.sqrt(hd + (self.rope_dim or 0))

    @classmethod
    def qk_norm_refusal(cls) -> str:
        return (
            "attention variant 'mla' cannot apply QK-norm (normalising its keys would block the absorbed decoding "
            "form); use model.qk_norm=false or another variant"
        )

    @classmethod
    def check_device(cls, config: ModelConfig, device: torch.device, training: bool) -> None:
        """Asked before the trainer builds anything: refuse QK-norm there already."""
        if config.qk_norm:
            raise ValueError(cls.qk_norm_refusal())

    def new_cache(self, batch_size, max_len, device, dtype, static=False):
        kind = StaticLatentCache if static else LatentCache
        return kind(batch_size, max_len, self.kv_rank, self.rope_dim, device, dtype)

    def rope_tables(self, positions: Tensor) -> Rope | None:
        """(cos, sin), each (T, rope_dim // 2), for `positions`: this layer's own table, since the rotary part has
        rope_dim dims, not the head size the model's table is made for."""
        if self.rope_dim is None:
            return None
        return self.rope_cos[positions], self.rope_sin[positions]

    def queries(self, x: Tensor, rope: Rope | None) -> tuple[Tensor, Tensor | None]:
        """q_C (B, H, T, hd) and the rotated q_R (B, H, T, r_R) (None without RoPE), from x (B, T, C)."""
        src = x if self.q_down is None else self.q_norm(self.q_down(x))  # (B, T, C) or (B, T, r_q)
        q_c = split_heads(self.q_up(src), self.n_head)  # (B, H, T, hd)
        if self.q_rope is None:
            return q_c, None
        return q_c, apply_rope(split_heads(self.q_rope(src), self.n_head), rope)  # (B, H, T, r_R)

    def latents(self, x: Tensor, rope: Rope | None) -> tuple[Tensor, Tensor | None]:
        """c_KV (B, T, r_kv) and the rotated shared key k_R (B, T, r_R) (None without RoPE): what is cached."""
        c_kv = self.kv_norm(self.kv_down(x))  # (B, T, r_kv)
        k_rope = apply_rope(self.k_rope(x), rope) if self.k_rope is not None else None  # (B, T, r_R)
        return c_kv, k_rope

    def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
        T = x.size(1)
        positions = kv_cache.positions(T, x.device) if kv_cache is not None else torch.arange(T, device=x.device)
        tables = self.rope_tables(positions)  # the model's `rope` has head_dim // 2 frequencies; see rope_tables
        q_c, q_r = self.queries(x, tables)
        c_kv, k_rope = self.latents(x, tables)
        if kv_cache is None:
            y, weights = self.explicit(q_c, q_r, c_kv, k_rope, docs, return_weights)
        else:
            c_kv, k_rope = kv_cache.update(c_kv, k_rope)  # (B, Tk, r_kv), (B, Tk, r_R)
            if isinstance(kv_cache, StaticLatentCache):
                keep = kv_cache.keep_mask()  # (T, max_len): the filled positions only
            else:
                keep = self.keep_mask(T, c_kv.size(1), x.device, docs)
            y, weights = self.absorbed(q_c, q_r, c_kv, k_rope, keep)
        return self.project_out(merge_heads(y), x), (weights if return_weights else None)

    def explicit(
        self, q_c: Tensor, q_r: Tensor | None, c_kv: Tensor, k_rope: Tensor | None, docs: Tensor | None,
        want_weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-head keys and values made from the latents, then ordinary attention: (y (B, H, T, hd), weights)."""
        B, H, T, _ = q_c.shape
        q, k = q_c, split_heads(self.k_up(c_kv), H)  # (B, H, T, hd) x2
        v = split_heads(self.v_up(c_kv), H)  # (B, H, T, hd)
        if q_r is not None:
            q = torch.cat([q_c, q_r], dim=-1)  # (B, H, T, hd + r_R)
            k = torch.cat([k, k_rope[:, None].expand(B, H, -1, -1)], dim=-1)  # (B, H, T, hd + r_R)
        if want_weights or self.sinks is not None:
            keep = self.keep_mask(T, c_kv.size(1), q.device, docs)
            return math_attention(q, k, v, keep, self.attn_dropout, self.sinks)  # scaled by 1/sqrt(hd + r_R)
        mask = None if docs is None else self.keep_mask(T, c_kv.size(1), q.device, docs)  # (B, 1, T, T)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout.p if self.training else 0.0,
            is_causal=mask is None, scale=self.scale,
        )  # (B, H, T, hd): v keeps its own width
        return y, None

    def absorbed(
        self, q_c: Tensor, q_r: Tensor | None, c_kv: Tensor, k_rope: Tensor | None, keep: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Attention straight over the latents c_kv (B, Tk, r_kv), W_UK folded into the queries and W_UV applied
        after the weighting: (y (B, H, T, hd), weights (B, H, T, Tk)). keep: (T, Tk) or (B, 1, T, Tk)."""
        H, hd = self.n_head, self.head_dim
        w_uk = self.k_up.weight.view(H, hd, self.kv_rank)  # (H, hd, r_kv)
        w_uv = self.v_up.weight.view(H, hd, self.kv_rank)  # (H, hd, r_kv)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_c, w_uk)  # (B, H, T, r_kv): W_UKᵀ q_C
        scores = torch.einsum("bhtr,bkr->bhtk", q_lat, c_kv)  # (B, H, T, Tk)
        if self.k_up.bias is not None:  # q_C . b_UK: the same for every key, which matters only next to a sink
            scores = scores + (q_c * self.k_up.bias.view(H, 1, hd)).sum(-1, keepdim=True)  # (B, H, T, 1)
        if q_r is not None:
            scores = scores + torch.einsum("bhtd,bkd->bhtk", q_r, k_rope)  # the shared rotary key
        scores = (scores * self.scale).masked_fill(~keep, float("-inf"))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # float32 at least, as math_attention
        weights = softmax_with_sinks(scores, self.sinks).type_as(q_c)  # (B, H, T, Tk)
        weights = self.attn_dropout(weights)
        attended = torch.einsum("bhtk,bkr->bhtr", weights, c_kv)  # (B, H, T, r_kv)
        y = torch.einsum("bhtr,hdr->bhtd", attended, w_uv)  # (B, H, T, hd)
        if self.v_up.bias is not None:  # each weight carries b_UV; rows sum below one with sinks or dropout
            y = y + weights.sum(-1, keepdim=True) * self.v_up.bias.view(H, 1, hd)
        return y, weights

