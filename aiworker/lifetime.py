"""Child processes that die with the node, even when the node is killed with -9.

The node's receiving and inference processes are its children. A child left running after
the node died would keep its port, its GPU memory and its job while a restarted node starts
another one, so each child calls :func:`die_with_parent` first: Linux sends it ``signal`` the
moment the thread that started it ends (``prctl(PR_SET_PDEATHSIG)``), and a watcher thread
ends it whenever its parent process is no longer ``parent_pid`` (a second line of defence,
for a kernel that did not take the first).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import threading

log = logging.getLogger("aiworker")

PR_SET_PDEATHSIG = 1
WATCH_S = 0.5  # how often the watcher looks at the parent


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Have this process end when its parent does: ``sig`` from the kernel at once, and an
    exit within :data:`WATCH_S` seconds should the parent change without it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        log.warning("cannot ask the kernel to end this process with its parent")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="lifeline",
                     daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit the process as soon as its parent is no longer ``parent_pid``."""
    while os.getppid() == parent_pid:
        threading.Event().wait(WATCH_S)
    os._exit(1)
