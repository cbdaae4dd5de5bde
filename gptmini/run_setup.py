"""Everything a training run needs before its first step, built and checked before anything is written.

`build_run` resolves the device and precision, prepares (or reuses) the data, builds the model and the optimizer
and loads the checkpoint to resume from. Each of these can fail on bad input; all of them run before the trainer
writes its first file into the run directory, so a bad request never touches an earlier run's files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from gptmini import data as data_lib
from gptmini.attention import ATTENTION_REGISTRY, layer_config
from gptmini.backend_probe import KernelReport, math_fallback_warning, probe_attention_kernel
from gptmini.checkpoint import (
    CheckpointError,
    check_compatible,
    check_tokenizer,
    checkpoint_dir,
    load_checkpoint,
    resume_path,
    upgrade_saved_config,
)
from gptmini.config import ModelConfig, RunConfig
from gptmini.config_checks import check_run_config
from gptmini.device import DeviceInfo, describe, dtype_choice, resolve_device
from gptmini.distributed import DistEnv, barrier, broadcast, load_optimizer_state, resolve_strategy, wrap_model
from gptmini.finite import check_finite_weights
from gptmini.model import GPT
from gptmini.optim import lr_at, make_optimizer, optimizer_class
from gptmini.pretrained import (
    build_gpt,
    check_pretrained_tokenizer,
    data_tokenizer_spec,
    load_pretrained,
    resolve_pretrained,
)
from gptmini.run_log import flatten
from gptmini.tokenizer import Tokenizer

T = TypeVar("T")


class TrainingError(ValueError):
    """Training cannot start or continue; the message says why and what to change."""


@dataclass(frozen=True)
class Hardware:
    env: DistEnv
    device: torch.device
    dtype: torch.dtype
    info: DeviceInfo
    strategy: str  # none | ddp | fsdp
    dtype_why: str = ""  # why this dtype, in words: "set by train.dtype=...", "auto: ..."


@dataclass
class RunData:
    tokenizer: Tokenizer
    train: np.ndarray  # token ids
    val: np.ndarray


@dataclass
class RunParts:
    """What `build_run` made; the trainer takes it from here."""

    hw: Hardware
    data: RunData
    model_cfg: ModelConfig  # cfg.model with the data's vocabulary size (and with init_from, the weights' sizes)
    model: GPT
    wrapped: torch.nn.Module  # what the training step calls: DDP(model), or model itself (FSDP shards in place)
    optimizer: Any
    resume: dict[str, Any] | None  # the checkpoint to continue from
    notes: list[str]  # start-up lines for the log
    kernel: KernelReport | None = None  # the attention kernel that serves the model (probed on GPUs)


def build_run(cfg: RunConfig, run_dir: Path, env: DistEnv) -> RunParts:
    check_run_config(cfg)  # again: `train(cfg, run_dir)` from Python does not pass through the command line
    hw = resolve_hardware(cfg, env)
    notes = []
    if env.enabled:
        notes.append(f"distributed: {env.world_size} processes, strategy {hw.strategy}")
    notes.extend(optimizer_class(cfg.optim.name).notes(cfg, hw.device))  # e.g. Muon's Newton-Schulz dtype
    # Refuse what the attention variant cannot do here (flex on CPU, ...) before preparing any data.
    for index, name in enumerate(cfg.model.attention.layer_names(cfg.model.n_layer)):  # every layer's variant
        ATTENTION_REGISTRY[name].check_device(layer_config(cfg.model, index), hw.device, training=True)
    resume_from = resume_path(cfg.train.resume, checkpoint_dir(run_dir))
    if cfg.model.init_from is not None and resume_from is None:
        check_pretrained_source(cfg)  # the tokenizer and the weights' folder, before minutes of preparation
    resume = read_resume(resume_from, env)
    if resume is not None and resume["step"] > cfg.train.max_iters:
        raise TrainingError(
            f"train.max_iters={cfg.train.max_iters} is before step {resume['step']} of {str(resume_from)!r}, the "
            f"checkpoint this run resumes; give a larger train.max_iters, or a new hydra.run.dir"
        )
    data = load_data(cfg, env, resume)
    model, model_cfg = build_model(cfg, data, resume, hw.device, env)
    hw = with_model_dtype(hw, cfg.train.dtype, model_cfg)  # auto on CPUs depends on the model's width
    notes.insert(0, f"device: {hw.info.backend}; dtype: {str(hw.dtype).removeprefix('torch.')} ({hw.dtype_why})")
    if resume is not None:
        check_compatible(resume, model_cfg, data.tokenizer.spec(), cfg.optim)
        notes.append(f"resumed from {resume_from} at step {resume['step']}")
        notes += resume_changes(resume, cfg)
        load_weights(model, resume["model"], resume_from)
    elif model_cfg.init_from is not None:
        notes.append(f"initialised from pretrained GPT-2 weights: {model_cfg.init_from}")
    kernel = probe_kernel(model, model_cfg, hw) if wants_kernel_probe(hw.device) else None
    if kernel is not None:
        notes += [kernel.line()] + [w for w in [math_fallback_warning(kernel, hw.device)] if w]
    wrapped = wrap_model(model, hw.strategy, hw.device)  # FSDP shards `model` in place: build the optimizer after
    optimizer = make_optimizer(model, cfg, hw.device)
    if resume is not None:
        load_optimizer_state(model, optimizer, resume["optimizer"], hw.strategy)
    return RunParts(hw=hw, data=data, model_cfg=model_cfg, model=model, wrapped=wrapped, optimizer=optimizer,
                    resume=resume, notes=notes, kernel=kernel)


def resume_changes(resume: dict[str, Any], cfg: RunConfig) -> list[str]:
    """One note per train./optim. setting that differs from the checkpoint's: a resumed run applies the new value
    (the learning-rate schedule is recomputed over the new train.max_iters), and says so."""
    notes = []
    for section in ("train", "optim"):
        saved = flatten(upgrade_saved_config(resume["config"]).get(section, {}))
        for key, value in flatten(dataclasses.asdict(getattr(cfg, section))).items():
            if key in saved and saved[key] != value and key not in ("resume", "stop_after"):
                notes.append(f"resume: {section}.{key} is now {value!r} (the checkpoint's run had {saved[key]!r})")
    return notes + _schedule_note(resume, cfg)


def _schedule_note(resume: dict[str, Any], cfg: RunConfig) -> list[str]:
    """What a new schedule length does to the learning rate at the resume step, and how to keep the old one."""
    saved = resume["config"].get("train", {})
    old_length = saved.get("schedule_iters") or saved.get("max_iters")
    new_length = cfg.train.schedule_iters or cfg.train.max_iters
    if old_length is None or old_length == new_length:
        return []
    step = resume["step"]
    before = lr_at(step, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, schedule_iters=old_length)))
    return [f"resume: the learning-rate schedule now spans {new_length} steps instead of {old_length}: lr at step "
            f"{step} is {lr_at(step, cfg):.3e} (it would be {before:.3e}); add train.schedule_iters={old_length} "
            f"to continue the checkpoint's schedule"]


def wants_kernel_probe(device: torch.device) -> bool:
    """GPUs only: there the backend decides the speed, and a CPU run's start-up time stays as it is."""
    return device.type == "cuda"


def probe_kernel(model: GPT, model_cfg: ModelConfig, hw: Hardware) -> KernelReport:
    """Which SDPA backend the model's attention gets at its training shape (one sequence): the first layer of each
    variant in the model (a pattern holds several) is probed, and a math fallback, if any layer has one, is the
    report, so a fast first layer does not hide a slow other."""
    firsts: dict[str, Any] = {}
    for block in model.blocks:
        firsts.setdefault(block.attn.name, block.attn)  # each variant's first layer
    reports = [probe_attention_kernel(attn, hw.device, hw.dtype, model_cfg.block_size, training=True)
               for attn in firsts.values()]
    return next((report for report in reports if report.is_math_fallback), reports[0])


def resolve_hardware(cfg: RunConfig, env: DistEnv) -> Hardware:
    strategy = resolve_strategy(cfg.train.strategy, env)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
    dtype, why = dtype_choice(cfg.train.dtype, device, cfg.model.n_embd)
    return Hardware(env=env, device=device, dtype=dtype, info=describe(device), strategy=strategy, dtype_why=why)


def with_model_dtype(hw: Hardware, requested: str, model_cfg: ModelConfig) -> Hardware:
    """`hw` with train.dtype resolved for the model as built (pretrained weights set its width, not the config)."""
    dtype, why = dtype_choice(requested, hw.device, model_cfg.n_embd)
    return dataclasses.replace(hw, dtype=dtype, dtype_why=why)


def local_rank_zero_first(env: DistEnv, work: Callable[[bool], T]) -> T:
    """`work(True)` on each machine's local rank 0, then `work(False)` on its other ranks once that is done: one
    process per machine prepares data or downloads weights, the others find them ready."""
    if env.local_rank == 0:
        result = work(True)
    barrier(env)
    if env.local_rank != 0:
        result = work(False)
    return result


def load_data(cfg: RunConfig, env: DistEnv, resume: dict[str, Any] | None = None) -> RunData:
    """One process per machine prepares the data; the others then find it up to date. Data this run would refuse
    (too small for the model, another vocabulary than the checkpoint it resumes) never replaces a prepared one."""

    def accept(prepared: data_lib.PreparedData) -> None:
        check_split_sizes(prepared, cfg.model.block_size)
        if resume is not None:
            check_tokenizer(resume, prepared.tokenizer.spec())

    prepared = local_rank_zero_first(env, lambda first: data_lib.prepare(
        cfg.data, cfg.data_dir, accept=accept, **({} if first else {"log": lambda _: None})))
    return RunData(tokenizer=prepared.tokenizer, train=prepared.train_tokens(), val=prepared.val_tokens())


def check_split_sizes(prepared: data_lib.PreparedData, block_size: int) -> None:
    for split in ("train", "val"):
        n_tokens = prepared.meta[f"{split}_tokens"]
        if n_tokens < block_size + 1:
            raise TrainingError(
                f"the {split} split has {n_tokens} tokens, fewer than model.block_size+1="
                f"{block_size + 1}; use more data or a smaller model.block_size"
            )


def read_resume(path: Path | None, env: DistEnv) -> dict[str, Any] | None:
    """The checkpoint `train.resume` pointed at (rank 0 reads it, every rank gets it)."""
    if path is None:
        return None
    return broadcast(_load_finite(path) if env.is_main else None, env)


RESUME_KEYS = {"model": dict, "optimizer": dict, "step": int, "config": dict, "scaler": dict, "sampler": dict,
               "rng": list}


def _load_finite(path: Path) -> dict[str, Any]:
    """The checkpoint to resume, with what resuming reads present and of its kind, and finite weights: a copied
    or edited file fails here in one line, not deep in the restore with a KeyError."""
    state = load_checkpoint(path)
    bad = next((k for k, kind in RESUME_KEYS.items() if not isinstance(state.get(k), kind)), None)
    if bad is not None:
        raise CheckpointError(f"{str(path)!r} cannot be resumed: its {bad!r} entry is missing or not a "
                              f"{RESUME_KEYS[bad].__name__}; resume from another checkpoint or train.resume=never")
    check_finite_weights(state["model"], repr(str(path)))  # training never saves such weights; a copied file may
    return state


def load_weights(model: GPT, weights: dict[str, Any], path: Path | None) -> None:
    """The checkpoint's weights into the model its config describes; a tensor of another shape is one line."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{str(path)!r} cannot be resumed: its weights do not fit the model of its own "
                              f"config ({detail})") from None


def check_pretrained_source(cfg: RunConfig) -> None:
    """`model.init_from` needs GPT-2's tokens and a folder of weights: check both before preparing data."""
    check_pretrained_tokenizer(cfg.model.init_from, data_tokenizer_spec(cfg.data.tokenizer, cfg.data.encoding))
    resolve_pretrained(cfg.model.init_from)


def build_model(
    cfg: RunConfig, data: RunData, resume: dict[str, Any] | None, device: torch.device, env: DistEnv
) -> tuple[GPT, ModelConfig]:
    """The GPT to train and its config: random weights (seeded alike on every rank), GPT-2's weights with
    `model.init_from`, or, when resuming, a model the checkpoint's weights will fill."""
    requested = with_data_ids(cfg.model, data.tokenizer)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    if requested.init_from is None:
        return GPT(requested).to(device), requested
    check_pretrained_tokenizer(requested.init_from, data.tokenizer.spec())
    if resume is not None:  # the sizes the checkpoint recorded stand in for the weights' folder, which may be gone
        model_cfg = pretrained_sizes(requested, resume)
        return GPT(model_cfg).to(device), model_cfg
    model_cfg, state_dict = local_rank_zero_first(env, lambda _: load_pretrained(requested))  # one download
    return build_gpt(model_cfg, state_dict).to(device), model_cfg


def with_data_ids(model: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """`model` with what the data decides: the vocabulary size and, with model.doc_mask, the end-of-text id that
    separates its documents (null otherwise, so checkpoints without document masking record none)."""
    eot = tokenizer.eot_id if model.doc_mask else None
    if model.eot_id is not None and model.eot_id != eot:
        raise ValueError(
            f"model.eot_id={model.eot_id} is not the data's end-of-text id {eot}; leave model.eot_id unset: "
            f"train.py takes it from the data's tokenizer"
        )
    return dataclasses.replace(model, vocab_size=tokenizer.vocab_size, eot_id=eot)


SIZED_BY_THE_WEIGHTS = ("n_layer", "n_head", "n_embd", "vocab_size", "mlp", "bias", "pos_encoding")


def pretrained_sizes(requested: ModelConfig, resume: dict[str, Any]) -> ModelConfig:
    """`requested` with what the pretrained weights fixed taken from the checkpoint (when it started from the
    same weights; otherwise `check_compatible` names the differences)."""
    saved = resume["config"]["model"]
    if saved.get("init_from") != requested.init_from:
        return requested
    return dataclasses.replace(requested, **{k: saved[k] for k in SIZED_BY_THE_WEIGHTS if k in saved})
