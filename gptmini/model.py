"""The GPT model: token embedding, positions, a stack of pre-norm transformer blocks, tied LM head.

Readable in one sitting on purpose; the attention implementations live in `attention/`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gptmini.attention import KVCache, LayerCache, Rope, StaticKVCache, build_attention
from gptmini.config import ModelConfig
from gptmini.loss import IGNORE, chunked_lm_loss


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop just the bias)."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class MLP(nn.Module):
    """Two linear maps with GELU between: exact (`gelu`), or its tanh approximation (`gelu_tanh`, what GPT-2 was
    trained with, so its weights reproduce it), or ReLU² (`model.mlp=relu2`: relu(x)², sparse and cheap)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.relu2 = config.mlp == "relu2"
        self.gelu_approximate = "tanh" if config.mlp == "gelu_tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, 4C)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate=self.gelu_approximate)
        return self.dropout(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = build_attention(config, layer_index)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        kv_cache: LayerCache | None = None,
        return_weights: bool = False,
        rope: Rope | None = None,
        docs: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        a, weights = self.attn(self.ln_1(x), kv_cache=kv_cache, return_weights=return_weights, rope=rope, docs=docs)
        x = x + self.resid_dropout(a)
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class GPTOutput(NamedTuple):
    logits: Tensor | None  # (B, T, vocab_size); None when the loss was computed fused (loss_chunk)
    loss: Tensor | None  # mean cross-entropy when targets were given
    attentions: list[Tensor] | None  # per layer (B, H, T, T_total) when return_weights


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        if config.doc_mask and config.eot_id is None:
            raise ValueError(
                "model.doc_mask=true needs model.eot_id, the end-of-text id that separates documents (train.py "
                "sets it from the data's tokenizer)"
            )
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab, config.n_embd)  # rows past vocab_size: padding, kept at 0
        self.wpe = (
            nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (GPT-2)
        if config.pos_encoding == "rope":
            cos, sin = self.rope_tables(config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def rope_tables(self, length: int) -> tuple[Tensor, Tensor]:
        """cos and sin (length, hd/2) of every position's rotary angles, computed on the CPU in float32 whatever
        the model's device, so that tables extended later hold the same values for the positions they share."""
        half = self.config.head_dim // 2
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(half, dtype=torch.float32) / half))
        angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, hd/2)
        return angles.cos(), angles.sin()

    def extend_rope(self, length: int) -> None:
        """RoPE tables for at least `length` positions (decoding past block_size with a rolling cache), doubled at
        each growth so that a long generation extends them a logarithmic number of times."""
        if length <= self.rope_cos.size(0):
            return
        cos, sin = self.rope_tables(max(length, 2 * self.rope_cos.size(0)))
        self.rope_cos = cos.to(self.rope_cos.device)  # (length, hd/2): still a non-persistent buffer
        self.rope_sin = sin.to(self.rope_sin.device)

    def rolls_past_block(self) -> bool:
        """Whether a rolling cache lets this model decode past block_size: every layer keeps a window only (its
        variant's `rolling_cache`) and positions are rotary (RoPE's tables extend; learned positions do not)."""
        return self.wpe is None and all(block.attn.rolling_cache for block in self.blocks)

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) everywhere, residual output projections scaled by 1/√(2·n_layer)
        (or zero with `model.zero_init_proj`, so every block starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.MultiheadAttention):  # torch_mha's fused in-projection
                nn.init.normal_(module.in_proj_weight, mean=0.0, std=0.02)
                if module.in_proj_bias is not None:
                    nn.init.zeros_(module.in_proj_bias)
        nn.init.zeros_(self.wte.weight[self.config.vocab_size :])  # padding rows: never looked up, never predicted
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "mlp.proj.weight")):
                if self.config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=residual_std)

    def num_parameters(self) -> int:
        """Unique parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def make_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
        rolling: bool = False,
    ) -> KVCache:
        """A preallocated cache for generating up to `max_len` (default block_size) positions; `static`: the
        fixed-shape StaticKVCache the compiled decode path uses (variants with `static_cache` only); `rolling`: the
        layers whose variant has `rolling_cache` keep their last `window` positions only (see rolls_past_block)."""
        for block in self.blocks:
            if static and not block.attn.static_cache:
                raise ValueError(f"attention variant {block.attn.name!r} has no static KV cache; use the sdpa family")
        if static and rolling:
            raise ValueError("a KV cache is static (fixed shapes) or rolling (a window), not both")
        ref = self.wte.weight
        max_len = max_len or self.config.block_size
        layers = [
            block.attn.new_cache(batch_size, max_len, device or ref.device, dtype or ref.dtype, static=static,
                                 **({"rolling": True} if rolling and block.attn.rolling_cache else {}))
            for block in self.blocks
        ]
        return StaticKVCache(layers) if static else KVCache(layers)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        return_weights: bool = False,
        input_pos: Tensor | None = None,
        loss_chunk: int | None = None,
        last_only: bool = False,
    ) -> GPTOutput:
        """idx (B, T) token ids; with a kv_cache they continue the cached positions.

        With a StaticKVCache, `input_pos` (T,) says which positions idx fills, and the cache's `pos` is left to
        the caller: nothing here depends on a Python number, so a decode step can be captured as a CUDA graph.
        With targets and `loss_chunk`, the head and the loss run fused, that many rows at a time
        (gptmini.loss), and no logits are returned (None). `last_only`: the logits of the last position only
        (B, 1, V), all that sampling needs: the head is skipped for the others (for GPT-2's vocabulary over a
        quarter of a forward's matrix FLOPs). model.doc_mask: attention within each document (`documents`), but
        with a kv_cache idx is one document (a prompt and what follows it: decoding stops at end-of-text)."""
        if last_only and targets is not None:
            raise ValueError("last_only=True computes no loss: pass targets=None")
        docs = self.documents(idx) if self.config.doc_mask and kv_cache is None else None  # (B, T)
        x, rope = self.embed(idx, kv_cache, input_pos, docs)  # (B, T, C)
        attentions = [] if return_weights else None
        for i, block in enumerate(self.blocks):
            layer_cache = kv_cache.layer(i) if kv_cache is not None else None
            x, weights = block(x, kv_cache=layer_cache, return_weights=return_weights, rope=rope, docs=docs)
            if attentions is not None:
                attentions.append(weights)
        if kv_cache is not None and not isinstance(kv_cache, StaticKVCache):
            kv_cache.pos += idx.size(1)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.ln_f(x)
        cap, V = self.config.logit_softcap, self.config.vocab_size
        if targets is not None and loss_chunk:
            loss = chunked_lm_loss(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), V, cap,
                                   loss_chunk)
            return GPTOutput(None, loss, attentions)
        logits = self.lm_head(x)  # (B, T, padded_vocab)
        if self.config.padded_vocab != V:
            logits = logits[..., :V]  # (B, T, vocab_size): padding is never predicted
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)  # smooth clamp to (-cap, cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE)
        return GPTOutput(logits, loss, attentions)

    def documents(self, idx: Tensor) -> Tensor:
        """Each position's document number (B, T), counted from 0 at the window's start.

        The data writes end-of-text between documents. Here it opens the document it precedes, as a
        prompt starting from end-of-text does in generation: a document's first token is predicted from
        end-of-text alone, and the previous document's last token still predicts end-of-text in its own context.
        """
        return torch.cumsum(idx == self.config.eot_id, dim=1)  # (B, T)

    def embed(
        self, idx: Tensor, kv_cache: KVCache | None, input_pos: Tensor | None, docs: Tensor | None = None
    ) -> tuple[Tensor, Rope | None]:
        """Token (+ learned position) embeddings (B, T, C) after dropout, and the RoPE tables for these positions
        ((B, 1, T, hd/2) per row with model.doc_rope_reset and `docs`: positions counted from each document's start)."""
        T = idx.size(1)
        if isinstance(kv_cache, StaticKVCache):
            kv_cache.input_pos = positions = input_pos  # (T,)
        else:
            start = kv_cache.pos if kv_cache is not None else 0
            rolling = kv_cache is not None and kv_cache.bounded and self.wpe is None
            if start + T > self.config.block_size and not rolling:
                raise ValueError(
                    f"sequence of {start + T} tokens is longer than model.block_size={self.config.block_size}; "
                    f"crop the input to the last {self.config.block_size} tokens"
                )
            if self.wpe is None:
                self.extend_rope(start + T)  # past block_size (a rolling cache): the tables grow
            positions = slice(start, start + T)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe.weight[positions]  # (T, C) broadcast
        elif docs is not None and self.config.doc_rope_reset:
            offsets = document_offsets(docs)  # (B, T)
            rope = (self.rope_cos[offsets][:, None], self.rope_sin[offsets][:, None])  # (B, 1, T, hd/2) x2
        else:
            rope = (self.rope_cos[positions], self.rope_sin[positions])  # (T, hd/2) x2
        return self.drop(x), rope


def document_offsets(docs: Tensor) -> Tensor:
    """Each position's distance from the first position of its document in the window, (B, T), for docs (B, T)
    non-decreasing document numbers."""
    pos = torch.arange(docs.size(1), device=docs.device).expand_as(docs)  # (B, T)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]  # (B, T): True where a document begins
    first = torch.where(starts, pos, 0).cummax(dim=1).values  # (B, T): where the current document began
    return pos - first
