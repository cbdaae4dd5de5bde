"""Multi-process training on PyTorch's own engine: torchrun sets the environment, we join its process group.

`python train.py` is one process (world size 1, nothing here does anything). Under
`torchrun --nproc_per_node=N train.py`, each process reads RANK / WORLD_SIZE / LOCAL_RANK, joins a process group
(NCCL on CUDA — RCCL on ROCm, same backend name — and gloo for CPU tensors), and wraps the model in DDP or FSDP2.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from gptmini.config import STRATEGIES, check_choice


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    """What the launcher says about this process (world size 1 without a launcher)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_process_group(timeout_s: float = 600.0) -> DistEnv:
    """Join torchrun's process group once (idempotent). A timeout brings a job with a dead rank down."""
    env = env_from_torchrun()
    if env.enabled and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return env


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank (pickled over gloo; only ever objects rank 0 made itself)."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.device.type == "cuda" else dist.ReduceOp.SUM)
        if value.device.type != "cuda":  # gloo has no AVG
            value /= env.world_size
    return value


def resolve_strategy(strategy: str, env: DistEnv) -> str:
    """`auto`: DDP when there is more than one process, else none."""
    check_choice("train.strategy", strategy, STRATEGIES)  # TrainConfig's check, for direct callers
    if not env.enabled:
        return "none"
    return "ddp" if strategy == "auto" else strategy


def wrap_model(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """DDP replicates the model; FSDP2 (`fully_shard`) shards each block, then the rest, across ranks."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def grad_sync(model: nn.Module, strategy: str, last: bool):
    """Gradient accumulation: ranks synchronise gradients only on the last micro-step."""
    if strategy == "ddp" and not last:
        return model.no_sync()
    if strategy == "fsdp":
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> tuple[dict, dict]:
    """Model and optimizer state in the single-process layout, whatever the strategy (collective under FSDP).

    So a checkpoint written by N processes resumes on M, and `generate.py` reads it unchanged.
    """
    if strategy != "fsdp":
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter name
    if not by_name:  # with cpu_offload only rank 0 receives the gathered state
        return model_sd, {}
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    optim_sd = {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in by_name["param_groups"]],
    }
    return model_sd, optim_sd


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], strategy: str
) -> None:
    """The inverse of `full_state_dicts` for the optimizer (every rank holds the full state).

    Only the state (moments, step counts) comes from the checkpoint: each group's settings (`base_lr`,
    `weight_decay`, betas ...) stay those the current config built, so a resumed run applies the values it logs.
    """
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    _load_optimizer_state(model, optimizer, state, strategy)
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)


def _load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                          strategy: str) -> None:
    if strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
