"""The `linear` variant: causal linear attention (Katharopoulos et al., 2020, "Transformers are RNNs").

The softmax kernel exp(q·k/√d) is replaced by φ(q)·φ(k) with φ(x) = elu(x) + 1, which is positive, so every
implied weight is positive and each row still sums to one. Per head,

    y_i = φ(q_i)ᵀ S_i / φ(q_i)ᵀ z_i,    S_i = Σ_{j≤i} φ(k_j) v_jᵀ  (hd, hd),    z_i = Σ_{j≤i} φ(k_j)  (hd,)

and the sums are associative, so the same function has three forms, chosen by what the call needs:

- chunked (training, prefill): quadratic inside chunks of `chunk_size` positions, the running (S, z) across chunks,
  so memory grows linearly in T instead of with T²;
- recurrent (decoding): one position at a time; the cache (`LinearStateCache`) holds only (S, z), the same size
  at token 10 and at token 10,000;
- explicit (the weights are asked for, or attention dropout is on in training): the implied (T, T) weights
  w_ij = φ(q_i)·φ(k_j) / Σ_{j'≤i} φ(q_i)·φ(k_j'), so dropout acts on the weights exactly as in the softmax
  variants. That costs the quadratic memory the chunked form avoids: train with model.dropout=0 to keep it linear.

RoPE is applied to queries and keys before φ (a rotated vector's φ is still positive, so the weights stay a
distribution); the scores then depend on absolute positions, not on relative ones only, since φ does not commute
with rotations. Nothing here bounds the length: the model's positions (learned or RoPE tables, block_size long) do.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gptmini.attention.cache import LayerCache
from gptmini.attention.core import PackedQKVBase, merge_heads, register_attention

State = tuple[Tensor, Tensor]  # (S (B, H, hd, hd), z (B, H, hd)): Σ φ(k_j) v_jᵀ and Σ φ(k_j) over the positions seen


def feature_map(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1: positive everywhere, so denominators never vanish and the weights are a distribution."""
    return F.elu(x) + 1.0


def empty_state(q: Tensor) -> State:
    """The state before any position, for features q (B, H, T, hd)."""
    B, H, _, hd = q.shape
    return q.new_zeros(B, H, hd, hd), q.new_zeros(B, H, hd)


def explicit_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor, dropout: nn.Dropout
) -> tuple[Tensor, Tensor]:
    """The quadratic form: features q (B, H, Tq, hd), k (B, H, Tk, hd), values v (B, H, Tk, hd), keep (Tq, Tk) bool.
    Returns y (B, H, Tq, hd) and the implied weights (after dropout, as math_attention returns them)."""
    scores = (q @ k.transpose(-2, -1)).masked_fill(~keep, 0.0)  # (B, H, Tq, Tk), all >= 0
    weights = dropout(scores / scores.sum(-1, keepdim=True))  # (B, H, Tq, Tk), rows sum to 1 before dropout
    return weights @ v, weights


def chunked_linear_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, state: State | None = None
                             ) -> tuple[Tensor, State]:
    """The chunked parallel form: features q, k and values v (B, H, T, hd), continuing `state` (None: empty).
    Returns y (B, H, T, hd) and the state after the last position. T need not be a multiple of chunk_size."""
    B, H, T, hd = q.shape
    C = min(chunk_size, T)
    n, pad = -(-T // C), -T % C
    # Padded keys and values are zero, so they add nothing to any sum; padded queries are positive (no 0/0 whose
    # gradient would be NaN) and their rows are dropped.
    q = F.pad(q, (0, 0, 0, pad), value=1.0)
    k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    qc, kc, vc = (t.reshape(B, H, n, C, hd) for t in (q, k, v))  # (B, H, n, C, hd)
    S0, z0 = state if state is not None else empty_state(q)
    kv = kc.transpose(-2, -1) @ vc  # (B, H, n, hd, hd): each chunk's Σ φ(k) vᵀ
    S = torch.cat([S0[:, :, None], kv], dim=2).cumsum(2)  # (B, H, n+1, hd, hd): S[:, :, c] = before chunk c
    z = torch.cat([z0[:, :, None], kc.sum(-2)], dim=2).cumsum(2)  # (B, H, n+1, hd)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # (C, C) within a chunk
    scores = (qc @ kc.transpose(-2, -1)).masked_fill(~causal, 0.0)  # (B, H, n, C, C)
    num = scores @ vc + qc @ S[:, :, :n]  # (B, H, n, C, hd)
    den = scores.sum(-1) + (qc @ z[:, :, :n, :, None]).squeeze(-1)  # (B, H, n, C)
    y = (num / den[..., None]).reshape(B, H, n * C, hd)[:, :, :T]  # (B, H, T, hd)
    return y, (S[:, :, n], z[:, :, n])


def recurrent_linear_attention(q: Tensor, k: Tensor, v: Tensor, state: State) -> tuple[Tensor, State]:
    """The RNN form, one position at a time: features q, k and values v (B, H, T, hd) continuing `state`.
    Returns y (B, H, T, hd) and the state after the last position."""
    S, z = state
    ys = []
    for t in range(q.size(2)):
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, hd, hd)
        z = z + k[:, :, t]  # (B, H, hd)
        num = (q[:, :, t, None, :] @ S).squeeze(-2)  # (B, H, hd)
        ys.append(num / (q[:, :, t] * z).sum(-1, keepdim=True))
    return torch.stack(ys, dim=2), (S, z)  # (B, H, T, hd)


class LinearStateCache(LayerCache):
    """One layer's decoding cache: the running S (B, H, hd, hd) and z (B, H, hd), whatever the length.

    Kept in float32 at least (a bfloat16 running sum would lose the small late terms). At pos 0 (a new cache, or
    one `KVCache.reset()`) it reads as empty, so a reset cache starts afresh like a key/value one."""

    def __init__(self, batch_size: int, heads: int, width: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        dtype = torch.promote_types(dtype, torch.float32)
        self.state = torch.zeros(batch_size, heads, width, width, device=device, dtype=dtype)  # (B, H, hd, hd)
        self.norm = torch.zeros(batch_size, heads, width, device=device, dtype=dtype)  # (B, H, hd)

    def tensors(self) -> list[Tensor]:
        return [self.state, self.norm]

    def read(self) -> State:
        if self.pos == 0:
            self.state.zero_()
            self.norm.zero_()
        return self.state, self.norm

    def write(self, state: State) -> None:
        self.state.copy_(state[0])
        self.norm.copy_(state[1])


@register_attention("linear")
class LinearAttention(PackedQKVBase):
    """Causal linear attention, φ(x) = elu(x) + 1 (see the module docstring for the three forms and what each
    costs). The canonical q/k/v/out projections, but another function of them: not weight-compatible."""

    weight_compatible = False
    softmax = False  # its weights are φ(q)·φ(k) normalised, which no softmax reference reproduces
    reads = ("gate",)
    not_read_because = {"sinks": "linear attention has no softmax whose denominator a sink logit could join"}
    chunk_size = 64  # positions per chunk of the chunked form (quadratic within, linear across)

    def new_cache(self, batch_size, max_len, device, dtype, static=False):
        """The running state, not keys and values: its size does not depend on max_len."""
        return LinearStateCache(batch_size, self.n_head, self.head_dim, device=device, dtype=dtype)

    def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
        q, k, v = self.project(x, None, rope)  # (B, H, T, hd) each; the cache keeps a state, not these
        work = torch.promote_types(q.dtype, torch.float32)  # the sums in float32 at least, also under autocast
        q, k, v = feature_map(q.to(work)), feature_map(k.to(work)), v.to(work)
        explicit = return_weights or (self.training and self.attn_dropout.p > 0)
        weights = None
        if kv_cache is not None:
            y, weights = self._cached(q, k, v, kv_cache, explicit)
        elif explicit:
            y, weights = explicit_linear_attention(q, k, v, self.keep_mask(q.size(2), k.size(2), x.device),
                                                   self.attn_dropout)
        else:
            y, _ = chunked_linear_attention(q, k, v, self.chunk_size)
        y = merge_heads(y.to(x.dtype))  # (B, T, C)
        return self.project_out(y, x), (weights if return_weights else None)

    def _cached(self, q: Tensor, k: Tensor, v: Tensor, cache: LinearStateCache, explicit: bool
                ) -> tuple[Tensor, Tensor | None]:
        """Continue the cached state with q, k, v (B, H, T, hd): recurrent for one new position, chunked for a
        prompt, explicit (from an empty cache only: the state keeps no past keys to weigh) when weights are needed."""
        if explicit and cache.pos > 0:
            raise ValueError(
                f"attention variant {self.name!r} keeps a running state, not past keys: it has no attention weights "
                f"(nor attention dropout) over the {cache.pos} cached positions; ask without a KV cache"
            )
        state = cache.read()
        weights = None
        if explicit:
            y, weights = explicit_linear_attention(q, k, v, self.keep_mask(q.size(2), k.size(2), q.device),
                                                   self.attn_dropout)
            new = (state[0] + k.transpose(-2, -1) @ v, state[1] + k.sum(2))  # (B, H, hd, hd), (B, H, hd)
        elif q.size(2) == 1:
            y, new = recurrent_linear_attention(q, k, v, state)
        else:
            y, new = chunked_linear_attention(q, k, v, self.chunk_size, state)
        cache.write(new)
        return y, weights
