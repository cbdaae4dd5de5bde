"""The LM head and cross-entropy fused and chunked, so the full (tokens x vocabulary) logits never exist.

For GPT-2 at 16 x 1024 tokens the plain path materialises 823M logits, and their fp32 copy for the loss: 3.3 GB
of memory and as much traffic, for a loss that needs one number per token. `chunked_lm_loss` computes the head
and the loss a chunk of rows at a time, and since the gradient of softmax cross-entropy is known in closed form
(softmax - one-hot), it computes the gradients of the hidden states and of the head weight in the same pass;
backward only scales them. Exactly the plain path's loss and gradients (tested in fp32), soft-cap and vocabulary
padding included. `train.loss_chunk` turns it on.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -1  # target id that counts for nothing (as F.cross_entropy's ignore_index in GPT.forward)


def accumulation(h: Tensor) -> torch.dtype:
    """The loss is computed in fp32 (fp64 for fp64 inputs), whatever precision the matmuls ran in."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _chunk_logits(h: Tensor, weight: Tensor, vocab_size: int, cap: float | None) -> tuple[Tensor, Tensor | None]:
    """fp32 logits (n, V) of one chunk and, with a soft-cap, tanh(z / cap) (for the gradient)."""
    z = (h @ weight[:vocab_size].t()).to(accumulation(h))  # (n, V): padding rows are never predicted
    if cap is None:
        return z, None
    t = torch.tanh(z / cap)
    return cap * t, t


def _chunks(h: Tensor, targets: Tensor, chunk: int):
    valid = targets != IGNORE  # (N,)
    for start in range(0, h.size(0), chunk):
        yield start, h[start : start + chunk], targets[start : start + chunk], valid[start : start + chunk]


def _chunk_loss_sum(z: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Summed cross-entropy of the valid rows of one chunk's fp32 logits z (n, V)."""
    safe = targets.clamp(min=0)[:, None]  # (n, 1)
    return ((z.logsumexp(-1) - z.gather(-1, safe)[:, 0]) * valid).sum()


class _ChunkedLMLoss(torch.autograd.Function):
    """Loss and both gradients in one chunked pass (forward); backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, cap: float | None,
                chunk: int) -> Tensor:
        acc = accumulation(h)
        count = (targets != IGNORE).sum().clamp(min=1).to(acc)
        grad_h = torch.zeros_like(h)  # (N, C)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)  # (V_padded, C)
        total = torch.zeros((), dtype=acc, device=h.device)
        for start, hs, ts, vs in _chunks(h, targets, chunk):
            z, t = _chunk_logits(hs, weight, vocab_size, cap)  # (n, V)
            total += _chunk_loss_sum(z, ts, vs)
            g = z.softmax(-1)  # d loss / d z = (softmax - one-hot) / count, on the valid rows
            g.scatter_add_(-1, ts.clamp(min=0)[:, None], -torch.ones_like(ts[:, None], dtype=g.dtype))
            g *= (vs.to(acc) / count)[:, None]
            if t is not None:
                g *= 1 - t.square()  # through cap * tanh(z / cap)
            g = g.to(hs.dtype)
            grad_h[start : start + chunk] = g @ weight[:vocab_size]  # (n, C)
            grad_w[:vocab_size] += (g.t() @ hs).to(acc)  # (V, C)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None


def chunked_lm_loss(h: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, cap: float | None = None,
                    chunk: int = 4096) -> Tensor:
    """Mean cross-entropy of `h @ weight.T` (soft-capped by `cap`, first `vocab_size` columns) against targets.

    h (N, C) final hidden states, weight (V_padded, C) the head, targets (N,) with IGNORE for no target.
    Without gradients (evaluation) only the loss is computed, still a chunk at a time."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedLMLoss.apply(h, weight, targets, vocab_size, cap, chunk)
    count = (targets != IGNORE).sum().clamp(min=1).to(accumulation(h))
    total = sum(_chunk_loss_sum(_chunk_logits(hs, weight, vocab_size, cap)[0], ts, vs)
                for _, hs, ts, vs in _chunks(h, targets, chunk))
    return total / count
