"""A non-finite step is skipped on the device: exactly nothing changes, and the training step never waits for
the device (no host read), so a GPU can run step k while the host queues step k+1."""

from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch
from model_helpers import tiny_config

from gptmini.config import MuonConfig, OptimConfig, RunConfig, TrainConfig
from gptmini.device import describe
from gptmini.distributed import DistEnv
from gptmini.model import GPT
from gptmini.optim import make_optimizer, skips_on_device, step_unless
from gptmini.run_setup import Hardware
from gptmini.trainer import TrainStep

CPU = torch.device("cpu")


def run_config(optim: str, **train) -> RunConfig:
    # weight decay on, and a learning rate whose decay factor 1 - lr*wd rounds differently in float32 and in double
    # (a kept step must compute it as a plain step does)
    optim_cfg = OptimConfig(name=optim, muon=MuonConfig(ns_dtype="float32", lr=0.012855827913956978,
                                                        weight_decay=0.1))
    return RunConfig(model=tiny_config("sdpa"), optim=optim_cfg,
                     train=TrainConfig(batch_size=4, warmup_iters=0, **train))


def set_grads(model: torch.nn.Module, seed: int, value: float | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) if value is None else torch.full_like(p, value)


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    state = optimizer.state_dict()
    parts = state.values() if set(state) == {"adamw", "muon"} else [state]
    return [t for part in parts for s in part["state"].values() for t in s.values() if torch.is_tensor(t)]


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_a_skipped_step_changes_nothing_and_a_kept_one_equals_a_plain_step(optim):
    torch.manual_seed(0)
    cfg = run_config(optim)
    model = GPT(cfg.model)
    optimizer = make_optimizer(model, cfg, CPU)
    assert skips_on_device(optimizer)
    for seed in range(2):  # warm moments and momentum first
        set_grads(model, seed)
        optimizer.step()
    twin_model = copy.deepcopy(model)
    twin = make_optimizer(twin_model, cfg, CPU)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # its own moments, not shared ones
    weights = [p.detach().clone() for p in model.parameters()]
    state = [t.clone() for t in optimizer_tensors(optimizer)]

    set_grads(model, 0, value=float("nan"))
    step_unless(optimizer, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(state, optimizer_tensors(optimizer), strict=True))

    set_grads(model, 7)
    step_unless(optimizer, torch.tensor(False))
    set_grads(twin_model, 7)
    twin.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(optimizer), optimizer_tensors(twin), strict=True))


def test_only_fused_adamw_skips_on_the_device():
    w = torch.nn.Parameter(torch.ones(2, 2))
    foreach = torch.optim.AdamW([w], foreach=True)
    assert skips_on_device(torch.optim.AdamW([w], fused=True)) and not skips_on_device(foreach)
    with pytest.raises(ValueError, match="fused AdamW"):
        step_unless(foreach, torch.tensor(False))


@contextlib.contextmanager
def no_host_reads():
    """Every way of reading a tensor's value on the host raises."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(self, *args, **kwargs):
        raise AssertionError("the training step read a tensor on the host")

    for name in names:
        setattr(torch.Tensor, name, refuse)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def make_trainer(optim: str) -> tuple[TrainStep, itertools.cycle]:
    torch.manual_seed(0)
    cfg = run_config(optim, grad_accum=2)
    model = GPT(cfg.model).train()
    hw = Hardware(env=DistEnv(), device=CPU, dtype=torch.float32, info=describe(CPU), strategy="none")
    trainer = TrainStep(cfg, model, make_optimizer(model, cfg, CPU), hw)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(37, (4, 16), generator=gen), torch.randint(37, (4, 16), generator=gen))
               for _ in range(3)]
    return trainer, itertools.cycle(batches)


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_the_training_step_never_reads_the_device(optim):
    trainer, batches = make_trainer(optim)
    assert trainer.skip_on_device
    with no_host_reads():
        for _ in range(3):
            result = trainer.train_step(batches)
    assert result.step == 3
    with no_host_reads(), pytest.raises(AssertionError, match="read a tensor"):
        trainer.read()  # the guard does catch a host read
    stats = trainer.read()
    assert 0 < stats.loss < 10 and stats.grad_norm > 0 and stats.skipped == 0 and stats.bad_in_a_row == 0


def test_bad_steps_are_counted_on_the_device_and_leave_the_weights_alone(monkeypatch):
    trainer, batches = make_trainer("muon")
    real = torch.nn.utils.clip_grad_norm_
    bad_calls = {2, 3}
    calls = iter(itertools.count(1))

    def flaky(params, max_norm, *args, **kwargs):
        norm = real(params, max_norm, *args, **kwargs)
        return norm * float("nan") if next(calls) in bad_calls else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", flaky)
    seen = []
    for _ in range(4):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train_step(batches)
        stats = trainer.read()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
        seen.append((unchanged, stats.skipped, stats.bad_in_a_row, stats.longest_bad_run))
    assert seen == [(False, 0, 0, 0), (True, 1, 1, 1), (True, 2, 2, 2), (False, 2, 0, 2)]
    assert trainer.skipped == 2
