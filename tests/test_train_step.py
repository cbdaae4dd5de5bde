"""The optimisation step against plain-tensor references: accumulation divides the loss, clipping reaches the
optimizer, a resumed rank gets its own random state back."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from model_helpers import tiny_config

from gptmini.checkpoint import rng_state
from gptmini.config import OptimConfig, RunConfig, TrainConfig
from gptmini.device import describe
from gptmini.distributed import DistEnv
from gptmini.model import GPT
from gptmini.optim import make_optimizer
from gptmini.run_setup import Hardware
from gptmini.trainer import TrainingLoop, TrainStep

CPU = torch.device("cpu")


def make_trainer(grad_accum: int, batch_size: int, grad_clip: float = 1.0) -> TrainStep:
    """A trainer of a tiny model in float64: Adam's first steps are about sign(g) per element, so float32 rounding
    on elements whose gradient is near zero would flip a few of them between two equal computations."""
    cfg = RunConfig(model=tiny_config("sdpa"), optim=OptimConfig(name="adamw"),
                    train=TrainConfig(batch_size=batch_size, grad_accum=grad_accum, grad_clip=grad_clip,
                                      warmup_iters=0, lr=1e-2))
    torch.manual_seed(0)  # the same initial weights for every trainer
    model = GPT(cfg.model).double().train()
    hw = Hardware(env=DistEnv(), device=CPU, dtype=torch.float32, info=describe(CPU), strategy="none")
    return TrainStep(cfg, model, make_optimizer(model, cfg, CPU), hw)


def rows(steps: int, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of n (x, y) rows of 16 tokens from a 37-token vocabulary."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(37, (n, 16), generator=gen), torch.randint(37, (n, 16), generator=gen))
            for _ in range(steps)]


def halves(batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """The same rows as micro-batches of half the size, in order."""
    for x, y in batches:
        yield x[:4], y[:4]
        yield x[4:], y[4:]


def test_two_half_micro_batches_equal_one_whole_batch():
    """grad_accum=2 x batch 4 is one step over the same 8 rows as grad_accum=1 x batch 8: same loss, same
    gradient norm, same weights (a missing division doubles loss and gradients; AdamW alone would hide it)."""
    whole, split = make_trainer(1, 8, grad_clip=0.0), make_trainer(2, 4, grad_clip=0.0)
    data = rows(3)
    whole_batches, split_batches = iter(data), halves(data)
    for _ in range(3):
        whole.train_step(whole_batches)
        split.train_step(split_batches)
        a, b = whole.read(), split.read()
        assert abs(a.loss - b.loss) < 1e-6 and abs(a.grad_norm - b.grad_norm) < 1e-6 * a.grad_norm, (a, b)
        assert 3 < a.loss < 5  # about ln 37 for a fresh model: the number is a real mean, not a sum
    for p, q in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)  # the steps move them by ~1e-2


def reference_grad_norm(model: GPT, x: torch.Tensor, y: torch.Tensor) -> float:
    """The gradient norm of the mean cross-entropy, from the logits, in plain tensors."""
    model.zero_grad(set_to_none=True)
    logits = model(x).logits  # (B, T, V)
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    model.zero_grad(set_to_none=True)
    return float(norm)


def test_the_optimizer_receives_clipped_gradients_and_the_log_shows_the_norm_before():
    clip = 0.05
    trainer = make_trainer(1, 8, grad_clip=clip)
    data = rows(2)
    seen: list[float] = []

    def record(optimizer, args, kwargs):  # runs inside optimizer.step(), on the gradients it is about to apply
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))

    trainer.optimizer.register_step_pre_hook(record)
    batches = iter(data)
    for x, y in data:
        before = reference_grad_norm(trainer.model, x, y)
        trainer.train_step(batches)
        stats = trainer.read()
        assert before > 10 * clip  # clipping has work to do
        assert abs(stats.grad_norm - before) < 1e-4 * before  # logged: the norm before clipping
        assert seen[-1] <= clip * (1 + 1e-5), (seen, clip)  # applied: the clipped gradients
        assert seen[-1] > 0.9 * clip
    assert len(seen) == 2


def test_a_resumed_rank_gets_its_own_random_state():
    """Rank r of a resumed run continues from rng[r] of the checkpoint, not rank 0's state."""
    states = []
    for seed in (11, 22):  # rank 0's and rank 1's state as a checkpoint holds them
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        states.append(rng_state())
    expected = (torch.rand(3), random.random(), np.random.rand())  # what rank 1 draws next
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    resume = {"scaler": {}, "sampler": {"seed": 5, "step": 9}, "rng": states, "step": 9, "skipped_steps": 0}
    run = SimpleNamespace(
        parts=SimpleNamespace(resume=resume), hw=SimpleNamespace(env=DistEnv(rank=1, world_size=2)),
        trainer=SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False), step=0, skipped=0),
        sampler=SimpleNamespace(load_state_dict=lambda state: None), t=SimpleNamespace(seed=0))
    TrainingLoop.restore(run)
    drawn = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(drawn[0], expected[0]) and drawn[1:] == expected[1:]
    assert run.trainer.step == 9
