"""The KV cache: what each layer keeps of the positions already generated, so each new token costs one position.

A `KVCache` holds one cache per layer and the count of positions filled (`pos`, shared by every layer). Each
attention variant makes its own layer cache (`Attention.new_cache`): most keep keys and values (`LayerKVCache`);
others keep what their decoding needs instead (a latent, a running state), so layers of different kinds can sit
in one model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class LayerCache:
    """Base of one layer's cache. The owning `KVCache` says how many positions are filled (`pos`)."""

    owner: KVCache | None = None
    # True when the cache keeps a bounded number of positions (a window), so decoding may run past block_size.
    bounded = False

    @property
    def pos(self) -> int:
        assert self.owner is not None, "a layer cache is used through the KVCache that holds it"
        return self.owner.pos

    def tensors(self) -> list[Tensor]:
        """The buffers this cache holds (their bytes are the cache's size)."""
        return []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class LayerKVCache(LayerCache):
    """Preallocated keys and values of one layer, (B, heads, max_len, width) each, filled left to right."""

    def __init__(
        self,
        batch_size: int,
        heads: int,
        max_len: int,
        width: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, heads, max_len, width)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (B, H_kv, max_len, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, hd) at the current position; return all keys and values so far."""
        start, end = self.pos, self.pos + k.size(-2)
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class RollingLayerKVCache(LayerCache):
    """Keys and values of a layer that looks back `window` positions (swa), keeping only the last `window`: a ring
    in which position p sits in slot p % window, so the cache is as large after a million tokens as after `window`.
    Keys are stored after RoPE, so each keeps its own position's rotary phase."""

    bounded = True

    def __init__(
        self,
        batch_size: int,
        heads: int,
        window: int,
        width: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, heads, window, width)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (B, H_kv, window, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.window = window

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, hd) of positions [pos, pos + T); return what the new queries may see.

        One new position (T == 1): the filled slots (B, H_kv, <= window, hd) in ring order, all inside its window
        (the order of keys does not change a softmax). More: the kept positions that the first new query can still
        see, then the new ones, in order (B, H_kv, kept + T, hd), for the layer's windowed causal mask."""
        W, pos, T = self.window, self.pos, k.size(-2)
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if T == 1:
            self.k[:, :, pos % W] = k[:, :, 0]
            self.v[:, :, pos % W] = v[:, :, 0]
            return self.k[:, :, : min(pos + 1, W)], self.v[:, :, : min(pos + 1, W)]
        seen = torch.arange(max(pos - W + 1, 0), pos, device=k.device) % W  # slots of the positions still in view
        k = torch.cat([self.k.index_select(2, seen), k], dim=2)  # (B, H_kv, kept + T, hd)
        v = torch.cat([self.v.index_select(2, seen), v], dim=2)
        end = pos + T
        slots = torch.arange(max(end - W, 0), end, device=k.device) % W  # the last `window` positions' slots
        self.k.index_copy_(2, slots, k[:, :, -slots.numel() :])
        self.v.index_copy_(2, slots, v[:, :, -slots.numel() :])
        return k, v


class KVCache:
    """The caches of every layer of a model, filled together: `pos` counts the positions already filled. The model
    reads it to place new tokens, each layer writes at [pos, pos + T), and the model advances `pos` once the whole
    stack has run."""

    def __init__(self, layers: Sequence[LayerCache]) -> None:
        self.layers = list(layers)
        for layer in self.layers:
            layer.owner = self
        self.pos = 0

    def layer(self, index: int) -> LayerCache:
        return self.layers[index]

    def reset(self) -> None:
        self.pos = 0

    @property
    def bounded(self) -> bool:
        """Every layer keeps a window only: decoding may run past block_size (RoPE models; see GPT.embed)."""
        return all(layer.bounded for layer in self.layers)

    def nbytes(self) -> int:
        """Bytes held by every layer's buffers."""
        return sum(layer.nbytes() for layer in self.layers)


class StaticKVCache(KVCache):
    """A KV cache whose every decode step has the same shapes, so `torch.compile(mode="reduce-overhead")` can
    capture it as a CUDA graph: the positions being written are a tensor (`input_pos`, set by the model from its
    `input_pos` argument), keys and values are written in place with `index_copy_`, and attention always reads
    the whole buffer under a mask of the filled positions. Served by the sdpa family (`static_cache = True`).

    `pos` (how many positions are filled) is kept by the caller, outside the captured step (`advance`)."""

    def __init__(self, layers: Sequence[LayerCache]) -> None:
        super().__init__(layers)
        first = layers[0]
        self.max_len: int = first.max_len  # every static layer cache has one
        device = first.tensors()[0].device
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)  # (T,) the positions being written
        self.k_pos = torch.arange(self.max_len, device=device)  # (max_len,)
        # Buffers the compiled step writes in place: marked static, CUDA graphs keep them (as they keep a module's
        # buffers) instead of skipping the graph for "mutated inputs".
        for layer in layers:
            for buffer in layer.tensors():
                torch._dynamo.mark_static_address(buffer)

    def advance(self, n: int) -> None:
        self.pos += n


class StaticLayerKVCache(LayerKVCache):
    owner: StaticKVCache | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H_kv, T, hd) at `input_pos`; return the whole buffers (B, H_kv, max_len, hd)."""
        assert self.owner is not None
        self.k.index_copy_(2, self.owner.input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, self.owner.input_pos, v.to(self.v.dtype))
        return self.k, self.v

    def keep_mask(self, window: int | None) -> Tensor:
        assert self.owner is not None
        return static_keep_mask(self.owner, window)


def static_keep_mask(owner: StaticKVCache, window: int | None) -> Tensor:
    """Bool (T, max_len): query at input_pos[i] sees the filled keys j <= input_pos[i] (within `window`)."""
    q_pos = owner.input_pos[:, None]  # (T, 1)
    k_pos = owner.k_pos[None, :]  # (1, max_len)
    keep = k_pos <= q_pos
    if window is not None:
        keep &= q_pos - k_pos < window
    return keep
