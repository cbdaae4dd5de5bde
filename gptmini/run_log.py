"""What a run reports: its log file (and console), and its TensorBoard events (scalars, text, heat-map images).

Named `run_log` rather than `logging` so that it never shadows the standard library's module.
"""

from __future__ import annotations

import contextlib
import logging
import sys
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
        file_handler = logging.FileHandler(run_dir / LOG_FILE)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        console = logging.StreamHandler(sys.stderr)
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


def attention_tag(layer: int, head: int | str) -> str:
    """The TensorBoard tag of one attention heat map (`head="all"`: the layer's grid)."""
    return f"attn/layer{layer}/{'all' if head == 'all' else f'head{head}'}"


class TensorBoard:
    """One SummaryWriter per run directory; a no-op on non-zero ranks."""

    def __init__(self, log_dir: Path, enabled: bool = True) -> None:
        self.writer = None
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

        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in _flatten(config).items()}
        exp, ssi, sei = hparams(flat, metrics)
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
