"""Optimizers and learning-rate schedules.

- The registry: `optim.name` (Hydra group `optim=adamw|muon`) picks an `OptimizerFactory` registered with
  `@register_optimizer`; `make_optimizer` builds it.
- `adamw` (GPT-2, nanoGPT): AdamW everywhere, weight decay on weight matrices only.
- `muon`: Muon (gptmini.muon) for the 2-D weight matrices inside the transformer blocks, AdamW for everything else
  (embeddings, the tied head, biases, norm gains); its settings are `optim.muon.*`.
- Schedules: linear warm-up, then `cosine` decay (GPT-2) or `wsd` (warm-up, stable, decay): flat at the peak
  for most of the run and a short linear decay at the end.
- Skipping a non-finite step on the device: the protocol in gptmini.step_skip.

Every parameter group carries its peak learning rate as `base_lr`; `set_lr` scales all of them by the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from gptmini.config import SCHEDULES, RunConfig, TrainConfig, check_choice
from gptmini.muon import (  # noqa: F401  (gptmini.optim's public names too)
    NS_COEFFS,
    Muon,
    MuonWithAdamW,
    newton_schulz,
    ns_dtype,
    ns_dtype_choice,
    ns_dtype_note,
)
from gptmini.step_skip import skips_on_device, step_unless  # noqa: F401

# ----------------------------------------------------------------------------------------------------------
# Schedules


def lr_scale(step: int, t: TrainConfig) -> float:
    """The schedule's multiplier of the peak learning rate at `step` (0-based); TrainConfig checked the settings."""
    assert t.lr_schedule in SCHEDULES, t.lr_schedule
    if step < t.warmup_iters:
        return (step + 1) / t.warmup_iters
    length = t.schedule_iters or t.max_iters  # past it: the final rate, lr * min_lr_ratio
    if t.lr_schedule == "wsd":
        decay_start = max(t.warmup_iters, length - round(t.decay_frac * length))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, length - decay_start))
        return 1.0 - (1.0 - t.min_lr_ratio) * progress
    progress = (step - t.warmup_iters) / max(1, length - t.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * coeff


def lr_at(step: int, cfg: RunConfig) -> float:
    """The learning rate of the AdamW parameters (train.lr times the schedule) at `step`."""
    return cfg.train.lr * lr_scale(step, cfg.train)


def set_lr(optimizer: Any, step: int, cfg: RunConfig) -> float:
    """Set every group's learning rate for `step` (its `base_lr` times the schedule); return train.lr's."""
    scale = lr_scale(step, cfg.train)
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", cfg.train.lr) * scale
    return cfg.train.lr * scale


# ----------------------------------------------------------------------------------------------------------
# The registry: one factory per optim.name


class OptimizerFactory:
    """Builds the optimizer `optim.name=<name>` names. A subclass with `@register_optimizer("<name>")` and a
    configs/optim/<name>.yaml (`name: <name>`) is all a new optimizer needs; its settings of its own go under
    `optim.<name>` (a dataclass field of gptmini.config.OptimConfig, like `muon`).

    `build` returns anything with torch's optimizer interface (`param_groups`, each with `base_lr`, the peak that
    the schedule scales; `step`, `zero_grad`, `state_dict`, `load_state_dict`). To skip non-finite steps without
    a host sync it follows the protocol above (`found_inf`, or `skips_on_device` + `step_unless`)."""

    name: ClassVar[str] = "base"
    # Why the optimizer needs whole matrices, when it does: it cannot run on FSDP's shards (train.strategy=fsdp).
    whole_matrices: ClassVar[str | None] = None

    @classmethod
    def build(cls, model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> Any:
        raise NotImplementedError

    @classmethod
    def notes(cls, cfg: RunConfig, device: torch.device) -> list[str]:
        """Lines for the start-up log (what was chosen for this hardware); none by default."""
        return []


OPTIMIZER_REGISTRY: dict[str, type[OptimizerFactory]] = {}


def register_optimizer(name: str) -> Callable[[type[OptimizerFactory]], type[OptimizerFactory]]:
    """Class decorator: `@register_optimizer("mine")` makes `optim.name=mine` (or `optim=mine`) build with it."""

    def add(cls: type[OptimizerFactory]) -> type[OptimizerFactory]:
        OPTIMIZER_REGISTRY[name] = cls
        cls.name = name
        return cls

    return add


def optimizer_class(name: str) -> type[OptimizerFactory]:
    """The registered optimizer called `name`; a one-line ValueError listing the valid names otherwise."""
    check_choice("optim.name", name, tuple(OPTIMIZER_REGISTRY))
    return OPTIMIZER_REGISTRY[name]


def check_optimizer_config(cfg: RunConfig) -> None:
    """optim.name is registered, and the optimizer can run under train.strategy."""
    cls = optimizer_class(cfg.optim.name)
    if cls.whole_matrices is not None and cfg.train.strategy == "fsdp":
        raise ValueError(
            f"optim.name={cfg.optim.name} cannot be combined with train.strategy=fsdp: {cls.whole_matrices} "
            f"and FSDP shards them; use train.strategy=ddp or optim.name=adamw"
        )


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> Any:
    """The optimizer optim.name names, for `model`'s parameters."""
    return optimizer_class(cfg.optim.name).build(model, cfg, device)


def is_hidden_matrix(name: str, p: Tensor) -> bool:
    """The parameters Muon updates: 2-D weights inside the transformer blocks (not embeddings or the head)."""
    return p.dim() == 2 and name.startswith("blocks.")


def adamw_groups(params: list[tuple[str, Tensor]], cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW's two groups: weight matrices decay (the embeddings when optim.decay_embeddings), biases and norm gains
    never do."""
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in params:
        is_embedding = name.startswith(("wte.", "wpe."))
        (decay if p.dim() >= 2 and (o.decay_embeddings or not is_embedding) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": o.weight_decay, "base_lr": cfg.train.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.train.lr},
    ]


def build_adamw(params: list[tuple[str, Tensor]], cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `params`, fused where torch has the fused kernel (it takes found_inf: steps skip on the device)."""
    o = cfg.optim
    return torch.optim.AdamW(adamw_groups(params, cfg), lr=cfg.train.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type in ("cuda", "cpu"))


@register_optimizer("adamw")
class AdamWFactory(OptimizerFactory):
    """AdamW for every parameter (GPT-2, nanoGPT)."""

    @classmethod
    def build(cls, model, cfg, device):
        return build_adamw(list(model.named_parameters()), cfg, device)


@register_optimizer("muon")
class MuonFactory(OptimizerFactory):
    """Muon for the hidden matrices (optim.muon.*), AdamW for embeddings, head, biases and norm gains."""

    whole_matrices = "Muon orthogonalises whole matrices"

    @classmethod
    def notes(cls, cfg, device):
        return [ns_dtype_note(cfg.optim.muon.ns_dtype, device)]

    @classmethod
    def build(cls, model, cfg, device):
        rest, hidden, fused_qkv = [], [], []
        for name, p in model.named_parameters():
            if not is_hidden_matrix(name, p):
                rest.append((name, p))
                continue
            # check_optimizer_config refuses muon with train.strategy=fsdp: Muon needs whole matrices.
            assert type(p).__name__ != "DTensor", "Muon cannot orthogonalise a sharded (FSDP) matrix"
            # The canonical fused projection stacks Q, K and V: orthogonalise them as the three maps they are.
            (fused_qkv if name.endswith(("attn.qkv.weight", "attn.mha.in_proj_weight")) else hidden).append(p)
        m, mc = cfg.optim.muon, model.config
        kv = mc.n_kv_head * mc.head_dim
        groups = [{"params": hidden, "base_lr": m.lr, "split": None},
                  {"params": fused_qkv, "base_lr": m.lr, "split": [mc.n_embd, kv, kv]}]
        muon = Muon([g for g in groups if g["params"]], lr=m.lr, momentum=m.momentum, nesterov=m.nesterov,
                    ns_steps=m.ns_steps, weight_decay=m.weight_decay, ns_dtype=ns_dtype(m.ns_dtype, device))
        return MuonWithAdamW(build_adamw(rest, cfg, device), muon)
