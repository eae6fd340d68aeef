"""The OpenAPI document, built from the application's real URL map so it cannot drift."""

from __future__ import annotations

import re
from typing import Any, Final

from quart import Quart

from . import __version__

_PROBLEM: Final = {
    "description": "problem+json",
    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
}

_DOCS: Final[dict[tuple[str, str], dict[str, Any]]] = {
    ("POST", "/v1/reports"): {
        "summary": "Submit one report",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Report"}}},
        },
        "responses": {
            "202": {"description": "admitted, returns message_id"},
            "400": _PROBLEM,
            "401": _PROBLEM,
            "403": _PROBLEM,
            "413": _PROBLEM,
            "422": _PROBLEM,
            "429": _PROBLEM,
            "503": _PROBLEM,
        },
    },
    ("POST", "/v1/reports:batch"): {
        "summary": "Submit many reports as NDJSON; one result line per report, in order",
        "requestBody": {
            "required": True,
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        },
        "responses": {
            "200": {
                "description": (
                    "NDJSON results, one per non-blank input line, in order: "
                    '{"message_id", "line"} or a problem object with "line", the '
                    "1-based input line number. Blank lines get no result."
                )
            },
            "401": _PROBLEM,
            "403": _PROBLEM,
            "413": _PROBLEM,
        },
    },
    ("POST", "/v1/acks"): {
        "summary": "Acknowledge (ack) or reject (nack) a message",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ack"}}},
        },
        "responses": {
            "200": {"description": "outcome: acked, nacked, late or unknown"},
            "400": _PROBLEM,
            "401": _PROBLEM,
            "403": _PROBLEM,
            "413": _PROBLEM,
            "422": _PROBLEM,
        },
    },
    ("GET", "/v1/resources/{resource_id}"): {
        "summary": "Per-resource state",
        "responses": {"200": {"description": "state"}, "404": _PROBLEM},
    },
    ("GET", "/v1/deadletters"): {
        "summary": "Dead letters, paged",
        "parameters": ["after", "limit"],
        "responses": {"200": {"description": "page"}, "422": _PROBLEM},
    },
    ("GET", "/v1/events"): {
        "summary": "Event log, paged",
        "parameters": ["after", "limit", "topic"],
        "responses": {"200": {"description": "page"}, "422": _PROBLEM},
    },
    ("GET", "/v1/events/stream"): {
        "summary": "Server-Sent Events stream",
        "parameters": ["topic", "last_event_id"],
        "responses": {
            "200": {"description": "text/event-stream"},
            "422": _PROBLEM,
            "503": _PROBLEM,
        },
    },
    ("GET", "/v1/status"): {
        "summary": "Counters, gauges and config summary",
        "responses": {"200": {"description": "status"}},
    },
    ("GET", "/metrics"): {
        "summary": "Prometheus metrics",
        "responses": {"200": {"description": "text exposition"}},
    },
    ("GET", "/healthz"): {"summary": "Liveness", "responses": {"200": {"description": "alive"}}},
    ("GET", "/readyz"): {
        "summary": "Readiness (false while starting or draining)",
        "responses": {"200": {"description": "ready"}, "503": _PROBLEM},
    },
    ("GET", "/openapi.json"): {
        "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.1"}},
    },
    ("POST", "/admin/shutdown"): {
        "summary": "Start a staged shutdown (admin token)",
        "responses": {"202": {"description": "started"}, "401": _PROBLEM, "403": _PROBLEM},
    },
    ("GET", "/"): {"summary": "Live status page", "responses": {"200": {"description": "HTML"}}},
}

_PARAMS: Final[dict[str, dict[str, Any]]] = {
    "after": {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    "limit": {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
    },
    "topic": {
        "name": "topic",
        "in": "query",
        "schema": {"type": "string", "enum": ["reports", "acks", "drops", "deadletter", "system"]},
    },
    "last_event_id": {
        "name": "last_event_id",
        "in": "query",
        "schema": {"type": "integer", "minimum": 0},
    },
}

_SCHEMAS: Final = {
    "Report": {
        "type": "object",
        "required": ["resource_id", "payload"],
        "additionalProperties": False,
        "properties": {
            "resource_id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
            "payload": {},
            "kind": {"type": "string", "minLength": 1, "maxLength": 64},
        },
    },
    "Ack": {
        "type": "object",
        "required": ["message_id", "status"],
        "properties": {
            "message_id": {"type": "string"},
            "status": {"type": "string", "enum": ["ack", "nack"]},
            "reason": {"type": "string", "maxLength": 256},
            "retry_after": {"type": "number", "minimum": 0, "maximum": 86400},
        },
    },
    "Problem": {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    },
}

_RULE_VAR: Final = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


def openapi_document(app: Quart) -> dict[str, Any]:
    """OpenAPI 3.1 for every route the app really serves (HEAD/OPTIONS omitted)."""
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
            params = [_PARAMS[name] for name in doc.pop("parameters", [])]
            params += [
                {"name": var, "in": "path", "required": True, "schema": {"type": "string"}}
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
