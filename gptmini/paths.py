"""Output paths checked before any work, and written so that nothing the user had is lost.

A run directory or an output file must be creatable and writable, asked up front so that a mistake costs one line
instead of a training run or a long sample lost at the end. An output file never replaces a run's own files (its
checkpoints, config.yaml, train.log) nor an input of the same command, and it replaces an earlier output only
once it is complete (`write_atomic`). The run directory's layout is named here, for every module that writes one.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"  # <run_dir>/checkpoints/{last,best}.pt
CONFIG_FILE = "config.yaml"  # <run_dir>/config.yaml: the resolved config
LOG_FILE = "train.log"
TB_EVENTS_PREFIX = "events.out.tfevents"
HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
# `.<name>.<kind>-<pid>@<host>-<random>`: a folder being written (tmp) or the one it replaces (old), named after
# the process, so that what a killed process left can be told from what a live one is writing.
STAGING = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9_.]+)-[^/]*")
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")  # model weights, or a dataset's tokens


def nearest_existing(path: Path) -> Path:
    """`path` itself, or its closest ancestor that exists."""
    return next(p for p in (path, *path.absolute().parents) if p.exists())


NAME_MAX = 255  # bytes in one file or folder name, on every common file system


def check_name_lengths(value: str | Path, key: str) -> None:
    """Refuse a path with a file or folder name longer than the file system allows, in one line naming `key`:
    asked of it, the OS answers every question (exists? a folder?) with an error instead of an answer."""
    long = next((part for part in Path(value).parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is not None:
        raise ValueError(f"{key}={str(value)!r} has a name of {len(os.fsencode(long))} bytes ({long[:20]}...); "
                         f"file systems allow {NAME_MAX}: choose a shorter {key}=")


def check_writable(value: str, key: str, *, folder: bool, choose: str | None = None) -> None:
    """Refuse, in one line naming `key`, a path that cannot become a folder (`folder`) or a file: the wrong kind
    of thing already there, a path below a file, or a place this process cannot write. `choose` names the setting
    to change (default: key)."""
    check_name_lengths(value, key)
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


def protected_reason(path: Path, reads: Iterable[str | Path | None] = ()) -> str | None:
    """Why an output must not go to `path`, or None: it is one of the command's inputs (`reads`), a file of a run
    directory, or an existing file of weights or tokens, which an output of text or an image would destroy."""
    target = path.resolve()
    if any(r is not None and str(r) and Path(r).resolve() == target for r in reads):
        return "is an input of this command"
    if target.parent.name == CHECKPOINTS_DIR:
        return "lies in a run's checkpoints folder"
    run_dir = (target.parent / CONFIG_FILE).is_file() and (target.parent / CHECKPOINTS_DIR).is_dir()
    if run_dir and (target.name in (CONFIG_FILE, LOG_FILE) or target.name.startswith(TB_EVENTS_PREFIX)):
        return "is a file of a training run"
    if target.is_file() and target.suffix in WEIGHT_SUFFIXES:
        return "holds weights or tokens (an existing .pt/.safetensors/.bin file)"
    return None


def check_output_file(value: str, key: str, reads: Iterable[str | Path | None] = ()) -> None:
    """Refuse, in one line naming `key`, an output file that cannot be written or must not be replaced."""
    check_writable(value, key, folder=False)
    reason = protected_reason(Path(value), reads)
    if reason:
        raise ValueError(f"{key}={value!r} {reason}; it is never overwritten: choose another {key}=")


def write_atomic(path: str | Path, data: bytes, key: str) -> None:
    """Write `path` so that it is replaced only by a complete file: written beside it, synced, then renamed over
    it. A full disk or a kill midway leaves the earlier file as it was; the error names `key`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; an output is as readable as any file
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        old = "; the earlier file is unchanged" if path.exists() else ""
        raise ValueError(f"{key}={str(path)!r} could not be written ({err.strerror or err}){old}") from None


def umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------------------
# Folders written beside their destination and renamed into place


def staging_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}@{HOST}-"


def make_staging_dir(parent: Path, name: str) -> Path:
    """A new, empty hidden folder beside `parent/name`, to be renamed into place once complete."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(name, "tmp"), dir=parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the finished folder is as shareable as any
    return tmp


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: never call a folder stale
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_stale_staging(parent: Path, name: str) -> list[tuple[str, str]]:
    """Remove the staging folders of `parent/name` that killed processes on this machine left; (path, pid) each.

    A live process's folder, and any folder made on another machine (a shared folder), stays; so does an `old`
    folder whose destination is gone (killed between the two renames: it is the previous version, kept).
    """
    removed = []
    if not parent.is_dir():
        return removed
    for found in sorted(glob.glob(os.path.join(glob.escape(str(parent)), f".{glob.escape(name)}.*-*"))):
        match = STAGING.fullmatch(os.path.basename(found))
        if not match or match["name"] != name or match["host"] != HOST or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not (parent / name).exists():
            continue
        shutil.rmtree(found, ignore_errors=True)
        if not os.path.exists(found):
            removed.append((found, match["pid"]))
    return removed
