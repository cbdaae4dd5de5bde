"""The training loop, as a library function: `train(config, run_dir)`.

Read it top to bottom: `train` locks the run directory, builds the run (`gptmini.run_setup`, which checks
everything before a file is written), then `TrainingLoop.run` restores a checkpoint, and for each step calls
`TrainStep.train_step` followed by the cadence hooks (log, evaluate, attention maps, checkpoint, stop signal), and
ends with the whole-split evaluation. `TrainStep.train_step` (in gptmini.train_step, the layer below) is the
optimisation step alone (accumulation, autocast, gradient scaling and clipping, the non-finite skip, optimizer
and schedule); `benchmarks/train.py` times that very method.

Entry scripts parse the config (Hydra) and call `train`; tests call it directly with a composed config.
Everything a run produces goes under `run_dir`: config.yaml, train.log, checkpoints/, TensorBoard events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptmini import data as data_lib
from gptmini.attention import attention_class
from gptmini.checkpoint import BEST, LAST, checkpoint_dir, rng_state, save_checkpoint, set_rng_state
from gptmini.config import RunConfig
from gptmini.device import flops_per_token, mfu, peak_flops, peak_memory_bytes, reset_peak_memory
from gptmini.distributed import (
    all_reduce_mean,
    barrier,
    broadcast,
    destroy_process_group,
    full_state_dicts,
    gather,
    init_process_group,
)
from gptmini.evaluate import evaluate_split
from gptmini.head_metrics import log_head_diagnostics
from gptmini.paths import CONFIG_FILE, write_atomic
from gptmini.phases import PhaseClock
from gptmini.run_lock import RunDirLocked, run_dir_lock
from gptmini.run_log import (
    TAG_PARAMETERS,
    TAG_PEAK_MEMORY,
    TAG_SKIPPED_STEPS,
    TAG_TOKENS_PER_S,
    TAG_TOKENS_SEEN,
    TAG_TRAIN_LOSS,
    TAG_VAL_LOSS,
    TensorBoard,
    final_metrics,
    format_bytes,
    profiler,
    progress_bar,
    run_outputs,
    to_yaml,
)
from gptmini.run_setup import RunParts, TrainingError, build_run
from gptmini.sampling import generate
from gptmini.train_step import Batches, StepResult, StepStats, TrainStep

__all__ = ["StepResult", "StepStats", "TrainResult", "TrainStep", "TrainingError", "TrainingLoop", "train"]

@dataclass
class TrainResult:
    step: int
    final_val_loss: float | None
    best_val_loss: float | None
    skipped_steps: int
    run_dir: Path


def train(cfg: RunConfig, run_dir: str | Path) -> TrainResult:
    """Train (or resume) the run in `run_dir`. Under torchrun every rank calls this; rank 0 writes."""
    env = init_process_group(cfg.train.dist_timeout_s)
    run_dir = Path(broadcast(str(run_dir), env))  # rank 0 decides where the run lives
    try:
        with contextlib.ExitStack() as held:
            refusal = None
            if env.is_main:  # one training process per run directory; the other ranks follow rank 0's answer
                try:
                    held.enter_context(run_dir_lock(run_dir))
                except RunDirLocked as err:
                    refusal = str(err)
            if (refusal := broadcast(refusal, env)) is not None:
                raise RunDirLocked(refusal)
            parts = build_run(cfg, run_dir, env)
            with run_outputs(run_dir, env.is_main) as (log, tb):
                for line in parts.notes:
                    log.info(line)
                return TrainingLoop(cfg, run_dir, parts, log, tb).run()
    finally:
        if env.enabled:
            destroy_process_group()


class TrainingLoop:
    """One run's loop: the trainer plus the data, the logs and the checkpoint cadence."""

    def __init__(self, cfg: RunConfig, run_dir: Path, parts: RunParts, log: Any, tb: TensorBoard) -> None:
        t, hw = cfg.train, parts.hw
        self.cfg, self.t, self.hw, self.parts, self.log, self.tb = cfg, t, hw, parts, log, tb
        self.run_dir, self.ckpt_dir = run_dir, checkpoint_dir(run_dir)
        self.model, self.model_cfg, self.data = parts.model, parts.model_cfg, parts.data
        self.trainer = TrainStep(cfg, parts.model, parts.optimizer, hw, parts.wrapped)
        self.sampler = data_lib.BatchSampler(self.data.train, self.model_cfg.block_size, t.batch_size, seed=t.seed,
                                             device=hw.device, rank=hw.env.rank, world_size=hw.env.world_size)
        self.batches: Batches = iter(self.sampler.next_batch, None)
        self.full_config = dataclasses.asdict(cfg) | {"model": dataclasses.asdict(self.model_cfg)}
        self.best_val: float | None = None
        self.last_saved: int | None = None  # step of the newest last.pt, which is always finite
        probe = self.data.val[: min(t.probe_tokens, self.model_cfg.block_size)]
        self.probe = torch.as_tensor(np.asarray(probe, dtype=np.int64))  # (P,) val tokens whose attention is drawn
        self.tokens_per_step = t.batch_size * t.grad_accum * self.model_cfg.block_size * hw.env.world_size
        n_params = self.model.num_parameters()
        self.flops_token = flops_per_token(n_params, self.model_cfg.n_layer, self.model_cfg.n_embd,
                                           self.model_cfg.block_size)
        self.peak = peak_flops(hw.info.name, hw.dtype)
        self.window_time, self.window_steps = 0.0, 0  # training time since the last log line
        self.reported_skipped, self.last_look = 0, 0  # skipped steps already reported, and when they were counted
        self.tokens_per_s: list[float] = []  # each log interval's throughput: the final metrics take the median
        reset_peak_memory(hw.device)  # the run's peak memory, not that of the data preparation before it
        # Attention maps only when every layer's variant returns its weights (its `returns_weights` flag).
        self.silent_variants = sorted({name for name in self.model_cfg.attention.layer_names(self.model_cfg.n_layer)
                                       if not attention_class(name).returns_weights})
        self.draws_attention = not self.silent_variants
        self.attn_interval = t.attn_interval if self.draws_attention else 0
        self.clock = PhaseClock()  # where the run's seconds go, logged before the final line

    def run(self) -> TrainResult:
        self.restore()
        self.write_header()
        t, stopped = self.t, False
        stop_step = min(t.max_iters, self.trainer.step + t.stop_after) if t.stop_after else t.max_iters
        self.model.train()
        self.clock.loop_started()
        with stop_on_signals() as stop, profiler(t.profile and self.hw.env.is_main, self.run_dir) as prof, \
                progress_bar(self.trainer.step, t.max_iters, enabled=self.hw.env.is_main) as bar:
            while self.trainer.step < stop_step and not stopped:
                result = self.trainer.train_step(self.batches)
                if prof is not None:
                    prof.step()
                bar.update(1)
                self.window_time += result.seconds
                self.window_steps += 1
                stopped = self.agree_to_stop(stop["stop"]) or result.step == stop_step < t.max_iters
                if self.work_due(result.step, stopped):
                    self.after_step(result, bar, stopped)
        self.log.info(f"run directory: {self.run_dir} (tensorboard --logdir {self.run_dir}; "
                      f"python generate.py ckpt={self.run_dir})")
        final = None if stopped else self.final_evaluation()  # its line stays the last: scripts read it
        barrier(self.hw.env)
        return TrainResult(step=self.trainer.step, final_val_loss=final, best_val_loss=self.best_val,
                           skipped_steps=self.trainer.skipped, run_dir=self.run_dir)

    # -- start ------------------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Continue exactly where the checkpoint stopped, or seed a fresh run (dropout differs between ranks)."""
        state, rank = self.parts.resume, self.hw.env.rank
        if state is None:
            seed = self.t.seed + rank
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            return
        self.trainer.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        self.trainer.step, self.trainer.skipped = state["step"], state.get("skipped_steps", 0)
        self.reported_skipped, self.last_look = self.trainer.skipped, state["step"]
        self.best_val, self.last_saved = state.get("best_val_loss"), state["step"]

    def write_header(self) -> None:
        if self.hw.env.is_main:
            write_atomic(self.run_dir / CONFIG_FILE, to_yaml(self.full_config).encode(), "hydra.run.dir")
        n_params = self.model.num_parameters()
        self.log.info(f"run directory: {self.run_dir}")
        self.log.info(f"model: {n_params / 1e6:.2f}M parameters, attention={self.model_cfg.attention.summary()}")
        self.tb.scalars({TAG_PARAMETERS: n_params}, self.trainer.step)
        if not self.draws_attention and self.t.attn_interval > 0:
            self.log.info(f"attention maps: none (attention variant {', '.join(map(repr, self.silent_variants))} "
                          f"returns no weights; train.attn_interval={self.t.attn_interval} is ignored)")
        self.tb.text("system/backend", f"{self.hw.info.backend}; dtype {self.hw.dtype}; torch {torch.__version__}; "
                     f"{self.hw.env.world_size} process(es)", self.trainer.step, code=False)
        if not self.trainer.skip_on_device and not self.trainer.scaler.is_enabled():
            self.log.info(f"note: the optimizer ({type(self.parts.optimizer).__name__}) cannot skip a non-finite step "
                          f"on the device (gptmini.step_skip); the host checks each step's loss (one sync a step)")
        if self.parts.kernel is not None:
            self.tb.text("system/attention_kernel", self.parts.kernel.line(), self.trainer.step, code=False)

    # -- cadence hooks ----------------------------------------------------------------------------------------

    def due(self, interval: int, step: int) -> bool:
        return interval > 0 and (step % interval == 0 or step == self.t.max_iters)

    def work_due(self, step: int, stopped: bool) -> bool:
        """Whether anything but training happens after `step`; only then does the loop wait for the device."""
        t = self.t
        return (stopped or step == t.max_iters or step % t.ckpt_interval == 0
                or any(self.due(i, step) for i in (t.log_interval, t.eval_interval, self.attn_interval)))

    def after_step(self, result: StepResult, bar: Any, stopped: bool) -> None:
        waiting = time.perf_counter()
        stats = self.trainer.read()  # the device catches up: the wait is training time, counted in the window
        self.window_time += time.perf_counter() - waiting
        self.check_skipped(stats, result.step)
        if self.due(self.t.log_interval, result.step):
            self.log_step(result, stats, bar)
        if self.due(self.t.eval_interval, result.step):
            self.evaluate_and_log(result.step)
        if self.due(self.attn_interval, result.step):
            self.log_attention(result.step)
        self.checkpoint_cadence(result.step, stopped)

    def check_skipped(self, stats: StepStats, step: int) -> None:
        """Report the steps skipped since the last look; stop after train.max_bad_steps of them in a row."""
        new, self.reported_skipped = stats.skipped - self.reported_skipped, stats.skipped
        if new > 0:
            self.log.warning(f"steps {self.last_look + 1}-{step}: {new} had a non-finite loss or gradient norm and "
                             f"were skipped ({stats.skipped} in all)")
            self.tb.scalars({TAG_SKIPPED_STEPS: stats.skipped}, step)
        self.last_look = step
        if stats.longest_bad_run >= self.t.max_bad_steps:
            raise TrainingError(f"{stats.longest_bad_run} non-finite steps in a row by step {step} "
                                f"(train.max_bad_steps={self.t.max_bad_steps}); stopping. {self.last_good()}; lower "
                                f"train.lr or use train.dtype=float32")

    def log_step(self, result: StepResult, stats: StepStats, bar: Any) -> None:
        """One plain line per log interval (train.log, and stdout when it is not a terminal) and the scalars."""
        per_step = self.window_time / max(self.window_steps, 1)
        tok_s = self.tokens_per_step / max(per_step, 1e-9)
        util = mfu(tok_s / self.hw.env.world_size, self.flops_token, self.peak)
        self.window_time, self.window_steps = 0.0, 0
        self.tokens_per_s.append(tok_s)
        peak = peak_memory_bytes(self.hw.device)
        bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{tok_s:,.0f}")
        self.log.info(
            f"step {result.step}/{self.t.max_iters}: loss {stats.loss:.4f}, lr {result.lr:.3e}, "
            f"{per_step * 1e3:.1f} ms/step, {tok_s:,.0f} tok/s, MFU {'n/a' if util is None else f'{util:.1%}'}, "
            f"peak memory {format_bytes(peak)}",
            extra={"step_line": True},
        )
        self.tb.scalars(
            {TAG_TRAIN_LOSS: stats.loss, "lr": result.lr, "grad_norm": stats.grad_norm,
             TAG_TOKENS_PER_S: tok_s, "throughput/tokens_per_s_per_device": tok_s / self.hw.env.world_size,
             "mfu": util, TAG_PEAK_MEMORY: peak, TAG_TOKENS_SEEN: result.step * self.tokens_per_step},
            result.step,
        )

    def evaluate_and_log(self, step: int) -> None:
        with self.clock.phase("evaluation"):
            losses = {split: self.estimate_loss(tokens) for split, tokens in
                      (("train", self.data.train), ("val", self.data.val))}
        self.log.info(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self.tb.scalars({"loss/train_eval": losses["train"], TAG_VAL_LOSS: losses["val"]}, step)
        val = losses["val"]
        if math.isfinite(val) and (self.best_val is None or val < self.best_val):
            self.best_val = val
            self.save(BEST, step)
        if self.t.sample_tokens > 0:
            self.tb.text("sample", self.sample(), step)

    @torch.no_grad()
    def estimate_loss(self, tokens: np.ndarray) -> float:
        """Mean loss over `train.eval_iters` batches drawn with a fixed seed (the same batches every time)."""
        t, env = self.t, self.hw.env
        sampler = data_lib.BatchSampler(tokens, self.model_cfg.block_size, t.batch_size, seed=t.seed + 1_000_003,
                                        device=self.hw.device, rank=env.rank, world_size=env.world_size)
        self.trainer.run_model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.hw.device)
        for _ in range(t.eval_iters):
            x, y = sampler.next_batch()
            with self.trainer.ctx:
                total += self.trainer.run_model(x, y, loss_chunk=t.loss_chunk).loss.double()
        self.trainer.run_model.train()
        return all_reduce_mean(total / t.eval_iters, env).item()

    def sample(self) -> str:
        """A continuation of the first few probe tokens, drawn with its own generator (training RNG untouched)."""
        gen = torch.Generator(device=self.hw.device).manual_seed(self.t.seed)
        self.model.eval()
        out = generate(self.model, self.probe[None, :8].to(self.hw.device), self.t.sample_tokens, temperature=0.8,
                       top_k=50, generator=gen)
        self.model.train()
        return self.data.tokenizer.decode(out[0].tolist())

    @torch.no_grad()
    def log_attention(self, step: int) -> None:
        self.model.eval()
        attentions = self.model(self.probe[None].to(self.hw.device), return_weights=True).attentions
        self.model.train()
        self.tb.attention([a.float().cpu() for a in attentions], step)
        log_head_diagnostics(self.tb, self.model, self.probe, step, seed=self.t.seed)  # on every rank (FSDP)

    def agree_to_stop(self, asked: bool) -> bool:
        """A signal may reach only some ranks: every rank stops if any was asked to."""
        return bool(all_reduce_mean(torch.tensor(float(asked)), self.hw.env).item() > 0)

    def checkpoint_cadence(self, step: int, stopped: bool) -> None:
        if stopped or step % self.t.ckpt_interval == 0 or step == self.t.max_iters:
            self.save(LAST, step)
        if stopped:
            self.log.info(f"stopped early: saved {self.ckpt_dir / LAST} at step {step}; run again to resume")

    # -- checkpoints and the end ------------------------------------------------------------------------------

    def save(self, name: str, step: int) -> None:
        """Collective: every rank calls it, rank 0 writes. Non-finite weights are never written."""
        if not self.trainer.weights_finite():
            raise TrainingError(f"the weights or optimizer state became non-finite by step {step}, so {name} was "
                                f"not saved; {self.last_good()}; lower train.lr or use train.dtype=float32")
        with self.clock.phase("checkpoints"):
            state = self.checkpoint_state()
            if self.hw.env.is_main:
                save_checkpoint(state, self.ckpt_dir / name)
        if name == LAST:
            self.last_saved = step

    def checkpoint_state(self) -> dict[str, Any]:
        model_sd, optim_sd = full_state_dicts(self.model, self.trainer.optimizer, self.hw.strategy)
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scaler": self.trainer.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": gather(rng_state(), self.hw.env),
            "step": self.trainer.step,
            "best_val_loss": self.best_val,
            "skipped_steps": self.trainer.skipped,
            "config": self.full_config,
            "tokenizer": self.data.tokenizer.spec(),
        }

    def last_good(self) -> str:
        if self.last_saved is None:
            return "no checkpoint of this run was saved yet"
        return f"the last good checkpoint is {self.ckpt_dir / LAST} (step {self.last_saved})"

    def final_evaluation(self) -> float | None:
        if not self.t.final_eval:
            self.write_final_metrics(None)
            self.log.info(self.clock.summary(self.trainer.step))
            return None
        window = self.t.eval_window or self.model_cfg.block_size
        self.log.info(f"final evaluation: the whole val split ({len(self.data.val):,} tokens) in windows of {window}")
        try:
            with self.clock.phase("evaluation"):
                final = evaluate_split(self.model, self.data.val, window, self.hw.device, self.trainer.ctx,
                                       progress=self.hw.env.is_main)
        except KeyboardInterrupt:
            self.log.info(f"final evaluation interrupted; the checkpoints are saved (last.pt at step "
                          f"{self.last_saved}); measure later with: python -m gptmini.evaluate ckpt={self.run_dir}")
            raise
        self.write_final_metrics(final)
        self.log.info(self.clock.summary(self.trainer.step))
        self.log.info(f"final val loss {final:.4f} (whole split, window {window})")
        return final

    def write_final_metrics(self, final: float | None) -> None:
        """Final val loss, median tokens/s, wall time and peak memory into the HPARAMS tab; peak memory to train.log."""
        peak = peak_memory_bytes(self.hw.device)
        self.tb.write_final_metrics(self.full_config, final_metrics(final, self.tokens_per_s, self.tb.started, peak))
        what = "max RSS" if self.hw.device.type == "cpu" else "peak allocated"
        self.log.info(f"peak memory {format_bytes(peak)} ({what})")


@contextlib.contextmanager
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
