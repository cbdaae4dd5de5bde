"""Benchmark the training step: tokens/s and MFU per model size and attention variant, side by side.

    python benchmarks/train.py                       # default and baby models, mha vs sdpa, on the device found
    python benchmarks/train.py --models default --variants mha sdpa flex --no-write

One training step is the product's own `gptmini.trainer.TrainStep.train_step`: `--grad-accum` micro-batches of
forward and backward under autocast, gradient scaling and clipping, the non-finite check (on the device: the
step never waits for it), the optimizer update (`--optims`: AdamW, Muon+AdamW) and the schedule, at the real
global batch (micro-batch x accumulation). Tokens are random and fixed (the data pipeline is not timed).
Rounds interleave the configurations, so a change in the machine's load hits all of them alike; the figure is
the median over rounds. MFU uses the peak-FLOPs table of `gptmini.device` (n/a where the device has no entry,
e.g. CPUs); achieved TFLOP/s is shown either way. On a GPU the GPT-2 124M rows (block 1024, bf16) run eager and
compiled.
`--doc-mask N` also times every case with model.doc_mask=true, the batch holding an end-of-text every N tokens
(documents of N tokens): the cost of the per-document mask against the plain causal one.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shlex
import statistics
import sys
import time

import torch
from _results import machine, write_section  # benchmarks/ is on sys.path when run as a script

from gptmini.config import AttentionConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from gptmini.device import describe, flops_per_token, mfu, peak_flops, resolve_dtype
from gptmini.distributed import DistEnv
from gptmini.model import GPT
from gptmini.optim import OPTIMIZER_REGISTRY, make_optimizer
from gptmini.run_setup import Hardware
from gptmini.trainer import TrainStep

MODELS = {
    "default": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=223),
    "baby": ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65),
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    # model.vocab_multiple=64: embedding and head padded to 50304 rows (nanoGPT's choice), the logits still 50257
    "gpt2-pad64": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, vocab_multiple=64),
    # Between default and baby, for the CPU bf16 rule (benchmarks/RESULTS.md, "bf16 autocast on CPUs")
    "w160": ModelConfig(n_layer=4, n_head=4, n_embd=160, block_size=128, vocab_size=223),
    "w192": ModelConfig(n_layer=4, n_head=4, n_embd=192, block_size=128, vocab_size=223),
    "w256": ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=223),
    "speedrun": ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=66),
}
BATCH = {"cpu": {"default": 16, "baby": 8, "gpt2": 1, "gpt2-pad64": 1, "w160": 16, "w192": 16, "w256": 16,
                 "speedrun": 16},
         "cuda": {"default": 64, "baby": 64, "gpt2": 16, "gpt2-pad64": 16, "w160": 64, "w192": 64, "w256": 64,
                  "speedrun": 64}}
# Issue 13's GPU goal for GPT-2 124M (bf16, compiled, 16x1024 micro-batches x 4): nanoGPT on an H100 measured
# 460,000 tok/s (40.3% MFU); gptmini should reach >= 1.15x that and >= 46% MFU. Printed beside GPU results.
GPT2_GOAL = "goal (H100, issue 13): >= 529,000 tok/s (1.15x nanoGPT's 460,000) and >= 46% MFU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), help="default: default baby (+ gpt2 on GPU)")
    p.add_argument("--variants", nargs="+", default=["mha", "sdpa"])
    p.add_argument("--optims", nargs="+", choices=list(OPTIMIZER_REGISTRY), default=["adamw"],
                   help="optim.name values to time side by side (muon: the speedrun recipes' optimizer)")
    p.add_argument("--dtype", "--dtypes", dest="dtypes", nargs="+", default=["auto"],
                   help="train.dtype values timed side by side, e.g. --dtypes float32 bfloat16 (auto: what "
                        "train.dtype=auto picks for each model on this device)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--grad-accum", type=int,
                   help="micro-batches per step (default: 4 for GPT-2 on a GPU, experiment=gpt2_gpu's global batch; "
                        "else 1)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loss-chunk", type=int, help="also time the fused, chunked LM loss (train.loss_chunk=N)")
    p.add_argument("--doc-mask", type=int, metavar="N",
                   help="also time model.doc_mask=true, with an end-of-text every N tokens (documents of N tokens)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (default on GPU)")
    p.add_argument("--eager", action="store_true", help="eager only, also on a GPU (no compile time)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 3 steps of each case: where the time goes, its top ops by self time "
                        "(device time on GPUs)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p.parse_args(argv)


class Case:
    """One (model, variant, compiled) configuration: its own model, optimizer and TrainStep, and a fixed batch."""

    def __init__(self, model_name: str, variant: str, compiled: bool, device: torch.device, dtype: torch.dtype,
                 grad_accum: int = 1, loss_chunk: int | None = None, optim: str = "adamw", doc_len: int | None = None):
        cfg = dataclasses.replace(MODELS[model_name], attention=AttentionConfig(variant))
        if doc_len:  # end-of-text is id 0 here: the tokens are random anyway
            cfg = dataclasses.replace(cfg, doc_mask=True, eot_id=0)
        mode = ("compiled" if compiled else "eager") + (f", loss in chunks of {loss_chunk}" if loss_chunk else "")
        mode += ", muon" if optim == "muon" else ""
        mode += f", doc_mask (documents of {doc_len})" if doc_len else ""
        self.label = (model_name, variant, mode)
        self.grad_accum = grad_accum
        self.batch = BATCH[device.type][model_name]
        self.tokens = self.batch * cfg.block_size * grad_accum  # per optimizer step
        torch.manual_seed(0)
        model = GPT(cfg).to(device).train()
        run_cfg = RunConfig(model=cfg, optim=OptimConfig(name=optim),
                            train=TrainConfig(batch_size=self.batch, grad_accum=grad_accum, compile=compiled,
                                              warmup_iters=0, loss_chunk=loss_chunk))
        hw = Hardware(env=DistEnv(), device=device, dtype=dtype, info=describe(device), strategy="none")
        self.trainer = TrainStep(run_cfg, model, make_optimizer(model, run_cfg, device), hw)
        x = torch.randint(1, cfg.vocab_size, (self.batch, cfg.block_size), device=device)  # (B, T)
        if doc_len:
            x[:, doc_len::doc_len] = 0  # an end-of-text opens each next document
        y = torch.randint(cfg.vocab_size, (self.batch, cfg.block_size), device=device)  # (B, T)
        self.batches = itertools.repeat((x, y))
        padding = (cfg.padded_vocab - cfg.vocab_size) * cfg.n_embd  # padding rows do no useful work: not counted
        self.flops = flops_per_token(model.num_parameters() - padding, cfg.n_layer, cfg.n_embd, cfg.block_size)
        self.device, self.dtype = device, dtype
        self.times: list[float] = []

    def step(self) -> None:
        self.trainer.train_step(self.batches)

    def top_ops(self, steps: int = 3, rows: int = 12) -> str:
        """torch.profiler over `steps` steps: the ops that take the most self time, as a text table."""
        from torch.profiler import ProfilerActivity, profile

        on_gpu = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])  # CUDA covers HIP too
        with profile(activities=activities) as prof:
            for _ in range(steps):
                self.step()
            if on_gpu:
                torch.cuda.synchronize()
        by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=by, row_limit=rows)

    def time(self, steps: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append((time.perf_counter() - start) / steps)


def case_dtype(name: str, model_name: str, device: torch.device) -> torch.dtype:
    """What `--dtypes NAME` means for this model: auto resolves as train.dtype=auto would (on CPUs: by width)."""
    return resolve_dtype(name, device, key="--dtypes", n_embd=MODELS[model_name].n_embd)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    models = args.models or (["default", "baby"] + (["gpt2", "gpt2-pad64"] if device.type == "cuda" else []))
    compiled = [False] + ([True] if not args.eager and (args.compile or device.type == "cuda") else [])

    def accum(model_name: str) -> int:
        if args.grad_accum is not None:
            return args.grad_accum
        return 4 if model_name.startswith("gpt2") and device.type == "cuda" else 1

    chunks = [None] + ([args.loss_chunk] if args.loss_chunk else [])
    docs = [None] + ([args.doc_mask] if args.doc_mask else [])
    cases = [Case(m, v, c, device, case_dtype(t, m, device), accum(m), k, o, d)
             for m in models for t in args.dtypes for v in args.variants for c in compiled for k in chunks
             for o in args.optims for d in docs]
    for case in cases:
        for _ in range(args.warmup):
            case.step()
    for _ in range(args.rounds):
        for case in cases:
            case.time(args.steps)
    report = (
        f"## Training step (`benchmarks/train.py`)\n\n{machine()}; median of {args.rounds} rounds x "
        f"{args.steps} steps of `TrainStep.train_step` (accumulation, clip, non-finite check, optimizer, schedule) on "
        f"random tokens, the cases interleaved round by round.\n"
        f"Command: `python benchmarks/train.py {shlex.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        f"{results_table(cases, models, device, args.profile)}\n"
    )
    print(report)
    if not args.no_write:
        write_section("train", report)


def results_table(cases: list[Case], models: list[str], device: torch.device, profile: bool) -> str:
    """One row per case; `vs mha` compares with the mha case of the same model, mode and dtype."""
    lines = [
        "| model | attention | mode | dtype | batch x block x accum | ms / step | best ms / step | tokens/s | vs mha | "
        "TFLOP/s | MFU |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base: dict[tuple[str, str, torch.dtype], float] = {}
    for case in cases:
        per_step = statistics.median(case.times)
        tok_s = case.tokens / per_step
        if case.label[1] == "mha":
            base[(case.label[0], case.label[2], case.dtype)] = tok_s
        ref = base.get((case.label[0], case.label[2], case.dtype))
        util = mfu(tok_s, case.flops, peak_flops(describe(device).name, case.dtype))
        lines.append(
            f"| {case.label[0]} | {case.label[1]} | {case.label[2]} | {str(case.dtype).removeprefix('torch.')} | "
            f"{case.batch} x {case.tokens // case.batch // case.grad_accum} x {case.grad_accum} | "
            f"{per_step * 1e3:.1f} | {min(case.times) * 1e3:.1f} | {tok_s:,.0f} | "
            f"{'n/a' if ref is None else f'{tok_s / ref:.2f}x'} | "
            f"{tok_s * case.flops / 1e12:.3f} | {'n/a' if util is None else f'{util:.1%}'} |"
        )
    if any(m.startswith("gpt2") for m in models) and device.type == "cuda":
        lines.append(f"\n{GPT2_GOAL}")
    table = "\n".join(lines)
    if profile:
        profiles = [f"{', '.join(case.label)}, {case.dtype}:\n\n```\n{case.top_ops()}\n```" for case in cases]
        table += "\n\n<details><summary>Where the time goes (torch.profiler, 3 steps each)</summary>\n\n"
        table += "\n\n".join(profiles) + "\n\n</details>"
    return table

if __name__ == "__main__":
    main()
