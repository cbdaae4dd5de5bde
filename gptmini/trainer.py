"""The training loop, as a library function: `train(config, run_dir)`.

Entry scripts parse the config (Hydra) and call this; tests call it directly with a composed config.
Everything a run produces goes under `run_dir`: config.yaml, train.log, checkpoints/, TensorBoard events.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptmini import data as data_lib
from gptmini.attention import build_attention
from gptmini.checkpoint import load_checkpoint, save_checkpoint
from gptmini.config import ModelConfig, RunConfig
from gptmini.device import autocast, describe, flops_per_token, mfu, peak_flops, resolve_device, resolve_dtype
from gptmini.distributed import (
    DistEnv,
    all_reduce_mean,
    barrier,
    broadcast,
    full_state_dicts,
    gather,
    grad_sync,
    init_process_group,
    load_optimizer_state,
    resolve_strategy,
    wrap_model,
)
from gptmini.evaluate import evaluate_split
from gptmini.logging import TensorBoard, close_logger, setup_logger
from gptmini.model import GPT
from gptmini.optim import lr_at, make_optimizer, set_lr  # noqa: F401  (lr_at: public, re-exported)
from gptmini.sampling import generate
from gptmini.tokenizer import Tokenizer


class TrainingError(ValueError):
    """Training cannot start or continue; the message says why and what to change."""


@dataclass
class TrainResult:
    step: int
    final_val_loss: float | None
    best_val_loss: float | None
    skipped_steps: int
    run_dir: Path


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def check_compatible(saved: dict[str, Any], model_cfg: ModelConfig, tokenizer_spec: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint whose model or tokenizer differs, naming the fields."""
    ours = dataclasses.asdict(model_cfg)
    theirs = saved["config"]["model"]
    diffs = [
        f"model.{k}: checkpoint {theirs.get(k)!r} vs now {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]
    ]
    if saved.get("tokenizer") != tokenizer_spec:
        diffs.append("tokenizer: the checkpoint was trained with a different tokenizer/vocabulary")
    if diffs:
        raise TrainingError(
            "cannot resume: the checkpoint's configuration differs (" + "; ".join(diffs) + "); use the same "
            "settings, train.resume=never, or a new hydra.run.dir"
        )


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def stop_on_signals() -> Iterator[dict[str, bool]]:
    """SIGINT/SIGTERM set a flag; the loop saves last.pt at the end of the step and exits cleanly."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, sampler: data_lib.BatchSampler, iters: int, ctx) -> float:
    model.eval()
    losses = []
    for _ in range(iters):
        x, y = sampler.next_batch()
        with ctx:
            losses.append(model(x, y).loss.item())
    model.train()
    return float(np.mean(losses))


def train(cfg: RunConfig, run_dir: str | Path) -> TrainResult:
    """Train (or resume) the run in `run_dir`. Under torchrun every rank calls this; rank 0 writes.

    Everything that can fail on bad input (device, data, model, resume compatibility) is checked before the
    first file is written into `run_dir`.
    """
    env = init_process_group(cfg.train.dist_timeout_s)
    run_dir = Path(broadcast(str(run_dir), env))  # rank 0 decides where the run lives
    setup = _setup(cfg, run_dir, env)
    log = setup_logger(run_dir) if env.is_main else _quiet_logger()
    tb: TensorBoard | None = None
    try:
        tb = TensorBoard(run_dir, enabled=env.is_main)
        for line in setup.notes:
            log.info(line)
        return _train(cfg, run_dir, setup, log, tb)
    finally:
        if tb is not None:
            tb.close()
        close_logger(log)


@dataclass
class _Setup:
    """What a run needs before its first step; building it writes nothing into the run directory."""

    env: DistEnv
    device: torch.device
    dtype: torch.dtype
    info: Any
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    model: GPT
    wrapped: torch.nn.Module  # what the training step calls: DDP(model), or model itself (FSDP shards it in place)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_data: np.ndarray
    val_data: np.ndarray
    sampler: data_lib.BatchSampler
    resume_state: dict[str, Any] | None
    strategy: str
    notes: list[str]


def _setup(cfg: RunConfig, run_dir: Path, env: DistEnv) -> _Setup:
    t = cfg.train
    strategy = resolve_strategy(t.strategy, env)
    device = resolve_device(t.device)
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
    dtype = resolve_dtype(t.dtype, device)
    info = describe(device)
    notes = [f"device: {info.backend}; dtype: {str(dtype).removeprefix('torch.')}"]
    if env.enabled:
        notes.append(f"distributed: {env.world_size} processes, strategy {strategy}")

    build_attention(cfg.model).check_device(device, training=True)  # e.g. flex cannot train on CPU: say so now

    # One process per machine prepares the data; the others then find it up to date.
    if env.local_rank == 0:
        prepared = data_lib.prepare(cfg.data, cfg.data_dir)
    barrier(env)
    if env.local_rank != 0:
        prepared = data_lib.prepare(cfg.data, cfg.data_dir, log=lambda _: None)
    tokenizer: Tokenizer = prepared.tokenizer
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    train_data, val_data = prepared.train_tokens(), prepared.val_tokens()
    for split, tokens in (("train", train_data), ("val", val_data)):
        if len(tokens) < model_cfg.block_size + 1:
            raise TrainingError(
                f"the {split} split has {len(tokens)} tokens, fewer than model.block_size+1="
                f"{model_cfg.block_size + 1}; use more data or a smaller model.block_size"
            )

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = GPT(model_cfg).to(device)
    for block in model.blocks:
        block.attn.check_device(device, training=True)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    sampler = data_lib.BatchSampler(train_data, model_cfg.block_size, t.batch_size, seed=t.seed, device=device,
                                    rank=env.rank, world_size=env.world_size)

    resume_state = None
    resume_from = _resume_path(t.resume, run_dir / "checkpoints")
    if resume_from is not None:
        resume_state = broadcast(load_checkpoint(resume_from) if env.is_main else None, env)
        check_compatible(resume_state, model_cfg, tokenizer.spec())
        notes.append(f"resumed from {resume_from} at step {resume_state['step']}")
        model.load_state_dict(resume_state["model"])
    wrapped = wrap_model(model, strategy, device)  # FSDP shards `model` in place: build the optimizer after
    optimizer = make_optimizer(model, cfg, device)
    if resume_state is not None:
        load_optimizer_state(model, optimizer, resume_state["optimizer"], strategy)
    return _Setup(env, device, dtype, info, tokenizer, model_cfg, model, wrapped, optimizer, scaler, train_data,
                  val_data, sampler, resume_state, strategy, notes)


def _train(cfg: RunConfig, run_dir: Path, s: _Setup, log, tb: TensorBoard) -> TrainResult:
    t, env, device, model, optimizer, scaler, sampler = cfg.train, s.env, s.device, s.model, s.optimizer, \
        s.scaler, s.sampler
    model_cfg, tokenizer, train_data, val_data = s.model_cfg, s.tokenizer, s.train_data, s.val_data
    step, best_val, skipped = 0, None, 0
    ckpt_dir = run_dir / "checkpoints"
    if s.resume_state is not None:
        state = s.resume_state
        scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        set_rng_state(rng[env.rank] if env.rank < len(rng) else rng[0])
        step, best_val, skipped = state["step"], state.get("best_val_loss"), state.get("skipped_steps", 0)
    else:
        torch.manual_seed(t.seed + env.rank)  # dropout masks differ between ranks
        random.seed(t.seed + env.rank)
        np.random.seed(t.seed + env.rank)
    wrapped = s.wrapped

    full_config = config_dict(cfg) | {"model": dataclasses.asdict(model_cfg)}
    if env.is_main:
        (run_dir / "config.yaml").write_text(_to_yaml(full_config))
    n_params = model.num_parameters()
    log.info(f"model: {n_params / 1e6:.2f}M parameters, attention={model_cfg.attention.name}")
    tb.text("system/backend", f"{s.info.backend}; dtype {s.dtype}; torch {torch.__version__}; "
            f"{env.world_size} process(es)", step, code=False)
    flops_token = flops_per_token(n_params, model_cfg.n_layer, model_cfg.n_embd, model_cfg.block_size)
    peak = peak_flops(s.info.name, s.dtype)
    ctx = autocast(device, s.dtype)
    run_model = torch.compile(wrapped) if t.compile else wrapped
    eval_sampler_seed = t.seed + 1_000_003
    probe = torch.as_tensor(np.asarray(val_data[: min(t.probe_tokens, model_cfg.block_size)], dtype=np.int64))

    def checkpoint_state() -> dict[str, Any]:
        """Collective: every rank calls it; the full state is meant for rank 0 to save."""
        rngs = gather(rng_state(), env)
        model_sd, optim_sd = full_state_dicts(model, optimizer, s.strategy)
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scaler": scaler.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": rngs,
            "step": step,
            "best_val_loss": best_val,
            "skipped_steps": skipped,
            "config": full_config,
            "tokenizer": tokenizer.spec(),
        }

    def save(name: str) -> None:
        state = checkpoint_state()
        if env.is_main:
            save_checkpoint(state, ckpt_dir / name)

    def evaluate_and_log() -> None:
        nonlocal best_val
        losses = {}
        for split, tokens in (("train", train_data), ("val", val_data)):
            eval_sampler = data_lib.BatchSampler(tokens, model_cfg.block_size, t.batch_size, seed=eval_sampler_seed,
                                                 device=device, rank=env.rank, world_size=env.world_size)
            local = estimate_loss(run_model, eval_sampler, t.eval_iters, ctx)
            losses[split] = all_reduce_mean(torch.tensor(local, dtype=torch.float64), env).item()
        log.info(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        tb.scalars({"loss/train_eval": losses["train"], "loss/val": losses["val"]}, step)
        if best_val is None or losses["val"] < best_val:
            best_val = losses["val"]
            save("best.pt")
        if t.sample_tokens > 0:
            tb.text("sample", _sample(model, tokenizer, probe, t.sample_tokens, t.seed, device), step)

    def log_attention() -> None:
        model.eval()
        with torch.no_grad():
            attentions = model(probe[None].to(device), return_weights=True).attentions
        model.train()
        tb.attention([a.float().cpu() for a in attentions], step)

    model.train()
    bad_in_a_row = 0
    tokens_per_step = t.batch_size * t.grad_accum * model_cfg.block_size * env.world_size
    progress = _progress(step, t.max_iters, enabled=env.is_main)
    last_time, last_step = time.perf_counter(), step
    stop_step = min(t.max_iters, step + t.stop_after) if t.stop_after else t.max_iters
    with stop_on_signals() as stop, _profiler(t.profile and env.is_main, run_dir) as prof:
        while step < stop_step:
            lr = set_lr(optimizer, step, cfg)  # every group: its base_lr times the schedule
            total = torch.zeros((), device=device)
            for micro in range(t.grad_accum):
                x, y = sampler.next_batch()
                with grad_sync(wrapped, s.strategy, last=micro == t.grad_accum - 1), ctx:
                    loss = run_model(x, y).loss / t.grad_accum
                scaler.scale(loss).backward()
                total += loss.detach()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else 1e30)
            # One number for every rank, so all ranks make the same skip decision; one device sync for both.
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            loss_value, norm_value = torch.stack([all_reduce_mean(total, env), norm.to(total)]).tolist()
            if math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler.is_enabled()):
                scaler.step(optimizer)
                scaler.update()
                bad_in_a_row = 0
            else:  # skip the step: nothing non-finite reaches the weights, the optimizer or a checkpoint
                skipped += 1
                bad_in_a_row += 1
                log.warning(f"step {step}: non-finite loss {loss_value} / grad norm {norm_value}; step skipped")
                tb.scalars({"train/skipped_steps": skipped}, step)
                if bad_in_a_row >= t.max_bad_steps:
                    raise TrainingError(
                        f"{bad_in_a_row} non-finite steps in a row at step {step}; stopping. The last good "
                        f"checkpoint is {ckpt_dir / 'last.pt'}; lower train.lr or use train.dtype=float32"
                    )
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if prof is not None:
                prof.step()
            progress.update(1)
            if step % t.log_interval == 0 or step == t.max_iters:
                now = time.perf_counter()
                tok_s = (step - last_step) * tokens_per_step / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}")
                tb.scalars(
                    {"loss/train": loss_value, "lr": lr, "grad_norm": norm_value,
                     "throughput/tokens_per_s": tok_s, "throughput/tokens_per_s_per_device": tok_s / env.world_size,
                     "mfu": mfu(tok_s / env.world_size, flops_token, peak)},
                    step,
                )
            if t.eval_interval > 0 and (step % t.eval_interval == 0 or step == t.max_iters):
                evaluate_and_log()
            if t.attn_interval > 0 and (step % t.attn_interval == 0 or step == t.max_iters):
                log_attention()
            # A signal may reach only some ranks: every rank stops if any was asked to.
            stop["stop"] = bool(all_reduce_mean(torch.tensor(float(stop["stop"])), env).item() > 0)
            stop["stop"] |= step == stop_step < t.max_iters
            if stop["stop"] or step % t.ckpt_interval == 0 or step == t.max_iters:
                save("last.pt")
            if stop["stop"]:
                log.info(f"stopped early: saved {ckpt_dir / 'last.pt'} at step {step}; run again to resume")
                break
    progress.close()

    final = None
    if t.final_eval and not stop["stop"]:
        window = t.eval_window or model_cfg.block_size
        final = evaluate_split(model, val_data, window, device, ctx)
        tb.hparams(full_config, {"hparam/final_val_loss": final})
        log.info(f"final val loss {final:.4f} (whole split, window {window})")
    barrier(env)
    return TrainResult(step=step, final_val_loss=final, best_val_loss=best_val, skipped_steps=skipped,
                       run_dir=run_dir)


def _resume_path(resume: str, ckpt_dir: Path) -> Path | None:
    """Which checkpoint to continue from. Never lets a fresh run overwrite another run's checkpoints."""
    existing = [p for p in (ckpt_dir / "last.pt", ckpt_dir / "best.pt") if p.is_file()]
    if resume == "auto":
        last = ckpt_dir / "last.pt"
        if not last.is_file() and existing:
            raise TrainingError(
                f"{ckpt_dir} holds {existing[0].name} but no last.pt; resume from it with "
                f"train.resume={existing[0]}, or start afresh in a new hydra.run.dir"
            )
        return last if last.is_file() else None
    if resume == "never":
        path = None
    else:
        path = Path(resume)
        if not path.is_file():
            raise TrainingError(f"train.resume={resume!r}: no such checkpoint file (valid: auto, never, or a path)")
    if existing and (path is None or path.resolve().parent != ckpt_dir.resolve()):
        raise TrainingError(
            f"train.resume={resume}: the run directory already holds another run's checkpoints ({ckpt_dir}), "
            f"which this run would overwrite; continue it with train.resume=auto, or choose a new hydra.run.dir"
        )
    return path


def _sample(model: GPT, tokenizer: Tokenizer, probe: Tensor, n: int, seed: int, device: torch.device) -> str:
    """A continuation of the first few probe tokens, drawn with its own generator (training RNG untouched)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out = generate(model, probe[None, :8].to(device), n, temperature=0.8, top_k=50, generator=gen)
    model.train()
    return tokenizer.decode(out[0].tolist())


def _progress(start: int, total: int, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
                disable=not enabled)


def _quiet_logger() -> logging.Logger:
    """Non-zero ranks log nothing (rank 0 speaks for the job); warnings and errors still reach stderr."""
    logger = logging.getLogger("gptmini.rank")
    logger.setLevel(logging.WARNING)
    return logger


@contextmanager
def _profiler(enabled: bool, run_dir: Path):
    """torch.profiler over a few steps, written as a TensorBoard trace (works for CUDA, ROCm/HIP and CPU)."""
    if not enabled:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(run_dir / "profile")),
        record_shapes=True,
    ) as prof:
        yield prof


def _to_yaml(tree: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(tree))
