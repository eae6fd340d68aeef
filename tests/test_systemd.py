"""systemd's notify protocol: READY/STOPPING/STATUS datagrams and the watchdog cadence."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from relay_helpers import make_config

from relay_trio.server import RelayServer
from relay_trio.systemd import SystemdNotifier, socket_address, watchdog_interval


@attrs.define
class RecordingTransport:
    """Records (virtual time, datagram) pairs: no socket, for the autojump clock."""

    sent: list[tuple[float, bytes]] = attrs.field(factory=list)

    def send(self, datagram: bytes) -> None:
        self.sent.append((trio.current_time(), datagram))

    def close(self) -> None:
        pass


async def receive(sock: trio.socket.SocketType) -> str:
    with trio.fail_after(20):
        data = await sock.recv(4096)
    return data.decode()


async def test_ready_stopping_status_reach_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
        assert notifier.enabled and notifier.watchdog_interval is None
        assert notifier.ready("listening on http://127.0.0.1:1")
        assert notifier.status("busy")
        assert notifier.stopping("draining (SIGTERM)")
        assert await receive(sock) == "READY=1\nSTATUS=listening on http://127.0.0.1:1"
        assert await receive(sock) == "STATUS=busy"
        assert await receive(sock) == "STOPPING=1\nSTATUS=draining (SIGTERM)"
        assert notifier.sent == 3
        notifier.close()
        assert notifier.status("after close") is False


async def test_abstract_namespace_socket_name() -> None:
    name = f"relay-trio-test-{os.getpid()}"
    assert socket_address("@" + name) == b"\0" + name.encode()
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(b"\0" + name.encode())
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("up")
        assert await receive(sock) == "READY=1\nSTATUS=up"
        notifier.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = SystemdNotifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1"}).enabled is False


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.ready("up") is False
    assert notifier.failed == 1 and notifier.sent == 0
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "3000000"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env, 4242) == expected


async def test_watchdog_pings_every_half_period_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = RecordingTransport()
    notifier = SystemdNotifier(transport, 1.5)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog)
        await trio.sleep(7)
        nursery.cancel_scope.cancel()
    assert [t - start for t, _ in transport.sent] == [0.0, 1.5, 3.0, 4.5, 6.0]
    assert {data for _, data in transport.sent} == {b"WATCHDOG=1"}


async def test_no_watchdog_task_without_watchdog_usec(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = RecordingTransport()
    notifier = SystemdNotifier(transport, None)
    start = trio.current_time()
    await notifier.run_watchdog()  # returns at once
    assert trio.current_time() == start and transport.sent == []


async def test_server_notifies_ready_only_once_serving_then_stopping(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        config = make_config(tmp_path)
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
        server = RelayServer(config, notifier=notifier)
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(server.serve)
            ready = await receive(sock)
            assert ready == f"READY=1\nSTATUS=listening on {urls[0]}"
            server.relay.request_shutdown("test")
            assert await receive(sock) == "STOPPING=1\nSTATUS=draining (test)"
            assert await receive(sock) == "STATUS=stopping HTTP"
        notifier.close()


async def test_relay_trio_run_notifies_systemd(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        env = {**os.environ, "RELAY_TRIO_PORT": "0", "NOTIFY_SOCKET": path}
        env["WATCHDOG_USEC"] = "400000"
        env.pop("WATCHDOG_PID", None)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "relay_trio", "run"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            seen: list[str] = []
            while not any(m.startswith("READY=1") for m in seen):
                seen.append(await receive(sock))
            ready = next(m for m in seen if m.startswith("READY=1"))
            assert ready.startswith("READY=1\nSTATUS=listening on http://127.0.0.1:")
            # The watchdog pings at WATCHDOG_USEC / 2 = 0.2 s while the relay runs.
            while seen.count("WATCHDOG=1") < 3:
                seen.append(await receive(sock))
            proc.send_signal(signal.SIGTERM)
            while not any(m.startswith("STOPPING=1") for m in seen):
                seen.append(await receive(sock))
            assert "STOPPING=1\nSTATUS=draining (SIGTERM)" in seen
            with trio.fail_after(20):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
