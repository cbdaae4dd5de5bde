"""Benchmark data-parallel scaling: training tokens/s with 1, 2, ... processes launched by torchrun.

    python benchmarks/scaling.py                          # CPU: 1 and 2 processes (gloo), default model
    python benchmarks/scaling.py --nprocs 1 2 4 8 --device cuda --model baby

Each run is the real `train.py` (DDP for more than one process) on a small synthetic corpus, with the same
per-process batch, so the global batch grows with the process count (weak scaling). Throughput is the job's
`throughput/tokens_per_s` as logged to TensorBoard, averaged over the logged intervals after the first (which
includes start-up). Scaling efficiency = tokens/s with N processes / (N x tokens/s with 1).

On CPU the machine's cores are split between the processes (torchrun sets OMP_NUM_THREADS=1 per process; the
single process gets every core), so the ratio shows what DDP costs and gains on one box, not multi-node scaling.
On a GPU machine the 1-process row is the figure a multi-GPU projection starts from.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _results import machine, write_section  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="default", help="a configs/model preset")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def run(nproc: int, args: argparse.Namespace, work: Path) -> float:
    corpus = work / "corpus.txt"
    if not corpus.exists():
        rng = np.random.default_rng(0)
        words = [w for w in Path(__file__).read_text().split() if w.isalpha()]
        corpus.write_text(" ".join(rng.choice(words, size=200_000)))
    launcher = [sys.executable, str(ROOT / "train.py")] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "train.py")]
    run_dir = work / f"run{nproc}"
    overrides = [
        f"model={args.model}", "data=text", f"data.path={corpus}", f"data_dir={work / 'data'}",
        f"hydra.run.dir={run_dir}", f"train.device={args.device}", f"train.batch_size={args.batch_size}",
        f"train.max_iters={args.iters}", "train.log_interval=10", "train.eval_interval=0", "train.attn_interval=0",
        "train.sample_tokens=0", "train.final_eval=false", "train.ckpt_interval=100000",
    ]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # torchrun sets 1 per process; one process uses every core
    subprocess.run([*launcher, *overrides], check=True, env=env, capture_output=True, text=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    values = [e.value for e in acc.Scalars("throughput/tokens_per_s")][1:]
    return float(np.mean(values))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: run(n, args, Path(tmp)) for n in args.nprocs}
    base = results[min(results)]
    lines = ["| processes | global batch | tokens/s (job) | tokens/s per process | scaling efficiency |",
             "|---:|---:|---:|---:|---:|"]
    for n, tok_s in results.items():
        eff = tok_s / (n / min(results) * base)
        lines.append(f"| {n} | {n * args.batch_size} | {tok_s:,.0f} | {tok_s / n:,.0f} | {eff:.0%} |")
    cmd = shlex.join(argv if argv is not None else sys.argv[1:])
    report = (
        f"## Data-parallel scaling (`benchmarks/scaling.py`)\n\n{machine()}; model `{args.model}`, "
        f"{args.batch_size} sequences per process, {args.iters} steps, DDP via torchrun ({args.device}).\n"
        f"Command: `python benchmarks/scaling.py {cmd}`\n\n" + "\n".join(lines) + "\n"
    )
    print(report)
    if not args.no_write:
        write_section("scaling", report)


if __name__ == "__main__":
    main()
