"""StreamReceiver.handle_stream on in-memory streams, in virtual time (autojump clock)."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from relay_helpers import FakeAdmitter

from relay_trio.core.identity import Identity
from relay_trio.stream.receiver import ReceiverLimits, StreamReceiver

TCP = Identity(listen="tcp://127.0.0.1:0", peer="test")


def report(rid: str = "vm-1", **extra: Any) -> bytes:
    return orjson.dumps({"resource_id": rid, "payload": {"n": 1}, **extra}) + b"\n"


async def read_reply_lines(stream: trio.abc.ReceiveStream) -> list[dict[str, Any]]:
    """Everything the relay sends until it closes the connection."""
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return [orjson.loads(line) for line in data.splitlines()]


async def read_n_lines(stream: trio.abc.ReceiveStream, n: int) -> list[dict[str, Any]]:
    data = b""
    while data.count(b"\n") < n:
        chunk = await stream.receive_some()
        assert chunk, f"closed after {len(data.splitlines())} of {n} lines"
        data += chunk
    return [orjson.loads(line) for line in data.splitlines()]


def receiver(admitter: FakeAdmitter | None = None, **limits: Any) -> StreamReceiver:
    return StreamReceiver([], admitter or FakeAdmitter(), ReceiverLimits(**limits))


async def test_idle_connection_closed_exactly_at_deadline(autojump_clock: trio.abc.Clock) -> None:
    rx = receiver()
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, server, TCP)
        replies = await read_reply_lines(client)
        assert trio.current_time() == 10
    assert [r["status"] for r in replies] == [408]
    assert replies[0]["type"].endswith("/idle-timeout")
    assert rx.idle_timeouts == 1
    assert rx.connections_open == 0


async def test_complete_line_resets_idle_deadline(autojump_clock: trio.abc.Clock) -> None:
    rx = receiver()
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, server, TCP)
        await trio.sleep(4)
        await client.send_all(report())
        await trio.sleep(4)
        await client.send_all(b"\n")  # a blank line is a keepalive
        replies = await read_reply_lines(client)
        assert trio.current_time() == 18
    assert [r.get("status") for r in replies] == [None, 408]


async def test_partial_line_does_not_reset_idle_deadline(autojump_clock: trio.abc.Clock) -> None:
    """A slowloris dribbling bytes without a newline is cut off at the same deadline."""
    rx = receiver()
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, server, TCP)
        for _ in range(3):
            await trio.sleep(3)
            await client.send_all(b'{"res')
        replies = await read_reply_lines(client)
        assert trio.current_time() == 10
    assert [r["status"] for r in replies] == [408]


async def test_slot_wait_refuses_exactly_after_slot_wait(autojump_clock: trio.abc.Clock) -> None:
    rx = receiver(max_connections=1, idle_timeout=100)
    holder, holder_server = trio.testing.memory_stream_pair()
    waiter, waiter_server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, holder_server, TCP)
        await trio.testing.wait_all_tasks_blocked()
        assert rx.connections_open == 1
        nursery.start_soon(rx.handle_stream, waiter_server, TCP)
        replies = await read_reply_lines(waiter)
        assert trio.current_time() == 5
        assert rx.connections_refused == 1
        await holder.aclose()
    assert len(replies) == 1
    assert replies[0]["status"] == 503
    assert replies[0]["type"].endswith("/too-many-connections")
    assert "slots busy for 5s" in replies[0]["detail"]


async def test_slot_freed_during_wait_is_taken(autojump_clock: trio.abc.Clock) -> None:
    rx = receiver(max_connections=1, idle_timeout=100)
    holder, holder_server = trio.testing.memory_stream_pair()
    waiter, waiter_server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, holder_server, TCP)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(rx.handle_stream, waiter_server, TCP)
        await trio.sleep(2)
        await holder.aclose()
        await waiter.send_all(report())
        replies = await read_n_lines(waiter, 1)
        assert trio.current_time() == 2
        assert replies == [{"message_id": "vm-1:1", "line": 1}]
        await waiter.aclose()
    assert rx.connections_refused == 0


async def test_waiting_connections_are_bounded(autojump_clock: trio.abc.Clock) -> None:
    rx = receiver(max_connections=1, max_waiting=1, idle_timeout=100)
    streams = [trio.testing.memory_stream_pair() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for _, server in streams[:2]:
            nursery.start_soon(rx.handle_stream, server, TCP)
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(rx.handle_stream, streams[2][1], TCP)
        replies = await read_reply_lines(streams[2][0])
        assert trio.current_time() == 0  # refused at once, no slot_wait
        nursery.cancel_scope.cancel()
    assert replies[0]["status"] == 503
    assert "already waiting" in replies[0]["detail"]


async def test_vsock_identity_binds_resource_ids(autojump_clock: trio.abc.Clock) -> None:
    admitter = FakeAdmitter()
    rx = receiver(admitter)
    client, server = trio.testing.memory_stream_pair()
    vm = Identity(listen="vsock://any:1024", peer="vsock://42:5000", cid=42)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, server, vm)
        await client.send_all(
            report("vm-1:42")
            + report("42")
            + report("vm-1:43")
            + report("vm-1:142")
            + b'{"resource_id": 42, "payload": 1}\n'
            + b"[1, 2]\n"
        )
        replies = await read_n_lines(client, 6)
        await client.aclose()
    assert [r.get("status") for r in replies] == [None, None, 403, 403, 422, 422]
    assert replies[2]["type"].endswith("/identity-mismatch")
    # Rejected identities never reach admission (no rate-limit tokens spent on them).
    assert admitter.seen == [
        {"resource_id": "vm-1:42", "payload": {"n": 1}},
        {"resource_id": "42", "payload": {"n": 1}},
        {"resource_id": 42, "payload": 1},
        [1, 2],
    ]
    assert (rx.lines_ok, rx.lines_rejected) == (2, 4)


@pytest.mark.parametrize("cid", [0, 1, 2])
async def test_host_and_hypervisor_cids_refused_at_connect(
    autojump_clock: trio.abc.Clock, cid: int
) -> None:
    admitter = FakeAdmitter()
    rx = receiver(admitter, max_connections=1)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, server, Identity("vsock://any:1024", cid=cid))
        await client.send_all(report(str(cid)))
        replies = await read_reply_lines(client)
        assert trio.current_time() == 0
    assert [r["status"] for r in replies] == [403]
    assert f"CID {cid}" in replies[0]["detail"]
    assert admitter.seen == []
    assert rx.connections_refused == 1


@attrs.define(eq=False)
class CountingStream(trio.abc.Stream):
    """Wraps a stream and records each send_all payload."""

    inner: trio.abc.Stream
    writes: list[bytes] = attrs.field(factory=list)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_lines_read_together_are_answered_in_one_write(
    autojump_clock: trio.abc.Clock,
) -> None:
    rx = receiver(FakeAdmitter(limit_every=10))
    client, server = trio.testing.memory_stream_pair()
    counting = CountingStream(server)
    lines = b"".join(report(f"vm-{i}") for i in range(200))
    assert len(lines) < 64 * 1024
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, counting, TCP)
        await client.send_all(lines)
        replies = await read_n_lines(client, 200)
        await client.aclose()
    assert len(counting.writes) == 1
    assert counting.writes[0].count(b"\n") == 200
    for i, reply in enumerate(replies, start=1):
        if i % 10 == 0:
            assert reply["status"] == 429
            assert reply["retry_after"] == 30.0
        else:
            assert reply == {"message_id": f"vm-{i - 1}:{i}", "line": i}


async def test_client_that_stops_reading_is_cut_at_write_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    rx = receiver()
    # lockstep: send_all blocks until the peer receives, like a full socket buffer.
    client, server = trio.testing.lockstep_stream_pair()
    ended_at: list[float] = []

    async def serve() -> None:
        await rx.handle_stream(server, TCP)
        ended_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(report())  # its reply is never read
        await trio.sleep(100)
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(report())
    assert ended_at == [10]
    assert rx.connections_open == 0


async def test_stop_accepting_lets_current_line_finish(autojump_clock: trio.abc.Clock) -> None:
    rx = receiver(idle_timeout=100)
    idle, idle_server = trio.testing.memory_stream_pair()
    busy, busy_server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, idle_server, TCP)
        nursery.start_soon(rx.handle_stream, busy_server, TCP)
        await busy.send_all(report()[:10])  # mid-line
        await trio.testing.wait_all_tasks_blocked()
        rx.stop_accepting()
        assert [r["type"].rsplit("/")[-1] for r in await read_reply_lines(idle)] == [
            "shutting-down"
        ]
        await trio.sleep(1)
        await busy.send_all(report()[10:])
        replies = await read_reply_lines(busy)
        assert trio.current_time() == 1
    assert [r.get("status") for r in replies] == [None, 503]


async def test_drain_cancels_stragglers_after_timeout(autojump_clock: trio.abc.Clock) -> None:
    rx = receiver(idle_timeout=100)
    stuck, stuck_server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, stuck_server, TCP)
        await stuck.send_all(b'{"resource_id": "vm-1"')  # never finished
        await trio.testing.wait_all_tasks_blocked()
        await rx.drain(3)
        assert trio.current_time() == 3
        assert await stuck.receive_some() == b""
    assert rx.connections_open == 0


async def test_token_then_reports(autojump_clock: trio.abc.Clock) -> None:
    url = "tcp://127.0.0.1:9000"
    admitter = FakeAdmitter()
    rx = StreamReceiver([], admitter, ReceiverLimits(), token="s3cret")
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, server, Identity(listen=url))
        await client.send_all(b'{"token": "s3cret"}\n' + report())
        replies = await read_n_lines(client, 2)
        await client.aclose()
    assert replies == [{"ok": True, "line": 1}, {"message_id": "vm-1:1", "line": 2}]


async def test_report_before_handshake_is_refused_and_not_admitted(
    autojump_clock: trio.abc.Clock,
) -> None:
    admitter = FakeAdmitter()
    refused: list[str] = []
    rx = StreamReceiver(
        [], admitter, ReceiverLimits(), token="s3cret", count_refused=refused.append
    )
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.handle_stream, server, TCP)
        await client.send_all(report() + b'{"token": "s3cret"}\n' + report())
        replies = await read_reply_lines(client)
        assert trio.current_time() == 0
    assert [(r["status"], r["line"]) for r in replies] == [(401, 1)]
    assert admitter.seen == []
    assert refused == ["unauthorized"]


def _frame_bodies() -> st.SearchStrategy[list[bytes]]:
    good = st.builds(report, st.sampled_from(["a", "b", "vm-1:7"]))
    bad = st.sampled_from([b"nope\n", b"{}\n", b"\n", b"  \r\n", b"[1]\n", b'{"x":\n'])
    return st.lists(st.one_of(good, bad), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(lines=_frame_bodies(), cuts=st.lists(st.integers(min_value=0, max_value=2000)))
async def test_replies_do_not_depend_on_how_bytes_are_split(
    lines: list[bytes], cuts: list[int]
) -> None:
    """However TCP splits the bytes, the reply lines are the same as for one write."""
    data = b"".join(lines)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})

    async def replies_for(pieces: list[bytes]) -> list[dict[str, Any]]:
        rx = receiver(read_chunk=7)
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rx.handle_stream, server, TCP)
            for piece in pieces:
                await client.send_all(piece)
                await trio.testing.wait_all_tasks_blocked()
            await client.send_eof()
            return await read_reply_lines(client)

    whole = await replies_for([data])
    split = await replies_for([data[a:b] for a, b in itertools.pairwise(points)])
    assert split == whole
    assert len(whole) == sum(1 for line in lines if line.strip())
