"""One training process per run directory, enforced by an OS file lock.

Two `train.py` on the same `hydra.run.dir` would interleave train.log and overwrite each other's checkpoints
and config.yaml. The lock is `flock` on the run directory itself: the kernel releases it when the process
ends, however it ends (kill -9 included), so a lock is never stale, and no lock file is needed. While held,
`<run dir>/.pid` names the holder for the refusal message; it is removed on release (a kill -9 leaves it
behind, harmless: it is only a note). Under torchrun only rank 0 takes the lock. Platforms without `fcntl`
(Windows) run unlocked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

PID_NAME = ".pid"

# Run directories this process holds, so that a nested request (the entry point, then the library) re-enters.
_held: dict[Path, int] = {}


class RunDirLocked(ValueError):
    """Another process is training in this run directory."""


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run directory's lock for the duration of the block (re-entrant within one process)."""
    key = Path(run_dir).resolve()
    if not enabled or fcntl is None or key in _held:
        yield
        return
    created = not key.exists()
    fd = _acquire(key)
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            (key / PID_NAME).unlink()
        if created:  # a run refused before its first file leaves no empty directory behind
            with contextlib.suppress(OSError):
                key.rmdir()  # fails, as it should, once the run has written anything
        os.close(fd)  # closing the descriptor releases the lock


def _acquire(run_dir: Path) -> int:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError as err:
        raise RunDirLocked(
            f"hydra.run.dir={str(run_dir)!r} cannot be used as a run directory: {err.strerror}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = (run_dir / PID_NAME).read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise RunDirLocked(
            f"hydra.run.dir={str(run_dir)!r} is in use by another training process (pid {holder}); wait for it "
            f"to finish, or choose another hydra.run.dir"
        ) from None
    with contextlib.suppress(OSError):  # only a note for the refusal message; the lock holds without it
        (run_dir / PID_NAME).write_text(f"{os.getpid()}\n")
    return fd
