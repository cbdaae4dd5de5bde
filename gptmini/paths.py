"""Output paths checked before any work: a run directory or an output file must be creatable and writable.

Asked up front, so that a mistake costs one line instead of a training run or a long sample lost at the end."""

from __future__ import annotations

import os
from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """`path` itself, or its closest ancestor that exists."""
    return next(p for p in (path, *path.absolute().parents) if p.exists())


def check_writable(value: str, key: str, *, folder: bool, choose: str | None = None) -> None:
    """Refuse, in one line naming `key`, a path that cannot become a folder (`folder`) or a file: the wrong kind
    of thing already there, a path below a file, or a place this process cannot write. `choose` names the setting
    to change (default: key)."""
    choose = choose or key
    path = Path(value)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{key}={value!r} is a file, not a directory; choose another {choose}")
    if not folder and path.is_dir():
        raise ValueError(f"{key}={value!r} is a directory; give the path of a file to write")
    existing = nearest_existing(path if folder else path.parent)
    if not existing.is_dir():
        raise ValueError(f"{key}={value!r} lies below {str(existing)!r}, which is a file; choose another {choose}")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{key}={value!r} is not writable ({existing} is read-only); choose another {choose}")
