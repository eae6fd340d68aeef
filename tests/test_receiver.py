"""StreamReceiver over real sockets: TCP on 127.0.0.1 port 0 and a Unix socket in tmp_path."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from relay_helpers import FakeAdmitter

from relay_trio.core.listen import parse_listen
from relay_trio.core.model import Accepted, Problem
from relay_trio.stream.receiver import ReceiverLimits, StreamReceiver

TCP_ANY = "tcp://127.0.0.1:0"


def report(rid: str = "vm-1") -> bytes:
    return orjson.dumps({"resource_id": rid, "payload": {"n": 1}}) + b"\n"


@asynccontextmanager
async def serving(rx: StreamReceiver, *, wall_limit: float = 10) -> AsyncIterator[list[str]]:
    """Run ``rx`` for the body; drain it afterwards. A hang fails the test."""
    with trio.fail_after(wall_limit):
        async with trio.open_nursery() as nursery:
            bound: list[str] = await nursery.start(rx.run)
            yield bound
            await rx.drain(1)


async def connect(url: str) -> trio.SocketStream:
    if url.startswith("unix://"):
        return await trio.open_unix_socket(url.removeprefix("unix://"))
    address = parse_listen(url)
    return await trio.open_tcp_stream(address.host, address.port)


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = b""

    async def lines(self, n: int) -> list[dict[str, Any]]:
        while self.buf.count(b"\n") < n:
            chunk = await self.stream.receive_some()
            assert chunk, f"closed with {self.buf!r} after fewer than {n} lines"
            self.buf += chunk
        *out, self.buf = self.buf.split(b"\n", n)
        return [orjson.loads(line) for line in out]

    async def rest(self) -> list[dict[str, Any]]:
        """All remaining lines, until the relay closes the connection.

        When the relay closes without reading what we sent (refusal, 413, bad token), the
        kernel answers with a reset after the data: Linux still delivers the reply lines
        first, then ECONNRESET instead of EOF.
        """
        try:
            while chunk := await self.stream.receive_some():
                self.buf += chunk
        except trio.BrokenResourceError:
            pass
        out, self.buf = self.buf.splitlines(), b""
        return [orjson.loads(line) for line in out]


async def test_many_lines_on_one_connection_answered_in_order() -> None:
    admitter = FakeAdmitter(limit_every=7)
    rx = StreamReceiver([parse_listen(TCP_ANY)], admitter, ReceiverLimits())
    async with serving(rx) as bound:
        assert bound == rx.bound
        assert bound[0].startswith("tcp://127.0.0.1:") and not bound[0].endswith(":0")
        stream = await connect(bound[0])
        reader = LineReader(stream)
        total = 2000
        # Several sends of different sizes so lines straddle read boundaries.
        payload = b"".join(report(f"vm-{i}") for i in range(total))
        for start in range(0, len(payload), 10_007):
            await stream.send_all(payload[start : start + 10_007])
        replies = await reader.lines(total)
        await stream.aclose()
    for n, reply in enumerate(replies, start=1):
        if n % 7 == 0:
            assert reply["status"] == 429
            assert reply["retry_after"] == 30.0
            assert reply["type"].endswith("/rate-limited")
        else:
            assert reply == {"message_id": f"vm-{n - 1}:{n}", "line": n}
    assert [reply["line"] for reply in replies] == list(range(1, total + 1))
    assert [obj["resource_id"] for obj in admitter.seen] == [f"vm-{i}" for i in range(total)]  # type: ignore[index]
    assert (rx.lines_ok, rx.lines_rejected) == (total - total // 7, total // 7)


async def test_garbage_lines_get_400_and_connection_keeps_working(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/relay.sock"
    rx = StreamReceiver([parse_listen(url)], FakeAdmitter(), ReceiverLimits())
    async with serving(rx) as bound:
        assert bound == [url]
        stream = await connect(url)
        reader = LineReader(stream)
        await stream.send_all(b"not json\n" + report("a") + b'\n\n{"resource_id":\n')
        first = await reader.lines(3)
        await stream.send_all(b"\xff\xfe\n" + b'{"payload": 1}\n' + report("b"))
        second = await reader.lines(3)
        await stream.aclose()
    assert [r.get("status") for r in first + second] == [400, None, 400, 400, 422, None]
    assert first[0]["type"].endswith("/malformed-json")
    # Blank lines 3 and 4 get no reply; numbering still counts them.
    assert [r["line"] for r in first + second] == [1, 2, 5, 6, 7, 8]
    assert second[2] == {"message_id": "b:3", "line": 8}
    assert not await trio.Path(url.removeprefix("unix://")).exists(), "socket file left behind"


async def test_oversized_frame_answered_413_without_buffering_it() -> None:
    limits = ReceiverLimits(max_frame=64 * 1024, read_chunk=16 * 1024)
    rx = StreamReceiver([parse_listen(TCP_ANY)], FakeAdmitter(), limits)
    async with serving(rx) as bound:
        stream = await connect(bound[0])
        reader = LineReader(stream)
        await stream.send_all(report("ok"))
        assert await reader.lines(1) == [{"message_id": "ok:1", "line": 1}]

        async def flood() -> None:
            # 8 MiB with no newline; the relay must stop reading long before the end.
            chunk = b"x" * (256 * 1024)
            try:
                for _ in range(32):
                    await stream.send_all(chunk)
            except trio.BrokenResourceError:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            replies = await reader.rest()
            nursery.cancel_scope.cancel()
        await stream.aclose()
    assert [(r["status"], r["line"]) for r in replies] == [(413, 2)]
    assert replies[0]["detail"] == "limit is 65536 bytes"
    assert rx.frames_too_large == 1
    assert rx.buffer_high_water <= limits.max_frame + limits.read_chunk
    assert rx.connections_open == 0


async def test_idle_connection_closed_at_deadline() -> None:
    rx = StreamReceiver([parse_listen(TCP_ANY)], FakeAdmitter(), ReceiverLimits(idle_timeout=0.3))
    async with serving(rx) as bound:
        stream = await connect(bound[0])
        start = trio.current_time()
        replies = await LineReader(stream).rest()
        elapsed = trio.current_time() - start
        await stream.aclose()
    assert [r["status"] for r in replies] == [408]
    assert 0.25 <= elapsed < 3
    assert rx.idle_timeouts == 1


async def test_connection_cap_refuses_with_reason() -> None:
    limits = ReceiverLimits(max_connections=2, slot_wait=0.3)
    rx = StreamReceiver([parse_listen(TCP_ANY)], FakeAdmitter(), limits)
    async with serving(rx) as bound:
        holders = [await connect(bound[0]) for _ in range(2)]
        for i, holder in enumerate(holders):
            await holder.send_all(report(f"h{i}"))
            assert len(await LineReader(holder).lines(1)) == 1
        assert rx.connections_open == 2

        extra = await connect(bound[0])
        await extra.send_all(report("late"))
        refused = await LineReader(extra).rest()
        await extra.aclose()

        # The freed slot is taken by a new connection within its slot_wait.
        await holders[0].aclose()
        again = await connect(bound[0])
        await again.send_all(report("again"))
        accepted = await LineReader(again).lines(1)
        for stream in (again, holders[1]):
            await stream.aclose()
    assert [r["status"] for r in refused] == [503]
    assert refused[0]["type"].endswith("/too-many-connections")
    assert "2 connection slots busy" in refused[0]["detail"]
    assert rx.connections_refused == 1
    assert "message_id" in accepted[0]


async def test_token_required_on_every_listener(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="relay_trio")
    unix_url = f"unix://{tmp_path}/auth.sock"
    admitter = FakeAdmitter()
    rx = StreamReceiver(
        [parse_listen(unix_url), parse_listen(TCP_ANY)],
        admitter,
        ReceiverLimits(),
        token="s3cret-token",
    )
    async with serving(rx) as bound:
        good_replies = []
        for url in bound:
            good = await connect(url)
            # Blank keepalive lines may come before the handshake; they keep their number.
            await good.send_all(b'\n{"token": "s3cret-token"}\n' + report("a"))
            good_replies.append(await LineReader(good).lines(2))
            await good.aclose()

        bad_replies = []
        for url in bound:
            for first_line in (
                b'{"token": "wrong"}\n',
                report("b"),
                b"garbage\n",
                b'{"token": 1}\n',
                b'{"token": "s3cret-token-and-more"}\n',
            ):
                bad = await connect(url)
                await bad.send_all(first_line + report("c"))
                bad_replies.append(await LineReader(bad).rest())
                await bad.aclose()
    for replies in good_replies:
        assert replies == [
            {"ok": True, "line": 2},
            {"message_id": replies[1]["message_id"], "line": 3},
        ]
    assert len(bad_replies) == 10
    for replies in bad_replies:
        assert [(r["status"], r["line"]) for r in replies] == [(401, 1)]
    assert [obj["resource_id"] for obj in admitter.seen] == ["a", "a"]  # type: ignore[index]
    assert rx.auth_failures == 10
    assert "s3cret-token" not in caplog.text
    assert "s3cret-token" not in repr(rx)


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        StreamReceiver([parse_listen(TCP_ANY)], FakeAdmitter(), ReceiverLimits(), token="")


async def test_stop_accepting_and_drain() -> None:
    rx = StreamReceiver([parse_listen(TCP_ANY)], FakeAdmitter(), ReceiverLimits())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound: list[str] = await nursery.start(rx.run)
            idle = await connect(bound[0])
            await idle.send_all(report())
            reader = LineReader(idle)
            assert len(await reader.lines(1)) == 1
            rx.stop_accepting()
            # The idle connection is told why and closed, well before its idle timeout.
            goodbye = await reader.rest()
            await idle.aclose()
            with pytest.raises(OSError):
                await connect(bound[0])
            await rx.drain(5)
        # run() returned by itself: listeners closed and no connection left.
    assert [r["type"].rsplit("/")[-1] for r in goodbye] == ["shutting-down"]
    assert rx.connections_open == 0


async def test_stale_unix_socket_file_is_replaced_and_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # leaves the file behind, as a crashed relay would
    url = f"unix://{path}"
    rx = StreamReceiver([parse_listen(url)], FakeAdmitter(), ReceiverLimits())
    async with serving(rx):
        other = StreamReceiver([parse_listen(url)], FakeAdmitter(), ReceiverLimits())
        with pytest.raises(OSError, match="in use by a live listener"):
            await other.run()
        stream = await connect(url)
        await stream.send_all(report())
        assert await LineReader(stream).lines(1) == [{"message_id": "vm-1:1", "line": 1}]
        await stream.aclose()


async def test_vsock_listener_binds_or_is_skipped_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="relay_trio")
    rx = StreamReceiver(
        [parse_listen("vsock://any:any"), parse_listen(TCP_ANY)], FakeAdmitter(), ReceiverLimits()
    )
    async with serving(rx) as bound:
        tcp = [b for b in bound if b.startswith("tcp://")]
        vsock = [b for b in bound if b.startswith("vsock://")]
        assert len(tcp) == 1
    warnings = [r for r in caplog.records if "vsock://any:any" in r.getMessage()]
    if vsock:
        assert vsock[0].startswith("vsock://any:") and not vsock[0].endswith(":any")
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert "skipping" in warnings[0].getMessage()


@attrs.define(eq=False)
class ExplodingAdmitter(FakeAdmitter):
    def admit(self, obj: object) -> Accepted | Problem:
        if isinstance(obj, dict) and obj.get("resource_id") == "boom":
            raise RuntimeError("admitter bug")
        return super().admit(obj)


async def test_a_failing_connection_does_not_take_down_the_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="relay_trio")
    rx = StreamReceiver([parse_listen(TCP_ANY)], ExplodingAdmitter(), ReceiverLimits())
    async with serving(rx) as bound:
        survivor = await connect(bound[0])
        victim = await connect(bound[0])
        await victim.send_all(report("boom"))
        assert await LineReader(victim).rest() == []
        await victim.aclose()
        await survivor.send_all(report("fine"))
        assert await LineReader(survivor).lines(1) == [{"message_id": "fine:1", "line": 1}]
        await survivor.aclose()
    assert "admitter bug" in caplog.text
