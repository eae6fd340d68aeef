"""The UMH deadline scheduler in virtual time (autojump clock): exact wake-up times."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from relay_trio.core.umh import Due, MessageState, RetryPolicy, UnconfirmedMessages
from relay_trio.services.scheduler import DeadlineScheduler

SEED = 99


class Recorder:
    """on_due callback that remembers when it ran and what it got."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, list[Due]]] = []

    def __call__(self, due: list[Due]) -> None:
        self.calls.append((trio.current_time(), due))


def make(policy: RetryPolicy) -> tuple[UnconfirmedMessages, Recorder, DeadlineScheduler]:
    umh = UnconfirmedMessages(policy, random.Random(SEED))
    rec = Recorder()
    return umh, rec, DeadlineScheduler(umh, rec)


async def test_ack_timeout_then_resend_at_exact_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    umh, rec, sched = make(RetryPolicy(ack_timeout=30.0, retry_base=10.0, retry_cap=100.0))
    retry_at = 30.0 + random.Random(SEED).uniform(0, 10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.testing.wait_all_tasks_blocked()
        assert sched.sleeping and sched.sleeping_until is None  # nothing armed yet
        umh.admit("vm:1", "vm", trio.current_time())
        umh.sent("vm:1", trio.current_time())
        sched.wake()
        assert sched.sleeping_until == 30.0
        await trio.sleep_until(29.999)
        assert umh.ack_timeouts == 0
        await trio.sleep_until(30.0)
        await trio.testing.wait_all_tasks_blocked()
        assert umh.ack_timeouts == 1
        assert sched.sleeping_until == retry_at
        assert rec.calls == []  # a timeout only arms a retry
        await trio.sleep_until(retry_at + 1)
        assert rec.calls == [(retry_at, [Due("resend", "vm:1", "vm", 2, retry_at)])]
        nursery.cancel_scope.cancel()


async def test_early_wakeup_for_nearer_deadline(autojump_clock: trio.testing.MockClock) -> None:
    umh, rec, sched = make(RetryPolicy(ack_timeout=30.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        umh.admit("a:1", "a", 0.0)
        umh.sent("a:1", 0.0)
        sched.wake()
        await trio.sleep(5)
        assert sched.sleeping_until == 30.0
        umh.admit("b:1", "b", 5.0)
        umh.defer("b:1", 5.0, 2.0)  # nearer than the sleeping deadline
        sched.wake()
        assert sched.sleeping_until == 7.0
        await trio.sleep(10)
        assert rec.calls == [(7.0, [Due("resend", "b:1", "b", 1, 7.0)])]
        assert trio.current_time() == 15.0
        nursery.cancel_scope.cancel()


async def test_without_wake_a_nearer_deadline_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The counterpart of the test above: proves the early wake-up comes from wake().
    umh, rec, sched = make(RetryPolicy(ack_timeout=30.0, retry_base=1.0, retry_cap=1.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        umh.admit("a:1", "a", 0.0)
        umh.sent("a:1", 0.0)
        sched.wake()
        await trio.sleep(5)
        umh.admit("b:1", "b", 5.0)
        umh.defer("b:1", 5.0, 2.0)
        await trio.sleep_until(30.0)
        await trio.testing.wait_all_tasks_blocked()
        assert [(t, [d.message_id for d in due]) for t, due in rec.calls] == [(30.0, ["b:1"])]
        nursery.cancel_scope.cancel()


async def test_wake_from_sleep_forever(autojump_clock: trio.testing.MockClock) -> None:
    umh, rec, sched = make(RetryPolicy())
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(1000)
        assert sched.wakeups == 0
        umh.admit("a:1", "a", 1000.0)
        umh.defer("a:1", 1000.0, 0.5)
        sched.wake()
        await trio.sleep(1)
        assert rec.calls == [(1000.5, [Due("resend", "a:1", "a", 1, 1000.5)])]
        assert sched.wakeups == 1
        nursery.cancel_scope.cancel()


async def test_wake_later_deadline_does_not_postpone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    umh, rec, sched = make(RetryPolicy(ack_timeout=30.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        umh.admit("a:1", "a", 0.0)
        umh.defer("a:1", 0.0, 3.0)
        sched.wake()
        umh.admit("b:1", "b", 0.0)
        umh.defer("b:1", 0.0, 9.0)
        sched.wake()
        assert sched.sleeping_until == 3.0
        await trio.sleep(10)
        assert [(t, due[0].message_id) for t, due in rec.calls] == [(3.0, "a:1"), (9.0, "b:1")]
        nursery.cancel_scope.cancel()


async def test_cancelled_deadline_wakes_without_callback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    umh, rec, sched = make(RetryPolicy(ack_timeout=30.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        umh.admit("a:1", "a", 0.0)
        umh.sent("a:1", 0.0)
        sched.wake()
        await trio.sleep(1)
        assert umh.ack("a:1", 1.0) == "acked"
        await trio.sleep(100)
        assert rec.calls == []
        assert sched.sleeping and sched.sleeping_until is None
        assert umh.state_of("a:1") is MessageState.ACKED
        nursery.cancel_scope.cancel()


async def test_mass_expiry_is_batched_at_one_instant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    umh = UnconfirmedMessages(RetryPolicy(), random.Random(SEED))
    rec = Recorder()
    sched = DeadlineScheduler(umh, rec, batch_size=1000)
    for i in range(2500):
        umh.admit(f"r{i}:1", f"r{i}", 0.0)
        umh.defer(f"r{i}:1", 0.0, 4.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(5)
        assert [(t, len(due)) for t, due in rec.calls] == [(4.0, 1000), (4.0, 1000), (4.0, 500)]
        assert umh.retries == 2500
        nursery.cancel_scope.cancel()


async def test_callback_defers_on_full_channel(autojump_clock: trio.testing.MockClock) -> None:
    """The wiring the relay uses: send_nowait, and defer on WouldBlock (never drop)."""
    umh = UnconfirmedMessages(RetryPolicy(), random.Random(SEED))
    send, receive = trio.open_memory_channel[Due](1)

    def on_due(due: list[Due]) -> None:
        now = trio.current_time()
        for item in due:
            if item.kind != "resend":
                continue
            try:
                send.send_nowait(item)
            except trio.WouldBlock:
                umh.defer(item.message_id, now, 1.0)

    sched = DeadlineScheduler(umh, on_due)
    for name in ("a", "b", "c"):
        umh.admit(f"{name}:1", name, 0.0)
        umh.defer(f"{name}:1", 0.0, 2.0)
    got: list[tuple[float, str]] = []
    async with send, receive, trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(9.5)  # the consumer is slow: only one fits in the channel
        # Setup deferred 3; t=2: a sent, b and c deferred; t=3..9: b and c deferred again.
        assert umh.deferred == 3 + 2 + 2 * 7
        for _ in range(3):
            item = await receive.receive()
            got.append((trio.current_time(), item.message_id))
            await trio.sleep(1.25)
        nursery.cancel_scope.cancel()
    # a waited in the channel; b went in at t=10 (c deferred once more), c at t=11.
    assert got == [(9.5, "a:1"), (10.75, "b:1"), (12.0, "c:1")]
    assert umh.deferred == 3 + 2 + 2 * 7 + 1
    assert umh.pending_count() == 3  # all in flight, none dropped


async def test_run_reports_started_and_is_cancellable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _umh, _rec, sched = make(RetryPolicy())
    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(sched.run)
            assert sched.sleeping
    assert scope.cancelled_caught
    assert not sched.sleeping
    assert trio.current_time() == 5.0


async def test_on_due_exception_propagates(autojump_clock: trio.testing.MockClock) -> None:
    umh = UnconfirmedMessages(RetryPolicy(), random.Random(SEED))

    def on_due(due: list[Due]) -> None:
        raise RuntimeError("callback bug")

    sched = DeadlineScheduler(umh, on_due)
    umh.admit("a:1", "a", 0.0)
    umh.defer("a:1", 0.0, 1.0)
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="callback bug")):
        async with trio.open_nursery() as nursery:
            await nursery.start(sched.run)
    assert trio.current_time() == 1.0
    assert umh.state_of("a:1") is MessageState.PENDING  # in flight, not lost
