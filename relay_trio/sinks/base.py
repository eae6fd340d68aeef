"""The side-sink port: a sink writes one pre-encoded JSON record (``bytes``, no newline) and is
driven by the side queue (:mod:`relay_trio.services.sidequeue`), never by the request path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

# Largest UDP payload IPv4 can carry (65535 - 8 byte UDP header - 20 byte IP header).
MAX_UDP_PAYLOAD = 65_507


class SideSink(Protocol):
    """Where side records go. One worker task calls ``write`` at a time, never concurrently."""

    name: str

    async def write(self, batch: Sequence[bytes]) -> None:
        """Deliver ``batch`` (pre-encoded JSON records, no trailing newline).

        May block for as long as it likes: the caller bounds it with a cancel scope.
        Raises on failure; returning means the sink accepted the whole batch.
        """
        ...

    async def aclose(self) -> None:
        """Release the sink's resources. Called once, after the last ``write``."""
        ...


@runtime_checkable
class SinkCounters(Protocol):
    """Optional: a sink with its own counters, merged into :meth:`SideQueue.stats`."""

    def counters(self) -> Mapping[str, int]: ...
