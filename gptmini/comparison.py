"""Runs side by side: the settings that tell them apart, groups of seeds, and the tables of a comparison.

Runs whose configs differ only in `train.seed` form a group; a group's spread is the seed noise, and Welch's
t-test (scipy; unequal variances, since a variant may well change the spread) says whether a difference between
two groups is more than that noise. Only finished runs enter a group's statistics; a crashed or running run
still gets its row, marked as such.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gptmini.run_log import format_bytes
from gptmini.run_records import FINISHED, RunRecord

SEED_KEY = "train.seed"
# Settings that cannot change what a run trains: where the data lies, how an invocation started or ended. A run
# stopped with train.stop_after and resumed stays in its seeds' group.
BOOKKEEPING = (SEED_KEY, "data_dir", "train.resume", "train.stop_after", "train.dist_timeout_s")


@dataclass
class Group:
    label: str  # "key=value, ..." of the settings that tell it apart ("all" when only seeds differ)
    settings: dict[str, Any]
    runs: list[RunRecord]

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == FINISHED]

    def losses(self) -> list[float]:
        return [r.final_val_loss for r in self.finished if r.final_val_loss is not None]

    def times(self) -> list[float]:
        return [r.wall_time_s for r in self.finished if r.wall_time_s is not None]


def differing_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys whose values are not the same in every run that has a config (`BOOKKEEPING` apart), in order."""
    configs = [r.config for r in runs if r.config]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if k not in BOOKKEEPING and len({repr(c.get(k)) for c in configs}) > 1]


def group_runs(runs: list[RunRecord], keys: list[str]) -> list[Group]:
    """One group per combination of the differing settings, in the order the runs came."""
    groups: dict[str, Group] = {}
    for run in runs:
        settings = {k: run.config.get(k) for k in keys} if run.config else {}
        if not run.config:
            label = "unknown settings"
        else:
            label = ", ".join(f"{k}={_yaml(v)}" for k, v in settings.items()) or "all"
        groups.setdefault(label, Group(label, settings, [])).runs.append(run)
    return list(groups.values())


def find_group(groups: list[Group], name: str) -> Group:
    """The group `name` means: its label, one `key=value` of it, or one value of it; exactly one must match."""
    for exact in (g for g in groups if g.label == name):
        return exact
    matches = [g for g in groups
               if any(name in (f"{k}={_yaml(v)}", _yaml(v)) for k, v in g.settings.items())]
    if len(matches) == 1:
        return matches[0]
    labels = "; ".join(g.label for g in groups)
    what = "matches several groups" if matches else "names no group"
    raise ValueError(f"baseline={name!r} {what}; the groups are: {labels}")


def _yaml(value: Any) -> str:
    """A setting as config.yaml and the command line write it (null, true), not as Python prints it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1: the spread of the seeds, estimated from few of them)."""
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (scipy); None with fewer than two values a side or no spread at all."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


# -- tables ---------------------------------------------------------------------------------------------------


def run_rows(runs: list[RunRecord], names: list[str], keys: list[str], groups: list[Group],
             target: float | None) -> list[dict[str, Any]]:
    """One row per run, raw values (None: not recorded), columns in report order."""
    group_of = {id(r): g.label for g in groups for r in g.runs}
    rows = []
    for r, name in zip(runs, names, strict=True):
        row: dict[str, Any] = {"run": name, "status": r.status, "group": group_of[id(r)]}
        row |= {k: r.config.get(k) if r.config else None for k in keys}
        row |= {"seed": r.seed, "parameters": r.parameters, "tokens": r.tokens, "steps": r.steps,
                "final_val_loss": r.final_val_loss, "best_val_loss": r.best_val_loss, "wall_time_s": r.wall_time_s,
                "tokens_per_s": r.tokens_per_s, "peak_memory_bytes": r.peak_memory, "skipped_steps": r.skipped_steps}
        if target is not None:
            row["time_to_target_s"] = r.time_to(target)
        rows.append(row)
    return rows


def group_rows(groups: list[Group], baseline: Group | None) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        loss_mean, loss_std = mean_std(g.losses())
        time_mean, time_std = mean_std(g.times())
        row: dict[str, Any] = {"group": g.label, "n": len(g.finished), "runs": len(g.runs),
                               "final_val_loss_mean": loss_mean, "final_val_loss_std": loss_std,
                               "wall_time_s_mean": time_mean, "wall_time_s_std": time_std}
        if baseline is not None:
            same = g is baseline
            row["p_loss"] = None if same else welch_p(g.losses(), baseline.losses())
            row["p_time"] = None if same else welch_p(g.times(), baseline.times())
        rows.append(row)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Raw values, full precision; an empty cell where a run recorded nothing."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue()


def _plain(value: Any) -> str:
    return "—" if value is None else str(value)


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    return "—" if mean is None else f"{mean:{fmt}} ± {'—' if std is None else format(std, fmt)}"


RUN_COLUMNS = {  # column key -> (markdown header, formatter)
    "run": ("run", str), "status": ("status", str),
    "seed": ("seed", lambda v: _num(v, "d")), "parameters": ("params", lambda v: _num(v, ",d")),
    "tokens": ("tokens", lambda v: _num(v, ",d")), "final_val_loss": ("final val loss", lambda v: _num(v, ".4f")),
    "best_val_loss": ("best val loss", lambda v: _num(v, ".4f")),
    "wall_time_s": ("wall time (s)", lambda v: _num(v, ".1f")),
    "tokens_per_s": ("tokens/s (median)", lambda v: _num(v, ",.0f")), "peak_memory_bytes": ("peak memory",
                                                                                            format_bytes),
    "skipped_steps": ("skipped", lambda v: _num(v, "d")),
    "time_to_target_s": ("time to target (s)", lambda v: _num(v, ".1f")),
}


def runs_markdown(rows: list[dict[str, Any]], keys: list[str], target: float | None) -> str:
    """The runs table; the differing settings come after the status, each under its own key."""
    columns = ["run", "status", *keys, "seed", "parameters", "tokens", "final_val_loss", "best_val_loss",
               "wall_time_s", "tokens_per_s", "peak_memory_bytes", "skipped_steps"]
    columns += ["time_to_target_s"] if target is not None else []
    headers = [RUN_COLUMNS[c][0] if c in RUN_COLUMNS else c for c in columns]
    if target is not None:
        headers[-1] = f"time to {target:g} (s)"
    lines = [[RUN_COLUMNS.get(c, (c, _plain))[1](row[c]) for c in columns] for row in rows]
    return _markdown(headers, lines)


def groups_markdown(rows: list[dict[str, Any]], baseline: Group | None) -> str:
    headers = ["group", "n", "final val loss (mean ± std)", "wall time s (mean ± std)"]
    if baseline is not None:
        headers += ["p (loss)", "p (time)"]
    lines = []
    for row in rows:
        cells = [row["group"], f"{row['n']}" + (f" of {row['runs']}" if row["runs"] != row["n"] else ""),
                 _pm(row["final_val_loss_mean"], row["final_val_loss_std"], ".4f"),
                 _pm(row["wall_time_s_mean"], row["wall_time_s_std"], ".1f")]
        if baseline is not None:
            same = row["group"] == baseline.label
            cells += ["baseline" if same else _num(row["p_loss"], ".3g"),
                      "baseline" if same else _num(row["p_time"], ".3g")]
        lines.append(cells)
    return _markdown(headers, lines)


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    escape = [[cell.replace("|", "\\|") for cell in row] for row in [headers, *rows]]
    lines = ["| " + " | ".join(row) + " |" for row in escape]
    lines.insert(1, "|" + "|".join("---" for _ in headers) + "|")
    return "\n".join(lines) + "\n"
