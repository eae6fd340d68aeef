"""JSON views of relay state for the HTTP API. Pure functions, no I/O.

Trio's clock drives every deadline; people read wall-clock times. A view takes one
reading of each clock and converts every Trio time through it, so times within one
response are consistent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .umh import Attempt, DeadLetter, PendingView

WallOf = Callable[[float | None], str | None]


def rfc3339(ts: float) -> str:
    """``ts`` (Unix seconds) as an RFC 3339 UTC timestamp with milliseconds.

    Every event gets one: the last result is kept for its millisecond, and the date part
    is formatted once per second (cached), so most calls format only the milliseconds.
    """
    millis_total = round(ts * 1_000_000) // 1000
    last = _last[0]
    if millis_total == last[0]:
        return last[1]
    seconds, millis = divmod(millis_total, 1000)
    text = f"{_second_prefix(seconds)}.{millis:03d}Z"
    _last[0] = (millis_total, text)
    return text


#: The last (milliseconds, text) :func:`rfc3339` returned.
_last: list[tuple[int, str]] = [(-1, "")]


@functools.lru_cache(maxsize=8)
def _second_prefix(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def wall_converter(trio_now: float, wall_now: float) -> WallOf:
    """Map Trio times to RFC 3339 wall-clock strings; ``None`` stays ``None``."""

    def wall_of(t: float | None) -> str | None:
        return None if t is None else rfc3339(wall_now - (trio_now - t))

    return wall_of


def attempt_view(attempt: Attempt, wall_of: WallOf) -> dict[str, Any]:
    """One failed attempt as JSON."""
    return {"at": wall_of(attempt.at), "outcome": attempt.outcome, "detail": attempt.detail}


def pending_view(pending: PendingView, wall_of: WallOf) -> dict[str, Any]:
    """A resource's pending message as JSON, with its attempt history."""
    return {
        "message_id": pending.message_id,
        "phase": pending.phase.value,
        "attempts": pending.attempts,
        "admitted_at": wall_of(pending.admitted_at),
        "next_deadline": wall_of(pending.deadline),
        "history": [attempt_view(a, wall_of) for a in pending.history],
    }


def dead_letter_view(dead: DeadLetter, wall_of: WallOf) -> dict[str, Any]:
    """A dead letter as JSON, with its full attempt history."""
    return {
        "index": dead.index,
        "message_id": dead.message_id,
        "resource_id": dead.resource_id,
        "reason": dead.reason,
        "admitted_at": wall_of(dead.admitted_at),
        "dead_at": wall_of(dead.dead_at),
        "attempts": [attempt_view(a, wall_of) for a in dead.attempts],
    }
