"""Where a run's seconds go: start-up, training steps, evaluation and checkpoints, one line at the end of a run.

A short run (the CPU speedrun: ~15 s) can lose a fifth of its time before its first step; this line shows it
without a profiler, and `benchmarks/speedrun.py` collects it into benchmarks/RESULTS.md. Imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

# When the package began loading (gptmini/__init__.py imports this module first, before torch): start-up counts
# from here. The interpreter's own start before it (tens of ms) is not counted.
LOADED = time.perf_counter()


class PhaseClock:
    """Seconds spent in named phases of a run, and the start of its first step."""

    def __init__(self, origin: float = LOADED) -> None:
        self.origin = origin
        self.first_step: float | None = None  # perf_counter() when the training loop began
        self.seconds: dict[str, float] = {}

    def loop_started(self) -> None:
        if self.first_step is None:
            self.first_step = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def summary(self, steps: int) -> str:
        """One line: e.g. `time: 14.21 s since gptmini loaded: start-up 2.71 s, training 10.43 s (360 steps),
        evaluation 1.02 s, checkpoints 0.05 s` (training: the loop's time less evaluation and checkpoints)."""
        now = time.perf_counter()
        first = self.first_step if self.first_step is not None else now
        evaluation, checkpoints = self.seconds.get("evaluation", 0.0), self.seconds.get("checkpoints", 0.0)
        training = max(now - first - evaluation - checkpoints, 0.0)
        return (f"time: {now - self.origin:.2f} s since gptmini loaded: start-up {first - self.origin:.2f} s, "
                f"training {training:.2f} s ({steps} steps), evaluation {evaluation:.2f} s, "
                f"checkpoints {checkpoints:.2f} s")
