"""The KV cache: keys and values of the positions already generated, so each new token costs one position."""

from __future__ import annotations

import torch
from torch import Tensor


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


class StaticKVCache(KVCache):
    """A KV cache whose every decode step has the same shapes, so `torch.compile(mode="reduce-overhead")` can
    capture it as a CUDA graph: the positions being written are a tensor (`input_pos`, set by the model from its
    `input_pos` argument), keys and values are written in place with `index_copy_`, and attention always reads
    the whole buffer under a mask of the filled positions. Served by the sdpa family (`static_cache = True`).

    `pos` (how many positions are filled) is kept by the caller, outside the captured step (`advance`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=self.k.device)  # (T,) the positions being written
        self.k_pos = torch.arange(self.max_len, device=self.k.device)  # (max_len,)
        # Buffers the compiled step writes in place: marked static, CUDA graphs keep them (as they keep a module's
        # buffers) instead of skipping the graph for "mutated inputs".
        for buffer in (self.k, self.v):
            torch._dynamo.mark_static_address(buffer)

    def layer(self, index: int) -> StaticLayerKVCache:
        return StaticLayerKVCache(self, index)

    def advance(self, n: int) -> None:
        self.pos += n


class StaticLayerKVCache(LayerKVCache):
    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H_kv, T, hd) at `input_pos`; return the whole buffers (B, H_kv, max_len, hd)."""
        cache = self.cache
        cache.k[self.index].index_copy_(2, cache.input_pos, k.to(cache.k.dtype))
        cache.v[self.index].index_copy_(2, cache.input_pos, v.to(cache.v.dtype))
        return cache.k[self.index], cache.v[self.index]

    def keep_mask(self, window: int | None) -> Tensor:
        """Bool (T, max_len): query at input_pos[i] sees the filled keys j <= input_pos[i] (within `window`)."""
        q_pos = self.cache.input_pos[:, None]  # (T, 1)
        k_pos = self.cache.k_pos[None, :]  # (1, max_len)
        keep = k_pos <= q_pos
        if window is not None:
            keep &= q_pos - k_pos < window
        return keep
