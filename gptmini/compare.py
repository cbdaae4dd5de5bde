"""Compare runs: `python -m gptmini.compare PATH... [target=LOSS] [baseline=GROUP] [out=FOLDER]`.

PATH is a run directory, a sweep directory (every run below it) or a glob of either. It prints a markdown table
with one row per run and one per group of runs that differ only in their seed, and writes `comparison.md`,
`comparison.csv` (one row per run, raw numbers) and `comparison.png` (val loss against step and against wall
time) into `out` (default: the current folder). Which variant trained best and fastest, and whether the
difference is more than seed noise, without clicking through TensorBoard runs one by one.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from gptmini.comparison import (
    Group,
    differing_keys,
    find_group,
    group_rows,
    group_runs,
    groups_markdown,
    run_rows,
    runs_markdown,
    to_csv,
)
from gptmini.config import CompareConfig
from gptmini.paths import check_writable, protected_reason, write_atomic
from gptmini.run_log import TAG_VAL_LOSS
from gptmini.run_records import RunRecord, Series, find_runs, read_run

OUTPUTS = ("comparison.md", "comparison.csv", "comparison.png")


@dataclass
class Comparison:
    runs: list[RunRecord]
    groups: list[Group]
    markdown: str
    csv: str
    run_rows: list[dict[str, Any]]
    group_rows: list[dict[str, Any]]


def compare(cfg: CompareConfig) -> Comparison:
    """Read the runs and build the tables; writes nothing."""
    if not cfg.paths:
        raise ValueError("name the runs to compare: python -m gptmini.compare PATH... (run directories, a sweep "
                         "directory or globs)")
    runs = [read_run(path) for path in find_runs(cfg.paths)]
    keys = differing_keys(runs)
    groups = group_runs(runs, keys)
    baseline = find_group(groups, cfg.baseline) if cfg.baseline is not None else None
    rows = run_rows(runs, run_names([r.path for r in runs]), keys, groups, cfg.target)
    stats = group_rows(groups, baseline)
    against = f"; p: Welch's t-test against {baseline.label}" if baseline is not None else ""
    markdown = (f"## Runs\n\n{runs_markdown(rows, keys, cfg.target)}\n"
                f"## Groups (runs that differ only in train.seed; n counts finished runs{against})\n\n"
                f"{groups_markdown(stats, baseline)}")
    return Comparison(runs, groups, markdown, to_csv(rows), rows, stats)


def run_names(paths: list[Path]) -> list[str]:
    """Each run's path below the folder all of them share (the folder's own name for a single run)."""
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(os.path.commonpath(paths))
    return [str(p.relative_to(common)) for p in paths]


def run_comparison(cfg: CompareConfig, stream: TextIO | None = sys.stdout) -> Comparison:
    """Compare, print the tables, write the three files into `cfg.out`."""
    check_writable(cfg.out, "out", folder=True)
    out = Path(cfg.out)
    for name in OUTPUTS:
        reason = protected_reason(out / name)
        if reason:
            raise ValueError(f"out={cfg.out!r}: {name} there {reason}; choose another out=")
    result = compare(cfg)
    if stream is not None:
        stream.write(result.markdown)
    write_atomic(out / "comparison.md", result.markdown.encode(), "out")
    write_atomic(out / "comparison.csv", result.csv.encode(), "out")
    write_atomic(out / "comparison.png", plot(result.groups), "out")
    print(f"wrote {', '.join(str(out / name) for name in OUTPUTS)}", file=sys.stderr)
    return result


def plot(groups: list[Group]) -> bytes:
    """Val loss against step and against wall time: one colour per group, each seed a thin line, the group's
    mean a thick one (over the steps all its runs reached). PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80, sharey=True)
    colours = plt.get_cmap("tab10")
    for i, group in enumerate(groups):
        colour = colours(i % 10)
        curves = [r.series(TAG_VAL_LOSS) for r in group.runs if r.series(TAG_VAL_LOSS).steps]
        for curve in curves:
            axes[0].plot(curve.steps, curve.values, color=colour, lw=0.8, alpha=0.45)
            axes[1].plot(curve.elapsed, curve.values, color=colour, lw=0.8, alpha=0.45)
        steps, loss, elapsed = mean_curve(curves)
        axes[0].plot(steps, loss, color=colour, lw=2.5, label=f"{group.label} (n={len(group.runs)})")
        axes[1].plot(elapsed, loss, color=colour, lw=2.5)
    axes[0].set(xlabel="step", ylabel="val loss", title="val loss vs step")
    axes[1].set(xlabel="wall time (s)", title="val loss vs wall time")
    for ax in axes:
        ax.grid(alpha=0.3)
    if groups:
        axes[0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def mean_curve(curves: list[Series]) -> tuple[list[int], list[float], list[float]]:
    """At each step every curve has: the mean loss and the mean time it took to get there."""
    if not curves:
        return [], [], []
    common = sorted(set(curves[0].steps).intersection(*(c.steps for c in curves[1:])))
    at = [{s: (v, t) for s, v, t in zip(c.steps, c.values, c.elapsed, strict=True)} for c in curves]
    loss = [sum(a[s][0] for a in at) / len(at) for s in common]
    elapsed = [sum(a[s][1] for a in at) / len(at) for s in common]
    return common, loss, elapsed


def split_paths(argv: list[str]) -> tuple[list[str], list[str]]:
    """(bare paths, the rest for Hydra). A bare argument is a path; so is one with `=` that exists on disk (a
    folder named `lr=0.1`). Everything else (`key=value`, flags) is Hydra's."""
    paths, rest = [], []
    for arg in argv:
        is_path = not arg.startswith("-") and ("=" not in arg or os.path.exists(arg))
        (paths if is_path else rest).append(arg)
    return paths, rest


def main() -> None:
    import dataclasses

    from gptmini.cli import run_command

    bare, sys.argv[1:] = split_paths(sys.argv[1:])
    run_command("compare", lambda cfg: run_comparison(dataclasses.replace(cfg, paths=[*cfg.paths, *bare])))


if __name__ == "__main__":
    main()
