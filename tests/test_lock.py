"""One node per data folder: the lock, its holder's description, and its hand-off to the
inference process (a child that outlives its node keeps the folder locked)."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from aiworker.store.lock import DataFolderLock, FolderInUse, SharedLock


def _hold_until_set(lock: SharedLock, release: multiprocessing.synchronize.Event) -> None:
    release.wait(30)


def test_a_second_lock_on_the_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = DataFolderLock(tmp_path)
    first.acquire()
    info = json.loads((tmp_path / "aiworker.lock").read_text())
    assert (info["pid"], info["host"]) == (os.getpid(), socket.gethostname())
    with pytest.raises(FolderInUse) as refused:
        DataFolderLock(tmp_path).acquire(wait_s=0.2)
    assert str(refused.value) == (
        f"the data folder {tmp_path} is in use by {info['command']} (pid {os.getpid()} on "
        f"{socket.gethostname()}, started {info['started']}); stop it, or give this node its "
        "own storage.data_dir")
    first.release()
    again = DataFolderLock(tmp_path)
    again.acquire(wait_s=0)
    again.release()


def test_a_spawned_child_holds_the_lock_after_its_parent_let_go(tmp_path: Path) -> None:
    lock = DataFolderLock(tmp_path)
    lock.acquire()
    context = multiprocessing.get_context("spawn")
    release = context.Event()
    child = context.Process(target=_hold_until_set, args=(lock.shared(), release))
    child.start()
    lock.release()
    try:
        with pytest.raises(FolderInUse):
            DataFolderLock(tmp_path).acquire(wait_s=0.3)
    finally:
        release.set()
        child.join(10)
    DataFolderLock(tmp_path).acquire(wait_s=5)  # free once the child has exited


def test_a_holder_whose_node_has_exited_is_named_as_left_over(tmp_path: Path) -> None:
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
    path = tmp_path / "aiworker.lock"
    path.write_text(json.dumps({"pid": int(exited.stdout), "host": socket.gethostname(),
                                "command": "aiworker serve", "started": "then"}))
    with open(path) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FolderInUse, match=r"in use by a process that aiworker serve "
                           rf"\(pid {exited.stdout.strip()} on .*\) started, which has exited"):
            DataFolderLock(tmp_path).acquire(wait_s=0.2)
