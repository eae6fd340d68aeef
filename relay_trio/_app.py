"""HTTP routes (quart-trio). Routes only: every decision is made by the :class:`Relay`.

Every 4xx/5xx is ``application/problem+json`` with a stable ``type``; bad input never
produces a 500.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime
from typing import Any, Final

import orjson
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ._events import MAX_PAGE, TOPICS, render_page
from ._hub import SubscriberLimit
from ._ids import CURSOR_MAX, MessageId
from ._line_protocol import reply_line
from ._model import (
    MAX_FILTER_LEN,
    MAX_TIMESTAMP_LEN,
    Accepted,
    Problem,
    empty_batch,
    invalid,
    invalid_query,
    malformed,
    parse_bounded_int,
    too_large,
    validate_ack,
)
from ._openapi import openapi_document
from ._ratelimit import retry_after_header
from ._redrive import RedriveRequest
from ._relay import Relay
from ._statuspage import STATUS_PAGE, static_assets
from ._store import DeadLetterQuery, StoreError

log = logging.getLogger("relay_trio.http")

PROBLEM_JSON: Final = "application/problem+json"
JSON: Final = "application/json"
NDJSON: Final = "application/x-ndjson"
MAX_JSON_DEPTH: Final = 64


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> Response:
    """A problem+json response; 429/503 carry ``Retry-After``."""
    response = Response(
        orjson.dumps(problem.to_dict()), status=problem.status, content_type=PROBLEM_JSON
    )
    if problem.retry_after is not None:
        response.headers["Retry-After"] = retry_after_header(problem.retry_after)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type=JSON)


def _depth_ok(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``value`` nests no deeper than ``limit`` (iterative: no recursion limit)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def decode_json(body: bytes) -> object | Problem:
    """Parse a JSON body; a 400 problem for garbage or nesting beyond the depth limit."""
    try:
        value: object = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return malformed(str(exc).split(":", 1)[0])
    # Nesting needs one bracket per level: counting them (in C) spares the walk for
    # every body that cannot be too deep, which is nearly all of them.
    if (
        isinstance(value, dict | list)
        and body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH
        and not _depth_ok(value)
    ):
        return malformed(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


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
        expected = tokens[scope]
        if expected is None:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return Problem(401, "unauthorized", "Missing bearer token", f"{scope} token required")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return Problem(403, "forbidden", "Wrong token", f"token not valid for {scope}")
        return None

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

    def count_refused(reason: str) -> None:
        # Reports refused before admission still count as received, so that received ==
        # admitted + rejected. A batch refused as a whole is not counted: its size is unknown.
        relay.metrics.reports_received.inc()
        relay.metrics.rejected[reason].inc()

    def refused(problem: Problem, reason: str) -> Response:
        count_refused(reason)
        return problem_response(problem)

    @app.post("/v1/reports")
    async def post_report() -> Response:
        body = await authorized_body("ingest", config.max_body_bytes)
        if isinstance(body, Problem):
            return refused(body, "too_large" if body.status == 413 else "unauthorized")
        obj = decode_json(body)
        if isinstance(obj, Problem):
            return refused(obj, "malformed")
        result = relay.admit(obj)
        if isinstance(result, Accepted):
            # A 2xx promises durability: answer only once the store has the report.
            try:
                await relay.durable()
            except StoreError as exc:
                return problem_response(store_unavailable(exc))
            return Response(
                orjson.dumps({"message_id": result.message_id}), status=202, content_type=JSON
            )
        return problem_response(result)

    @app.post("/v1/reports:batch")
    async def post_batch() -> Response:
        body = await authorized_body("ingest", config.batch_max_bytes)
        if isinstance(body, Problem):
            return problem_response(body)
        # Blank lines get no result, but keep their number: each result names its input line.
        lines = [(n, line) for n, line in enumerate(body.split(b"\n"), 1) if line.strip()]
        if not lines:
            return problem_response(empty_batch())
        if len(lines) > config.batch_max_lines:
            return problem_response(
                Problem(
                    413,
                    "too-many-lines",
                    "Too many reports",
                    f"at most {config.batch_max_lines} lines",
                )
            )
        results: list[tuple[int, Accepted | Problem]] = []
        for number, line in lines:
            if len(line) > config.max_body_bytes:
                result: Accepted | Problem = too_large(config.max_body_bytes)
                count_refused("too_large")
            else:
                obj = decode_json(line)
                if isinstance(obj, Problem):
                    count_refused("malformed")
                result = obj if isinstance(obj, Problem) else relay.admit(obj)
            results.append((number, result))
        if any(isinstance(r, Accepted) for _, r in results):
            # One commit for the whole batch; no line says "accepted" before it is stored.
            try:
                await relay.durable()
            except StoreError as exc:
                return problem_response(store_unavailable(exc))
        out = [reply_line(result, number) for number, result in results]
        return Response(b"".join(out), status=200, content_type=NDJSON)

    @app.post("/v1/acks")
    async def post_ack() -> Response:
        body = await authorized_body("ack", config.max_body_bytes)
        if isinstance(body, Problem):
            return problem_response(body)
        obj = decode_json(body)
        if isinstance(obj, Problem):
            return problem_response(obj)
        ack = validate_ack(obj)
        if isinstance(ack, Problem):
            return problem_response(ack)
        outcome = relay.acknowledge(ack.message_id, ack.status, ack.reason, ack.retry_after)
        return json_response({"message_id": ack.message_id, "outcome": outcome})

    @app.get("/v1/resources/<resource_id>")
    async def get_resource(resource_id: str) -> Response:
        denied = auth_problem("read")
        if denied is not None:
            return problem_response(denied)
        view = relay.resource_view(resource_id)
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
        return json_response(await relay.dead_letter_page(query))

    @app.post("/v1/deadletters:redrive")
    async def post_redrive() -> Response:
        body = await authorized_body("admin", config.max_body_bytes)
        if isinstance(body, Problem):
            return problem_response(body)
        obj = decode_json(body)
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
        page = relay.hub.ring.page(after, limit, topic)
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
            subscription = relay.hub.subscribe(
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


def int_value(name: str, raw: str, low: int, high: int) -> int | Problem:
    """``raw`` (from the query parameter or header ``name``) as an integer in ``[low, high]``,
    or a 422 problem naming it. Every integer parameter goes through here."""
    value = parse_bounded_int(raw, low, high)
    if value is None:
        return invalid_query(name, f"{name} must be an integer in [{low}, {high}]")
    return value


def int_param(name: str, default: int | None, low: int, high: int) -> int | Problem | None:
    """The bounded integer query parameter ``name`` (``default`` when absent), or a 422."""
    raw = request.args.get(name)
    return default if raw is None else int_value(name, raw, low, high)


def store_unavailable(exc: Exception) -> Problem:
    """503 when the store could not commit: nothing was promised, the client may retry."""
    log.error("store commit failed: %s", exc)
    return Problem(503, "store-unavailable", "Store unavailable", str(exc), retry_after=5.0)


_FILTERS: Final = ("resource_id", "reason", "upstream")
_REDRIVE_KEYS: Final = frozenset(
    {"message_ids", "dry_run", "limit", "force", "since", "until", *_FILTERS}
)


def _timestamp(name: str, value: object) -> float | Problem | None:
    """An RFC 3339 timestamp as Unix seconds (``None`` stays ``None``)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TIMESTAMP_LEN:
        return invalid(field=name, detail=f"{name} must be an RFC 3339 timestamp")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return invalid(field=name, detail=f"{name} must be an RFC 3339 timestamp")
    if parsed.tzinfo is None:
        return invalid(field=name, detail=f"{name} must carry a time zone (Z or an offset)")
    return parsed.timestamp()


def _filters(source: Any) -> dict[str, Any] | Problem:
    """The dead-letter filter fields shared by the list and redrive routes."""
    out: dict[str, Any] = {}
    for name in _FILTERS:
        value = source.get(name)
        if value is not None and (
            not isinstance(value, str) or not 1 <= len(value) <= MAX_FILTER_LEN
        ):
            return invalid(field=name, detail=f"{name} must be a non-empty string")
        out[name] = value
    for name in ("since", "until"):
        ts = _timestamp(name, source.get(name))
        if isinstance(ts, Problem):
            return ts
        out[name] = ts
    return out


def dead_letter_query(args: Any) -> DeadLetterQuery | Problem:
    """``GET /v1/deadletters`` query parameters (filters, ``cursor``, ``limit``)."""
    cursor = int_param("cursor", 0, 0, CURSOR_MAX)
    if isinstance(cursor, Problem):
        return cursor
    limit = int_param("limit", 100, 1, MAX_PAGE)
    if isinstance(limit, Problem):
        return limit
    filters = _filters(args)
    if isinstance(filters, Problem):
        return filters
    return DeadLetterQuery(**filters, message_ids=None, after_index=cursor or 0, limit=limit or 100)


def redrive_request(obj: object) -> RedriveRequest | Problem:
    """``POST /v1/deadletters:redrive`` body: filters or ``message_ids``, ``dry_run``,
    ``limit`` [100, at most 1000], ``force``."""
    if not isinstance(obj, dict):
        return invalid(field="body", detail="body must be a JSON object")
    unknown = set(obj) - _REDRIVE_KEYS
    if unknown:
        return invalid(field=min(unknown), detail=f"unknown field {min(unknown)!r}")
    filters = _filters(obj)
    if isinstance(filters, Problem):
        return filters
    ids = obj.get("message_ids")
    if ids is not None and (
        not isinstance(ids, list)
        or not 1 <= len(ids) <= MAX_PAGE
        or any(MessageId.split(i) is None for i in ids)
    ):
        return invalid(field="message_ids", detail=f"message_ids must be 1..{MAX_PAGE} message ids")
    limit = obj.get("limit", 100)
    # JSON has one number type: 42.0 is the integer 42 (as JSON Schema's "integer" says).
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        return invalid(field="limit", detail=f"limit must be an integer in [1, {MAX_PAGE}]")
    flags: dict[str, bool] = {}
    for name in ("dry_run", "force"):
        value = obj.get(name, False)
        if not isinstance(value, bool):
            return invalid(field=name, detail=f"{name} must be true or false")
        flags[name] = value
    if ids is None and not any(v is not None for v in filters.values()):
        return invalid(field="message_ids", detail="give message_ids or at least one filter")
    query = DeadLetterQuery(
        **filters,
        message_ids=None if ids is None else tuple(ids),
        after_index=0,
        limit=limit,
    )
    return RedriveRequest(query, dry_run=flags["dry_run"], force=flags["force"])


def topic_param() -> str | Problem | None:
    """The optional ``topic`` query parameter, validated against the known topics."""
    topic = request.args.get("topic")
    if topic is not None and topic not in TOPICS:
        return invalid_query("topic", f"topic must be one of {', '.join(sorted(TOPICS))}")
    return topic


__all__ = ["create_app", "decode_json", "problem_response"]
