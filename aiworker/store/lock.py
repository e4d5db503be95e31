"""One node per data folder: an exclusive lock on ``<data_dir>/aiworker.lock``.

Two nodes on one folder would run two completion schedulers and two outboxes on one
database and spool. :class:`DataFolderLock` takes an ``flock`` on the folder's lock file
(the kernel releases it when the holder dies, however it dies) and writes who holds it: the
pid, host, command and start time. A node that cannot take it waits a few seconds (a killed
node's children may still be going away) and then stops with :class:`FolderInUse`, one line
naming the other process.

The node hands the lock to its inference process (:meth:`DataFolderLock.shared`): the child
holds the same lock, so while any process of an old node still runs, a new node cannot start
on the folder and run a job that process holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from datetime import UTC, datetime
from multiprocessing import reduction
from pathlib import Path

LOCK_FILE = "aiworker.lock"
WAIT_S = 5.0  # how long a start waits for the folder's holder to go away
POLL_S = 0.1


class FolderInUse(Exception):
    """Another live process holds the data folder."""


class DataFolderLock:
    """The exclusive lock on a data folder, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, wait_s: float = WAIT_S) -> None:
        """Take the lock, waiting up to ``wait_s`` seconds for its holder to let go; raises
        :class:`FolderInUse` naming the holder when it does not."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise FolderInUse(f"the data folder {self.path.parent} is in use by "
                                      f"{holder(self.path)}; stop it, or give this node "
                                      "its own storage.data_dir") from None
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_this_process()).encode() + b"\n")
        os.fsync(fd)
        self._fd = fd

    def shared(self) -> SharedLock:
        """The held lock, for a child process to hold too (passed to it at spawn)."""
        if self._fd is None:
            raise RuntimeError("the data folder lock is not held")
        return SharedLock(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SharedLock:
    """A held lock's file descriptor that a spawned child receives as its own copy (the
    same open file, so the same lock), and holds until it exits."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):  # spawn passes the descriptor itself, as it does for pipes
        return _received_lock, (reduction.DupFd(self.fd),)


def _received_lock(duplicated) -> SharedLock:
    return SharedLock(duplicated.detach())


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, in words (from what the holder wrote)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        named = (f"{info['command']} (pid {info['pid']} on {info['host']}, "
                 f"started {info['started']})")
    except (OSError, ValueError, KeyError):
        return "another process"
    if info["host"] == socket.gethostname() and not _alive(int(info["pid"])):
        return f"a process that {named} started, which has exited"
    return named


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _this_process() -> dict[str, str | int]:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.now(UTC).isoformat(timespec="seconds")}
