"""Leaky bucket: exact refill timing and the admission bound, as properties."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from relay_trio.core.limiter import LeakyBucket, retry_after_header


def test_one_per_minute_refills_after_exactly_sixty_seconds() -> None:
    bucket = LeakyBucket.per_minute(1.0, 1)
    ok, level, _ = bucket.offer(0.0, 0.0, 100.0)
    assert ok and level == 1.0
    ok, _, retry = bucket.offer(level, 100.0, 100.0)
    assert not ok and retry == 60.0
    ok, _, retry = bucket.offer(level, 100.0, 159.0)
    assert not ok and math.isclose(retry, 1.0)
    ok, _, _ = bucket.offer(level, 100.0, 160.0)
    assert ok


def test_burst_admits_that_many_at_once_then_paces() -> None:
    bucket = LeakyBucket(rate=2.0, burst=3)
    level, last = 0.0, 0.0
    admitted = []
    for _ in range(5):
        ok, level, retry = bucket.offer(level, last, 10.0)
        last = 10.0
        admitted.append(ok)
    assert admitted == [True, True, True, False, False]
    assert retry == 0.5
    ok, level, _ = bucket.offer(level, last, 10.5)
    assert ok


def test_retry_after_header_rounds_up_to_whole_seconds() -> None:
    assert retry_after_header(59.001) == "60"
    assert retry_after_header(60.0) == "60"
    assert retry_after_header(0.2) == "1"


arrivals = st.lists(
    st.tuples(st.floats(min_value=0, max_value=0.5), st.sampled_from(["a", "b", "c"])),
    min_size=1,
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    gaps=arrivals,
    rate=st.floats(min_value=0.5, max_value=20),
    burst=st.integers(min_value=1, max_value=5),
)
def test_admissions_never_exceed_burst_plus_rate_times_window(
    gaps: list[tuple[float, str]], rate: float, burst: int
) -> None:
    bucket = LeakyBucket(rate=rate, burst=burst)
    state: dict[str, tuple[float, float]] = {}
    times: dict[str, list[float]] = {}
    now = 0.0
    for gap, rid in gaps:
        now += gap
        level, last = state.get(rid, (0.0, now))
        before = bucket.drained(level, last, now)
        ok, level, _ = bucket.offer(level, last, now)
        # Admitted whenever the bucket has room for one more.
        assert ok == (before + 1 <= burst + 1e-9)
        state[rid] = (level, now)
        if ok:
            times.setdefault(rid, []).append(now)
    for admitted_at in times.values():
        for i, start in enumerate(admitted_at):
            for j in range(i, len(admitted_at)):
                window = admitted_at[j] - start
                count = j - i + 1
                assert count <= burst + rate * window + 1e-6
