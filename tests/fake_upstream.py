"""A real HTTP upstream for tests, whose behaviour the test controls at runtime.

Usage (real sockets: do not combine with the autojump clock)::

    async with run_fake_upstream() as up:          # listening on 127.0.0.1:<free port>
        relay_config = ...(upstreams=[up.url])     # "http://127.0.0.1:PORT/ingest"
        up.behaviour = Behaviour(fail_first=2)     # assigning restarts the first-N counters
        ...
        await up.wait_received(3)                  # blocks until 3 POSTs have arrived
        assert [r.outcome for r in up.received] == ["fail", "fail", "ack"]

Each ``POST /ingest`` body is recorded, in arrival order, in ``up.received`` as a
:class:`Received` (decoded JSON ``body`` plus the ``outcome`` and HTTP ``status`` it got).
``GET``/``HEAD /ingest`` is a health probe: 503 while ``fail_all``, else 200; probes are
only counted (``up.probes``). Asynchronous ACK/NACK callbacks the fake makes are recorded
in ``up.callbacks``.

The server is hypercorn's Trio worker serving a hand-written ASGI app; it is shut down
through ``shutdown_trigger`` when the context exits, after releasing any stalled requests.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import httpx
import hypercorn.config
import hypercorn.trio
import orjson
import trio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: Loosely typed on purpose: hypercorn's own ASGI TypedDicts would cost casts everywhere.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

#: hypercorn logs "Running on ..." at INFO and errors at ERROR; a named, non-configured
#: logger keeps the INFO noise out of test output but still shows real errors.
_LOG: Final = logging.getLogger("tests.fake_upstream")


async def serve_on_free_port(
    app: ASGIApp, nursery: trio.Nursery, *, graceful_timeout: float = 1.0
) -> tuple[str, trio.Event]:
    """Start hypercorn (Trio worker) serving ``app`` on ``127.0.0.1:0`` in ``nursery``.

    Returns ``(base_url, shutdown)``: ``base_url`` is ``"http://127.0.0.1:PORT"`` with the
    real port, and the server is already accepting connections. Setting ``shutdown``
    stops it gracefully (in-flight requests get ``graceful_timeout`` seconds). A
    checkpoint; raises if the socket cannot be bound or the app's lifespan startup fails.
    """
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = _LOG
    config.graceful_timeout = graceful_timeout
    shutdown = trio.Event()
    binds: list[str] = await nursery.start(
        functools.partial(hypercorn.trio.serve, app, config, shutdown_trigger=shutdown.wait)
    )
    return binds[0], shutdown


@attrs.frozen
class Behaviour:
    """How the fake answers. Every field is independent; they combine.

    Order of effects for each ``POST``: record it, then ``stall``, then answer 503 if
    ``fail_all`` or while ``fail_first`` is not used up, else 200 ``{"ack": true}`` when
    ``sync_ack`` or 202 ``{"ack": false}`` otherwise. After any 2xx, if
    ``ack_callback_url`` is set, a background task waits ``ack_callback_delay`` and POSTs
    ``{"message_id", "status": "ack"}`` there -- or ``"nack"`` (with ``retry_after`` if
    ``nack_retry_after`` is set) while ``nack_first`` lasts, or nothing at all while
    ``drop_acks_first`` lasts (dropping is decided first). ``sync_ack`` with a callback URL
    gives a synchronous ACK *and* a later duplicate callback (useful for late-ACK tests).

    Hostile upstreams: a POST whose ``resource_id`` is in ``hang_resources`` is recorded
    and then never answered (until the client leaves or the fake shuts down); failures
    answer ``fail_status`` (503 by default) with a ``Retry-After: <retry_after>`` header
    when ``retry_after`` is set (sent verbatim, so invalid values can be tested too); a
    2xx answer with ``answer_bytes`` set is that many bytes of filler, streamed in 64 KiB
    chunks and never built in memory, declared by ``Content-Length`` when
    ``declare_length`` else sent chunked.
    """

    fail_first: int = 0
    fail_all: bool = False
    stall: float = 0.0
    sync_ack: bool = True
    ack_callback_url: str | None = None
    ack_callback_delay: float = 0.0
    ack_callback_headers: Mapping[str, str] = attrs.field(factory=dict)
    nack_first: int = 0
    nack_retry_after: float | None = None
    drop_acks_first: int = 0
    hang_resources: frozenset[str] = frozenset()
    fail_status: int = 503
    retry_after: str | None = None
    answer_bytes: int = 0
    declare_length: bool = True


@attrs.define(eq=False)
class Received:
    """One ``POST`` as the fake saw it. ``outcome`` is ``"pending"`` while stalled, then
    one of ``"fail"`` (``fail_status``), ``"ack"`` (200 sync ACK), ``"accepted"`` (202),
    ``"bad_request"`` (400, body not JSON), ``"disconnected"`` (client left before the
    answer), ``"huge"`` (200 with ``answer_bytes`` of filler; ``"huge_cut"`` once the
    client hung up before the last byte)."""

    body: Any
    outcome: str = "pending"
    status: int | None = None
    at: float = 0.0


@attrs.frozen
class Callback:
    """One asynchronous ACK/NACK decision and what became of it.

    ``status`` is ``"ack"``, ``"nack"`` or ``"dropped"`` (never sent); ``http_status`` is the
    relay's answer, ``None`` if dropped or if the POST failed (then ``error`` says why).
    """

    message_id: str
    status: str
    http_status: int | None = None
    error: str | None = None


@attrs.define(eq=False)
class FakeUpstream:
    """A controllable upstream. Create with :func:`run_fake_upstream`.

    ``behaviour`` may be reassigned at any time; assigning resets the ``fail_first``,
    ``nack_first`` and ``drop_acks_first`` budgets to the new values. ``received``,
    ``callbacks`` and ``probes`` only grow (cleared by :meth:`clear`).
    """

    path: str
    _nursery: trio.Nursery
    _client: httpx.AsyncClient
    base_url: str = ""
    received: list[Received] = attrs.field(factory=list)
    callbacks: list[Callback] = attrs.field(factory=list)
    probes: int = 0
    _behaviour: Behaviour = attrs.field(factory=Behaviour)
    _fail_left: int = 0
    _nack_left: int = 0
    _drop_left: int = 0
    _closing: trio.Event = attrs.field(factory=trio.Event)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        """The ingest URL to configure as the relay's upstream."""
        return self.base_url + self.path

    @property
    def behaviour(self) -> Behaviour:
        return self._behaviour

    @behaviour.setter
    def behaviour(self, value: Behaviour) -> None:
        self._behaviour = value
        self._fail_left = value.fail_first
        self._nack_left = value.nack_first
        self._drop_left = value.drop_acks_first

    def message_ids(self) -> list[str]:
        """``message_id`` of every received body, in arrival order (``""`` if absent)."""
        return [
            r.body.get("message_id", "") if isinstance(r.body, dict) else "" for r in self.received
        ]

    def clear(self) -> None:
        """Forget what was received so far (behaviour and its budgets are kept)."""
        self.received.clear()
        self.callbacks.clear()
        self.probes = 0

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[FakeUpstream], bool]) -> None:
        """Block until ``predicate(self)`` holds; re-checked after every request, answer and
        callback. Has no timeout: wrap it in ``trio.fail_after``. A checkpoint."""
        while not predicate(self):
            await self._changed.wait()
        await trio.lowlevel.checkpoint()

    async def wait_received(self, count: int) -> None:
        """Block until at least ``count`` POSTs have arrived (answered or not)."""
        await self.wait_until(lambda up: len(up.received) >= count)

    async def wait_callbacks(self, count: int) -> None:
        """Block until at least ``count`` callbacks have been decided and, unless dropped,
        made (answered or failed)."""
        await self.wait_until(lambda up: len(up.callbacks) >= count)

    # -- ASGI --------------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application (lifespan + http)."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] != self.path:
            await _respond(send, 404, {"error": "not found"})
            return
        method = scope["method"]
        if method in ("GET", "HEAD"):
            self.probes += 1
            self._notify()
            if self._behaviour.fail_all:
                await _respond(send, 503, {"ok": False})
            else:
                await _respond(send, 200, {"ok": True})
            return
        if method != "POST":
            await _respond(send, 405, {"error": "method not allowed"})
            return
        raw = await _read_body(receive)
        if raw is None:
            return
        await self._handle_post(raw, receive, send)

    async def _stall(self, seconds: float, receive: Receive) -> bool:
        """Sleep ``seconds``, cut short by teardown. Returns ``True`` if the client
        disconnected meanwhile (e.g. the relay's send deadline fired)."""
        disconnected = False

        async def watch_disconnect(cancel_scope: trio.CancelScope) -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            cancel_scope.cancel()

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_disconnect, nursery.cancel_scope)
                # Released early on exit so a stalled request never delays test teardown.
                await self._closing.wait()
                nursery.cancel_scope.cancel()
        return disconnected

    async def _handle_post(self, raw: bytes, receive: Receive, send: Send) -> None:
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.received.append(Received(raw, "bad_request", 400, trio.current_time()))
            self._notify()
            await _respond(send, 400, {"error": "bad json"})
            return
        record = Received(body, at=trio.current_time())
        self.received.append(record)
        self._notify()
        behaviour = self._behaviour
        resource_id = body.get("resource_id") if isinstance(body, dict) else None
        stall = math.inf if resource_id in behaviour.hang_resources else behaviour.stall
        if stall > 0 and await self._stall(stall, receive):
            record.outcome = "disconnected"
            self._notify()
            return
        behaviour = self._behaviour  # may have been changed while stalled
        answer: dict[str, Any]
        if behaviour.fail_all or self._fail_left > 0:
            if not behaviour.fail_all:
                self._fail_left -= 1
            outcome, status, answer = "fail", behaviour.fail_status, {"error": "unavailable"}
        elif behaviour.answer_bytes:
            record.outcome, record.status = "huge", 200
            self._notify()
            if not await _respond_huge(
                send, receive, behaviour.answer_bytes, behaviour.declare_length
            ):
                record.outcome = "huge_cut"
                self._notify()
            return
        elif behaviour.sync_ack:
            outcome, status, answer = "ack", 200, {"ack": True}
        else:
            outcome, status, answer = "accepted", 202, {"ack": False}
        # Recorded before answering: a client that saw the answer must find it recorded.
        record.outcome, record.status = outcome, status
        self._notify()
        headers = []
        if status >= 300 and behaviour.retry_after is not None:
            headers.append((b"retry-after", behaviour.retry_after.encode()))
        await _respond(send, status, answer, headers)
        # After teardown began (a stall released by exit) the callback nursery is closed.
        if status < 300 and behaviour.ack_callback_url is not None and not self._closing.is_set():
            self._schedule_callback(behaviour, body)

    def _schedule_callback(self, behaviour: Behaviour, body: Any) -> None:
        message_id = str(body.get("message_id", "")) if isinstance(body, dict) else ""
        if self._drop_left > 0:
            self._drop_left -= 1
            self.callbacks.append(Callback(message_id, "dropped"))
            self._notify()
            return
        payload: dict[str, Any] = {"message_id": message_id, "status": "ack"}
        if self._nack_left > 0:
            self._nack_left -= 1
            payload["status"] = "nack"
            if behaviour.nack_retry_after is not None:
                payload["retry_after"] = behaviour.nack_retry_after
        self._nursery.start_soon(self._post_callback, behaviour, payload)

    async def _post_callback(self, behaviour: Behaviour, payload: dict[str, Any]) -> None:
        assert behaviour.ack_callback_url is not None
        if behaviour.ack_callback_delay > 0:
            await trio.sleep(behaviour.ack_callback_delay)
        http_status: int | None = None
        error: str | None = None
        try:
            response = await self._client.post(
                behaviour.ack_callback_url,
                content=orjson.dumps(payload),
                headers={"content-type": "application/json", **behaviour.ack_callback_headers},
            )
            http_status = response.status_code
        except httpx.HTTPError as exc:
            # Never crash the fake (and with it the test) because the relay is down.
            error = f"{type(exc).__name__}: {exc}"
        self.callbacks.append(
            Callback(payload["message_id"], payload["status"], http_status, error)
        )
        self._notify()


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or ``None`` if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send, status: int, body: Any, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(extra_headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


#: One chunk of a huge answer, shared: streaming N bytes costs one chunk of memory.
_FILLER: Final = b" " * (64 * 1024)


async def _respond_huge(send: Send, receive: Receive, size: int, declare_length: bool) -> bool:
    """Stream ``size`` bytes of filler as a 200. ``False`` if the client left first (the
    rest is then not sent)."""
    headers = [(b"content-type", b"application/json")]
    if declare_length:
        headers.append((b"content-length", str(size).encode()))
    gone = False

    async def watch_disconnect() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_disconnect)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        left = size
        while left > 0 and not gone:
            chunk = _FILLER if left >= len(_FILLER) else _FILLER[:left]
            left -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
        nursery.cancel_scope.cancel()
    return left == 0


@asynccontextmanager
async def run_fake_upstream(
    behaviour: Behaviour | None = None, *, path: str = "/ingest"
) -> AsyncIterator[FakeUpstream]:
    """Run a :class:`FakeUpstream` on ``127.0.0.1:<free port>`` for the ``async with`` body.

    The server is accepting connections when the body starts. On exit, stalled requests are
    released, pending callback tasks are cancelled, and hypercorn shuts down gracefully.
    """
    # Callbacks run in their own inner nursery so teardown can cancel them at once (they may
    # be sleeping on ack_callback_delay) while the server shuts down gracefully.
    async with (
        httpx.AsyncClient(timeout=5.0) as client,
        trio.open_nursery() as server_nursery,
        trio.open_nursery() as callback_nursery,
    ):
        up = FakeUpstream(path, callback_nursery, client)
        up.behaviour = behaviour or Behaviour()
        up.base_url, shutdown = await serve_on_free_port(up.app, server_nursery)
        try:
            yield up
        finally:
            up._closing.set()
            shutdown.set()
            callback_nursery.cancel_scope.cancel()
