"""Who may associate: the ``node.allowed_callers`` allow-list."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from aiworker.config import AllowedCaller


@dataclass(frozen=True)
class AllowList:
    """Calling AE titles, each optionally bound to the addresses its host name resolves to.

    An empty list allows every caller.
    """

    entries: tuple[tuple[str, frozenset[str] | None], ...]

    @classmethod
    def from_config(cls, callers: list[AllowedCaller]) -> AllowList:
        return cls(tuple((c.ae_title.strip(), _addresses(c.host)) for c in callers))

    def allows(self, ae_title: str, address: str) -> bool:
        if not self.entries:
            return True
        ae_title = ae_title.strip()
        return any(
            title == ae_title and (hosts is None or address in hosts)
            for title, hosts in self.entries
        )


def _addresses(host: str | None) -> frozenset[str] | None:
    """Every IP address ``host`` names (itself when it is an address and does not resolve)."""
    if host is None:
        return None
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return frozenset({host})
    return frozenset({host} | {info[4][0] for info in infos})
