"""Writing a file so that a reader never sees half of it."""

from __future__ import annotations

import os
from pathlib import Path

from aiworker.store.spool import fsync_path


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` under a temporary name beside ``path``, flush it to disk, and rename
    it into place (text as UTF-8)."""
    path = Path(path)
    partial = path.with_name(f"partial-{path.name}")
    partial.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    fsync_path(partial)
    os.replace(partial, path)
