"""Which attention learns best here: train every arm of a study with the same budget and several seeds, side by
side, and tabulate the runs with the product's own comparison (`python -m gptmini.compare`).

    python benchmarks/learning.py --study attention --data-path input.txt          # every variant, gate, sinks
    python benchmarks/learning.py --study attention --arms sdpa mla --seeds 1 --no-write
    python benchmarks/learning.py --study layers --data-path input.txt             # patterns, doc mask; 2 corpora

A study is an experiment config and its arms; an arm is a label and the Hydra overrides that make it. The
`attention` study's arms come from the attention registry: every variant that trains on a CPU (its
`trains_on_cpu` flag), then sdpa with `model.attention.gate=true` and with `model.attention.sinks=true`.

Each run is a fresh process, `python train.py experiment=<study's> <arm's overrides> train.seed=<seed>`, into
its own run directory; seeds are the outer loop and the arms' order alternates seed by seed, so changes in the
machine's load hit every arm alike (the 1-minute load average before each run is printed). The data is prepared
once beforehand. The table (whole-val loss and wall time, mean ± std over seeds; Welch's p against sdpa) is what
`gptmini.compare` reports on those runs; it goes to stdout and to the `learning_<study>` section of
benchmarks/RESULTS.md (--no-write: not).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import machine, write_section  # benchmarks/ is on sys.path when run as a script

from gptmini.attention import ATTENTION_REGISTRY
from gptmini.compare import compare
from gptmini.config import CompareConfig

ROOT = Path(__file__).resolve().parents[1]


def attention_arms() -> dict[str, list[str]]:
    arms = {name: [f"model/attention={name}"] for name, cls in ATTENTION_REGISTRY.items() if cls.trains_on_cpu}
    for option in ("gate", "sinks"):
        if option in ATTENTION_REGISTRY["sdpa"].reads:
            arms[f"sdpa+{option}"] = ["model/attention=sdpa", f"model.attention.{option}=true"]
    return arms


def layer_arms() -> dict[str, list[str]]:
    """Issue 25's recipes: full attention everywhere, sliding windows everywhere, nanochat's SSSL pattern (three
    windowed layers, then a full one) and full attention masked per document."""
    return {
        "sdpa": ["model/attention=sdpa"],
        "swa": ["model/attention=swa", "model.attention.window=32"],
        "SSSL": ["model.attention.layers=[swa:32,swa:32,swa:32,sdpa]"],
        "sdpa+doc_mask": ["model/attention=sdpa", "model.doc_mask=true"],
    }


# Study -> (experiment config, data configs it runs on, a function giving its arms, the baseline arm's group, the
# overrides every run of the study shares).
STUDIES = {
    "attention": ("attention_cpu", ["shakespeare_char"], attention_arms, "sdpa", []),
    "layers": ("attention_cpu", ["python_stdlib", "shakespeare_char"], layer_arms, "sdpa",
               ["model.pos_encoding=rope"]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), default="attention")
    p.add_argument("--data-path", help="Tiny Shakespeare text file (data.path of the shakespeare data configs)")
    p.add_argument("--arms", nargs="+", help="only these arms (default: all of the study)")
    p.add_argument("--seeds", type=int, default=3, help="runs per arm, seeds 1..N")
    p.add_argument("--override", nargs="*", default=[], help="extra overrides for every run")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories (default: deleted)")
    p.add_argument("--runs", help="tabulate the runs already in this folder (<data>/<arm>-seed<N>) instead")
    return p.parse_args(argv)


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode, (done.stdout + done.stderr)[-2000:]


def run_study(args: argparse.Namespace, data: str, work: Path, env: dict[str, str]) -> list[Path]:
    """Every arm for every seed on one corpus; the run directories that finished."""
    experiment, _, arms_of, _, shared = STUDIES[args.study]
    arms = arms_of()
    names = [a for a in arms if not args.arms or a in args.arms]
    data_args = [f"data={data}", f"data_dir={work / 'data'}"]
    if data.startswith("shakespeare"):
        if not args.data_path:
            raise SystemExit("error: --data-path (the Tiny Shakespeare text) is needed for data=" + data)
        data_args.append(f"data.path={Path(args.data_path).resolve()}")
    subprocess.run([sys.executable, "-m", "gptmini.data", *data_args], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    done = []
    for seed in range(1, args.seeds + 1):
        for name in names if seed % 2 else names[::-1]:
            run_dir = work / data / f"{name}-seed{seed}"
            cmd = [sys.executable, "train.py", f"experiment={experiment}", *shared, *arms[name], *data_args,
                   *args.override, f"train.seed={seed}", f"hydra.run.dir={run_dir}"]
            load = os.getloadavg()[0]
            seconds, code, tail = run(cmd, env)
            print(f"{data} {name:>14} seed {seed}: {seconds:6.1f} s, exit {code}, load before {load:.2f}", flush=True)
            if code == 0:
                done.append(run_dir)
            else:
                print(tail, file=sys.stderr)
    return done


def table(runs: list[Path], baseline: str) -> str:
    """gptmini.compare's tables of `runs`, p-values against the group holding the `baseline` arm's runs (groups are
    labelled by every setting that differs, so the arm's name alone can match several)."""
    paths = [str(r) for r in runs]
    groups = compare(CompareConfig(paths=paths)).groups
    mine = {r.resolve() for r in runs if r.name.rsplit("-seed", 1)[0] == baseline}
    label = next((g.label for g in groups if {r.path.resolve() for r in g.runs} == mine), None)
    return compare(CompareConfig(paths=paths, baseline=label)).markdown


def report(args: argparse.Namespace, tables: dict[str, str], command: str) -> str:
    experiment, _, arms_of, _, shared = STUDIES[args.study]
    arms = arms_of()
    listed = "; ".join(f"{name}: `{' '.join(o)}`" for name, o in arms.items() if not args.arms or name in args.arms)
    sections = "\n".join(f"### data={data}\n\n{table}" for data, table in tables.items())
    return f"""## Which attention learns best: `experiment={experiment}` ({args.study} study)

`{command}` on {machine()}.

- Arms: {listed}.
- Every run: `python train.py experiment={experiment} {' '.join(shared)} <arm> train.seed=<seed>`, a fresh
  process; seeds 1..{args.seeds}, the arms' order alternating seed by seed. Same steps, batch and schedule for
  every arm.
- Final val loss: the run's whole-val evaluation at the end (every position of the val split, windows of
  block_size). Wall time: the run's own record (start to end, start-up and final evaluation included), as
  `gptmini.compare` reads it. p: Welch's t-test against the baseline's group.

{sections}"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _, corpora, _, baseline, _ = STUDIES[args.study]
    env = dict(os.environ, TQDM_DISABLE="1", HYDRA_FULL_ERROR="1")
    work = Path(tempfile.mkdtemp(prefix=f"learning-{args.study}-"))
    print(f"run directories: {work}", flush=True)  # kept if tabulating fails: --runs WORK tabulates them again
    tables = {}
    for data in corpora:
        runs = sorted((Path(args.runs) / data).glob("*-seed*")) if args.runs else run_study(args, data, work, env)
        tables[data] = re.sub(r"^## ", "#### ", table(runs, baseline), flags=re.M)  # under this section's headings
    markdown = report(args, tables, "python benchmarks/learning.py " + shlex.join(argv or sys.argv[1:]))
    print("\n" + markdown)
    if not args.no_write:
        write_section(f"learning_{args.study}", markdown)
    if args.keep_runs or args.runs:
        print(f"run directories: {args.runs or work}")
    if not args.keep_runs:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
