"""What every attention variant shares: the base class and its canonical state-dict layout, the registry, masks,
RoPE and QK-norm, and the explicit softmax path that returns the attention weights. Checking a config against the
registry and building each layer's module from it: gptmini.attention.build."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gptmini.attention.cache import LayerCache, LayerKVCache, StaticLayerKVCache
from gptmini.config import VARIANT_DEFAULTS, AttentionConfig, ModelConfig

# (cos, sin), each (T, head_dim // 2), for the positions of the current input; (B, 1, T, head_dim // 2) with
# model.doc_rope_reset (each row's positions restart at its documents), so they broadcast over (B, H, T, hd) only.
Rope = tuple[Tensor, Tensor]

# The AttentionConfig fields only some variants read; a variant lists the ones it reads in `Attention.reads`. A key
# counts as set when it is neither null nor false.
OPTIONAL_KEYS = ("n_kv_head", "window", "kv_rank", "q_rank", "rope_dim", "gate", "sinks")


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


def causal_keep_mask(
    q_len: int, k_len: int, device: torch.device, window: int | None = None, docs: Tensor | None = None
) -> Tensor:
    """Bool (q_len, k_len), True where query i may attend to key j; (B, 1, q_len, k_len) when `docs` is given.

    Queries are the last `q_len` of `k_len` positions (the cache holds the earlier ones), so query i sits at
    absolute position k_len - q_len + i and sees keys j <= that position (and, with a window, j > pos - window).
    `docs` (B, k_len): each position's document number; a query then sees only keys of its own document.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    keep = k_pos <= q_pos
    if window is not None:
        keep &= q_pos - k_pos < window
    if docs is not None:
        same = docs[:, k_len - q_len :, None] == docs[:, None, :]  # (B, Tq, Tk)
        keep = (keep & same)[:, None]  # (B, 1, Tq, Tk)
    return keep


def math_attention(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor, dropout: nn.Dropout, sinks: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Explicit softmax(QKᵀ/√d)V that also returns the weights; used whenever weights are asked for.

    q (B, H, Tq, hd); k, v (B, H, Tk, hd) with as many heads as q; keep (Tq, Tk) bool, or (B, 1, Tq, Tk) per
    document (model.doc_mask). `sinks` (H,): a learned logit per head that joins every softmax denominator without
    a value (gpt-oss), so each row of the weights returned sums to one minus the sink's share.
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~keep, float("-inf"))
    # in float32 at least (bf16 weights lose the small ones), float64 kept for float64 checks
    weights = softmax_with_sinks(scores.to(torch.promote_types(scores.dtype, torch.float32)), sinks).type_as(q)
    weights = dropout(weights)
    return weights @ v, weights  # (B, H, Tq, hd)


def softmax_with_sinks(scores: Tensor, sinks: Tensor | None) -> Tensor:
    """Softmax over the last dim of scores (B, H, Tq, Tk), with each head's sink logit (H,) as one more column
    that is dropped afterwards (None: the plain softmax)."""
    if sinks is None:
        return F.softmax(scores, dim=-1)
    B, H, Tq, _ = scores.shape
    sink = sinks.to(scores.dtype).view(1, H, 1, 1).expand(B, H, Tq, 1)  # (B, H, Tq, 1)
    return F.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]  # (B, H, Tq, Tk)


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


def weight_compatible_variants() -> tuple[str, ...]:
    """Registered variants whose state dicts are interchangeable and whose outputs agree for equal weights."""
    return tuple(name for name, cls in ATTENTION_REGISTRY.items() if cls.weight_compatible)


def register_attention(name: str) -> Callable[[type[Attention]], type[Attention]]:
    """Class decorator: `@register_attention("mine")` makes `model/attention=mine` (with a configs/model/attention/
    mine.yaml) and `AttentionConfig("mine")` build this class. What the rest of gptmini must know about the variant
    it reads from the class's capability flags (see `Attention`), never from its name."""

    def add(cls: type[Attention]) -> type[Attention]:
        ATTENTION_REGISTRY[name] = cls
        VARIANT_DEFAULTS[name] = cls.with_defaults  # ModelConfig fills the settings the variant leaves null
        cls.name = name
        return cls

    return add


def attention_class(name: str) -> type[Attention]:
    """The registered variant called `name`; a one-line error listing the valid names otherwise."""
    if name not in ATTENTION_REGISTRY:
        raise ValueError(
            f"unknown attention variant {name!r} (model.attention.name); "
            f"valid names: {', '.join(sorted(ATTENTION_REGISTRY))}"
        )
    return ATTENTION_REGISTRY[name]


# ----------------------------------------------------------------------------------------------------------
# Base classes


class Attention(nn.Module):
    """Base class: configuration, output projection, dropout and the canonical state-dict layout."""

    name = "base"
    # Capability flags. Every place that treats variants differently (config checks, checkpoint swaps, the kernel
    # probe, the trainer, the tests) asks these, never a variant's name; a new variant sets the ones it changes.
    #
    # True when this variant loads the canonical full-head state dict and computes what `mha` computes with it;
    # variants that change the function (fewer key/value heads, a window) set it to False.
    weight_compatible: ClassVar[bool] = True
    # True when the state dict is the canonical layout (qkv, out_proj), with as many key/value heads as the variant
    # has (gqa: fewer), so an `mha` module can be made to compute the same function; a variant with parameters of
    # its own (mla's latents) sets False and is pinned by its own tests instead.
    canonical_layout: ClassVar[bool] = True
    # Which of OPTIONAL_KEYS (model.attention.*) this variant reads (a value set for any other key is refused),
    # which it needs, and which the trained weights fix (a checkpoint runs only with its own value).
    reads: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()
    fixed_by_weights: ClassVar[tuple[str, ...]] = ()
    # Why the variant cannot read some of the other keys (key -> a phrase), added to the refusal of a set value.
    not_read_because: ClassVar[dict[str, str]] = {}
    # True when the weights are softmax(QKᵀ/√d) under a causal mask (what `mha` computes, up to the heads and the
    # window); False for a variant with another kernel (`linear`), which no softmax reference reproduces.
    softmax: ClassVar[bool] = True
    # True when forward(return_weights=True) returns the (B, H, Tq, Tk) attention weights (the trainer draws them
    # every train.attn_interval steps; a variant without them gets no maps, and the log says so once).
    returns_weights: ClassVar[bool] = True
    # True when forward understands a StaticKVCache (fixed-shape decoding that CUDA graphs can capture).
    static_cache: ClassVar[bool] = False
    # True when new_cache(rolling=True) keeps only this layer's last `window` positions (bounded, past block_size).
    rolling_cache: ClassVar[bool] = False
    # True when forward honours `docs` (model.doc_mask: each token attends only within its own document).
    doc_mask: ClassVar[bool] = False
    # True when the returned weights are one softmax per head (rows sum to one, less a learned sink's share). False
    # when they combine maps (differential attention's A1 - λ·A2: signed, n_head/2 of them): the head metrics then
    # read no sink share from them and judge each layer's weights as they come.
    weights_are_probabilities: ClassVar[bool] = True
    # What the variant can do: train on CPU (a backward there), attention dropout, RoPE and QK-norm on its heads.
    trains_on_cpu: ClassVar[bool] = True
    has_dropout: ClassVar[bool] = True
    applies_rope: ClassVar[bool] = True
    applies_qk_norm: ClassVar[bool] = True
    # The backend the kernel probe reports when the profiler sees no known attention op (a compiled kernel hides
    # it); None: the probe's own reading stands.
    compiled_backend: ClassVar[str | None] = None

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index  # 0-based place in the stack (differential attention's lambda depends on it)
        self.n_head = config.n_head
        self.n_kv_head = self.kv_heads(config)
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.block_size = config.block_size
        self.window: int | None = None  # only `swa` limits how far back a query sees
        self.bias = config.bias
        self.qk_norm = config.qk_norm
        # model.qk_norm_gain: one gain per head dimension, shared by queries and keys (so q.k scales by gain^2).
        self.qk_gain = nn.Parameter(torch.ones(self.head_dim)) if config.qk_norm_gain else None
        self.attn_dropout = nn.Dropout(config.dropout)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # model.attention.gate (variants that read it): G1 of Qiu et al. 2025, y * sigmoid(x W_g) per head dimension
        # before the output projection. model.attention.sinks: one learned logit per head (see math_attention).
        # Both are separate state-dict keys, so the canonical layout of the variants without them is unchanged.
        self.gate_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias) if config.attention.gate else None
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if config.attention.sinks else None
        self.register_state_dict_post_hook(_save_hook)
        self.register_load_state_dict_pre_hook(_load_hook)

    @classmethod
    def with_defaults(cls, attention: AttentionConfig, model: ModelConfig) -> AttentionConfig:
        """`attention` with the settings this variant needs but the config left null filled in from the rest of
        `model` (ModelConfig calls it through gptmini.config.VARIANT_DEFAULTS, before validating itself; its sizes
        are positive integers by then); the YAML groups leave them null so that a checkpoint's own values win when
        generate.py swaps variants."""
        return attention

    def new_cache(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype, static: bool = False
    ) -> LayerCache:
        """This layer's cache for decoding up to `max_len` positions: by default the projected keys and values
        (n_kv_head heads of head_dim); `static`: the fixed-shape one (variants with `static_cache` only). A variant
        that decodes from something else (a latent, a running state, its inputs) returns its own LayerCache; one
        with `rolling_cache` also takes `rolling=True` (the model asks only those)."""
        kind = StaticLayerKVCache if static else LayerKVCache
        return kind(batch_size, self.n_kv_head, max_len, self.head_dim, device=device, dtype=dtype)

    def kv_heads(self, config: ModelConfig) -> int:
        """Key/value heads; only `gqa` uses fewer than the query heads."""
        return config.n_head

    def position_qk(self, x: Tensor, rope: Rope | None) -> Tensor:
        """What happens to queries and keys (..., T, hd) before the dot product: QK-norm (when on, with its gain
        when model.qk_norm_gain), then RoPE."""
        if self.qk_norm:
            x = normalize_heads(x) if self.qk_gain is None else normalize_heads(x) * self.qk_gain  # (..., T, hd)
        return apply_rope(x, rope)

    def project_out(self, y: Tensor, x: Tensor) -> Tensor:
        """The attention output y (B, T, C), heads side by side, through the output gate (when on; it reads the
        layer input x (B, T, C)) and the output projection."""
        if self.gate_proj is not None:
            y = y * torch.sigmoid(self.gate_proj(x))  # (B, T, C)
        return self.out_proj(y)

    # Subclasses whose internal layout differs from the canonical one override these two.
    def _to_canonical(self, sd: dict[str, Tensor], prefix: str) -> None:
        """Rewrite this module's entries of `sd` (keys start with `prefix`) into the canonical layout."""

    def _from_canonical(self, sd: dict[str, Tensor], prefix: str) -> None:
        """Rewrite canonical entries of `sd` into this module's own layout, in place."""

    @classmethod
    def check_sizes(cls, config: ModelConfig) -> None:
        """Raise a one-line ValueError naming the model.* key when this variant cannot be built with `config`'s
        sizes (differential attention pairs heads: n_head must be even). Asked where a config enters
        (gptmini.config_checks) and again by build_attention."""

    @classmethod
    def check_device(cls, config: ModelConfig, device: torch.device, training: bool) -> None:
        """Raise if this variant cannot run `config` on `device` (in training mode when `training`).

        A classmethod, so the trainer can ask before it builds anything."""

    def keep_mask(self, q_len: int, k_len: int, device: torch.device, docs: Tensor | None = None) -> Tensor:
        """Causal (within this layer's window, and within each document when `docs` (B, k_len) is given)."""
        return causal_keep_mask(q_len, k_len, device, self.window, docs)

    # The same signature as gptmini.model.Block.forward, which passes its arguments straight through.
    def forward(
        self,
        x: Tensor,
        kv_cache: LayerKVCache | None = None,
        return_weights: bool = False,
        rope: Rope | None = None,
        docs: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, C) -> (y (B, T, C), the weights (B, H, T, Tk) when asked and `returns_weights`). `docs` (B, T):
        each position's document number, for variants with `doc_mask` (model.doc_mask); None: one document."""
        raise NotImplementedError


def _save_hook(module: Attention, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    module._to_canonical(state_dict, prefix)


def _load_hook(module: Attention, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if prefix + "qkv.weight" in state_dict:
        module._from_canonical(state_dict, prefix)


class PackedQKVBase(Attention):
    """Base of the variants that keep the canonical packed projection, one matmul for Q, K and V
    (`fused_qkv`, `sdpa`, `gqa`, `swa`, `flex`); not a variant itself."""

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
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

    def weights_path(self, q: Tensor, k: Tensor, v: Tensor, docs: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The explicit math path, used when the caller wants the attention weights."""
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, Tk, hd)
        keep = self.keep_mask(q.size(2), k.size(2), q.device, docs)  # (Tq, Tk), or (B, 1, Tq, Tk) with docs
        return math_attention(q, k, v, keep, self.attn_dropout, self.sinks)


class SeparateQKVBase(Attention):
    """Base of the variants with three (C, C) projections `q_proj`, `k_proj`, `v_proj` (`mha`, `einsum`),
    stacked into the canonical `qkv` in the state dict; not a variant itself."""

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
        C = config.n_embd
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)

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
