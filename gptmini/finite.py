"""Whether weights are finite: below gptmini.checkpoint and gptmini.pretrained, which both refuse NaN or inf
weights where they enter (a checkpoint, a Hugging Face folder), and the trainer, which never saves them."""

from __future__ import annotations

import math
from typing import Any

import torch


class NonFiniteWeights(ValueError):
    """Weights holding NaN or inf; one line naming where they came from."""


def all_finite(*trees: Any) -> bool:
    """True when every floating-point tensor (and float) in the nested dicts/lists is finite."""
    stack = list(trees)
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, torch.Tensor) and item.is_floating_point():
            if not bool(torch.isfinite(item).all()):
                return False
        elif isinstance(item, float) and not math.isfinite(item):
            return False
    return True


def check_finite_weights(weights: dict[str, Any], where: str) -> None:
    """Refuse weights holding NaN or inf where they enter (a checkpoint, a Hugging Face folder), in one line
    naming `where` (the file, or the key=value the user typed) and the first such tensor. Training never saves
    such weights; a file from elsewhere could hold them, and a model built from them only prints nan."""
    bad = next((name for name, tensor in weights.items() if not all_finite(tensor)), None)
    if bad is not None:
        raise NonFiniteWeights(f"{where}: its weights hold NaN or inf (first in {bad}), so they cannot be used "
                               f"(a damaged file, or one saved from a diverged model)")
