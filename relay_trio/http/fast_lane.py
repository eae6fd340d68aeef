"""The ASGI fast lane: the hot routes answered without Quart's per-request machinery.

Quart's request handling (request context and ``g``, before/after hooks, werkzeug
``Headers`` and ``Response`` objects, a task watching for the client's disconnect) measured
about half the CPU of a single-report POST: server pinned to one core, 32 keep-alive
connections, wrk, 630 → 330 µs per request. The hot routes need none of it.
:class:`FastLane` sits in front of the Quart app and answers ``POST /v1/reports``,
``POST /v1/reports:batch`` and ``POST /v1/acks`` itself when the request is the ordinary kind:

* the route's bearer token (``ingest``, or ``ack``) checks out (or none is configured), and
* ``Content-Length`` is given and within the route's limit, with no ``Transfer-Encoding``
  and no ``Expect``.

Everything else (a missing or wrong token, an oversized or chunked body, every other route
and method, lifespan) passes to Quart untouched, its body still unread, so the rare cases
keep Quart's handling (401/403/413 problems, closing the connection after an unread body).
The answer itself always comes from :class:`~relay_trio.http.hot_routes.HotRoutes`, as in
the Quart routes, and the latency histogram gets the same route label.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final

import trio

from ..core.model import Problem
from .hot_routes import HotRoutes, Reply, problem_reply
from .params import bearer_problem

if TYPE_CHECKING:
    from ..relay import Relay

log = logging.getLogger("relay_trio.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

REPORT: Final = "/v1/reports"
BATCH: Final = "/v1/reports:batch"
ACKS: Final = "/v1/acks"


class FastLane:
    """An ASGI app: the hot routes' ordinary requests here, everything else to ``app``."""

    def __init__(self, app: ASGIApp, relay: Relay) -> None:
        self.app = app
        self.hot = HotRoutes(relay)
        config = relay.config
        #: Per path taken here: its body limit, and the token scope and token it needs.
        self.routes: dict[str, tuple[int, str, str | None]] = {
            REPORT: (config.max_body_bytes, "ingest", config.ingest_token),
            BATCH: (config.batch_max_bytes, "ingest", config.ingest_token),
            ACKS: (config.max_body_bytes, "ack", config.ack_token),
        }
        latency = relay.metrics.request_seconds
        self._observe = {path: latency.labels(path).observe for path in self.routes}
        #: Requests answered here (the rest went to Quart): a test can tell the lanes apart.
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            route = self.routes.get(path)
            if route is not None:
                # Names are lower case in ASGI; the first of repeated headers wins, as in
                # werkzeug's ``Headers.get``.
                headers: dict[bytes, bytes] = dict(reversed(scope["headers"]))
                if self._takes(headers, *route):
                    await self._serve(path, headers, receive, send)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    def _takes(headers: dict[bytes, bytes], limit: int, scope: str, token: str | None) -> bool:
        """Whether this request is the ordinary kind (see the module docstring)."""
        length = headers.get(b"content-length")
        if length is None or b"transfer-encoding" in headers or b"expect" in headers:
            return False
        if not length.isdigit() or len(length) > 19 or int(length) > limit:
            return False
        if token is None:
            return True
        authorization = headers.get(b"authorization")
        given = None if authorization is None else authorization.decode("latin-1")
        return bearer_problem(token, given, scope) is None

    async def _serve(
        self, path: str, headers: dict[bytes, bytes], receive: Receive, send: Send
    ) -> None:
        started = trio.current_time()
        chunks: list[bytes] = []
        while True:  # bounded: h11 delivers exactly Content-Length bytes (within the limit)
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body was complete: nothing to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        def header(name: str) -> str | None:
            value = headers.get(name.lower().encode())
            return None if value is None else value.decode("latin-1")

        try:
            if path == REPORT:
                reply = await self.hot.report(body, header)
            elif path == BATCH:
                reply = await self.hot.batch(body)
            else:
                reply = await self.hot.ack(body)
        except Exception as exc:  # a bug: a problem answer, never a dropped connection
            log.exception("internal error on POST %s", path)
            reply = problem_reply(Problem(500, "internal", "Internal error", type(exc).__name__))
        self.served += 1
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": _raw_headers(reply),
            }
        )
        await send({"type": "http.response.body", "body": reply.body})
        self._observe[path](trio.current_time() - started)


def _raw_headers(reply: Reply) -> list[tuple[bytes, bytes]]:
    raw = [
        (b"content-type", reply.content_type.encode()),
        (b"content-length", b"%d" % len(reply.body)),
    ]
    raw += [(name.lower().encode(), value.encode("latin-1")) for name, value in reply.headers]
    return raw
