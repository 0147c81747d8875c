"""One owner per run directory: a lock file naming the live run (pid, host, start time).

    lock = RunLock.acquire(out_dir)   # RunLocked (one line naming the owner) while one lives
    ...
    lock.release()

Two runs on one out_dir would interleave metrics.jsonl and read each other's checkpoint
pruning as damage, so the second is refused before it reads anything there. A lock whose pid
is dead on this host is stale (a kill -9, a crash): it is taken over, with a note. A lock held
on another host cannot be tested, so it is refused with the file to delete if that run is
gone. The file is created with O_EXCL: of two runs starting at once, exactly one wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from moka_jax.support.outputs import LOCK, OutputError


class RunLocked(OutputError):
    """The run directory is held by another live process."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _owner_line(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) \
        if isinstance(started, int | float) else "an unknown time"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {when}"


def read_lock(out_dir) -> dict | None:
    """The owner recorded in out_dir's lock, {} when the file is unreadable, None when absent."""
    try:
        owner = json.loads((Path(out_dir) / LOCK).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _stale(owner: dict) -> bool:
    pid = owner.get("pid")
    return owner.get("host") == socket.gethostname() and isinstance(pid, int) \
        and pid != os.getpid() and not _alive(pid)


class RunLock:
    def __init__(self, path: Path, owner: dict, created: bool = False):
        self.path, self.owner, self.created = path, owner, created

    @classmethod
    def acquire(cls, out_dir, *, note=lambda line: print(f"[moka_jax] {line}")) -> RunLock:
        """Take out_dir's lock (creating out_dir), or raise RunLocked naming the owner.
        The same process may take it again (a library caller running one config twice)."""
        out_dir = Path(out_dir)
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):  # a stale lock removed between two tries: try again
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_lock(out_dir)
                if owner is None:
                    continue
                if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                    return cls(path, owner)
                if not owner:
                    raise RunLocked(
                        f"{out_dir} is locked by {path}, which is unreadable; if no run is "
                        "using this directory, delete that file and start again") from None
                if not _stale(owner):
                    raise RunLocked(
                        f"{out_dir} is in use by another run ({_owner_line(owner)}); wait for "
                        "it to finish or stop it, or use another train.out_dir"
                        + ("" if owner.get("host") == me["host"] else
                           f"; if that run is gone, delete {path}")) from None
                note(f"{out_dir}: taking over the lock of a run that is gone "
                     f"({_owner_line(owner)})")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return cls(path, me, created)
        raise RunLocked(f"{out_dir}: could not take the lock {path}; another run is starting "
                        "there. Try again, or use another train.out_dir")

    def release(self) -> None:
        """Remove the lock if it is still this process's, and the directory when taking the
        lock created it and nothing was written there since (a run refused by its plan)."""
        if (read_lock(self.path.parent) or {}).get("pid") == self.owner.get("pid"):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self.created:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # fails, as it should, unless empty


__all__ = ["LOCK", "RunLock", "RunLocked", "read_lock"]
