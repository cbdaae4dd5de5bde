"""What a run reports: its log file (and console), and its TensorBoard events (scalars, text, heat-map images).

Named `run_log` rather than `logging` so that it never shadows the standard library's module.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from gptmini.drawing import with_colour_scale
from gptmini.heatmap import heatmap, heatmap_grid, is_signed
from gptmini.paths import LOG_FILE


def setup_logger(run_dir: Path, name: str = "gptmini") -> logging.Logger:
    """A logger writing to <run_dir>/train.log and to the console; one file handler per run directory.

    Records marked `extra={"step_line": True}` (the per-interval throughput lines) go to the file always, and to
    stdout only when stdout is not a terminal: a cluster job's log shows them, while on a terminal the
    progress bar shows the same numbers. Everything else goes to stderr.
    """
    logger = logging.getLogger(f"{name}.{run_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            file_handler = logging.FileHandler(run_dir / LOG_FILE)
        except OSError as err:  # read-only, full, not a file: the run directory is to blame, in one line
            raise ValueError(f"hydra.run.dir={str(run_dir)!r}: {LOG_FILE} cannot be written ({err.strerror}); make "
                             f"it writable or choose another hydra.run.dir") from None
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        console = BarSafeHandler(sys.stderr)
        console.addFilter(lambda record: not getattr(record, "step_line", False))
        logger.addHandler(file_handler)
        logger.addHandler(console)
        if not sys.stdout.isatty():
            steps = logging.StreamHandler(sys.stdout)
            steps.addFilter(lambda record: getattr(record, "step_line", False))
            logger.addHandler(steps)
        for handler in logger.handlers[1:]:
            handler.setFormatter(logging.Formatter("%(message)s"))
    return logger


class BarSafeHandler(logging.StreamHandler):
    """Console lines written around a live progress bar (tqdm clears it, writes, redraws it), instead of onto the
    bar's own line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def quiet_logger() -> logging.Logger:
    """Non-zero ranks log nothing (rank 0 speaks for the job); warnings and errors still reach stderr."""
    logger = logging.getLogger("gptmini.rank")
    logger.setLevel(logging.WARNING)
    return logger


@contextlib.contextmanager
def run_outputs(run_dir: Path, is_main: bool) -> Iterator[tuple[logging.Logger, TensorBoard]]:
    """The run's logger and TensorBoard writer (rank 0 only), closed on any exit.

    When the block fails, a failure to close (TensorBoard flushing onto a full disk) is logged as one warning
    instead of burying the original error under another traceback.
    """
    log = setup_logger(run_dir) if is_main else quiet_logger()
    tb, failing = None, False
    try:
        tb = TensorBoard(run_dir, enabled=is_main)
        yield log, tb
    except BaseException:
        failing = True
        raise
    finally:
        try:
            if tb is not None:
                tb.close()
        except OSError as err:
            if not failing:
                raise
            log.warning(f"could not finish the TensorBoard events in {run_dir}: {err}")
        finally:
            close_logger(log)


def progress_bar(start: int, total: int, enabled: bool = True) -> Any:
    """A tqdm bar on a terminal; none when stderr is a file or pipe (the step lines report progress there)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
                disable=not (enabled and sys.stderr.isatty()))


def to_yaml(tree: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(tree))


# TensorBoard scalar tags, named once: the trainer writes them and `python -m gptmini.compare` reads them.
TAG_TRAIN_LOSS = "loss/train"
TAG_VAL_LOSS = "loss/val"  # the estimate at each evaluation (train.eval_iters batches)
TAG_TOKENS_PER_S = "throughput/tokens_per_s"  # all processes together, per log interval
TAG_SKIPPED_STEPS = "train/skipped_steps"  # written only when a step was skipped
TAG_TOKENS_SEEN = "train/tokens"  # tokens trained on so far (all processes)
TAG_PEAK_MEMORY = "memory/peak_bytes"  # peak so far: max RSS on CPU, peak allocated on GPUs (rank 0)
TAG_PARAMETERS = "model/parameters"
# The final metrics, written once at the end of a run into the HPARAMS tab (and as scalars of the same name).
HPARAM_FINAL_VAL_LOSS = "hparam/final_val_loss"  # whole val split
# Of the invocation that finished the run (a resumed run's comparison sums the invocations from their events).
HPARAM_TOKENS_PER_S = "hparam/tokens_per_s"  # median over the log intervals
HPARAM_WALL_TIME = "hparam/wall_time_s"  # from the TensorBoard writer's start to the end of the run
HPARAM_PEAK_MEMORY = "hparam/peak_memory_bytes"


def final_metrics(final_val_loss: float | None, tokens_per_s: list[float], started: float,
                  peak_memory: int | None, now: float | None = None) -> dict[str, float]:
    """The HPARAMS metrics of a finished run; a metric the run could not measure is left out, not invented.

    The median of the per-interval throughputs, because the first interval carries the start-up (compilation,
    warm caches) and a mean would let it drag the figure down. `started` is a `time.time()` (the writer's start,
    `TensorBoard.started`), so that the wall time spans the same events a comparison reads.
    """
    wall = (time.time() if now is None else now) - started
    metrics = {HPARAM_FINAL_VAL_LOSS: final_val_loss, HPARAM_WALL_TIME: wall,
               HPARAM_TOKENS_PER_S: statistics.median(tokens_per_s) if tokens_per_s else None,
               HPARAM_PEAK_MEMORY: None if peak_memory is None else float(peak_memory)}
    return {tag: float(value) for tag, value in metrics.items() if value is not None}


def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; None -> '—' (not measured)."""
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


def attention_tag(layer: int, head: int | str) -> str:
    """The TensorBoard tag of one attention heat map (`head="all"`: the layer's grid)."""
    return f"attn/layer{layer}/{'all' if head == 'all' else f'head{head}'}"


class TensorBoard:
    """One SummaryWriter per run directory; a no-op on non-zero ranks."""

    def __init__(self, log_dir: Path, enabled: bool = True) -> None:
        self.writer = None
        self.started = time.time()  # when the events file opens: a run's wall time counts from here
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int, code: bool = True) -> None:
        if self.writer is not None:
            body = "```\n" + text.replace("```", "'''") + "\n```" if code else text
            self.writer.add_text(tag, body, step)

    def image(self, tag: str, image: Tensor | np.ndarray, step: int, dataformats: str = "CHW") -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats=dataformats)

    def heatmap(self, tag: str, weights: Tensor, step: int, scale: str = "row") -> None:
        """One head's (Tq, Tk) weights as a heat map with its colour scale on the right (gptmini.heatmap)."""
        if self.writer is not None:
            image = with_colour_scale(heatmap(weights, scale=scale), scale, is_signed(weights))  # (h, w, 3)
            self.image(tag, image, step, dataformats="HWC")

    def attention(self, attentions: list[Tensor], step: int, scale: str = "row") -> None:
        """Per layer: one image per head `attn/layer{l}/head{h}` and the grid `attn/layer{l}/all`, each with its
        colour scale; `scale`: `row` (each row divided by its maximum) or `absolute` (the probabilities)."""
        for layer, weights in enumerate(attentions):
            heads = weights[0]  # (H, Tq, Tk) of the first sequence
            for h, w in enumerate(heads):
                self.heatmap(attention_tag(layer, h), w, step, scale)
            if self.writer is not None:
                grid = with_colour_scale(heatmap_grid(heads, scale=scale), scale, is_signed(heads))
                self.image(attention_tag(layer, "all"), grid, step, dataformats="HWC")

    def hparams(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """Flattened config and final metrics, written into this run's own events file."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flatten(config).items()}
        exp, ssi, sei = hparams(flat, metrics)
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)

    def write_final_metrics(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's final metrics (`final_metrics`) into the HPARAMS tab, beside its flattened config, so that
        TensorBoard's table of runs shows what `python -m gptmini.compare` reports."""
        if metrics:
            self.hparams(config, metrics)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: each setting by the dotted name users type."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@contextlib.contextmanager
def profiler(enabled: bool, run_dir: Path) -> Iterator[Any]:
    """torch.profiler over a few steps, written as a TensorBoard trace (works for CUDA, ROCm/HIP and CPU)."""
    if not enabled:
        yield None
        return
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(run_dir / "profile")),
        record_shapes=True,
    ) as prof:
        yield prof
