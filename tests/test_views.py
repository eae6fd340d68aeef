"""JSON view helpers."""

from __future__ import annotations

from datetime import UTC, datetime

from relay_trio.core.views import rfc3339


def test_rfc3339_matches_datetime_isoformat() -> None:
    for ts in (0.0, 1764078023.4567, 1764078023.9999, 1764078023.001, 1764078023.0005, 1.9999999):
        expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
        assert rfc3339(ts) == expected.replace("+00:00", "Z")
