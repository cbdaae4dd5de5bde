"""The run-time side of the data: open a prepared dataset and draw batches from its memory-mapped tokens.

Nothing here reads a corpus or writes files; `gptmini.data.preparation` makes what this module reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptmini.config import DataConfig
from gptmini.data.format import DataError, bin_path, check_prepared, read_meta
from gptmini.tokenizer import Tokenizer


@dataclass
class PreparedData:
    """A checked prepared dataset: its folder, meta.json and tokenizer; the splits are memory-mapped on demand."""

    path: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer

    def _tokens(self, split: str) -> np.memmap:
        return np.memmap(bin_path(self.path, split), dtype=self.meta["dtype"], mode="r")

    def train_tokens(self) -> np.memmap:
        return self._tokens("train")

    def val_tokens(self) -> np.memmap:
        return self._tokens("val")


def load_prepared(path: str | Path, expect_tokenizer: DataConfig | None = None) -> PreparedData:
    """Open a prepared dataset, checking that meta.json and the .bin files agree before anything uses them."""
    path = Path(path)
    meta = read_meta(path)
    tokenizer = check_prepared(path, meta, expect_tokenizer)
    return PreparedData(path, meta, tokenizer)


class BatchSampler:
    """Random `block_size` windows from a token array; batch k depends only on (seed, k).

    Batch k is one *global* batch of `batch_size * world_size` windows drawn from (seed, k); rank r takes rows
    [r*batch_size, (r+1)*batch_size). So each rank of a distributed job draws its own rows, N processes see exactly
    the windows one process with an N-times larger batch would, and a resumed run (restore `state_dict()`) draws
    exactly the batches an uninterrupted run would have.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(f"{len(tokens)} tokens are fewer than block_size+1={block_size + 1}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size, self.step = seed, rank, world_size, 0
        self.device = torch.device(device)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(x, y), each (B, T) int64 on the device; y is x shifted left by one token."""
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]  # this rank's rows
        rows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        batch = torch.from_numpy(rows)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            batch = batch.to(self.device)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


def iter_windows(tokens: np.ndarray, window: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Non-overlapping windows covering the whole split; every target position appears exactly once.

    Yields (x, y) of (b, window) int64, the last window possibly shorter (in a batch of its own).
    """
    n = max(len(tokens) - 1, 0)  # positions that have a next token
    full = n // window
    for first in range(0, full, batch_size):
        count = min(batch_size, full - first)
        chunk = np.asarray(tokens[first * window : (first + count) * window + 1], dtype=np.int64)  # (count*window+1,)
        x = torch.from_numpy(chunk[:-1].reshape(count, window))  # (count, window)
        y = torch.from_numpy(chunk[1:].reshape(count, window))  # (count, window), shifted by one
        yield x, y
    rest = n - full * window
    if rest > 0:
        chunk = torch.from_numpy(np.asarray(tokens[full * window :], dtype=np.int64))  # (rest+1,)
        yield chunk[None, :-1], chunk[None, 1:]  # (1, rest)
