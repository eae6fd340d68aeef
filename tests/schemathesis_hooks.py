"""schemathesis hooks for tests/test_schemathesis.py (loaded with ``SCHEMATHESIS_HOOKS``)."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import schemathesis

_KEY = re.compile(r"^[!-~]{1,255}$")
_CASES = itertools.count()


@schemathesis.serializer("application/x-ndjson")
def ndjson(_ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """A batch body: one JSON line per array item (any other value is one line)."""
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


@schemathesis.hook
def before_call(_ctx: schemathesis.HookContext, case: Any, _kwargs: dict[str, Any]) -> None:
    """Make every valid idempotency key unique to its generated case.

    Generated cases are independent clients; two of them reusing one key for different
    reports is exactly what the relay must refuse (422 ``idempotency-mismatch``, tested in
    tests/test_idempotency.py), not "valid data rejected". Invalid keys are left alone.
    """
    n = next(_CASES)
    headers = case.headers
    if headers and _KEY.fullmatch(headers.get("Idempotency-Key", "")):
        headers["Idempotency-Key"] = f"{n}-{headers['Idempotency-Key']}"[:255]
    body = case.body
    key = body.get("idempotency_key") if isinstance(body, dict) else None
    if isinstance(key, str) and _KEY.fullmatch(key):
        body["idempotency_key"] = f"{n}-{body['idempotency_key']}"[:255]
