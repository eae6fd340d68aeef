"""The NDJSON line protocol, sans-I/O: bytes in, reply bytes out, no Trio and no sockets."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_trio.core.line_protocol import LineConnection, reply_line, token_digest
from relay_trio.core.model import Accepted, Problem, validate_report


class Admit:
    """Admits valid reports as ``<rid>:<n>``; records what it was given."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def __call__(self, obj: object) -> Accepted | Problem:
        self.seen.append(obj)
        report = validate_report(obj)
        if isinstance(report, Problem):
            return report
        return Accepted(f"{report.resource_id}:{len(self.seen)}", report.resource_id, 1)


def parse(out: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.splitlines()]


def report(rid: str) -> bytes:
    return orjson.dumps({"resource_id": rid, "payload": 1}) + b"\n"


def test_replies_name_their_input_line_and_blank_lines_get_none() -> None:
    refused: list[str] = []
    conn = LineConnection(Admit(), 1000, count_refused=refused.append)
    out = conn.receive_data(report("a") + b"\n  \r\n" + b"{bad\n" + report("b")[:5])
    assert conn.mid_line and conn.lines_read == 4
    out += conn.receive_data(report("b")[5:] + b"[1]\n")
    replies = parse(out)
    assert [(r["line"], r.get("message_id") or r["status"]) for r in replies] == [
        (1, "a:1"),
        (4, 400),
        (5, "b:2"),
        (6, 422),
    ]
    assert refused == ["malformed"]  # the 422 is counted by admission itself
    assert (conn.counters.lines_ok, conn.counters.lines_rejected) == (2, 2)


def test_last_line_without_newline_is_answered_at_eof() -> None:
    conn = LineConnection(Admit(), 1000)
    assert conn.receive_data(b"\n" + report("a").rstrip()) == b""
    assert parse(conn.receive_eof()) == [{"message_id": "a:1", "line": 2}]
    assert conn.closed
    assert conn.receive_data(report("late")) == b""


def test_handshake_then_reports() -> None:
    admit = Admit()
    conn = LineConnection(admit, 1000, token=token_digest("t0k"))
    out = conn.receive_data(b'{"token": "t0k"}\n' + report("a"))
    assert parse(out) == [{"ok": True, "line": 1}, {"message_id": "a:1", "line": 2}]
    assert not conn.closed


@pytest.mark.parametrize(
    "first",
    [report("a"), b'{"token": "t0K"}\n', b'{"token": "t0k "}\n', b'{"token": null}\n', b"t0k\n"],
)
def test_missing_or_wrong_token_closes_and_admits_nothing(first: bytes) -> None:
    admit = Admit()
    refused: list[str] = []
    conn = LineConnection(admit, 1000, token=token_digest("t0k"), count_refused=refused.append)
    out = conn.receive_data(first + b'{"token": "t0k"}\n' + report("b"))
    replies = parse(out)
    assert [(r["status"], r["line"]) for r in replies] == [(401, 1)]
    assert replies[0]["type"].endswith("/unauthorized")
    assert conn.closed and admit.seen == [] and refused == ["unauthorized"]
    assert conn.counters.auth_failures == 1
    assert conn.receive_data(report("c")) == b"" and admit.seen == []


def test_oversized_line_answered_413_and_buffer_stays_bounded() -> None:
    refused: list[str] = []
    conn = LineConnection(Admit(), 100, count_refused=refused.append)
    assert parse(conn.receive_data(report("a"))) == [{"message_id": "a:1", "line": 1}]
    out = b""
    for _ in range(10):
        out += conn.receive_data(b"x" * 40)
    replies = parse(out)
    assert [(r["status"], r["line"]) for r in replies] == [(413, 2)]
    assert conn.closed and refused == ["too_large"]
    assert conn.counters.buffer_high_water <= 100 + 40


def test_oversized_tail_after_a_newline_is_refused_at_once() -> None:
    conn = LineConnection(Admit(), 100)
    replies = parse(conn.receive_data(report("a") + b"y" * 150))
    assert [(r.get("status"), r["line"]) for r in replies] == [(None, 1), (413, 2)]
    assert conn.closed


def test_identity_mismatch_is_refused_before_admission() -> None:
    admit = Admit()
    refused: list[str] = []
    conn = LineConnection(admit, 1000, cid=42, count_refused=refused.append)
    replies = parse(conn.receive_data(report("vm:42") + report("vm:43")))
    assert [(r.get("status"), r["line"]) for r in replies] == [(None, 1), (403, 2)]
    assert admit.seen == [{"resource_id": "vm:42", "payload": 1}]
    assert refused == ["unauthorized"]


def test_reply_line_shape() -> None:
    assert reply_line(Accepted("a:1", "a", 1), 7) == b'{"message_id":"a:1","line":7}\n'
    problem = orjson.loads(reply_line(Problem(429, "rate-limited", "Slow", retry_after=3.0), 2))
    assert (problem["status"], problem["retry_after"], problem["line"]) == (429, 3.0, 2)


_LINES = st.lists(
    st.one_of(
        st.builds(report, st.sampled_from(["a", "b"])),
        st.sampled_from([b"nope\n", b"{}\n", b"\n", b"  \r\n", b'{"x":\n', b"z" * 90 + b"\n"]),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(lines=_LINES, cuts=st.lists(st.integers(min_value=0, max_value=2000)))
def test_replies_do_not_depend_on_how_bytes_are_split(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(lines)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})

    def replies_for(pieces: list[bytes]) -> bytes:
        conn = LineConnection(Admit(), 80)
        out = b"".join(conn.receive_data(piece) for piece in pieces)
        return out + conn.receive_eof()

    whole = replies_for([data])
    split = replies_for([data[a:b] for a, b in itertools.pairwise(points)])
    assert split == whole
    numbers = [r["line"] for r in parse(whole)]
    assert numbers == sorted(set(numbers))
    blank = {n for n, line in enumerate(lines, 1) if not line.strip()}
    assert not blank & set(numbers)
