"""Outputs are written to a temporary path and renamed into place; when a write fails, the temporary path is
removed (so nothing half-written, or looking finished, remains) and a full disk becomes one line for the user."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from .config import UserError

# how a full disk reads when it does not arrive as an OSError (safetensors' Rust writer, torch's zip writer)
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class DiskFullError(UserError):
    """An output could not be written because the disk (or quota) is full."""


def disk_full(e: BaseException, path: str | Path | None) -> DiskFullError | None:
    """A one-line user error when `e` (raised while writing `path`) means the disk is full; else None."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and not any(text in str(e) for text in _DISK_FULL_TEXT):
        return None
    where = path or getattr(e, "filename", None) or "an output"
    return DiskFullError(f"{where}: disk full while writing it (no space left on device); free some space or "
                         "choose another --out, then run again (nothing half-written was kept)")


@contextlib.contextmanager
def writing(tmp: Path, final: Path) -> Iterator[None]:
    """Around the writes into the temporary `tmp` that becomes `final`: on any failure remove `tmp` and re-raise,
    a full disk as a `DiskFullError` naming `final`."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (err := disk_full(e, final)) is not None:
            raise err from e
        raise
