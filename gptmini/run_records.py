"""What a finished, crashed or running run directory says about itself, read from its own records.

A run's numbers come from its TensorBoard events (read with TensorBoard's own reader) and its `config.yaml`,
never from train.log's text, so a change of wording in a log line cannot change a comparison. Every field is
optional: a run that crashed before its first evaluation, an events file cut short by a kill, or a run still
training gives what it has, and the report shows the rest as unknown.
"""

from __future__ import annotations

import contextlib
import glob
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptmini import run_log as tags
from gptmini.paths import CHECKPOINTS_DIR, CONFIG_FILE, TB_EVENTS_PREFIX
from gptmini.run_lock import PID_NAME

FINISHED, RUNNING, CRASHED = "finished", "running", "crashed"


@dataclass
class Series:
    """One scalar tag over a run: steps, values and the run's training clock (seconds) at each point."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)

    def last(self) -> float | None:
        return self.values[-1] if self.values else None


@dataclass
class RunRecord:
    """One run as a comparison sees it; None wherever the run did not record the figure."""

    path: Path
    status: str  # finished | running | crashed
    config: dict[str, Any]  # config.yaml flattened to dotted keys ({} when missing or unreadable)
    scalars: dict[str, Series]
    wall_time_s: float | None  # the invocations' spans (first to last event) summed: pauses between resumes omitted
    parameters: int | None = None

    def series(self, tag: str) -> Series:
        return self.scalars.get(tag, Series())

    @property
    def seed(self) -> int | None:
        return self.config.get("train.seed")

    @property
    def steps(self) -> int | None:
        steps = [s for series in self.scalars.values() for s in series.steps if s > 0]
        return max(steps) if steps else None

    @property
    def tokens(self) -> int | None:
        """Logged, or steps x batch x grad_accum x block from config.yaml (then one process is assumed)."""
        logged = self.series(tags.TAG_TOKENS_SEEN).last()
        if logged is not None:
            return int(logged)
        keys = ("train.batch_size", "train.grad_accum", "model.block_size")
        if self.steps is None or any(not isinstance(self.config.get(k), int) for k in keys):
            return None
        c = self.config
        return self.steps * c["train.batch_size"] * c["train.grad_accum"] * c["model.block_size"]

    @property
    def final_val_loss(self) -> float | None:
        return self.series(tags.HPARAM_FINAL_VAL_LOSS).last()

    @property
    def best_val_loss(self) -> float | None:
        values = self.series(tags.TAG_VAL_LOSS).values
        return min(values) if values else None

    @property
    def tokens_per_s(self) -> float | None:
        values = self.series(tags.TAG_TOKENS_PER_S).values
        return statistics.median(values) if values else None

    @property
    def peak_memory(self) -> float | None:
        final = self.series(tags.HPARAM_PEAK_MEMORY).last()
        values = self.series(tags.TAG_PEAK_MEMORY).values
        return final if final is not None else max(values) if values else None

    @property
    def skipped_steps(self) -> int | None:
        """The last count logged; 0 when the run logged steps but never a skip (the tag is written only then)."""
        last = self.series(tags.TAG_SKIPPED_STEPS).last()
        return int(last) if last is not None else (0 if self.steps is not None else None)

    def time_to(self, target: float) -> float | None:
        """Training-clock seconds until the first val-loss estimate at or below `target`; None if never."""
        val = self.series(tags.TAG_VAL_LOSS)
        return next((t for v, t in zip(val.values, val.elapsed, strict=True) if v <= target), None)


def find_runs(patterns: list[str]) -> list[Path]:
    """Run directories named by `patterns`: runs, folders holding runs (a sweep), or globs of either; each run once.

    A pattern that names nothing, or nothing that holds a run, is a ValueError naming it.
    """
    runs: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not Path(matches[0]).exists():
            raise ValueError(f"{pattern!r} {'matches nothing' if glob.has_magic(pattern) else 'does not exist'}; "
                             f"give run directories, a sweep directory or a glob of them")
        found = [run for match in matches for run in _runs_in(Path(match))]
        if not found:
            raise ValueError(f"{pattern!r} is not a run directory: it holds no {CONFIG_FILE} and no TensorBoard "
                             f"events, nor do the folders below it")
        runs += [run for run in found if run not in runs]
    return runs


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / CONFIG_FILE).is_file() or any(path.glob(f"{TB_EVENTS_PREFIX}*")))


def _runs_in(path: Path) -> list[Path]:
    if is_run_dir(path):
        return [path.resolve()]
    if not path.is_dir():
        return []
    found = []
    for dirpath, dirnames, _ in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d != CHECKPOINTS_DIR and not d.startswith("."))
        if is_run_dir(Path(dirpath)):
            found.append(Path(dirpath).resolve())
            dirnames[:] = []  # a run's own folders (profile/, ...) hold no other runs
    return found


def read_run(path: Path) -> RunRecord:
    """Everything `path` recorded; never raises for a damaged or partial run."""
    config = read_config(path)
    scalars, wall = read_scalars(path)
    record = RunRecord(path, CRASHED, config, scalars, wall)
    logged = record.series(tags.TAG_PARAMETERS).last()
    record.parameters = int(logged) if logged is not None else count_parameters(config)
    record.status = run_status(record)
    return record


def read_config(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        tree = OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE))
    except Exception:  # missing, half-written or not YAML: the run's settings are unknown, not an error
        return {}
    return tags.flatten(tree) if isinstance(tree, dict) else {}


def read_scalars(path: Path) -> tuple[dict[str, Series], float | None]:
    """Every scalar of every events file in `path`, in order, on one training clock.

    Each invocation of train.py (a resume included) writes its own events file; the clock of a point is the
    time since its file opened plus the spans of the files before, so the pause between a stop and a resume is
    not counted. A step written twice (a run resumed from a checkpoint before its last logged step) keeps the
    later value. An events file cut short (a kill mid-write) gives the records before the cut.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, dict[int, tuple[float, float]]] = {}
    offset, any_file = 0.0, False
    for events in sorted(path.glob(f"{TB_EVENTS_PREFIX}*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
        with contextlib.suppress(Exception):  # unreadable: whatever was read before the damage is kept
            acc.Reload()
        try:
            start = acc.FirstEventTimestamp()
        except ValueError:  # not even the file's header event
            continue
        any_file, end = True, start
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                points.setdefault(tag, {})[event.step] = (event.value, offset + event.wall_time - start)
                end = max(end, event.wall_time)
        offset += end - start
    scalars = {}
    for tag, by_step in points.items():
        ordered = sorted(by_step.items())
        scalars[tag] = Series([s for s, _ in ordered], [v for _, (v, _) in ordered], [t for _, (_, t) in ordered])
    return scalars, offset if any_file else None


def count_parameters(config: dict[str, Any]) -> int | None:
    """Parameters of the model config.yaml describes, built on the meta device (no memory, no weights)."""
    model = {k[len("model."):]: v for k, v in config.items() if k.startswith("model.")}
    if not model:
        return None
    import torch

    from gptmini.config import AttentionConfig, ModelConfig
    from gptmini.model import GPT

    try:
        attention = AttentionConfig(**{k[len("attention."):]: v for k, v in model.items()
                                       if k.startswith("attention.")})
        plain = {k: v for k, v in model.items() if not k.startswith("attention.")} | {"init_from": None}
        with torch.device("meta"):
            return GPT(ModelConfig(**plain, attention=attention)).num_parameters()
    except Exception:  # a config from another version of gptmini: unknown rather than wrong
        return None


def run_status(record: RunRecord) -> str:
    """running: its lock note names a live process; finished: it reached train.max_iters and, when asked for,
    logged its final val loss; crashed: anything else (an error, a kill, or a stop to be resumed later)."""
    if _holder_alive(record.path):
        return RUNNING
    max_iters, final_eval = record.config.get("train.max_iters"), record.config.get("train.final_eval", True)
    reached = max_iters is not None and (record.steps or 0) >= max_iters
    has_final = record.final_val_loss is not None
    if (reached or max_iters is None) and (has_final or (reached and not final_eval)):
        return FINISHED
    return CRASHED


def _holder_alive(path: Path) -> bool:
    try:
        pid = int((path / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
