"""A full disk (or quota) on any write becomes DiskFull: the path, and what is still intact.

    with writing(out_dir, intact="nothing in out_dir changed"):
        ...  # checkpoint, metrics, adapter, plots, export

The cause is found however the writer reports it: an OSError with errno ENOSPC / EDQUOT (open,
write, PIL, safetensors), or a library error whose message carries the strerror (tensorstore,
orbax), anywhere in the exception's cause / context chain. The commands print DiskFull as one
line (cli.errors); a DiskFull raised inside another `writing` keeps its path, and the outer
block adds what it knows is intact.
"""

from __future__ import annotations

import contextlib
import errno
import os

CODES = (errno.ENOSPC, errno.EDQUOT)
_TEXTS = tuple(os.strerror(c) for c in CODES)


class DiskFull(OSError):
    """A write failed for lack of space; .path is what was being written, .intact what is safe."""

    def __init__(self, path, cause: str, intact: str = ""):
        super().__init__(errno.ENOSPC, cause, str(path))
        self.path, self.cause, self.intact = str(path), cause, intact

    def __str__(self) -> str:
        tail = f"; {self.intact}" if self.intact else ""
        return f"disk full writing {self.path} ({self.cause}){tail}. Free space, then run again"


def disk_full_cause(e: BaseException | None) -> BaseException | None:
    """The exception in e's chain that says the disk (or quota) is full, else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in CODES):
            return e
        if any(t in str(e) for t in _TEXTS):
            return e
        e = e.__cause__ or e.__context__
    return None


def as_disk_full(e: BaseException, path, intact: str = "") -> DiskFull | None:
    """DiskFull for `e` when its chain is a full disk: an inner DiskFull keeps its path."""
    cause = disk_full_cause(e)
    if cause is None:
        return None
    if isinstance(cause, DiskFull):
        return DiskFull(cause.path, cause.cause, intact or cause.intact)
    where = getattr(cause, "filename", None) or path
    text = next((t for t in _TEXTS if t in str(cause)), str(cause).splitlines()[0][:120])
    return DiskFull(where, text, intact)


@contextlib.contextmanager
def writing(path, intact: str = ""):
    """Re-raise a full disk inside the block as DiskFull(path or the file it names, intact)."""
    try:
        yield
    except Exception as e:
        full = as_disk_full(e, path, intact)
        if full is None:
            raise
        raise full from None


__all__ = ["CODES", "DiskFull", "as_disk_full", "disk_full_cause", "writing"]
