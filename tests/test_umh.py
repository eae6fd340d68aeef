"""Pure tests of the unconfirmed-message handler: every ``now`` is passed explicitly."""

from __future__ import annotations

import random

import pytest

from relay_trio.core.umh import (
    AckOutcome,
    Attempt,
    DeadLetterLog,
    Due,
    MessageState,
    Outcome,
    Phase,
    RetryPolicy,
    UnconfirmedMessages,
)

SEED = 1234


def make(policy: RetryPolicy | None = None, **kw: int) -> UnconfirmedMessages:
    return UnconfirmedMessages(policy or RetryPolicy(), random.Random(SEED), **kw)


# ---------------------------------------------------------------- policy


def test_backoff_exact_values_and_bounds() -> None:
    policy = RetryPolicy(retry_base=30.0, retry_cap=600.0)
    rng = random.Random(SEED)
    twin = random.Random(SEED)
    ceilings = [30.0, 60.0, 120.0, 240.0, 480.0, 600.0, 600.0, 600.0, 600.0, 600.0]
    for attempt, ceiling in enumerate(ceilings, start=1):
        delay = policy.backoff(attempt, rng)
        assert delay == twin.uniform(0, min(600.0, 30.0 * 2 ** (attempt - 1)))
        assert 0.0 <= delay <= ceiling


def test_backoff_huge_attempt_is_capped_not_overflowing() -> None:
    policy = RetryPolicy(retry_base=1.0, retry_cap=5.0)
    rng = random.Random(1)
    assert all(0.0 <= policy.backoff(10_000, rng) <= 5.0 for _ in range(100))
    with pytest.raises(ValueError):
        policy.backoff(0, rng)


@pytest.mark.parametrize(
    "kw",
    [
        {"ack_timeout": 0.0},
        {"retry_base": -1.0},
        {"retry_cap": float("nan")},
        {"max_attempts": 0},
        {"max_age": float("inf")},
    ],
)
def test_policy_validation(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- ack deadline


def test_ack_timeout_deadline_is_exact_and_counts_an_attempt() -> None:
    umh = make(RetryPolicy(ack_timeout=30.0, retry_base=10.0, retry_cap=100.0))
    twin = random.Random(SEED)
    assert umh.admit("vm1:1", "vm1", now=5.0) is None
    assert umh.next_deadline() is None  # in flight: no deadline before sent()
    umh.sent("vm1:1", now=7.0)
    assert umh.next_deadline() == 37.0
    assert umh.pop_due(36.999) == []
    assert umh.pop_due(37.0) == []  # timeout -> retry armed, nothing to resend yet
    assert umh.ack_timeouts == 1
    view = umh.pending_for("vm1")
    assert view is not None
    assert view.phase is Phase.RETRY_WAIT
    assert view.attempts == 1
    assert view.history == (Attempt(37.0, "ack_timeout", "no ack within 30s"),)
    retry_at = 37.0 + twin.uniform(0, 10.0)
    assert view.deadline == retry_at
    assert umh.next_deadline() == retry_at
    assert umh.pop_due(retry_at) == [Due("resend", "vm1:1", "vm1", 2, retry_at)]
    assert umh.retries == 1
    assert umh.next_deadline() is None  # in flight again


def test_ack_clears_and_cancels_deadline() -> None:
    umh = make()
    umh.admit("vm1:1", "vm1", 0.0)
    umh.sent("vm1:1", 1.0)
    assert umh.ack("vm1:1", 2.0) == AckOutcome.ACKED
    assert umh.ack("vm1:1", 2.0) == "late"
    assert umh.state_of("vm1:1") is MessageState.ACKED
    assert umh.next_deadline() is None
    assert umh.pop_due(1000.0) == []
    assert umh.pending_count() == 0
    assert (umh.acked, umh.late_acks, umh.unknown_acks) == (1, 1, 0)


def test_sent_ignored_when_not_in_flight() -> None:
    umh = make()
    umh.admit("vm1:1", "vm1", 0.0)
    assert umh.nack("vm1:1", 1.0, "busy", retry_after=50.0) == AckOutcome.NACKED
    umh.sent("vm1:1", 2.0)  # the send finished after the NACK arrived: keep the retry
    assert umh.next_deadline() == 51.0
    umh.sent("nope:1", 2.0)  # unknown ids are ignored
    assert umh.next_deadline() == 51.0


# ---------------------------------------------------------------- failures, retries, dead letters


def test_send_failed_backoff_sequence_and_dead_letter_after_max_attempts() -> None:
    policy = RetryPolicy(ack_timeout=30.0, retry_base=2.0, retry_cap=10.0, max_attempts=5)
    umh = make(policy)
    twin = random.Random(SEED)
    umh.admit("vm1:1", "vm1", 0.0)
    now = 0.0
    for attempt in range(1, 5):
        outcome = umh.send_failed("vm1:1", now, f"boom{attempt}")
        expected = now + twin.uniform(0, min(10.0, 2.0 * 2 ** (attempt - 1)))
        assert outcome == Outcome("retry", retry_at=expected)
        assert expected - now <= min(10.0, 2.0 * 2 ** (attempt - 1))
        assert umh.pop_due(expected) == [Due("resend", "vm1:1", "vm1", attempt + 1, expected)]
        now = expected
    outcome = umh.send_failed("vm1:1", now, "boom5")
    assert outcome.kind == "dead"
    dl = outcome.dead_letter
    assert dl is not None
    assert dl.reason == "max_attempts"
    assert [a.detail for a in dl.attempts] == [f"boom{i}" for i in range(1, 6)]
    assert len(dl.attempts) == policy.max_attempts
    assert dl.dead_at == now
    assert dl.index == 1
    assert umh.state_of("vm1:1") is MessageState.DEAD
    assert umh.dead_lettered == 1
    assert umh.dead_letters.get("vm1:1") is dl
    assert umh.pending_count() == 0
    assert umh.send_failed("vm1:1", now, "again") == Outcome("ignored")


def test_ack_timeouts_dead_letter_exactly_at_max_attempts() -> None:
    policy = RetryPolicy(ack_timeout=5.0, retry_base=1.0, retry_cap=1.0, max_attempts=3)
    umh = make(policy)
    umh.admit("vm1:1", "vm1", 0.0)
    now = 0.0
    dead: list[Due] = []
    for _ in range(3):
        umh.sent("vm1:1", now)
        now += 5.0
        dead = umh.pop_due(now)
        if dead:
            break
        view = umh.pending_for("vm1")
        assert view is not None and view.deadline is not None
        now = view.deadline
        assert [d.kind for d in umh.pop_due(now)] == ["resend"]
    assert umh.ack_timeouts == 3
    assert len(dead) == 1
    assert dead[0].kind == "dead"
    assert dead[0].attempt == 3
    assert dead[0].dead_letter is not None
    assert dead[0].dead_letter.reason == "max_attempts"
    assert [a.outcome for a in dead[0].dead_letter.attempts] == ["ack_timeout"] * 3


def test_max_age_dead_letter() -> None:
    policy = RetryPolicy(retry_base=1.0, retry_cap=1.0, max_attempts=100, max_age=60.0)
    umh = make(policy)
    umh.admit("vm1:1", "vm1", 10.0)
    assert umh.send_failed("vm1:1", 69.9, "x").kind == "retry"
    umh.pop_due(71.0)
    outcome = umh.send_failed("vm1:1", 70.0, "y")
    assert outcome.kind == "dead"
    assert outcome.dead_letter is not None
    assert outcome.dead_letter.reason == "max_age"
    assert outcome.dead_letter.admitted_at == 10.0
    assert len(outcome.dead_letter.attempts) == 2


def test_nack_retry_after_honoured_and_capped() -> None:
    umh = make(RetryPolicy(retry_cap=600.0))
    umh.admit("a:1", "a", 0.0)
    umh.sent("a:1", 0.0)
    assert umh.nack("a:1", 10.0, "busy", retry_after=42.5) == AckOutcome.NACKED
    assert umh.next_deadline() == 52.5
    assert umh.pop_due(52.5) == [Due("resend", "a:1", "a", 2, 52.5)]
    umh.sent("a:1", 53.0)
    assert umh.nack("a:1", 60.0, "busy", retry_after=1e9) == "nacked"
    assert umh.next_deadline() == 660.0  # capped at retry_cap
    umh.pop_due(660.0)
    assert umh.nack("a:1", 700.0, "busy", retry_after=-5.0) == "nacked"
    assert umh.next_deadline() == 700.0  # negative -> 0


def test_nack_without_retry_after_uses_backoff() -> None:
    umh = make(RetryPolicy(retry_base=4.0, retry_cap=100.0))
    twin = random.Random(SEED)
    umh.admit("a:1", "a", 0.0)
    umh.sent("a:1", 0.0)
    assert umh.nack("a:1", 3.0, "bad", None) == "nacked"
    assert umh.next_deadline() == 3.0 + twin.uniform(0, 4.0)
    assert umh.nacks == 1


def test_nack_while_waiting_for_retry_does_not_count_twice() -> None:
    umh = make(RetryPolicy(ack_timeout=5.0, retry_base=1.0, retry_cap=200.0))
    umh.admit("a:1", "a", 0.0)
    umh.sent("a:1", 0.0)
    umh.pop_due(5.0)  # ack timeout: attempt 1, retry armed within [5, 6]
    view = umh.pending_for("a")
    assert view is not None and view.deadline is not None
    retry_at = view.deadline
    assert umh.nack("a:1", 5.5, "late nack", None) == "nacked"
    assert umh.next_deadline() == retry_at  # unchanged, not counted
    assert umh.nack("a:1", 5.5, "late nack", retry_after=100.0) == "nacked"
    assert umh.next_deadline() == 105.5  # postponed as asked
    after = umh.pending_for("a")
    assert after is not None and after.attempts == 1


def test_nack_exhausting_returns_dead() -> None:
    umh = make(RetryPolicy(max_attempts=1))
    umh.admit("a:1", "a", 0.0)
    umh.sent("a:1", 0.0)
    assert umh.nack("a:1", 1.0, "rejected", None) == AckOutcome.DEAD
    dl = umh.dead_letters.get("a:1")
    assert dl is not None
    assert dl.attempts == (Attempt(1.0, "nack", "rejected"),)


def test_nack_of_old_or_unknown_id() -> None:
    umh = make()
    umh.admit("a:1", "a", 0.0)
    umh.admit("a:2", "a", 1.0)
    umh.sent("a:2", 1.0)
    assert umh.nack("a:1", 2.0, "x", None) == "late"
    assert umh.nack("zzz:1", 2.0, "x", None) == "unknown"
    assert umh.next_deadline() == 31.0  # a:2 untouched
    assert umh.nacks == 0


# ---------------------------------------------------------------- superseding and stale acks


def test_superseding_cancels_old_deadline() -> None:
    umh = make()
    assert umh.admit("vm1:1", "vm1", 0.0) is None
    umh.sent("vm1:1", 0.0)
    assert umh.next_deadline() == 30.0
    assert umh.admit("vm1:2", "vm1", 10.0) == "vm1:1"
    assert umh.state_of("vm1:1") is MessageState.SUPERSEDED
    assert umh.state_of("vm1:2") is MessageState.PENDING
    assert umh.superseded == 1
    assert umh.pending_count() == 1
    assert umh.next_deadline() is None  # vm1:2 in flight, vm1:1's deadline gone
    assert umh.pop_due(100.0) == []
    assert umh.send_failed("vm1:1", 11.0, "late failure") == Outcome("ignored")
    umh.sent("vm1:1", 11.0)
    assert umh.next_deadline() is None


def test_old_ack_never_clears_newer_pending() -> None:
    umh = make()
    umh.admit("vm1:1", "vm1", 0.0)
    umh.sent("vm1:1", 0.0)
    umh.admit("vm1:2", "vm1", 5.0)
    umh.sent("vm1:2", 5.0)
    assert umh.ack("vm1:1", 6.0) == AckOutcome.LATE
    assert umh.state_of("vm1:2") is MessageState.PENDING
    assert umh.next_deadline() == 35.0
    assert umh.ack("vm1:2", 7.0) == AckOutcome.ACKED
    assert (umh.acked, umh.late_acks) == (1, 1)


def test_late_ack_by_seq_after_history_forgotten() -> None:
    umh = make(max_history=0)
    umh.admit("vm1:1", "vm1", 0.0)
    umh.admit("vm1:2", "vm1", 1.0)
    assert umh.state_of("vm1:1") is None  # forgotten
    assert umh.ack("vm1:1", 2.0) == "late"  # but older seq than the pending one
    assert umh.ack("vm1:3", 2.0) == "unknown"  # newer than anything admitted
    assert umh.ack("vm2:1", 2.0) == "unknown"
    assert umh.ack("garbage", 2.0) == "unknown"
    assert umh.ack("vm1:x", 2.0) == "unknown"
    assert umh.ack("vm1:" + "9" * 5000, 2.0) == "unknown"
    assert umh.nack("vm1:" + "1" * 5000, 2.0, "x", None) == "unknown"
    assert umh.ack("vm1:\u0662", 2.0) == "unknown"  # a non-ASCII digit
    assert (umh.late_acks, umh.unknown_acks) == (1, 7)
    assert umh.state_of("vm1:2") is MessageState.PENDING


def test_history_lru_is_bounded() -> None:
    umh = make(max_history=3)
    for i in range(1, 6):
        umh.admit(f"r{i}:1", f"r{i}", 0.0)
        umh.ack(f"r{i}:1", 0.0)
    assert [umh.state_of(f"r{i}:1") for i in range(1, 6)] == [None, None] + [MessageState.ACKED] * 3
    assert umh.ack("r1:1", 1.0) == "unknown"


def test_admit_validation() -> None:
    umh = make()
    with pytest.raises(ValueError):
        umh.admit("vm2:1", "vm1", 0.0)
    with pytest.raises(ValueError):
        umh.admit("vm1", "vm1", 0.0)
    umh.admit("vm1:5", "vm1", 0.0)
    with pytest.raises(ValueError):
        umh.admit("vm1:5", "vm1", 0.0)
    with pytest.raises(ValueError):
        umh.admit("vm1:4", "vm1", 0.0)
    assert umh.state_of("vm1:5") is MessageState.PENDING
    # Resource ids may themselves contain ':'
    assert umh.admit("ns:vm:7", "ns:vm", 0.0) is None
    assert umh.ack("ns:vm:7", 1.0) == "acked"


# ---------------------------------------------------------------- defer, dead_letter_now


def test_defer_rearms_resend() -> None:
    umh = make(RetryPolicy(retry_base=1.0, retry_cap=1.0))
    umh.admit("a:1", "a", 0.0)
    umh.send_failed("a:1", 0.0, "x")
    due = umh.pop_due(1.0)
    assert [d.kind for d in due] == ["resend"]
    umh.defer("a:1", 1.0, 0.25)  # channel full
    assert umh.next_deadline() == 1.25
    assert umh.deferred == 1
    assert umh.pop_due(1.25) == [Due("resend", "a:1", "a", 2, 1.25)]  # not a new attempt
    umh.defer("a:1", 2.0, -3.0)
    assert umh.next_deadline() == 2.0
    umh.defer("a:1", 2.0, 50.0)  # not in flight any more: ignored, keeps deadline
    assert umh.next_deadline() == 2.0
    umh.defer("b:1", 2.0, 1.0)  # unknown: ignored
    assert umh.armed_count() == 1


def test_defer_of_first_send() -> None:
    umh = make()
    umh.admit("a:1", "a", 0.0)
    umh.defer("a:1", 0.0, 0.5)
    assert umh.pop_due(0.5) == [Due("resend", "a:1", "a", 1, 0.5)]


def test_dead_letter_now() -> None:
    umh = make()
    umh.admit("a:1", "a", 1.0)
    umh.sent("a:1", 1.0)
    dl = umh.dead_letter_now("a:1", 2.0, "shutdown")
    assert dl is not None
    assert (dl.reason, dl.admitted_at, dl.dead_at, dl.attempts) == ("shutdown", 1.0, 2.0, ())
    assert umh.dead_letter_now("a:1", 3.0, "shutdown") is None
    assert umh.next_deadline() is None
    assert umh.state_of("a:1") is MessageState.DEAD


# ---------------------------------------------------------------- ordering and heap hygiene


def test_pop_due_in_deadline_order_with_limit() -> None:
    umh = make(RetryPolicy(ack_timeout=10.0))
    for i, t in enumerate([5.0, 1.0, 3.0, 1.0]):
        umh.admit(f"r{i}:1", f"r{i}", 0.0)
        umh.defer(f"r{i}:1", 0.0, t)
    assert [d.message_id for d in umh.pop_due(4.0, limit=2)] == ["r1:1", "r3:1"]
    assert [d.message_id for d in umh.pop_due(4.0)] == ["r2:1"]
    assert umh.next_deadline() == 5.0


def test_heap_compaction_keeps_memory_bounded() -> None:
    umh = make()
    for i in range(5000):
        umh.admit(f"r{i}:1", f"r{i}", 0.0)
        umh.sent(f"r{i}:1", float(i))
    umh.admit("keep:1", "keep", 0.0)
    umh.sent("keep:1", 1e6)
    for i in range(5000):
        assert umh.ack(f"r{i}:1", 1.0) == "acked"
    assert umh.heap_size() <= 3 * umh.armed_count() + 1025
    assert umh.next_deadline() == 1e6 + 30.0
    assert umh.armed_count() == 1


def test_history_bounded_by_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=4, retry_base=1.0, retry_cap=1.0)
    umh = make(policy)
    umh.admit("a:1", "a", 0.0)
    for i in range(3):
        umh.send_failed("a:1", float(i * 2), "x")
        umh.pop_due(float(i * 2 + 1))
    view = umh.pending_for("a")
    assert view is not None and view.attempts == 3
    assert umh.send_failed("a:1", 10.0, "x").kind == "dead"
    assert umh.pending_for("a") is None


# ---------------------------------------------------------------- dead-letter log


def test_dead_letter_log_bounded_and_paged() -> None:
    log = DeadLetterLog(3)
    for i in range(1, 6):
        log.record(f"r:{i}", "r", "x", admitted_at=0.0, dead_at=float(i), attempts=())
    assert len(log) == 3
    assert log.total == 5
    assert log.evicted == 2
    assert [d.index for d in log.page(0, 10)] == [3, 4, 5]
    assert [d.index for d in log.page(3, 1)] == [4]
    assert log.page(5) == []
    assert log.get("r:1") is None
    got = log.get("r:5")
    assert got is not None and got.dead_at == 5.0
    assert [d.message_id for d in log] == ["r:3", "r:4", "r:5"]


def test_umh_dead_letters_bounded() -> None:
    umh = make(RetryPolicy(max_attempts=1), max_dead_letters=2)
    for i in range(4):
        umh.admit(f"r{i}:1", f"r{i}", 0.0)
        umh.send_failed(f"r{i}:1", 1.0, "x")
    assert umh.dead_lettered == 4
    assert len(umh.dead_letters) == 2
    assert [d.message_id for d in umh.dead_letters.page()] == ["r2:1", "r3:1"]


def test_counters_dict() -> None:
    umh = make()
    umh.admit("a:1", "a", 0.0)
    counters = umh.counters()
    assert counters["admitted"] == 1
    assert counters["pending"] == 1
    assert set(counters) >= {
        "acked",
        "late_acks",
        "unknown_acks",
        "retries",
        "dead_lettered",
        "superseded",
    }
