"""The optimisation step alone, below the training loop (gptmini.trainer) that calls it and the benchmark
(benchmarks/train.py) that times it: accumulation, autocast, gradient scaling and clipping, the non-finite skip,
optimizer and schedule. It knows nothing of files, logs or cadence."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gptmini.config import RunConfig
from gptmini.device import autocast
from gptmini.distributed import all_reduce_mean, grad_sync
from gptmini.finite import all_finite
from gptmini.model import GPT
from gptmini.optim import set_lr, skips_on_device, step_unless
from gptmini.run_setup import Hardware

Batches = Iterator[tuple[Tensor, Tensor]]  # (x, y) micro-batches, each (B, T) token ids


@dataclass
class StepResult:
    step: int  # optimizer steps taken so far, this one included
    lr: float
    seconds: float  # host time of the step: it queues the work and returns while the device may still run it


@dataclass
class StepStats:
    """What the device knows after the latest step, read by `TrainStep.read` (one host sync)."""

    loss: float  # the latest step's loss: mean over its micro-batches (and ranks)
    grad_norm: float  # the latest step's gradient norm, before clipping
    skipped: int  # steps of this run skipped so far (non-finite loss or gradients: the update was not applied)
    bad_in_a_row: int  # how many of the latest steps in a row were skipped
    longest_bad_run: int  # the most steps in a row skipped so far (a run may end between two reads)


class TrainStep:
    """The optimisation step and its counters; knows nothing of files, logs or cadence.

    `train_step` never waits for the device: the non-finite check decides on the device whether the update is
    applied (`optim.step_unless`), and the loss, gradient norm and skip counters stay there until `read`. So on a
    GPU the host queues step k+1 while step k runs, as nanoGPT does by reading the loss only when it logs.
    """

    def __init__(self, cfg: RunConfig, model: GPT, optimizer: Any, hw: Hardware,
                 wrapped: torch.nn.Module | None = None) -> None:
        self.cfg, self.model, self.optimizer, self.hw = cfg, model, optimizer, hw
        self.wrapped = wrapped if wrapped is not None else model
        self.run_model = torch.compile(self.wrapped) if cfg.train.compile else self.wrapped
        self.ctx = autocast(hw.device, hw.dtype)
        self.scaler = torch.amp.GradScaler(hw.device.type, enabled=hw.dtype == torch.float16)
        # fp16's GradScaler skips overflowing steps itself, and foreach AdamW cannot skip on the device: the host
        # decides for those (one sync per step).
        self.skip_on_device = skips_on_device(optimizer) and not self.scaler.is_enabled()
        self.step = 0
        self.latest = torch.zeros(2, device=hw.device)  # (loss, grad_norm) of the latest step
        self.counters = torch.zeros(3, dtype=torch.long, device=hw.device)  # (skipped, bad_in_a_row, longest run)

    def train_step(self, batches: Batches) -> StepResult:
        """One optimizer step over `train.grad_accum` micro-batches drawn from `batches`; no host sync."""
        start = time.perf_counter()
        t = self.cfg.train
        lr = set_lr(self.optimizer, self.step, self.cfg)  # every group: its base_lr times the schedule
        total = torch.zeros((), device=self.hw.device)
        for micro in range(t.grad_accum):
            x, y = next(batches)
            with grad_sync(self.wrapped, self.hw.strategy, last=micro == t.grad_accum - 1), self.ctx:
                loss = self.run_model(x, y, loss_chunk=t.loss_chunk).loss / t.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else 1e30)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        loss = all_reduce_mean(total, self.hw.env)  # one number for every rank, so all ranks skip alike
        bad = ~torch.isfinite(loss)
        if not self.scaler.is_enabled():  # fp16: the scaler itself skips steps with inf gradients
            bad |= ~torch.isfinite(norm.to(loss))
        if self.skip_on_device:
            step_unless(self.optimizer, bad)
        elif not bad.item():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.counters[0] += bad
        self.counters[1] = (self.counters[1] + 1) * bad
        self.counters[2] = torch.maximum(self.counters[2], self.counters[1])
        self.latest = torch.stack([loss, norm.to(loss)])
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(self.step, lr, time.perf_counter() - start)

    def read(self) -> StepStats:
        """Wait for the device and read the latest step's numbers (the training loop's one host sync)."""
        loss, norm = self.latest.tolist()
        return StepStats(loss, norm, *self.counters.tolist())

    @property
    def skipped(self) -> int:
        return int(self.counters[0].item())

    @skipped.setter
    def skipped(self, value: int) -> None:
        self.counters[0] = value

    def weights_finite(self) -> bool:
        """Whether parameters and optimizer state are all finite, agreed by every rank (each checks its shard)."""
        local = all_finite(list(self.model.parameters()), self.optimizer.state_dict().get("state", {}))
        return all_reduce_mean(torch.tensor(float(local)), self.hw.env).item() == 1.0
