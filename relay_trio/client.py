"""Client side of the CLI: follow the event stream (``tail``) and push reports (``send``)."""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing
from typing import Any

import attrs
import httpx
import orjson
import trio

from .core.listen import parse_listen

log = logging.getLogger("relay_trio.client")


@attrs.frozen
class SseEvent:
    """One parsed SSE frame."""

    event: str
    data: str
    id: str | None = None


def describe(event: SseEvent) -> str:
    """One terminal line for ``relay-trio tail``: ``<id> <event> [@<instance>] <data>``.

    The producing instance (cluster mode: every event carries it) is shown after the event
    name; frames whose data is not a JSON object with an ``instance`` show none. Never raises.
    """
    line = f"{event.id or '-'} {event.event}"
    try:
        body = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        body = None
    instance = body.get("instance") if isinstance(body, dict) else None
    if isinstance(instance, str):
        line += f" @{instance}"
    return f"{line} {event.data}"


async def parse_sse(lines: AsyncIterator[str]) -> AsyncGenerator[SseEvent, None]:
    """Turn SSE lines into events; comments (heartbeats) are skipped."""
    name, event_id = "message", None
    data: list[str] = []
    async for line in lines:
        if line == "":
            if data:
                yield SseEvent(name, "\n".join(data), event_id)
            name, data, event_id = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                event_id = value


async def follow_events(
    url: str,
    on_event: Callable[[SseEvent], bool | None],
    *,
    topic: str | None = None,
    token: str | None = None,
    last_event_id: str | None = None,
    max_backoff: float = 10.0,
) -> None:
    """Follow ``url``'s event stream, resuming with ``Last-Event-ID`` after a disconnect.

    ``on_event`` returns True to stop. Reconnects with capped exponential backoff; stops
    on a ``shutdown`` event only if ``on_event`` says so. Runs until stopped or cancelled.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params = {"topic": topic} if topic else {}
    backoff = 0.5
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), timeout=httpx.Timeout(10, read=None)
    ) as client:
        while True:
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            try:
                async with client.stream(
                    "GET", "/v1/events/stream", params=params, headers=headers
                ) as response:
                    if response.status_code != 200:
                        body = await response.aread()
                        log.warning(
                            "stream refused: HTTP %s %s",
                            response.status_code,
                            body[:200].decode(errors="replace"),
                        )
                    else:
                        backoff = 0.5
                        async with aclosing(parse_sse(response.aiter_lines())) as events:
                            async for event in events:
                                if event.id is not None:
                                    last_event_id = event.id
                                if on_event(event):
                                    return
            except httpx.HTTPError as exc:
                log.warning("stream interrupted (%s); reconnecting", type(exc).__name__)
            await trio.sleep(backoff)
            backoff = min(max_backoff, backoff * 2)


@attrs.define(eq=False)
class SendSummary:
    """What ``relay-trio send`` did."""

    read: int = 0
    admitted: int = 0
    retried: int = 0
    rejected: Counter[str] = attrs.field(factory=Counter)

    def line(self) -> str:
        """One line for a person: what was read and what became of it."""
        if self.read == 0:
            return "read 0 reports: nothing to send"
        rejected = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items())) or "none"
        return f"read {self.read}, admitted {self.admitted}, retried {self.retried}, rejected: {rejected}"


def _reason(reply: dict[str, Any]) -> str:
    if "message_id" in reply:
        return "admitted"
    return str(reply.get("reason") or reply.get("type", "error").rsplit("/", 1)[-1])


def _in_line_order(replies: list[dict[str, Any]], first: int, count: int) -> list[dict[str, Any]]:
    """The replies to input lines ``first .. first + count - 1``, in that order.

    Every reply names its input line (``line``); a line without one is the relay's notice
    that it is closing the connection (idle timeout, shutdown), raised as ConnectionError.
    """
    by_line: dict[int, dict[str, Any]] = {}
    for reply in replies:
        line = reply.get("line")
        if not isinstance(line, int):
            detail = reply.get("detail") or reply.get("title") or reply
            raise ConnectionError(f"relay closed the connection: {detail}")
        by_line[line] = reply
    wanted = range(first, first + count)
    if set(by_line) != set(wanted):
        raise ConnectionError(
            f"relay answered lines {sorted(by_line)}, expected {first}..{first + count - 1}"
        )
    return [by_line[n] for n in wanted]


class _Transport:
    async def exchange(self, lines: Sequence[bytes]) -> list[dict[str, Any]]:
        """Send ``lines`` (none blank) and return one reply per line, in order."""
        raise NotImplementedError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class _HttpBatch(_Transport):
    client: httpx.AsyncClient

    async def exchange(self, lines: Sequence[bytes]) -> list[dict[str, Any]]:
        response = await self.client.post("/v1/reports:batch", content=b"\n".join(lines) + b"\n")
        if response.status_code != 200:
            problem = orjson.loads(response.content) if response.content else {}
            return [problem if isinstance(problem, dict) else {"type": "error"}] * len(lines)
        replies = [orjson.loads(line) for line in response.content.splitlines() if line]
        return _in_line_order(replies, 1, len(lines))

    async def aclose(self) -> None:
        await self.client.aclose()


@attrs.define(eq=False)
class _Stream(_Transport):
    stream: trio.abc.Stream
    buffer: bytearray = attrs.field(factory=bytearray)
    #: Lines sent on this connection so far: the stream numbers lines per connection.
    lines_sent: int = 0

    async def exchange(self, lines: Sequence[bytes]) -> list[dict[str, Any]]:
        await self.stream.send_all(b"\n".join(lines) + b"\n")
        first = self.lines_sent + 1
        self.lines_sent += len(lines)
        replies: list[dict[str, Any]] = []
        while len(replies) < len(lines):
            newline = self.buffer.find(b"\n")
            if newline < 0:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise ConnectionError("relay closed the stream")
                self.buffer += chunk
                continue
            reply = orjson.loads(bytes(self.buffer[:newline]))
            del self.buffer[: newline + 1]
            replies.append(reply)
            if "line" not in reply:
                break  # a closing notice: _in_line_order raises with its detail
        return _in_line_order(replies, first, len(lines))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _open_transport(url: str, token: str | None) -> _Transport:
    if url.startswith(("http://", "https://")):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return _HttpBatch(httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=30))
    address = parse_listen(url)
    stream: trio.abc.Stream
    if address.transport == "tcp":
        stream = await trio.open_tcp_stream(address.host, address.port)
    elif address.transport == "unix":
        stream = await trio.open_unix_socket(address.path)
    else:
        raise ValueError("sending over vsock is done from inside a guest; use tcp:// or unix://")
    transport = _Stream(stream)
    if token:
        (reply,) = await transport.exchange([orjson.dumps({"token": token})])
        if reply.get("ok") is not True:
            raise PermissionError(f"token refused: {reply.get('title', reply)}")
    return transport


async def send_reports(
    url: str,
    lines: Iterable[bytes],
    *,
    token: str | None = None,
    batch_size: int = 500,
    max_retry_wait: float = 120.0,
    progress: Callable[[int], None] | None = None,
) -> SendSummary:
    """Send NDJSON report lines in batches; re-send 429s after their ``retry_after``.

    A report whose ``retry_after`` exceeds ``max_retry_wait`` is counted as rejected
    instead of retried. Returns the summary; raises on connection errors.
    """
    summary = SendSummary()
    transport = await _open_transport(url, token)
    retries: list[tuple[float, int, bytes]] = []
    order = itertools.count()
    try:
        source = iter(lines)
        exhausted = False
        while not exhausted or retries:
            batch: list[bytes] = []
            now = trio.current_time()
            while retries and retries[0][0] <= now and len(batch) < batch_size:
                batch.append(heapq.heappop(retries)[2])
                summary.retried += 1
            while not exhausted and len(batch) < batch_size:
                line = next(source, None)
                if line is None:
                    exhausted = True
                elif line.strip():
                    summary.read += 1
                    batch.append(line.rstrip(b"\r\n"))
            if not batch:
                if not retries:
                    break  # the input ended exactly at a batch boundary (or was empty)
                await trio.sleep_until(retries[0][0])
                continue
            for line, reply in zip(batch, await transport.exchange(batch), strict=True):
                reason = _reason(reply)
                wait = reply.get("retry_after")
                if reason == "admitted":
                    summary.admitted += 1
                elif (
                    reply.get("status") == 429
                    and isinstance(wait, int | float)
                    and wait <= max_retry_wait
                ):
                    heapq.heappush(retries, (trio.current_time() + float(wait), next(order), line))
                    continue
                else:
                    summary.rejected[reason] += 1
                if progress is not None:
                    progress(1)
    finally:
        await transport.aclose()
    return summary
