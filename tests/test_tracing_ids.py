"""Trace and span ids of admitted messages: cut from a pool of random hex digits.

The pool hands out every digit once, in order, and draws a new pool when the next cut would
cross its end; the ids it yields are W3C-shaped and never repeat.
"""

from __future__ import annotations

import random
import re

import pytest

from relay_trio import tracing
from relay_trio.core.webhooks import TraceContext
from relay_trio.tracing import NO_TRACING

HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")


def test_the_pool_hands_out_each_digit_once_in_order_and_refills_at_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing, "_ids", random.Random(7))
    expected = random.Random(7)
    first = expected.randbytes(6144).hex()  # 12288 digits: exactly 256 cuts of 48
    second = expected.randbytes(6144).hex()
    pool = tracing._HexPool()
    cuts = [pool.take(48) for _ in range(256)]
    assert "".join(cuts) == first
    # The 257th cut would cross the end: it comes from a fresh pool, from its start.
    assert pool.take(48) == second[:48]
    assert pool.take(16) == second[48:64]


def test_a_cut_longer_than_the_pool_draws_a_pool_that_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing, "_ids", random.Random(3))
    digits = tracing._HexPool().take(20_000)
    assert digits == random.Random(3).randbytes(10_000).hex()


def test_new_traces_are_w3c_shaped_and_never_repeat_across_refills() -> None:
    # 1000 admissions cross the pool's end three times.
    traces = [NO_TRACING.admitted(None, f"r{i}:1", f"r{i}") for i in range(1000)]
    for t in traces:
        assert isinstance(t, TraceContext)
        assert HEX32.fullmatch(t.trace_id) and t.trace_id != "0" * 32
        assert t.parent_id is not None and HEX16.fullmatch(t.parent_id)
        assert (t.flags, t.tracestate) == ("01", None)
    ids = [t.trace_id for t in traces] + [str(t.parent_id) for t in traces]
    assert len(set(ids)) == len(ids)


def test_an_incoming_trace_keeps_its_id_flags_and_state_with_a_new_span() -> None:
    incoming = TraceContext("ab" * 16, "cd" * 8, "00", "vendor=1")
    got = NO_TRACING.admitted(incoming, "r:1", "r")
    assert (got.trace_id, got.flags, got.tracestate) == ("ab" * 16, "00", "vendor=1")
    assert got.parent_id is not None and HEX16.fullmatch(got.parent_id)
    assert got.parent_id != incoming.parent_id
