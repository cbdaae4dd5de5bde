"""The `flex` variant: FlexAttention with a causal block mask (compiled kernels on GPUs)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gptmini.attention.core import PackedQKVBase, merge_heads, register_attention
from gptmini.config import ModelConfig


class NoCPUBackward(ValueError, RuntimeError):
    """Flex asked for gradients on CPU. A ValueError where the config is checked (a one-line `error:` before any
    work), the RuntimeError torch code expects when a forward pass hits it; one class, so one message."""


def check_backward(device: torch.device | str) -> None:
    """torch 2.13 has no FlexAttention backward on CPU: the one place that says so."""
    if torch.device(device).type == "cpu":
        raise NoCPUBackward(
            "attention variant 'flex' cannot train on CPU: torch has no backward on CPU for FlexAttention; use a "
            "GPU, or another variant such as model/attention=sdpa (inference with flex works on CPU, under "
            "torch.no_grad())"
        )


@register_attention("flex")
class FlexAttention(PackedQKVBase):
    """FlexAttention with a causal block mask (compiled kernels on GPUs).

    torch 2.13 has no FlexAttention backward on CPU and no dropout inside it: training on CPU, or with
    dropout > 0, is refused with a message; inference works everywhere. Its mask has no window
    (model.attention.window is refused; `swa` has one).
    """

    trains_on_cpu = has_dropout = False  # torch 2.13: no CPU backward, no dropout inside the kernel
    doc_mask = True  # a block mask built from the document numbers (model.doc_mask)
    reads = fixed_by_weights = ("gate", "sinks")
    compiled_backend = "flex"  # compiled on GPUs: the profiler sees Inductor's kernels, not FlexAttention's op

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
        self._block_masks: dict[tuple[int, int, str], Any] = {}

    # Inductor's FlexAttention kernel refuses smaller heads ("NYI: embedding dimension of the query, key, and
    # value must be at least 16"), so a GPU run with them is refused before any work.
    MIN_GPU_HEAD_DIM = 16

    @classmethod
    def check_device(cls, config: ModelConfig, device: torch.device, training: bool) -> None:
        device = torch.device(device)
        if training:
            check_backward(device)
        if training and config.dropout > 0:
            raise ValueError(
                f"attention variant 'flex' has no attention dropout; set model.dropout=0 "
                f"(got {config.dropout}) or use another variant"
            )
        if device.type == "cuda" and config.head_dim < cls.MIN_GPU_HEAD_DIM:
            raise ValueError(
                f"attention variant 'flex' needs a head size of at least {cls.MIN_GPU_HEAD_DIM} on GPUs, got "
                f"model.n_embd/model.n_head={config.n_embd}/{config.n_head}={config.head_dim}; use fewer heads, "
                f"a wider model, or another variant such as model/attention=sdpa"
            )

    def block_mask(self, q_len: int, k_len: int, device: torch.device, docs: Tensor | None = None) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        if docs is not None:
            return document_block_mask(docs)
        if q_len == 1:
            return None  # a single new token may see every cached position
        key = (q_len, k_len, str(device))
        if key not in self._block_masks:
            offset = k_len - q_len

            def causal(b, h, q_idx, kv_idx):
                return q_idx + offset >= kv_idx

            self._block_masks[key] = create_block_mask(causal, None, None, q_len, k_len, device=device)
        return self._block_masks[key]

    def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
        if torch.is_grad_enabled():  # also in eval mode: gradients with respect to the input need a backward
            check_backward(x.device)
        if self.training:
            self.check_device(self.config, x.device, training=True)
        q, k, v = self.project(x, kv_cache, rope)  # (B, H, T, hd), (B, H, Tk, hd) x2
        if return_weights:
            y, weights = self.weights_path(q, k, v, docs)
            return self.project_out(merge_heads(y), x), weights
        block_mask = self.block_mask(q.size(2), k.size(2), x.device, docs)
        if self.sinks is None:
            y = _flex_kernel(x.device.type)(q, k, v, block_mask=block_mask)  # (B, H, T, hd)
        else:
            y = flex_with_sinks(_flex_kernel(x.device.type), q, k, v, block_mask, self.sinks)
        return self.project_out(merge_heads(y), x), None


def flex_with_sinks(
    kernel: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, block_mask: Any, sinks: Tensor
) -> Tensor:
    """FlexAttention (q, k, v (B, H, T, hd)) with each head's sink logit (sinks (H,)) in every softmax denominator.

    A sink s joins a row whose scores have log-sum-exp L: every weight shrinks by Z / (Z + e^s) = sigmoid(L - s),
    and the sink adds no value, so the output is the kernel's output times sigmoid(L - s), exactly."""
    from torch.nn.attention.flex_attention import AuxRequest

    y, aux = kernel(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True))  # (B, H, T, hd), lse (B, H, T)
    share = torch.sigmoid(aux.lse.float() - sinks.float().view(1, -1, 1))  # (B, H, T): what the sink leaves
    return (y * share.unsqueeze(-1)).type_as(y)


# The last document block mask built, with the docs (B, T) it was built from: every layer of one forward gets the
# same docs tensor, so the mask is built once per forward, not once per layer.
_LAST_DOC_MASK: list[tuple[Tensor, Any]] = []


def document_block_mask(docs: Tensor) -> Any:
    """The block mask of causal attention within each document, for docs (B, T) document numbers (no cache:
    queries and keys are the same T positions). Blocks wholly across documents are skipped by the kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    if _LAST_DOC_MASK and _LAST_DOC_MASK[0][0] is docs:
        return _LAST_DOC_MASK[0][1]
    B, T = docs.shape

    def causal_in_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    mask = create_block_mask(causal_in_document, B, None, T, T, device=docs.device)
    _LAST_DOC_MASK[:] = [(docs, mask)]
    return mask


@functools.cache
def _flex_kernel(device_type: str) -> Callable[..., Tensor]:
    """flex_attention, compiled into a fused kernel on GPUs; eager (unfused, for inference) on CPU."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cpu":
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention
    return torch.compile(flex_attention, dynamic=False)
