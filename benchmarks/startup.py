"""Start-up: seconds from `python train.py` to its first training step, and from `python generate.py` to its first
generated token, for one or more checkouts side by side.

    python benchmarks/startup.py --data-path input.txt                          # this checkout
    python benchmarks/startup.py --data-path input.txt --trees /work/main .     # before / after, alternating

Each round runs every tree once (the order alternating round by round, so that the machine's load hits all
alike), each command a fresh process:
- train: `python train.py experiment=speedrun_cpu ... train.max_iters=1 train.log_interval=1
  train.final_eval=false`, timed from process start to its `step 1/1` line (imports, Hydra, the data check, the
  model, the optimizer, the first step itself);
- generate: `python generate.py ckpt=<that run> max_new_tokens=1`, timed from process start to its exit
  (the first token and the process's end: generate streams tokens, a single one is the whole output).
The data is prepared once beforehand (not timed); each tree generates from its own run's checkpoint. The figure
is the median over rounds, with the best (the least disturbed). Results go to the `startup` section of
benchmarks/RESULTS.md (--no-write: not).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import machine, write_section  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True, help="Tiny Shakespeare text file (data.path)")
    p.add_argument("--trees", nargs="+", default=[str(ROOT)], help="checkouts to time side by side")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--experiment", default="speedrun_cpu")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    return p.parse_args(argv)


def seconds_to(cmd: list[str], cwd: Path, marker: str | None) -> float:
    """Seconds from starting `cmd` to the first output line containing `marker` (None: to its exit)."""
    env = dict(os.environ, PYTHONPATH=str(cwd), TQDM_DISABLE="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen, out = None, []
    for line in proc.stdout:
        out.append(line)
        if marker is not None and seen is None and marker in line:
            seen = time.perf_counter() - start
    proc.wait()
    done = time.perf_counter() - start
    if proc.returncode != 0 or (marker is not None and seen is None):
        raise RuntimeError(f"{shlex.join(cmd)} in {cwd} failed:\n{''.join(out[-20:])}")
    return done if marker is None else seen


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="startup-"))
    data_dir = work / "data"
    trees = [Path(t).resolve() for t in args.trees]
    subprocess.run([sys.executable, "-m", "gptmini.data", "data=shakespeare_char", f"data.path={args.data_path}",
                    f"data_dir={data_dir}"], cwd=trees[0], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(trees[0])))
    times: dict[tuple[int, str], list[float]] = {}
    loads = []
    for r in range(args.rounds):
        for i in (range(len(trees)) if r % 2 == 0 else reversed(range(len(trees)))):
            run_dir = work / f"run{i}-{r}"
            loads.append(os.getloadavg()[0])
            train = [sys.executable, "train.py", f"experiment={args.experiment}", f"data.path={args.data_path}",
                     f"data_dir={data_dir}", "train.max_iters=1", "train.log_interval=1", "train.final_eval=false",
                     f"hydra.run.dir={run_dir}"]
            times.setdefault((i, "train"), []).append(seconds_to(train, trees[i], "step 1/1"))
            gen = [sys.executable, "generate.py", f"ckpt={run_dir}", "max_new_tokens=1", "prompt=a"]
            times.setdefault((i, "generate"), []).append(seconds_to(gen, trees[i], None))
    rows = ["| checkout | train.py to its first step, s (median / best) | generate.py, 1 token, to exit, s |",
            "|---|--:|--:|"]
    for i, tree in enumerate(trees):
        cells = [f"{statistics.median(times[i, k]):.2f} / {min(times[i, k]):.2f}" for k in ("train", "generate")]
        rows.append(f"| `{tree}` ({git_head(tree)}) | {cells[0]} | {cells[1]} |")
    command = "python benchmarks/startup.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = (f"## Start-up (`benchmarks/startup.py`)\n\n`{command}` on {machine()}.\n\n"
              f"- {args.rounds} rounds, the checkouts alternating; `experiment={args.experiment}`; 1-minute load "
              f"average before the runs: min {min(loads):.2f}, max {max(loads):.2f} on {os.cpu_count()} CPUs.\n\n"
              + "\n".join(rows) + "\n")
    print(report)
    if not args.no_write:
        write_section("startup", report)


def git_head(tree: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return done.stdout.strip() or "?"


if __name__ == "__main__":
    main()
