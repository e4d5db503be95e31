"""Free space on the disk that holds a folder of the data dir."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def free_mb(folder: Path) -> int:
    """Free megabytes on the file system of ``folder`` (or of its nearest existing parent,
    for a folder not made yet)."""
    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    return shutil.disk_usage(where).free // (1024 * 1024)


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error is the disk (or the quota) being full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS
