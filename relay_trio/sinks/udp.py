"""UDP sink: one datagram per record to ``HOST:PORT`` (bounded size, never blocks on a dead
collector).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from .base import MAX_UDP_PAYLOAD


@attrs.define(eq=False)
class UdpSink:
    """Sends one datagram per record to ``host:port`` (resolved once, on the first write).

    Records longer than ``max_datagram`` bytes are dropped and counted in ``oversized``,
    never fragmented or truncated: a partial JSON document is worse than none. Each
    ``sendto`` is a checkpoint and the queue's timeout bounds the whole batch.
    """

    host: str
    port: int
    max_datagram: int = attrs.field(default=65_000)
    name: str = "udp"
    oversized: int = attrs.field(default=0, init=False)
    sent: int = attrs.field(default=0, init=False)
    _sock: trio.socket.SocketType | None = attrs.field(default=None, init=False)
    _addr: Any = attrs.field(default=None, init=False)

    @max_datagram.validator
    def _check_max_datagram(self, _attribute: object, value: int) -> None:
        if not 1 <= value <= MAX_UDP_PAYLOAD:
            raise ValueError(f"max_datagram must be in 1..{MAX_UDP_PAYLOAD}, got {value}")

    async def write(self, batch: Sequence[bytes]) -> None:
        """Send each record as one datagram. Checkpoint; raises ``OSError`` on socket errors."""
        sock, addr = await self._socket()
        for record in batch:
            if len(record) > self.max_datagram:
                self.oversized += 1
                continue
            await sock.sendto(record, addr)
            self.sent += 1

    async def aclose(self) -> None:
        """Close the socket. Idempotent. Checkpoint."""
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()
        await trio.lowlevel.checkpoint()

    def counters(self) -> Mapping[str, int]:
        """Datagrams sent and records dropped for exceeding ``max_datagram``."""
        return {"oversized": self.oversized, "datagrams_sent": self.sent}

    async def _socket(self) -> tuple[trio.socket.SocketType, Any]:
        if self._sock is None:
            infos = await trio.socket.getaddrinfo(self.host, self.port, type=trio.socket.SOCK_DGRAM)
            if not infos:
                raise OSError(f"cannot resolve UDP target {self.host}:{self.port}")
            family, type_, proto, _canonname, sockaddr = infos[0]
            self._sock = trio.socket.socket(family, type_, proto)
            self._addr = sockaddr
        else:
            await trio.lowlevel.checkpoint()
        return self._sock, self._addr


def parse_udp_target(target: str) -> tuple[str, int]:
    """Parse ``side_udp`` (``HOST:PORT``, IPv6 as ``[::1]:514``). Raises ``ValueError``."""
    host, sep, port_text = target.strip().rpartition(":")
    if not sep or not host or not port_text:
        raise ValueError(f"side_udp must be HOST:PORT, got {target!r}")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")) or len(host) < 3:
            raise ValueError(f"side_udp has a malformed [IPv6] host: {target!r}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"side_udp IPv6 hosts must be bracketed, like [::1]:514; got {target!r}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"side_udp port must be a number, got {port_text!r} in {target!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"side_udp port must be in 1..65535, got {port} in {target!r}")
    return host, port
