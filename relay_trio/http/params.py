"""Query-parameter and body parsers of the HTTP routes: one parser per parameter, each
answering a 422 problem that names it. Pure functions of their input (and of quart's
``request`` for query parameters); the OpenAPI document publishes the same bounds.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import orjson
from quart import request

from ..core.events import MAX_PAGE, TOPICS
from ..core.idempotency import MAX_KEY_LEN, valid_key
from ..core.ids import CURSOR_MAX, MessageId
from ..core.model import (
    MAX_FILTER_LEN,
    MAX_TIMESTAMP_LEN,
    Problem,
    contract_fields_problem,
    invalid,
    invalid_query,
    malformed,
    parse_bounded_int,
)
from ..services.redrive import RedriveRequest
from ..stores.base import DeadLetterQuery

log = logging.getLogger("relay_trio.http")


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


def bearer_problem(expected: str | None, authorization: str | None, scope: str) -> Problem | None:
    """The one bearer-token check of every HTTP route: ``None`` when ``scope`` needs no token
    or ``authorization`` (the request's header, ``None`` when absent) carries the right one;
    else 401 (missing) or 403 (wrong). Constant-time comparison."""
    if expected is None:
        return None
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return Problem(401, "unauthorized", "Missing bearer token", f"{scope} token required")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return Problem(403, "forbidden", "Wrong token", f"token not valid for {scope}")
    return None


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


#: Request headers of POST /v1/reports that set a report field (docs/upstream.md).
REPORT_HEADERS: Final = (
    ("Idempotency-Key", "idempotency_key"),
    ("traceparent", "traceparent"),
    ("tracestate", "tracestate"),
)


def with_contract_headers(
    obj: dict[Any, Any], header: Callable[[str], str | None]
) -> dict[Any, Any] | Problem:
    """The report with the delivery contract's headers as its fields (the same fields a
    batch or stream line carries): a header wins over a body member of the same name, both
    must be valid (422), an empty ``traceparent``/``tracestate`` header counts as absent.
    ``header(name)`` reads one request header (``None`` when absent). Updates ``obj`` in
    place; never raises."""
    given = [(field, header(name)) for name, field in REPORT_HEADERS]
    if all(value is None for _, value in given):
        return obj
    refused = contract_fields_problem(obj)
    if refused is not None:
        return refused
    for field, value in given:
        if value is None or (not value and field != "idempotency_key"):
            continue
        if field == "idempotency_key" and not valid_key(value):
            return invalid_query(
                "Idempotency-Key", f"must be 1-{MAX_KEY_LEN} visible ASCII characters"
            )
        obj[field] = value
    return obj


MAX_JSON_DEPTH: Final = 64


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
