"""systemd's readiness protocol (``sd_notify``): READY, STOPPING, STATUS and watchdog pings.

With ``Type=notify`` systemd starts a unit's dependants only once the service says
``READY=1``, and with ``WatchdogSec=`` it restarts a service whose pings stop. The
protocol is one datagram per message on the ``AF_UNIX`` socket named by
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace); lines are
``KEY=value``. No libsystemd is needed.

Example::

    notifier = SystemdNotifier.from_environ()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run_watchdog)
        ...  # start every service
        notifier.ready("listening on http://127.0.0.1:8080")
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Protocol

import attrs
import trio

log = logging.getLogger("relay_trio.systemd")


class Transport(Protocol):
    """Where notifications go: one datagram per :meth:`send`."""

    def send(self, datagram: bytes) -> None:
        """Send one datagram without blocking; raise ``OSError`` when it cannot."""

    def close(self) -> None:
        """Release the socket (idempotent)."""


def socket_address(value: str) -> str | bytes:
    """The ``AF_UNIX`` address for a ``NOTIFY_SOCKET`` value: ``@name`` is abstract."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


@attrs.define(eq=False)
class UnixDatagramTransport:
    """Sends datagrams to ``address`` from one non-blocking ``AF_UNIX`` socket.

    A full receive queue (systemd not reading) raises ``BlockingIOError`` instead of
    blocking the event loop: the notifier logs it and carries on.
    """

    address: str | bytes
    sock: socket.socket = attrs.field(
        factory=lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    )

    def __attrs_post_init__(self) -> None:
        self.sock.setblocking(False)

    def send(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, self.address)

    def close(self) -> None:
        self.sock.close()


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as systemd advises.

    ``None`` when the watchdog is off, malformed, or meant for another process
    (``WATCHDOG_PID`` set to a different pid).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner is not None and owner != str(pid):
        return None
    return int(usec) / 1_000_000 / 2


@attrs.define(eq=False)
class SystemdNotifier:
    """Tells systemd (or whatever listens on ``NOTIFY_SOCKET``) about the service's state.

    Every method but :meth:`run_watchdog` is synchronous and never blocks. A notifier
    without a transport (no ``NOTIFY_SOCKET``) does nothing, so callers need no checks.
    """

    transport: Transport | None = None
    #: Seconds between watchdog pings; ``None`` = no watchdog.
    watchdog_interval: float | None = None
    sent: int = attrs.field(init=False, default=0)
    failed: int = attrs.field(init=False, default=0)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """A notifier for ``NOTIFY_SOCKET`` / ``WATCHDOG_USEC`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address:
            return cls()
        if not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET %r is not a unix socket: not notifying systemd", address)
            return cls()
        return cls(
            UnixDatagramTransport(socket_address(address)),
            watchdog_interval(env, os.getpid()),
        )

    @property
    def enabled(self) -> bool:
        """True when there is somewhere to send notifications."""
        return self.transport is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; ``False`` if it could not be sent.

        Never blocks and never raises: a lost notification is logged (once per failure
        streak), not fatal, because the relay serves fine without systemd hearing it.
        """
        if self.transport is None:
            return False
        try:
            self.transport.send("\n".join(lines).encode())
        except OSError as exc:
            if self.failed == 0:
                log.warning("cannot notify systemd: %s", exc)
            self.failed += 1
            return False
        self.failed = 0
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        """Every service is up: ``READY=1`` with a ``STATUS=`` line."""
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        """Shutdown has begun: ``STOPPING=1`` with a ``STATUS=`` line."""
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        """A free-form status line (shown by ``systemctl status``)."""
        return self.notify(f"STATUS={status}")

    def close(self) -> None:
        """Close the socket; later notifications are dropped silently."""
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    async def run_watchdog(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send ``WATCHDOG=1`` now and then every ``watchdog_interval`` seconds of Trio's
        clock, until cancelled. Returns at once when there is no watchdog.

        The pings come from the event loop itself, so a loop stalled for longer than
        ``WATCHDOG_USEC`` stops them and systemd restarts the service.
        """
        task_status.started()
        interval = self.watchdog_interval
        if interval is None or self.transport is None:
            return
        next_at = trio.current_time()
        while True:
            self.notify("WATCHDOG=1")
            # Fixed cadence on the clock: a late wake-up does not shift later pings.
            next_at += interval
            await trio.sleep_until(next_at)


__all__ = ["SystemdNotifier", "UnixDatagramTransport", "socket_address", "watchdog_interval"]
