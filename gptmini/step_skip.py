"""Skipping a non-finite step without a host sync: the protocol an optimizer follows to take part.

The trainer decides on the device whether a step's loss or gradient norm was non-finite, and must then leave weights
and optimizer state untouched without reading that decision on the host (a read per step stalls the GPU). An
optimizer takes part in one of two ways:
  - it is a torch optimizer whose `step()` reads a `found_inf` attribute (fused AdamW does, as GradScaler uses it):
    `step_unless` sets it for the one step;
  - it declares `skips_on_device = True` and has `step_unless(bad)`, leaving everything unchanged where `bad` (a
    0-dim bool tensor on the device) is true (gptmini.muon.MuonWithAdamW).
Any other optimizer still works: the host reads the decision once a step, and the trainer says so once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def skips_on_device(optimizer: Any) -> bool:
    """Whether `step_unless` can skip a step without the host reading the decision: an optimizer that declares
    `skips_on_device`, or fused AdamW (found_inf); foreach AdamW (e.g. on MPS) cannot."""
    declared = getattr(optimizer, "skips_on_device", None)
    if declared is not None and hasattr(optimizer, "step_unless"):
        return bool(declared)
    return isinstance(optimizer, torch.optim.AdamW) and all(g.get("fused") for g in optimizer.param_groups)


def step_unless(optimizer: Any, bad: Tensor) -> None:
    """`optimizer.step()`, except that where `bad` (a 0-dim bool tensor on the device) is true nothing changes:
    not the weights, not the moments, not AdamW's step count.

    The decision stays on the device, so the host can queue the next step while this one runs (a host read per
    step would stall the GPU on every step). Fused AdamW takes it as `found_inf`, the way GradScaler tells it
    about overflowing fp16 gradients; an optimizer that declares `skips_on_device` gets `step_unless(bad)`.
    Needs `skips_on_device(optimizer)`.
    """
    if not skips_on_device(optimizer):
        raise ValueError("step_unless needs fused AdamW (or Muon with it); this optimizer must be stepped by the host")
    if hasattr(optimizer, "step_unless"):
        optimizer.step_unless(bad)
        return
    optimizer.found_inf = bad.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
