"""Where a preparation writes: a temporary folder beside the dataset, swapped in by renames when complete.

Temporary folders are named `.<name>.tmp-<pid>@<host>-<random>` (`gptmini.paths`): a preparation killed before
it could clean up leaves one, and the next preparation on the same machine removes it once that process is gone.
OS errors while writing become one `DataError` line naming `data_dir=`, and the earlier dataset stays as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from gptmini.data.format import SPLIT_NAMES, DataError, bin_path, foreign_entries
from gptmini.paths import check_name_lengths, make_staging_dir, remove_stale_staging, staging_prefix

# A full disk or quota: when converting the corpus into the data folder hits one, data_dir is to blame.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

Log = Callable[[str], None]


class DataDirError(DataError, OSError):
    """data_dir cannot be written (read-only, full, not a folder): a user error, and still an OSError."""

    def __init__(self, data_dir: str | Path, cause: OSError) -> None:
        reason = os.strerror(cause.errno) if cause.errno else str(cause)
        where = f" ({cause.filename})" if cause.filename else ""
        super().__init__(
            f"data_dir={str(data_dir)!r} cannot be written: {reason}{where}; "
            f"choose a writable data_dir= with free space (nothing of an earlier dataset was changed)"
        )
        self.errno = cause.errno


@contextmanager
def writes_to(data_dir: Path, errnos: tuple[int, ...] | None = None) -> Iterator[None]:
    """OSErrors of the block (those with one of `errnos`, when given) as a `DataDirError` naming data_dir."""
    try:
        yield
    except DataError:
        raise
    except OSError as err:
        if errnos is not None and err.errno not in errnos:
            raise
        raise DataDirError(data_dir, err) from err


def check_data_dir(data_dir: Path) -> None:
    try:
        check_name_lengths(data_dir, "data_dir")
    except ValueError as err:
        raise DataError(str(err)) from None
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data_dir={str(data_dir)!r} is a file, not a folder; choose a folder for data_dir=")


def make_tmp(data_dir: Path, name: str) -> Path:
    """A new, empty temporary folder for dataset `name`, named after this process."""
    return make_staging_dir(data_dir, name)


def remove_stale(data_dir: Path, name: str, log: Log) -> None:
    """Remove what killed preparations of `name` on this machine left (see `gptmini.paths.remove_stale`)."""
    for found, pid in remove_stale_staging(data_dir, name):
        log(f"data: removed {found}, left by an interrupted preparation (process {pid} is gone)")


def check_replaceable(data_dir: Path, name: str) -> None:
    """Refuse to prepare into `<data_dir>/<name>` when it holds anything a preparation did not write there."""
    found = foreign_entries(data_dir / name)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise DataError(
            f"data.name={name!r} in data_dir={str(data_dir)!r} would replace {str(data_dir / name)!r}, which holds "
            f"files gptmini did not write ({shown}); they are never deleted: choose another data.name= or data_dir="
        )


def swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames: a crash leaves the old folder, the new one, or none; never a mix.

    Only a dataset of ours is replaced (checked again here: a user may have put files there meanwhile)."""
    check_replaceable(out.parent, out.name)
    old = None
    if out.exists():
        # An empty folder: the rename below replaces it.
        old = Path(tempfile.mkdtemp(prefix=staging_prefix(out.name, "old"), dir=out.parent))
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)  # put the earlier dataset back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class SplitFiles:
    """train.bin and val.bin of a folder, open for appending bytes; synced to disk when the block ends cleanly.

    Only the writes are guarded: an OSError of the caller's own (e.g. reading a corpus) passes unchanged.
    """

    def __init__(self, folder: Path, data_dir: Path) -> None:
        self.folder, self.data_dir = folder, data_dir
        self.files: dict[str, BinaryIO] = {}

    def __enter__(self) -> SplitFiles:
        try:
            with writes_to(self.data_dir):
                for split in SPLIT_NAMES:
                    self.files[split] = open(bin_path(self.folder, split), "wb")
        except DataError:
            self._close()
            raise
        return self

    def write(self, split: str, data: bytes) -> None:
        try:
            self.files[split].write(data)
        except OSError as err:
            raise DataDirError(self.data_dir, err) from err

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                with writes_to(self.data_dir):
                    for f in self.files.values():
                        f.flush()
                        os.fsync(f.fileno())  # a full disk may only show here
        finally:
            self._close()

    def _close(self) -> None:
        for f in self.files.values():
            with suppress(OSError):  # unwritten buffers of a failed preparation: its folder is deleted anyway
                f.close()
