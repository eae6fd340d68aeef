"""HTTP routes (quart-trio). Routes only: every decision is made by the :class:`Relay`.

The hot routes (ingest and ACKs) answer through :class:`~relay_trio.http.hot_routes.HotRoutes`;
their ordinary requests never reach Quart (:mod:`relay_trio.http.fast_lane` serves them), so
the routes here handle the rest: a bad token, an oversized or chunked body, ``Expect``.

Every 4xx/5xx is ``application/problem+json`` with a stable ``type``; bad input never
produces a 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import orjson
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..core.events import MAX_PAGE, render_page
from ..core.ids import CURSOR_MAX
from ..core.model import Problem, too_large
from ..services.hub import HistoryUnavailable, SubscriberLimit
from ..stores.base import StoreError
from .hot_routes import JSON, HotRoutes, Reply, problem_reply
from .openapi import openapi_document
from .params import (
    bearer_problem,
    dead_letter_query,
    decode_json,
    int_param,
    int_value,
    redrive_request,
    store_unavailable,
    topic_param,
)
from .statuspage import STATUS_PAGE, static_assets

if TYPE_CHECKING:  # the composition root sits above the front doors
    from ..relay import Relay

log = logging.getLogger("relay_trio.http")


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> Response:
    """A problem+json response; 429/503 carry ``Retry-After``."""
    return reply_response(problem_reply(problem, tuple((headers or {}).items())))


def reply_response(reply: Reply) -> Response:
    """The Quart response for a framework-free :class:`~relay_trio.http.hot_routes.Reply`."""
    response = Response(reply.body, status=reply.status, content_type=reply.content_type)
    for key, value in reply.headers:
        response.headers[key] = value
    return response


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type=JSON)


def create_app(relay: Relay) -> QuartTrio:
    """The quart-trio application serving ``relay``'s HTTP API (v1)."""
    config = relay.config
    # static_folder=None: assets are served from memory by the /static route below.
    app = QuartTrio("relay_trio", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max(config.max_body_bytes, config.batch_max_bytes)
    app.config["BODY_TIMEOUT"] = 30
    app.config["RESPONSE_TIMEOUT"] = 60
    tokens = {
        "ingest": config.ingest_token,
        "ack": config.ack_token,
        "admin": config.admin_token,
        "read": config.read_token,
    }

    def auth_problem(scope: str) -> Problem | None:
        return bearer_problem(tokens[scope], request.headers.get("Authorization"), scope)

    async def read_body(limit: int) -> bytes | Problem:
        if request.content_length is not None and request.content_length > limit:
            return too_large(limit)
        body = await request.get_data(cache=False)
        assert isinstance(body, bytes)
        g.relay_body_read = True
        if len(body) > limit:
            return too_large(limit)
        return body

    # Latency per route rule (bounded label set: the rules, plus "unmatched" for 404s).
    # Trio's clock, not the wall clock; an SSE stream is timed up to its headers.
    latency = relay.metrics.request_seconds
    observers: dict[str, Any] = {}

    @app.before_request
    async def start_timer() -> None:
        g.relay_t0 = trio.current_time()

    @app.after_request
    async def record_latency(response: Response) -> Response:
        started = g.get("relay_t0")
        if started is not None:
            rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
            observe = observers.get(rule)
            if observe is None:
                observe = observers[rule] = latency.labels(rule).observe
            observe(trio.current_time() - started)
        if not g.get("relay_body_read") and (
            request.content_length or "chunked" in request.headers.get("Transfer-Encoding", "")
        ):
            # A request body left unread (413 on Content-Length, 405, a body on a GET)
            # leaves hypercorn unable to recycle the keep-alive connection: the client's
            # next request on it could hang. Close it instead, as nginx does after a 413.
            response.headers["Connection"] = "close"
        return response

    async def authorized_body(scope: str, limit: int) -> bytes | Problem:
        """The request body, once the bearer token for ``scope`` checks out (401/403/413)."""
        denied = auth_problem(scope)
        if denied is not None:
            return denied
        return await read_body(limit)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        slug = {
            404: "not-found",
            405: "method-not-allowed",
            413: "too-large",
            408: "request-timeout",
        }.get(status, "http-error")
        headers = None
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            # RFC 9110 15.5.6: a 405 must list what the resource does support.
            headers = {"Allow": ", ".join(sorted(error.valid_methods))}
        return problem_response(Problem(status, slug, error.name, error.description or ""), headers)

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.path)
        return problem_response(Problem(500, "internal", "Internal error", type(error).__name__))

    hot = HotRoutes(relay)

    def refused(problem: Problem, reason: str) -> Response:
        hot.count_refused(reason)
        return problem_response(problem)

    @app.post("/v1/reports")
    async def post_report() -> Response:
        body = await authorized_body("ingest", config.max_body_bytes)
        if isinstance(body, Problem):
            return refused(body, "too_large" if body.status == 413 else "unauthorized")
        return reply_response(await hot.report(body, request.headers.get))

    @app.post("/v1/reports:batch")
    async def post_batch() -> Response:
        body = await authorized_body("ingest", config.batch_max_bytes)
        if isinstance(body, Problem):
            return problem_response(body)
        return reply_response(await hot.batch(body))

    async def authorized_json(scope: str) -> object | Problem:
        """The request's JSON body, after the ``scope`` token check and the size limit."""
        body = await authorized_body(scope, config.max_body_bytes)
        return body if isinstance(body, Problem) else decode_json(body)

    @app.post("/v1/acks")
    async def post_ack() -> Response:
        body = await authorized_body("ack", config.max_body_bytes)
        if isinstance(body, Problem):
            return problem_response(body)
        return reply_response(await hot.ack(body))

    @app.get("/v1/resources/<resource_id>")
    async def get_resource(resource_id: str) -> Response:
        denied = auth_problem("read")
        if denied is not None:
            return problem_response(denied)
        try:
            view = await relay.resource_view_any(resource_id)
        except StoreError as exc:
            return problem_response(store_unavailable(exc))
        if view is None:
            return problem_response(
                Problem(404, "unknown-resource", "Unknown resource", resource_id)
            )
        return json_response(view)

    @app.get("/v1/deadletters")
    async def get_deadletters() -> Response:
        denied = auth_problem("read")
        if denied is not None:
            return problem_response(denied)
        query = dead_letter_query(request.args)
        if isinstance(query, Problem):
            return problem_response(query)
        try:
            return json_response(await relay.dead_letter_page(query))
        except StoreError as exc:
            return problem_response(store_unavailable(exc))

    @app.post("/v1/deadletters:redrive")
    async def post_redrive() -> Response:
        obj = await authorized_json("admin")
        if isinstance(obj, Problem):
            return problem_response(obj)
        req = redrive_request(obj)
        if isinstance(req, Problem):
            return problem_response(req)
        try:
            return json_response(await relay.redrive(req))
        except StoreError as exc:
            return problem_response(store_unavailable(exc))

    @app.get("/v1/events")
    async def get_events() -> Response:
        denied = auth_problem("read")
        if denied is not None:
            return problem_response(denied)
        after = int_param("after", None, 0, CURSOR_MAX)
        limit = int_param("limit", 100, 1, MAX_PAGE)
        topic = topic_param()
        for value in (after, limit, topic):
            if isinstance(value, Problem):
                return problem_response(value)
        assert not isinstance(after, Problem) and isinstance(limit, int)
        assert not isinstance(topic, Problem)
        try:
            page = await relay.hub.page(after, limit, topic)
        except HistoryUnavailable as exc:
            # Cluster mode: ids older than this instance's mirror are in NATS.
            return problem_response(
                Problem(503, "cluster-unavailable", "Event history unreachable", str(exc), {}, 1.0)
            )
        return Response(render_page(page), status=200, content_type=JSON)

    @app.get("/v1/events/stream")
    async def get_event_stream() -> Response:
        denied = auth_problem("read")
        if denied is not None:
            return problem_response(denied)
        topic = topic_param()
        if isinstance(topic, Problem):
            return problem_response(topic)
        # EventSource resends the last ``id:`` it saw as a header; scripts may use the query.
        last = request.headers.get("Last-Event-ID")
        last_id = (
            int_param("last_event_id", None, 0, CURSOR_MAX)
            if last is None
            else int_value("Last-Event-ID", last, 0, CURSOR_MAX)
        )
        if isinstance(last_id, Problem):
            return problem_response(last_id)
        try:
            subscription = await relay.subscribe_events(
                None if topic is None else frozenset({topic}), last_id
            )
        except SubscriberLimit as exc:
            return problem_response(exc.to_problem())

        async def stream() -> AsyncIterator[bytes]:
            # quart-trio cancels this generator when the client goes away; aclosing and
            # the subscription's context unregister it at once (seed 004: no dead subs).
            async with subscription, aclosing(subscription.stream()) as chunks:
                async for chunk in chunks:
                    yield chunk

        response = Response(stream(), status=200, content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    @app.get("/v1/status")
    async def get_status() -> Response:
        denied = auth_problem("read")
        if denied is not None:
            return problem_response(denied)
        return json_response(relay.status())

    @app.get("/metrics")
    async def get_metrics() -> Response:
        denied = auth_problem("read")
        if denied is not None:
            return problem_response(denied)
        return Response(
            relay.metrics.render(),
            status=200,
            content_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if relay.ready.value and not relay.draining:
            return json_response({"ready": True})
        return problem_response(
            Problem(503, "not-ready", "Not ready", "starting or draining", retry_after=1.0)
        )

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(openapi_document(app, batch_max_lines=config.batch_max_lines))

    @app.post("/admin/shutdown")
    async def admin_shutdown() -> Response:
        problem = auth_problem("admin")
        if problem is None and config.admin_token is None:
            problem = Problem(
                403, "forbidden", "Admin token not configured", "set admin_token to enable /admin"
            )
        if problem is not None:
            return problem_response(problem)
        relay.request_shutdown("admin")
        return json_response({"shutdown": "started"}, status=202)

    @app.get("/")
    async def index() -> Response:
        return Response(STATUS_PAGE, status=200, content_type="text/html; charset=utf-8")

    assets = static_assets()

    @app.get("/static/<name>", endpoint="static")
    async def static_asset(name: str) -> Response:
        asset = assets.get(name)
        if asset is None:
            return problem_response(Problem(404, "not-found", "Not Found", "no such asset"))
        response = Response(asset[0], status=200, content_type=asset[1])
        response.headers["Cache-Control"] = "public, max-age=3600"
        return response

    return app


__all__ = ["create_app", "decode_json", "problem_response"]
