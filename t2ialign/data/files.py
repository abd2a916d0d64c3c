"""Output folders and failed writes as one line: which path, why, what is intact, what to do.

``prepare_output_dir`` refuses an output folder that is a file (or lies under one) before any work
starts. ``reported_write`` wraps a save: a disk that is full or not writable (``OSError`` such as
ENOSPC, or safetensors' ``SafetensorError`` wrapping one) becomes an ``OutputError`` that names the
file and says what earlier output survived, instead of a traceback from deep inside PIL/safetensors.
Savers write to a temporary name and rename, so "intact" is true: a failed write never replaces a file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

from t2ialign.errors import UserFacingError

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
# safetensors formats the wrapped io::Error with Debug: IoError(Os { code: 28, kind: StorageFull, ... })
RUST_OS_CODE = re.compile(r"code: (\d+)|os error (\d+)")


class OutputError(UserFacingError):
    """An output that cannot be written; the message says what was kept."""


def prepare_output_dir(path, key: str) -> Path:
    """Create the folder ``path`` (and its parents); ``key`` is the flag or config key that named it."""
    path = Path(path)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        what = "is a file" if blocker == path else f"lies under {blocker}, which is a file"
        raise OutputError(f"{key}: {path} {what}, not a folder; choose another {key} (or move the file away)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{key}: cannot create the folder {path} ({_why(exc)}); choose a writable location") from None
    return path


def _file_in_the_way(path: Path):
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


@contextlib.contextmanager
def reported_write(path, kept: str, *, cleanup=None):
    """Run a save of ``path``; a failed write raises OutputError saying ``kept`` (what is intact).

    ``cleanup``: a temporary file to remove on failure, so no half-written file stays behind.
    """
    try:
        yield
    except UserFacingError:
        raise
    except Exception as exc:
        if not _is_write_failure(exc):
            raise
        if cleanup is not None:
            with contextlib.suppress(OSError):
                os.unlink(cleanup)
        raise OutputError(
            f"cannot write {path}: {_why(exc)}; {kept}. Fix: free disk space or choose a writable location, "
            "then run the same command again"
        ) from None


def _is_write_failure(exc: BaseException) -> bool:
    # SafetensorError is not an OSError; it is recognised by name (safetensors may not be imported here)
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


def _why(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if code is None:
        match = RUST_OS_CODE.search(str(exc))
        code = int(match.group(1) or match.group(2)) if match else None
    if code in FULL or "StorageFull" in str(exc):
        return "the disk is full"
    if code in NOT_WRITABLE:
        return f"the location is not writable ({os.strerror(code)})"
    detail = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:120] or type(exc).__name__
    return f"the write failed ({detail})"
