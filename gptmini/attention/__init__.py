"""Causal multi-head self-attention in interchangeable implementations.

Every variant computes the same thing: causal self-attention over `n_head` heads, dropout on the attention
weights (after the softmax), and an output projection. They differ only in how. All share

    Variant(config: ModelConfig, layer_index: int = 0)
    forward(x, kv_cache=None, return_weights=False, rope=None, docs=None) -> (y, weights | None)

and are found by name in `ATTENTION_REGISTRY` (see `build_attention`).

State dicts are portable. Every variant saves its parameters in one canonical layout,

    qkv.weight  (C + 2*C_kv, C)   query, key and value projections stacked, in that order
    qkv.bias    (C + 2*C_kv,)     when config.bias
    out_proj.weight (C, C), out_proj.bias (C,)

(the same layout as `nn.MultiheadAttention.in_proj_weight`), plus `gate_proj.*` and `sinks` when
model.attention.gate / sinks are on, and converts to and from its own internal layout in state-dict hooks. So a
model trained with `sdpa` loads into `mha` to look at its attention weights.

Modules: `core` (the base classes, registry, masks, RoPE and QK-norm), `cache` (the per-layer KV caches), `variants`
(every variant but flex, mla, linear and diff), `flex`, `mla` (multi-head latent attention, with its own state dict
and cache), `linear` (causal linear attention, with its running-state cache) and `diff` (differential attention).
"""

from gptmini.attention.build import (
    build_attention,
    check_attention_config,
    check_doc_mask,
    check_layer,
    layer_attention,
    layer_config,
)
from gptmini.attention.cache import (
    KVCache,
    LayerCache,
    LayerKVCache,
    RollingLayerKVCache,
    StaticKVCache,
    StaticLayerKVCache,
)
from gptmini.attention.core import (
    ATTENTION_REGISTRY,
    Attention,
    PackedQKVBase,
    Rope,
    SeparateQKVBase,
    apply_rope,
    attention_class,
    causal_keep_mask,
    math_attention,
    merge_heads,
    normalize_heads,
    register_attention,
    softmax_with_sinks,
    split_heads,
    weight_compatible_variants,
)
from gptmini.attention.variants import (  # imported (and so registered) first: the registry keeps this order
    CausalHead,
    EinsumAttention,
    FusedQKV,
    GroupedQueryAttention,
    MultiHeadAttention,
    SDPAttention,
    SlidingWindowAttention,
    TorchMultiheadAttention,
    WrapperAttention,
)

# isort: split
from gptmini.attention.diff import DifferentialAttention
from gptmini.attention.flex import FlexAttention
from gptmini.attention.linear import LinearAttention, LinearStateCache
from gptmini.attention.mla import LatentCache, MultiHeadLatentAttention, StaticLatentCache

__all__ = [
    "ATTENTION_REGISTRY",
    "Attention",
    "CausalHead",
    "DifferentialAttention",
    "EinsumAttention",
    "FlexAttention",
    "FusedQKV",
    "GroupedQueryAttention",
    "KVCache",
    "LayerCache",
    "LatentCache",
    "LayerKVCache",
    "LinearAttention",
    "LinearStateCache",
    "RollingLayerKVCache",
    "StaticKVCache",
    "StaticLatentCache",
    "StaticLayerKVCache",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "PackedQKVBase",
    "Rope",
    "SDPAttention",
    "SeparateQKVBase",
    "SlidingWindowAttention",
    "TorchMultiheadAttention",
    "WrapperAttention",
    "apply_rope",
    "attention_class",
    "build_attention",
    "causal_keep_mask",
    "check_attention_config",
    "check_doc_mask",
    "check_layer",
    "layer_attention",
    "layer_config",
    "math_attention",
    "merge_heads",
    "normalize_heads",
    "register_attention",
    "softmax_with_sinks",
    "split_heads",
    "weight_compatible_variants",
]
