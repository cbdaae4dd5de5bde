"""Checkpoints: one self-contained file, written atomically, read without unpickling arbitrary objects.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)` can read
it: nothing in it is executed or imported. The config is a plain dict, never a pickled object.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "gptmini-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or not a gptmini checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` so that a crash at any moment leaves either the old file or the new one.

    Temporary file in the same directory, fsync, atomic rename, fsync of the directory.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create {str(path.parent)!r} for checkpoints: {err.strerror}") from None
    payload = {"format": FORMAT, "version": VERSION, **state}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointError(f"cannot write a checkpoint into {str(path.parent)!r}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # disk full, quota, read-only: the previous checkpoint stays as it was
        Path(tmp).unlink(missing_ok=True)
        reason = err.strerror or str(err)
        raise CheckpointError(
            f"could not save {str(path)!r} ({reason}); the previous checkpoint there is intact"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; a clear CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    # The weights-only unpickler fails on arbitrary bytes in many ways (KeyError from its memo on a text file,
    # IndexError, UnicodeDecodeError, ...): any failure to read means "not a readable checkpoint".
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError, KeyError,
            IndexError, TypeError, AttributeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if not isinstance(err, (pickle.UnpicklingError, RuntimeError, ValueError, OSError)):
            first_line = f"{type(err).__name__} {first_line}".strip()  # e.g. "KeyError 544502645"
        raise CheckpointError(
            f"{str(path)!r} is not a readable gptmini checkpoint (truncated, corrupted, or holding objects that "
            f"weights_only loading refuses): {first_line}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a gptmini checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {state.get('version')}, expected {VERSION}")
    return state


def find_checkpoint(path: str | Path) -> Path:
    """A run directory means its best checkpoint, else its last; a file means itself."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"run directory {str(path)!r} has no checkpoints/best.pt or checkpoints/last.pt")
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    return path
