"""Time-to-quality: run training recipes N times each (different seeds), side by side, and time them end to end.

    python benchmarks/speedrun.py --data-path input.txt                 # speedrun vs baseline for this device, 5 seeds
    python benchmarks/speedrun.py --data-path input.txt --recipes speedrun_cpu --seeds 1 --no-write
    python benchmarks/speedrun.py --data-path input.txt --recipes speedrun_cpu speedrun_cpu:optim.muon.ns_dtype=float32

A recipe is an experiment config, optionally followed by `:` and comma-separated overrides of its own (the same
recipe with one setting changed is then a recipe of its own, timed side by side).

Each run is a fresh process, `python train.py experiment=<recipe> train.seed=<seed> ...`, timed from just before
the process starts to the moment it prints its last line, `final val loss X (whole split, window 64)`: Python
and torch start-up, Hydra, data loading, the model, every training step, the final checkpoint and the final
whole-split evaluation all count. The data is prepared once beforehand (not timed). A run reaches the target
when that loss is <= --target; each saved checkpoint is then re-measured with the evaluation command
(`python -m gptmini.evaluate ckpt=RUN eval.window=64`), which must print the same loss.

Recipes alternate run by run (seed 1: A, B; seed 2: B, A; ...), so that changes in the machine's load hit
all recipes alike; the 1-minute load average is recorded before every run. Results go to stdout and to the
`speedrun` section of benchmarks/RESULTS.md (--no-write: not).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _results import machine, write_section  # benchmarks/ is on sys.path when run as a script
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r"final val loss (\d+\.\d+) \(whole split, window (\d+)\)")
# The trainer's phase line (gptmini.phases), just before the final line
PHASES = re.compile(r"time: ([\d.]+) s since gptmini loaded: start-up ([\d.]+) s, training ([\d.]+) s \(\d+ steps\), "
                    r"evaluation ([\d.]+) s, checkpoints ([\d.]+) s")
PHASE_NAMES = ("in all", "start-up", "training", "evaluation", "checkpoints")
EVALUATED = re.compile(r"val loss (\d+\.\d+), perplexity (\d+\.\d+)")


@dataclass
class Run:
    recipe: str
    seed: int
    seconds: float | None  # process start to the final-evaluation line (None: the run failed)
    loss: float | None
    last_line: bool  # the final-evaluation line was the last line the process printed
    confirmed: float | None  # the evaluation command's loss on the saved checkpoint
    load: float  # 1-minute load average just before the run
    phases: tuple[float, ...] | None = None  # the run's own phase seconds (PHASE_NAMES), from its `time:` line

    def reached(self, target: float) -> bool:
        return self.loss is not None and self.loss <= target


# Per device kind: the recipes compared, the target loss, the evaluation window and the goal the output restates.
PRESETS = {
    "cpu": dict(recipes=["speedrun_cpu", "baseline_cpu"], target=1.90, window=64,
                goal="speedrun_cpu: whole-val <= 1.90 on 5/5 seeds in <= 1/8 of nanoGPT's CPU recipe time (>= 6x on a "
                     "CPU without native bf16); baseline_cpu (nanoGPT's recipe) >= 1.3x faster than nanoGPT itself "
                     "(issue 26)"),
    "gpu": dict(recipes=["speedrun_gpu", "baseline_gpu"], target=1.47, window=256,
                goal="speedrun_gpu: whole-val <= 1.47 on 5/5 seeds in <= 30 s process wall, compile included "
                     "(one H100); nanoGPT's own run on one H100: best checkpoint 1.472 at ~75 s, 196 s in all"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True, help="Tiny Shakespeare text file (data.path)")
    p.add_argument("--data", default="shakespeare_char", help="data config (default shakespeare_char)")
    p.add_argument("--data-dir", help="prepared-data folder (default: a temporary one)")
    p.add_argument("--device", choices=sorted(PRESETS), help="which preset (default: gpu when CUDA/ROCm is there)")
    p.add_argument("--recipes", nargs="+",
                   help="experiment configs, each optionally with its own overrides: NAME:KEY=VALUE,KEY=VALUE "
                        "(default: the device's speedrun and baseline)")
    p.add_argument("--seeds", type=int, default=5, help="runs per recipe, seeds 1..N")
    p.add_argument("--target", type=float, help="whole-val loss to reach (default: 1.90 CPU, 1.47 GPU)")
    p.add_argument("--window", type=int, help="evaluation window the recipes use (default: 64 CPU, 256 GPU)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every run (default: torch's choice)")
    p.add_argument("--override", nargs="*", default=[], help="extra overrides for every run")
    p.add_argument("--nanogpt-seconds", type=float,
                   help="nanoGPT's own wall time for its CPU recipe, measured on this machine in the same sitting: "
                        "the closing note then gives both recipes' ratio to it")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories (default: deleted at the end)")
    args = p.parse_args(argv)
    import torch

    preset = PRESETS[args.device or ("gpu" if torch.cuda.is_available() else "cpu")]
    for key in ("recipes", "target", "window"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.goal = preset["goal"]
    return args


def recipe_args(recipe: str) -> list[str]:
    """`speedrun_cpu:optim.muon.ns_dtype=float32` -> the experiment and its own overrides."""
    name, _, extra = recipe.partition(":")
    return [f"experiment={name}", *(o for o in extra.split(",") if o)]


def run_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ, TQDM_DISABLE="1", HYDRA_FULL_ERROR="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def timed_run(cmd: list[str], env: dict[str, str]) -> tuple[float | None, float | None, bool, str]:
    """Run `cmd`; the seconds until its final-evaluation line, that loss, whether it was last, its last lines
    (the phase line among them)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = loss = None
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        match = FINAL.search(line)
        if match and seconds is None:
            seconds, loss = time.perf_counter() - start, float(match.group(1))
        if line.strip():
            lines.append(line.rstrip())
    proc.wait()
    if proc.returncode != 0:
        return None, None, False, "\n".join(lines[-20:])
    return seconds, loss, bool(lines) and FINAL.search(lines[-1]) is not None, "\n".join(lines[-20:])


def confirm(run_dir: Path, window: int, env: dict[str, str]) -> float | None:
    """The evaluation command's whole-val loss on the run's saved checkpoint, in the dtype the run evaluated in
    (its train.dtype: bf16 on GPUs, where an fp32 evaluation differs in the 3rd decimal)."""
    dtype = OmegaConf.load(run_dir / "config.yaml").train.dtype
    cmd = [sys.executable, "-m", "gptmini.evaluate", f"ckpt={run_dir}", f"eval.window={window}", f"eval.dtype={dtype}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    match = EVALUATED.search(done.stdout)
    return float(match.group(1)) if match else None


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def load_summary(runs: list[Run]) -> str:
    loads = [r.load for r in runs]
    return f"min / median / max {spread(loads, 2)} on {os.cpu_count()} CPUs" if loads else "n/a"


def spread(xs: list[float], digits: int) -> str:
    """min / median / max"""
    if not xs:
        return "n/a"
    return " / ".join(f"{v:.{digits}f}" for v in (min(xs), statistics.median(xs), max(xs)))


def summarise(runs: list[Run], recipes: list[str], target: float) -> tuple[str, dict[str, float]]:
    """The markdown summary table, one row per recipe, and each recipe's median time."""
    rows, medians = [], {}
    for recipe in recipes:
        mine = [r for r in runs if r.recipe == recipe]
        times = [r.seconds for r in mine if r.seconds is not None]
        hit = [r.seconds for r in mine if r.reached(target)]
        losses = [r.loss for r in mine if r.loss is not None]
        missed = [f"seed {r.seed} ({'crashed' if r.loss is None else f'{r.loss:.4f}'})"
                  for r in mine if not r.reached(target)]
        if times:
            medians[recipe] = statistics.median(times)
        rows.append(f"| `{recipe}` | {len(hit)}/{len(mine)} | {spread(times, 1)} | {spread(hit, 1)} | "
                    f"{spread(losses, 4)} | {', '.join(missed) or 'none'} |")
    table = [
        "| recipe | reached target | s to final line, min / median / max | s, runs that reached it | "
        "whole-val loss, min / median / max | missed target |",
        "|---|--:|--:|--:|--:|---|",
        *rows,
    ]
    return "\n".join(table), medians


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"goal: {args.goal}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="speedrun-"))
    runs = run_all(args, work, run_env(args.threads))
    markdown = report(args, runs, "python benchmarks/speedrun.py " + shlex.join(argv or sys.argv[1:]))
    print("\n" + markdown)
    if not args.no_write:
        write_section("speedrun", markdown)
    if args.keep_runs:
        print(f"run directories: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def run_all(args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[Run]:
    """Prepare the data once, then every recipe for every seed, the recipes' order alternating seed by seed."""
    data_dir = Path(args.data_dir) if args.data_dir else work / "data"
    common = [f"data={args.data}", f"data.path={args.data_path}", f"data_dir={data_dir}", *args.override]
    prep = [sys.executable, "-m", "gptmini.data", f"data={args.data}", f"data.path={args.data_path}",
            f"data_dir={data_dir}"]
    subprocess.run(prep, cwd=ROOT, env=env, check=True, capture_output=True)
    runs: list[Run] = []
    for seed in range(1, args.seeds + 1):
        for recipe in args.recipes if seed % 2 else args.recipes[::-1]:
            run_dir = work / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', recipe)}-seed{seed}"
            cmd = [sys.executable, "train.py", *recipe_args(recipe), *common, f"train.seed={seed}",
                   f"hydra.run.dir={run_dir}"]
            load = os.getloadavg()[0]
            seconds, loss, last, tail = timed_run(cmd, env)
            confirmed = confirm(run_dir, args.window, env) if loss is not None else None
            phases = PHASES.search(tail)
            runs.append(Run(recipe, seed, seconds, loss, last, confirmed, load,
                            tuple(float(x) for x in phases.groups()) if phases else None))
            status = "crashed:\n" + tail if loss is None else (
                f"{seconds:6.1f} s  loss {loss:.4f}  evaluate: {confirmed}  last line: {last}  load {load:.2f}")
            print(f"{recipe:>16} seed {seed}: {status}", flush=True)
    return runs


def phase_table(runs: list[Run], recipes: list[str]) -> str:
    """Median seconds per phase and recipe, from the runs' phase lines."""
    rows = ["| recipe | " + " | ".join(f"{name} s" for name in PHASE_NAMES) + " |",
            "|---|" + "--:|" * len(PHASE_NAMES)]
    for recipe in recipes:
        timed = [r.phases for r in runs if r.recipe == recipe and r.phases is not None]
        if timed:
            medians = (statistics.median(col) for col in zip(*timed, strict=True))
            rows.append(f"| `{recipe}` | " + " | ".join(f"{m:.2f}" for m in medians) + " |")
    return "\n".join(rows)


def report(args: argparse.Namespace, runs: list[Run], command: str) -> str:
    """The RESULTS.md section: how the runs were made and checked, the summary table, then every run."""
    table, medians = summarise(runs, args.recipes, args.target)
    per_run = ["| recipe | seed | s to final line | whole-val loss | evaluation command | load before |",
               "|---|--:|--:|--:|--:|--:|"]
    for r in runs:
        per_run.append(
            f"| `{r.recipe}` | {r.seed} | {'n/a' if r.seconds is None else f'{r.seconds:.1f}'} | "
            f"{'crashed' if r.loss is None else f'{r.loss:.4f}'}{'' if r.reached(args.target) else ' (missed)'} | "
            f"{'n/a' if r.confirmed is None else f'{r.confirmed:.4f}'} | {r.load:.2f} |"
        )
    ratio = ""
    if len(args.recipes) >= 2 and all(k in medians for k in args.recipes[:2]):
        a, b = args.recipes[:2]
        ratio = f"\nMedian time, `{b}` / `{a}`: **{medians[b] / medians[a]:.2f}×**.\n"
    if args.nanogpt_seconds:
        ratio += "".join(f"\nnanoGPT's recipe ({args.nanogpt_seconds:.1f} s, measured beside these runs) / `{r}`: "
                         f"**{args.nanogpt_seconds / medians[r]:.2f}×**." for r in args.recipes if r in medians) + "\n"
    mismatches = [r for r in runs if r.loss is not None and (r.confirmed is None or abs(r.confirmed - r.loss) > 1e-4)]
    not_last = [r for r in runs if r.loss is not None and not r.last_line]
    checks = (
        f"- Evaluation command on every saved checkpoint: "
        f"{'same loss as the run printed (to 4 decimals) for every run' if not mismatches else 'MISMATCH for ' + ', '.join(f'{m.recipe} seed {m.seed}' for m in mismatches)}.\n"  # noqa: E501
        f"- The final-evaluation line was the last line printed: "
        f"{'every run' if not not_last else 'not for ' + ', '.join(f'{m.recipe} seed {m.seed}' for m in not_last)}."
    )
    return f"""## Speedrun: time to whole-val loss <= {args.target:.2f} (Tiny Shakespeare, characters)

`{command}` on {machine()}.

Goal: {args.goal}.

- Each run: `python train.py experiment=<recipe> data={args.data} data.path=... train.seed=<seed>`, a fresh
  process, timed from process start to its final line `final val loss X (whole split, window {args.window})`
  (start-up, imports, training, final checkpoint and whole-val evaluation included; data prepared beforehand).
- Whole-val loss: mean cross-entropy over the val split in non-overlapping {args.window}-character windows,
  every position counted. Target {args.target:.2f}; seeds 1..{args.seeds}; recipes alternate run by run.
- Threads: {args.threads or 'torch default'} ({torch_threads()} here). The machine may be shared with other work;
  the 1-minute load average just before each run is listed (it includes the tail of the benchmark's own previous
  run, about 2): {load_summary(runs)}.
{checks}

{table}
{ratio}
Where the seconds go (median per recipe of each run's own `time:` line; start-up: from gptmini's import to the
first step; training: the loop less evaluation and checkpoints; the whole-val evaluation is in evaluation):

{phase_table(runs, args.recipes)}

<details><summary>Every run</summary>

{chr(10).join(per_run)}

</details>
"""


if __name__ == "__main__":
    main()
