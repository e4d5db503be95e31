"""Where the node keeps its files under ``storage.data_dir``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class DataPaths:
    """The data dir's layout: ``spool/``, ``state.db``, ``quarantine/``."""

    root: Path

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"
