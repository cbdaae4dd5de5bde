"""The `diff` variant: differential attention (Ye et al., "Differential Transformer", ICLR 2025).

Each of n_head/2 differential heads has two queries and two keys of head_dim and one value of 2*head_dim, and
outputs (A1 - λ·A2)V with A1 = softmax(Q1K1ᵀ/√d), A2 = softmax(Q2K2ᵀ/√d): the second map cancels the attention
noise both maps share (mass on irrelevant context, sinks) and keeps what differs. λ is learned through four
vectors, λ = exp(λ_q1·λ_k1) - exp(λ_q2·λ_k2) + λ_init, with λ_init = 0.8 - 0.6·exp(-0.3·(l-1)) for layer l
(1-based): deeper layers subtract more. Each head's output is RMS-normalised (one learned gain of 2*head_dim
shared by the heads, as the paper's code has it) and scaled by (1 - λ_init), so the gradients flow as in plain
attention at initialisation.

The projections are mha's, in the canonical packed layout: query head 2i is Q1 of differential head i and 2i+1
its Q2 (likewise the keys), and value heads 2i, 2i+1 side by side are its value. So the KV cache, RoPE and
QK-norm work on n_head heads of head_dim as for every other variant; only what is done with the maps differs.
The weights are not mha's function, so `weight_compatible` is False and GPT-2 export refuses the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gptmini.attention.cache import StaticLayerKVCache
from gptmini.attention.core import PackedQKVBase, merge_heads, register_attention, softmax_with_sinks
from gptmini.config import ModelConfig

LAMBDA_STD = 0.1  # the λ vectors' init (the paper's code: normal, std 0.1)
NORM_EPS = 1e-5  # the per-head RMSNorm's epsilon (the paper's code)


def lambda_init(layer_index: int) -> float:
    """λ_init = 0.8 - 0.6·exp(-0.3·(l - 1)) for layer l = layer_index + 1: 0.2 in the first layer, towards 0.8."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def pair_values(v: Tensor) -> Tensor:
    """(B, H, Tk, hd) value heads -> (B, H/2, Tk, 2*hd): heads 2i and 2i+1 side by side, differential head i's value."""
    B, H, Tk, hd = v.shape
    return v.view(B, H // 2, 2, Tk, hd).permute(0, 1, 3, 2, 4).reshape(B, H // 2, Tk, 2 * hd)


@register_attention("diff")
class DifferentialAttention(PackedQKVBase):
    """Differential attention over n_head/2 heads; see the module docstring."""

    weight_compatible = False  # (A1 - λA2)V, normalised: not what mha computes with the same weights
    reads = fixed_by_weights = ("gate", "sinks")  # the gate and the sink logits are parameters of their own
    static_cache = True  # keys and values as for sdpa, so the fixed-shape cache serves it too
    doc_mask = True
    weights_are_probabilities = False  # A1 - λ·A2: signed, n_head/2 maps per layer

    @classmethod
    def check_sizes(cls, config: ModelConfig) -> None:
        if config.n_head % 2:
            raise ValueError(
                f"attention variant 'diff' pairs heads (two softmax maps each): model.n_head={config.n_head} must "
                f"be even"
            )

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        self.check_sizes(config)
        super().__init__(config, layer_index)
        hd = self.head_dim
        self.lambda_init = lambda_init(layer_index)
        # Parameters, not Linear layers: GPT.reset_parameters leaves them as initialised here.
        self.lambda_q1 = nn.Parameter(torch.empty(hd))
        self.lambda_k1 = nn.Parameter(torch.empty(hd))
        self.lambda_q2 = nn.Parameter(torch.empty(hd))
        self.lambda_k2 = nn.Parameter(torch.empty(hd))
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=LAMBDA_STD)
        self.head_norm = nn.RMSNorm(2 * hd, eps=NORM_EPS)  # (2*hd,) gain, initialised to 1

    def lambda_full(self) -> Tensor:
        """λ, a 0-d tensor (in at least float32): exp(λ_q1·λ_k1) - exp(λ_q2·λ_k2) + λ_init."""
        dtype = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        one = torch.exp((self.lambda_q1.to(dtype) * self.lambda_k1.to(dtype)).sum())
        two = torch.exp((self.lambda_q2.to(dtype) * self.lambda_k2.to(dtype)).sum())
        return one - two + self.lambda_init

    def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
        q, k, v = self.project(x, kv_cache, rope)  # (B, H, T, hd), (B, H, Tk, hd) x2
        T, Tk = q.size(2), k.size(2)
        lam = self.lambda_full().to(q.dtype)
        if isinstance(kv_cache, StaticLayerKVCache):
            keep = kv_cache.keep_mask(self.window)  # (T, max_len): the filled positions only
        elif T == Tk and docs is None:
            keep = None  # causal over the whole input: SDPA's is_causal, or built below when needed
        else:
            keep = self.keep_mask(T, Tk, x.device, docs)  # (T, Tk) or (B, 1, T, Tk)
        if return_weights or self.sinks is not None:
            if keep is None:
                keep = self.keep_mask(T, Tk, x.device)
            weights = self.differential_map(q, k, keep, lam)  # (B, H/2, T, Tk)
            y = weights @ pair_values(v)  # (B, H/2, T, 2*hd)
        else:
            weights = None
            y = self.fused(q, k, v, keep, lam)  # (B, H/2, T, 2*hd)
        y = self.head_norm(y) * (1 - self.lambda_init)  # (B, H/2, T, 2*hd)
        return self.project_out(merge_heads(y), x), (weights if return_weights else None)

    def differential_map(self, q: Tensor, k: Tensor, keep: Tensor, lam: Tensor) -> Tensor:
        """A1 - λ·A2 (B, H/2, T, Tk), each map softmax(QKᵀ/√d) with its own sink logit (model.attention.sinks),
        dropped out on its own like any attention weights."""
        B, H, T, Tk = q.size(0), q.size(1), q.size(2), k.size(2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, Tk): map j of head i at 2i + j
        scores = scores.masked_fill(~keep, float("-inf"))
        work = torch.promote_types(scores.dtype, torch.float32)
        maps = softmax_with_sinks(scores.to(work), self.sinks).type_as(q)  # (B, H, T, Tk)
        maps = self.attn_dropout(maps).view(B, H // 2, 2, T, Tk)
        return maps[:, :, 0] - lam * maps[:, :, 1]

    def fused(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, lam: Tensor) -> Tensor:
        """The same (A1 - λA2)V through one fused SDPA call (each map against its head's 2*hd-wide value), then
        the difference: no (T, Tk) weights in memory."""
        B, H, _, _ = v.shape
        paired = pair_values(v)  # (B, H/2, Tk, 2*hd)
        values = paired[:, :, None].expand(-1, -1, 2, -1, -1).reshape(B, H, *paired.shape[2:])  # (B, H, Tk, 2*hd)
        y = F.scaled_dot_product_attention(
            q,
            k,
            values,
            attn_mask=keep,
            dropout_p=self.attn_dropout.p if self.training else 0.0,
            is_causal=keep is None,
        )  # (B, H, T, 2*hd)
        y = y.view(B, H // 2, 2, *y.shape[2:])  # (B, H/2, 2, T, 2*hd)
        return y[:, :, 0] - lam * y[:, :, 1]
