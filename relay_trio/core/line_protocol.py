"""The NDJSON line protocol of the stream receiver, sans-I/O: bytes in, reply bytes out.

No Trio, no sockets, no clock: :class:`LineConnection` is fed the bytes one connection
received and returns the bytes to write back, like ``h11.Connection``. The stream receiver
(``_receiver.py``) drives it with deadlines and connection limits; the batch route reuses
:func:`reply_line` so both doors answer in the same shape.

Wire protocol (one connection):

* client → relay: newline-delimited JSON, one report object per line. Blank lines get no
  reply but count as input lines (and as keepalives: they reset the idle deadline).
* relay → client: one JSON line per non-blank input line, in order: ``{"message_id": ...,
  "line": N}`` or an RFC 9457 problem object (``status``, ``type``, ``retry_after`` for
  429...) with ``"line": N``. ``line`` is the 1-based number of the input line on this
  connection, blank lines and the handshake line included, so a client can pair replies
  with what it sent.
* Handshake: when the relay has an ``ingest_token``, the first non-blank line must be
  ``{"token": "..."}``, answered ``{"ok": true, "line": N}``. A missing or wrong token
  gets a 401 ``unauthorized`` reply line and the connection is closed: nothing sent on it
  is admitted. Tokens are compared in constant time.
* A line longer than the frame limit gets a 413 ``too-large`` reply and the connection is
  closed (the relay stops reading it).
* The relay may send one unsolicited problem line (without ``line``) right before it
  closes the connection: 503 ``too-many-connections`` / ``shutting-down``, 403
  ``peer-not-allowed``, 408 ``idle-timeout``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import cast

import attrs
import orjson

from .identity import identity_problem
from .model import Accepted, Problem, malformed, reply_for, too_large

__all__ = [
    "LineBatch",
    "LineConnection",
    "LineCounters",
    "idle_timeout",
    "problem_line",
    "reply_line",
    "shutting_down",
    "token_digest",
    "too_many_connections",
    "unauthorized",
]


def reply_line(result: Accepted | Problem, line: int) -> bytes:
    """The NDJSON reply to input line ``line`` (1-based), newline included. Pure."""
    if isinstance(result, Accepted) and not result.replayed:
        # The common reply, one per admitted report: formatted directly (same bytes).
        return b'{"message_id":%s,"line":%d}\n' % (orjson.dumps(result.message_id), line)
    body = reply_for(result)
    body["line"] = line
    return orjson.dumps(body) + b"\n"


def problem_line(problem: Problem) -> bytes:
    """An unsolicited problem line (answers no input line), newline included. Pure."""
    return orjson.dumps(problem.to_dict()) + b"\n"


def too_many_connections(detail: str) -> Problem:
    """503: every connection slot is taken."""
    return Problem(503, "too-many-connections", "Too many connections", detail)


def idle_timeout(seconds: float) -> Problem:
    """408: no complete line within the idle deadline."""
    return Problem(
        408, "idle-timeout", "Idle timeout", f"no complete line within {seconds:g} seconds"
    )


def shutting_down() -> Problem:
    """503: the relay is draining its stream connections."""
    return Problem(503, "shutting-down", "Shutting down", "the relay is draining connections")


def unauthorized() -> Problem:
    """401: the handshake line is missing or carries the wrong token."""
    return Problem(
        401,
        "unauthorized",
        "Unauthorized",
        'the first line must be {"token": "..."} with the ingest token',
    )


def token_digest(token: str) -> bytes:
    """What :class:`LineConnection` compares: a fixed-length digest, so the comparison
    takes the same time whatever the length of the token a client sends."""
    return hashlib.sha256(token.encode()).digest()


def _token_matches(line: bytes | bytearray, expected: bytes) -> bool:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    got = obj.get("token") if isinstance(obj, dict) else None
    if not isinstance(got, str):
        return False
    return hmac.compare_digest(token_digest(got), expected)


def _count_nothing(_reason: str) -> None:
    pass


@attrs.define(eq=False)
class LineCounters:
    """Totals over every connection of one receiver. Shared by its connections."""

    lines_ok: int = 0
    lines_rejected: int = 0
    frames_too_large: int = 0
    auth_failures: int = 0
    #: Largest per-connection read buffer seen; never exceeds max_frame + one read.
    buffer_high_water: int = 0


@attrs.define(eq=False)
class LineBatch:
    """The replies to the lines one read completed, for one write. ``parts`` holds reply
    bytes, or the line number of a report whose admission the caller still has to decide
    (``reports``, same order); :meth:`LineConnection.answer` fills those in."""

    parts: list[bytes | int]
    reports: list[object]

    def join(self) -> bytes:
        """The reply bytes. Only once every part is decided (no ``reports`` left, or
        after :meth:`LineConnection.answer`)."""
        return b"".join(cast("list[bytes]", self.parts))


@attrs.define(eq=False)
class LineConnection:
    """One connection's state in the line protocol: framing, handshake, line numbers.

    ``admit`` is the relay's admission (synchronous, never raises for bad input), used by
    :meth:`receive_data`; :meth:`read_data` instead leaves the reports to the caller (an
    admission that awaits, such as cluster mode's) and :meth:`answer` writes its decisions.
    ``token`` is the :func:`token_digest` of the token the handshake must present, or
    None for no handshake. ``cid`` is the VSOCK peer's CID, which binds resource ids.
    ``count_refused(reason)`` is called once for every line refused before admission
    (``malformed``, ``too_large``, ``unauthorized``), so the relay's report counters add
    up the same way for every door. Every method is synchronous and never blocks.
    """

    admit: Callable[[object], Accepted | Problem]
    max_frame: int
    token: bytes | None = None
    cid: int | None = None
    counters: LineCounters = attrs.field(factory=LineCounters)
    count_refused: Callable[[str], None] = _count_nothing

    #: Complete input lines so far (blank ones included): the last ``line`` number used.
    lines_read: int = attrs.field(init=False, default=0)
    #: Lines admitted on this connection: when it grows, the driver awaits durability
    #: before it writes the replies.
    admitted: int = attrs.field(init=False, default=0)
    #: True once the relay must close: after a 413 or a failed handshake, or after EOF.
    closed: bool = attrs.field(init=False, default=False)
    _authed: bool = attrs.field(init=False)
    _buf: bytearray = attrs.field(init=False, factory=bytearray)

    def __attrs_post_init__(self) -> None:
        self._authed = self.token is None

    @property
    def mid_line(self) -> bool:
        """True while part of a line has arrived but not its newline."""
        return bool(self._buf)

    def receive_data(self, data: bytes | bytearray) -> bytes:
        """Feed received bytes; return the replies to every line they complete (maybe
        ``b""``), each report admitted by ``admit``. The buffer never holds more than
        ``max_frame`` plus one ``data``: a line longer than that is answered 413 and the
        connection ``closed``.
        """
        return self._answer(self._frame(data), self.admit).join()

    def receive_eof(self) -> bytes:
        """The peer finished sending: a last line without its newline is still a line.
        Returns its reply (maybe ``b""``); the connection is ``closed`` afterwards."""
        return self._answer(self._frame_eof(), self.admit).join()

    def read_data(self, data: bytes | bytearray) -> LineBatch:
        """Like :meth:`receive_data`, but the reports are not admitted: the returned batch
        holds them, in order, for the caller to decide (for example in one awaited call),
        and :meth:`answer` turns the decisions into the reply bytes."""
        return self._answer(self._frame(data), None)

    def read_eof(self) -> LineBatch:
        """Like :meth:`receive_eof`, with admission left to the caller (see :meth:`read_data`)."""
        return self._answer(self._frame_eof(), None)

    def answer(self, batch: LineBatch, results: Sequence[Accepted | Problem]) -> bytes:
        """The reply bytes for ``batch``, given one admission result per ``batch.reports``
        (same order). Counts admitted and rejected lines as :meth:`receive_data` does."""
        assert len(results) == len(batch.reports), "one result per deferred report"
        counters = self.counters
        parts = batch.parts
        at = 0
        for i, part in enumerate(parts):
            if isinstance(part, int):
                result = results[at]
                at += 1
                if isinstance(result, Accepted):
                    counters.lines_ok += 1
                    self.admitted += 1
                else:
                    counters.lines_rejected += 1
                parts[i] = reply_line(result, part)
        return batch.join()

    def _frame(self, data: bytes | bytearray) -> list[bytes | bytearray]:
        """The lines ``data`` completes (a too-long unfinished tail included, for its 413)."""
        if self.closed:
            return []
        buf = self._buf
        start = len(buf)
        buf += data
        self.counters.buffer_high_water = max(self.counters.buffer_high_water, len(buf))
        newline = buf.rfind(b"\n", start)
        if newline < 0:
            return [buf] if len(buf) > self.max_frame else []
        lines: list[bytes | bytearray] = list(buf[:newline].split(b"\n"))
        del buf[: newline + 1]
        if len(buf) > self.max_frame:
            lines.append(buf)  # the unfinished tail is already too long: answer 413
        return lines

    def _frame_eof(self) -> list[bytes | bytearray]:
        if self.closed:
            return []
        lines: list[bytes | bytearray] = [bytes(self._buf)] if self._buf else []
        self._buf.clear()
        self.closed = True
        return lines

    def _answer(
        self,
        lines: Sequence[bytes | bytearray],
        admit: Callable[[object], Accepted | Problem] | None,
    ) -> LineBatch:
        """Reply lines for ``lines``, for one write; with ``admit`` ``None`` each report's
        reply is left to :meth:`answer` (a line number in ``parts``, the report in
        ``reports``).

        Admission never awaits, and one write per read keeps the per-line cost down to a
        JSON parse, an admit() and a dumps().
        """
        max_frame = self.max_frame
        counters = self.counters
        cid = self.cid
        replies: list[bytes | int] = []
        reports: list[object] = []
        number = self.lines_read
        for line in lines:
            number += 1
            if len(line) > max_frame:
                counters.frames_too_large += 1
                counters.lines_rejected += 1
                self.count_refused("too_large")
                replies.append(reply_line(too_large(max_frame), number))
                self.closed = True
                break
            if not line or line.isspace():
                continue
            if not self._authed:
                assert self.token is not None
                if not _token_matches(line, self.token):
                    counters.auth_failures += 1
                    counters.lines_rejected += 1
                    self.count_refused("unauthorized")
                    replies.append(reply_line(unauthorized(), number))
                    self.closed = True
                    break
                self._authed = True
                replies.append(b'{"ok":true,"line":%d}\n' % number)
                continue
            result: Accepted | Problem
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                self.count_refused("malformed")
                result = malformed(str(exc))
            else:
                refused = identity_problem(obj, cid)
                if refused is not None:
                    # A report for another guest's resource is refused like a bad token.
                    self.count_refused("unauthorized")
                    result = refused
                elif admit is None:
                    replies.append(number)  # decided by the caller: see answer()
                    reports.append(obj)
                    continue
                else:
                    result = admit(obj)
            if isinstance(result, Accepted):
                counters.lines_ok += 1
                self.admitted += 1
            else:
                counters.lines_rejected += 1
            replies.append(reply_line(result, number))
        self.lines_read = number
        return LineBatch(replies, reports)
