"""The hypercorn quarantine: version gate, source hashes, all-or-nothing frames, no global state."""

from __future__ import annotations

import gc
import socket
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import cast

import pytest
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.events import RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from relay_helpers import make_config, running_server

import relay_trio.http.hypercorn_patch as patch
from relay_trio.http.hypercorn_patch import (
    RELIED_ON_SOURCES,
    FrontDoorPolicy,
    HypercornVersionError,
    RelayConnection,
    WriteWatchdog,
    check_hypercorn_version,
    source_hashes,
)
from relay_trio.server import RelayServer


def test_relied_on_hypercorn_sources_are_the_reviewed_ones() -> None:
    """Fails when hypercorn changes a function _hypercorn_patch copies, overrides or relies
    on: re-read it, adjust the module, then record the new hashes in RELIED_ON_SOURCES."""
    installed = dist_version("hypercorn")
    assert installed in RELIED_ON_SOURCES, f"hypercorn {installed} was never reviewed"
    assert source_hashes() == RELIED_ON_SOURCES[installed]


@pytest.mark.parametrize("text", ["0.16.9", "0.19.0", "1.0", "0.19.0rc1"])
def test_version_gate_refuses_untested_hypercorn(text: str) -> None:
    with pytest.raises(HypercornVersionError, match=f"hypercorn {text} is installed"):
        check_hypercorn_version(text)


@pytest.mark.parametrize("text", ["0.17.0", "0.17.3", "0.18.0", "0.18.9"])
def test_version_gate_accepts_tested_range(text: str) -> None:
    assert check_hypercorn_version(text) == text


async def test_server_refuses_to_start_on_untested_hypercorn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(patch, "dist_version", lambda _name: "0.19.0")
    server = RelayServer(make_config(tmp_path))
    with pytest.raises(HypercornVersionError, match=r"hypercorn 0\.19\.0 is installed"):
        await server.serve()
    assert server.urls == []


def _connection(sock: trio.socket.SocketType) -> RelayConnection:
    return RelayConnection(
        None,
        HyperConfig(),
        WorkerContext(None),
        ConnectionState({}),
        trio.SocketStream(sock),
        policy=FrontDoorPolicy(10.0, WriteWatchdog(10.0)),
    )


async def _read_all(sock: trio.socket.SocketType, into: bytearray) -> None:
    while chunk := await sock.recv(1 << 16):
        into += chunk


async def test_partial_write_is_finished_despite_cancellation() -> None:
    """The fast path wrote part of a frame; a cancellation pending at the lock's checkpoint
    must not drop the rest (the peer would read a torn frame)."""
    ours, peer = trio.socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn = _connection(ours)
    frame = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffer
    received = bytearray()
    with ours, peer, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_all, peer, received)
            with trio.CancelScope() as scope:
                scope.cancel()
                await conn.protocol_send(RawData(frame))
            ours.close()
    assert received == frame
    assert not conn.send_lock.locked()
    assert conn.policy.watchdog.writing == {}


async def test_cancelled_frame_behind_a_writer_is_sent_whole_or_not_at_all() -> None:
    """With another write in progress, a cancelled frame is not started at all."""
    ours, peer = trio.socket.socketpair()
    conn = _connection(ours)
    received = bytearray()
    with ours, peer, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_all, peer, received)
            await conn.send_lock.acquire()
            with trio.CancelScope() as scope:
                scope.cancel()
                await conn.protocol_send(RawData(b"second"))
            assert scope.cancelled_caught
            conn.send_lock.release()
            await conn.protocol_send(RawData(b"first"))
            ours.close()
    assert received == b"first"


async def test_watchdog_cut_during_finish_closes_the_connection() -> None:
    """A frame that cannot be finished (the peer stopped reading) is cut by the write
    deadline: the socket is closed, never left with a torn frame followed by more data."""
    ours, peer = trio.socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn = _connection(ours)
    closed: list[object] = []

    class Protocol:
        async def handle(self, event: object) -> None:
            closed.append(event)
            await trio.lowlevel.checkpoint()

    conn.protocol = cast(ProtocolWrapper, Protocol())
    with ours, peer, trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def cut_when_stuck() -> None:
                while not conn.policy.watchdog.writing:  # noqa: ASYNC110 - polling a dict
                    await trio.sleep(0.01)
                conn.policy.watchdog.sweep(trio.current_time(), older_than=0)

            nursery.start_soon(cut_when_stuck)
            await conn.protocol_send(RawData(b"x" * (1 << 20)))
        assert ours.fileno() == -1
    assert len(closed) == 1


async def test_serve_leaves_gc_settings_and_hypercorn_alone(tmp_path: Path) -> None:
    thresholds = gc.get_threshold()
    frozen = gc.get_freeze_count()
    protocol_send = TCPServer.protocol_send
    read_data = TCPServer._read_data
    async with running_server(make_config(tmp_path)) as (_server, client):
        assert (await client.get("/healthz")).status_code == 200
        assert gc.get_threshold() == thresholds
        assert gc.get_freeze_count() == frozen
    assert gc.get_threshold() == thresholds
    assert TCPServer.protocol_send is protocol_send
    assert TCPServer._read_data is read_data
