# -*- test-case-name: tests.test_limits -*-
"""
Connection counting shared by every listener (DESIGN.md §5): a total and a per-client limit,
where a client is an IPv4 address or an IPv6 /64 (one customer's prefix).
"""

from __future__ import annotations

import ipaddress


def client_key(host: str) -> str:
    """The unit that per-client limits count: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class ConnectionLimiter:
    """
    Counts open connections in total and per client.

    @ivar total: connections open now.
    """

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self._per_client: dict[str, int] = {}

    def acquire(self, host: str) -> str | None:
        """
        Count a new connection from C{host}.

        @return: C{None} if it may go on (then call L{release} when it ends), or the reason it
            may not (C{"total"} or C{"per-client"}).
        """
        if self.total >= self.max_total:
            return "total"
        key = client_key(host)
        n = self._per_client.get(key, 0)
        if n >= self.max_per_client:
            return "per-client"
        self._per_client[key] = n + 1
        self.total += 1
        return None

    def release(self, host: str) -> None:
        """A connection counted by L{acquire} has ended."""
        key = client_key(host)
        n = self._per_client.get(key, 0)
        if n <= 1:
            self._per_client.pop(key, None)
        else:
            self._per_client[key] = n - 1
        self.total = max(0, self.total - 1)
