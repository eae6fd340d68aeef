"""The OpenAPI document, built from the application's real URL map so it cannot drift.

Every bound the routes enforce is published from the constant the code checks against
(``MESSAGE_ID_PATTERN``, ``CURSOR_MAX``, ``MAX_PAGE``, ``MAX_KIND_LEN``...), and
``tests/test_schemathesis.py`` runs schemathesis over the served document to keep the two in
agreement (no 5xx, documented statuses, content types and bodies).
"""

from __future__ import annotations

import re
from typing import Any, Final

from quart import Quart

from .. import __version__
from ..core.events import MAX_PAGE, TOPICS
from ..core.idempotency import IDEMPOTENCY_KEY_PATTERN
from ..core.ids import CURSOR_MAX, MESSAGE_ID_MAX_LEN, MESSAGE_ID_PATTERN, RESOURCE_ID_CHARS
from ..core.model import (
    MAX_FILTER_LEN,
    MAX_KIND_LEN,
    MAX_REASON_LEN,
    MAX_RETRY_AFTER,
    MAX_TIMESTAMP_LEN,
)

_RESOURCE_ID_PATTERN: Final = f"^{RESOURCE_ID_CHARS}$"
_PROBLEM: Final = {
    "description": "problem+json",
    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
}
_RETRY_AFTER: Final = {
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}
}
_PROBLEM_RETRY: Final = {**_PROBLEM, "headers": _RETRY_AFTER}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_OBJECT: Final = {"type": "object"}

_DOCS: Final[dict[tuple[str, str], dict[str, Any]]] = {
    ("POST", "/v1/reports"): {
        "summary": "Submit one report",
        "description": "A repeat of an ``Idempotency-Key`` within ``idempotency_window`` is "
        "answered 202 with the original message id and ``Idempotent-Replayed: true`` (not "
        "admitted again); the same key with another report is refused 422 "
        "(``idempotency-mismatch``). ``traceparent``/``tracestate`` (W3C) are sent upstream "
        "with every delivery attempt; an invalid ``traceparent`` is ignored.",
        "parameters": ["Idempotency-Key", "traceparent", "tracestate"],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("Report")}},
        },
        "responses": {
            "202": {
                **_json("admitted (or replayed)", _ref("Admitted")),
                "headers": {
                    "Idempotent-Replayed": {
                        "description": "true when this answers a repeated idempotency key",
                        "schema": {"type": "string", "enum": ["true"]},
                    }
                },
            },
            "400": _PROBLEM,
            "401": _PROBLEM,
            "403": _PROBLEM,
            "413": _PROBLEM,
            "422": _PROBLEM,
            "429": _PROBLEM_RETRY,
            "503": _PROBLEM_RETRY,
        },
    },
    ("POST", "/v1/reports:batch"): {
        "summary": "Submit many reports as NDJSON; one result line per report, in order",
        "description": "One JSON report per line; blank lines are skipped. A body without "
        "any report line is refused with 400 (``empty-batch``).",
        "requestBody": {
            "required": True,
            # One array item per line; the schema (maxItems) is filled in per app.
            "content": {"application/x-ndjson": {}},
        },
        "responses": {
            "200": {
                "description": (
                    "NDJSON results, one per non-blank input line, in order: "
                    '{"message_id", "line"} or a problem object with "line", the '
                    "1-based input line number. Blank lines get no result."
                ),
                "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
            },
            "400": _PROBLEM,
            "401": _PROBLEM,
            "403": _PROBLEM,
            "413": _PROBLEM,
        },
    },
    ("POST", "/v1/acks"): {
        "summary": "Acknowledge (ack) or reject (nack) a message",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Ack")}}},
        "responses": {
            "200": _json("outcome: acked, nacked, late or unknown", _ref("AckOutcome")),
            "400": _PROBLEM,
            "401": _PROBLEM,
            "403": _PROBLEM,
            "413": _PROBLEM,
            "422": _PROBLEM,
        },
    },
    ("GET", "/v1/resources/{resource_id}"): {
        "summary": "Per-resource state",
        "responses": {
            "200": _json("state", _OBJECT),
            "401": _PROBLEM,
            "403": _PROBLEM,
            "404": _PROBLEM,
        },
    },
    ("GET", "/v1/deadletters"): {
        "summary": "Dead letters, paged (oldest first), optionally filtered",
        "parameters": ["resource_id", "reason", "upstream", "since", "until", "cursor", "limit"],
        "responses": {
            "200": _json("page", _ref("DeadLetterPage")),
            "401": _PROBLEM,
            "403": _PROBLEM,
            "422": _PROBLEM,
            "503": _PROBLEM_RETRY,
        },
    },
    ("POST", "/v1/deadletters:redrive"): {
        "summary": "Redrive dead letters by filter or message_ids (admin token)",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("Redrive")}},
        },
        "responses": {
            "200": _json("what was matched, redriven and skipped", _ref("RedriveResult")),
            "400": _PROBLEM,
            "401": _PROBLEM,
            "403": _PROBLEM,
            "413": _PROBLEM,
            "422": _PROBLEM,
            "503": _PROBLEM_RETRY,
        },
    },
    ("GET", "/v1/events"): {
        "summary": "Event log, paged",
        "description": "Cluster mode: ids older than this instance's mirror are read from "
        "the event stream; 503 ``cluster-unavailable`` when NATS cannot be reached for them.",
        "parameters": ["after", "limit", "topic"],
        "responses": {
            "200": _json("page", _ref("EventPage")),
            "401": _PROBLEM,
            "403": _PROBLEM,
            "422": _PROBLEM,
            "503": _PROBLEM_RETRY,
        },
    },
    ("GET", "/v1/events/stream"): {
        "summary": "Server-Sent Events stream",
        "description": "Resumes after the ``Last-Event-ID`` header, else the ``last_event_id`` "
        "query parameter (the header wins).",
        "parameters": ["topic", "last_event_id", "Last-Event-ID"],
        "responses": {
            "200": {
                "description": "event stream",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            "401": _PROBLEM,
            "403": _PROBLEM,
            "422": _PROBLEM,
            "429": _PROBLEM_RETRY,
            "503": _PROBLEM_RETRY,
        },
    },
    ("GET", "/v1/status"): {
        "summary": "Counters, gauges and config summary",
        "responses": {"200": _json("status", _OBJECT), "401": _PROBLEM, "403": _PROBLEM},
    },
    ("GET", "/metrics"): {
        "summary": "Prometheus metrics",
        "responses": {
            "200": {
                "description": "text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            "401": _PROBLEM,
            "403": _PROBLEM,
        },
    },
    ("GET", "/healthz"): {
        "summary": "Liveness",
        "responses": {"200": _json("alive", _OBJECT)},
    },
    ("GET", "/readyz"): {
        "summary": "Readiness (false while starting or draining)",
        "responses": {"200": _json("ready", _OBJECT), "503": _PROBLEM_RETRY},
    },
    ("GET", "/openapi.json"): {
        "summary": "This document",
        "responses": {"200": _json("OpenAPI 3.1", _OBJECT)},
    },
    ("POST", "/admin/shutdown"): {
        "summary": "Start a staged shutdown (admin token)",
        "responses": {"202": _json("started", _OBJECT), "401": _PROBLEM, "403": _PROBLEM},
    },
    ("GET", "/"): {
        "summary": "Live status page",
        "responses": {
            "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
        },
    },
}

_CURSOR: Final = {"type": "integer", "minimum": 0, "maximum": CURSOR_MAX}
_FILTER: Final = {"type": "string", "minLength": 1, "maxLength": MAX_FILTER_LEN}
_TIMESTAMP: Final = {
    "type": "string",
    "format": "date-time",
    "maxLength": MAX_TIMESTAMP_LEN,
    "description": "RFC 3339 with a time zone",
}
_IDEMPOTENCY_KEY: Final = {
    "type": "string",
    "pattern": IDEMPOTENCY_KEY_PATTERN,
    "description": "1-255 visible ASCII characters (no spaces)",
}
_PARAMS: Final[dict[str, dict[str, Any]]] = {
    "after": {"name": "after", "in": "query", "schema": _CURSOR},
    "cursor": {"name": "cursor", "in": "query", "schema": _CURSOR},
    **{
        name: {"name": name, "in": "query", "schema": _FILTER}
        for name in ("resource_id", "reason", "upstream")
    },
    "since": {"name": "since", "in": "query", "schema": _TIMESTAMP},
    "until": {"name": "until", "in": "query", "schema": _TIMESTAMP},
    "limit": {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
    },
    "topic": {
        "name": "topic",
        "in": "query",
        "schema": {"type": "string", "enum": sorted(TOPICS)},
    },
    "last_event_id": {"name": "last_event_id", "in": "query", "schema": _CURSOR},
    "Last-Event-ID": {"name": "Last-Event-ID", "in": "header", "schema": _CURSOR},
    "Idempotency-Key": {"name": "Idempotency-Key", "in": "header", "schema": _IDEMPOTENCY_KEY},
    "traceparent": {"name": "traceparent", "in": "header", "schema": {"type": "string"}},
    "tracestate": {"name": "tracestate", "in": "header", "schema": {"type": "string"}},
}

_REPORT: Final = {
    "type": "object",
    "required": ["resource_id", "payload"],
    "additionalProperties": False,
    "properties": {
        "resource_id": {"type": "string", "pattern": _RESOURCE_ID_PATTERN},
        "payload": {},
        # null is accepted and means "no kind" (clients that serialise None as null).
        "kind": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_KIND_LEN},
        "idempotency_key": {**_IDEMPOTENCY_KEY, "type": ["string", "null"]},
        # W3C trace context; an invalid traceparent is ignored (a new trace is started).
        "traceparent": {"type": ["string", "null"]},
        "tracestate": {"type": ["string", "null"]},
    },
}

_SCHEMAS: Final = {
    "Report": _REPORT,
    "Admitted": {
        "type": "object",
        "required": ["message_id"],
        "properties": {
            "message_id": _ref("MessageId"),
            "replayed": {"type": "boolean", "description": "on a batch or stream line"},
        },
    },
    "MessageId": {
        "type": "string",
        "description": "<resource_id>:<seq>, seq a decimal in [1, 2**63-1] without leading zero",
        "pattern": MESSAGE_ID_PATTERN,
        "maxLength": MESSAGE_ID_MAX_LEN,
    },
    "Ack": {
        "type": "object",
        "required": ["message_id", "status"],
        "properties": {
            "message_id": _ref("MessageId"),
            "status": {"type": "string", "enum": ["ack", "nack"]},
            "reason": {"type": ["string", "null"], "maxLength": MAX_REASON_LEN},
            "retry_after": {"type": ["number", "null"], "minimum": 0, "maximum": MAX_RETRY_AFTER},
        },
    },
    "AckOutcome": {
        "type": "object",
        "required": ["message_id", "outcome"],
        "properties": {
            "message_id": {"type": "string"},
            "outcome": {"type": "string", "enum": ["acked", "nacked", "late", "unknown", "dead"]},
        },
    },
    "EventPage": {
        "type": "object",
        "required": ["events", "next_after", "gap"],
        "properties": {
            "events": {"type": "array", "items": {"type": "object"}},
            "next_after": {"type": "integer", "minimum": 0},
            "gap": {"type": "integer", "minimum": 0},
        },
    },
    "DeadLetterPage": {
        "type": "object",
        "required": ["dead_letters", "next_cursor", "pruned"],
        "properties": {
            "dead_letters": {"type": "array", "items": {"type": "object"}},
            "next_cursor": {"type": ["integer", "null"], "minimum": 0},
            "pruned": {"type": "integer", "minimum": 0},
        },
    },
    "Redrive": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "message_ids": {
                "type": ["array", "null"],
                "items": _ref("MessageId"),
                "minItems": 1,
                "maxItems": MAX_PAGE,
            },
            "resource_id": {**_FILTER, "type": ["string", "null"]},
            "reason": {**_FILTER, "type": ["string", "null"]},
            "upstream": {**_FILTER, "type": ["string", "null"]},
            "since": {**_TIMESTAMP, "type": ["string", "null"]},
            "until": {**_TIMESTAMP, "type": ["string", "null"]},
            "dry_run": {"type": "boolean"},
            "force": {"type": "boolean"},
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
        },
        # message_ids or at least one filter (null counts as absent).
        "anyOf": [
            {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
            for name in ("message_ids", "resource_id", "reason", "upstream", "since", "until")
        ],
    },
    "RedriveResult": {
        "type": "object",
        "required": ["matched", "redriven", "skipped", "message_ids", "dry_run"],
        "properties": {
            "matched": {"type": "integer", "minimum": 0},
            "redriven": {"type": "integer", "minimum": 0},
            "skipped": {"type": "integer", "minimum": 0},
            "skipped_by_reason": {"type": "object"},
            "message_ids": {"type": "array", "items": {"type": "string"}},
            "dry_run": {"type": "boolean"},
        },
    },
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    },
}

_RULE_VAR: Final = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")
_PATH_PARAMS: Final[dict[str, dict[str, Any]]] = {
    "resource_id": {"type": "string", "pattern": _RESOURCE_ID_PATTERN},
}


def openapi_document(app: Quart, *, batch_max_lines: int) -> dict[str, Any]:
    """OpenAPI 3.1 for every route the app really serves (HEAD/OPTIONS omitted).

    ``batch_max_lines`` is the configured cap on reports per batch (``maxItems``).
    """
    batch = {"type": "array", "items": _ref("Report"), "minItems": 1, "maxItems": batch_max_lines}
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = _RULE_VAR.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            doc = dict(
                _DOCS.get(
                    (method, path),
                    {"summary": rule.endpoint, "responses": {"200": {"description": "ok"}}},
                )
            )
            body = doc.get("requestBody")
            if body is not None and "application/x-ndjson" in body["content"]:
                doc["requestBody"] = {
                    **body,
                    "content": {"application/x-ndjson": {"schema": batch}},
                }
            params = [_PARAMS[name] for name in doc.pop("parameters", [])]
            params += [
                {
                    "name": var,
                    "in": "path",
                    "required": True,
                    "schema": _PATH_PARAMS.get(var, {"type": "string"}),
                }
                for var in _RULE_VAR.findall(rule.rule)
            ]
            if params:
                doc["parameters"] = params
            doc["operationId"] = f"{rule.endpoint}_{method.lower()}"
            paths.setdefault(path, {})[method.lower()] = doc
    return {
        "openapi": "3.1.0",
        "info": {"title": "relay-trio", "version": __version__},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": _SCHEMAS},
    }
