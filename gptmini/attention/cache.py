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
