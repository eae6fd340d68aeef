"""Stateful property test: the UMH against a naive model (lists and ``min``, no heap).

The model replays the same seeded RNG in the same order, so every retry deadline, every
``Due`` and ``next_deadline()`` must match exactly, not just approximately.
"""

from __future__ import annotations

import random

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from relay_trio.core.umh import MessageState, Phase, RetryPolicy, UnconfirmedMessages

POLICY = RetryPolicy(ack_timeout=5.0, retry_base=2.0, retry_cap=20.0, max_attempts=4, max_age=60.0)
RESOURCES = ("a", "b", "c")
STRANGERS = ("zz:1", "a:999", "nope")
SEED = 7


@attrs.define
class ModelMessage:
    mid: str
    rid: str
    seq: int
    admitted_at: float
    phase: Phase = Phase.IN_FLIGHT
    deadline: float | None = None
    arm: int = 0
    attempts: int = 0


class UMHMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.umh = UnconfirmedMessages(POLICY, random.Random(SEED), max_history=100_000)
        self.rng = random.Random(SEED)
        self.now = 0.0
        self.seq = dict.fromkeys(RESOURCES, 0)
        self.pending: dict[str, ModelMessage] = {}
        self.final: dict[str, MessageState] = {}
        self.dead_reasons: dict[str, str] = {}
        self.ids: list[str] = []
        self.arms = 0
        self.counts = {"acked": 0, "late": 0, "unknown": 0, "superseded": 0, "retries": 0}

    # ------------------------------------------------------------ model helpers

    def current(self, mid: str) -> ModelMessage | None:
        for m in self.pending.values():
            if m.mid == mid:
                return m
        return None

    def arm(self, m: ModelMessage, deadline: float, phase: Phase) -> None:
        self.arms += 1
        m.deadline, m.arm, m.phase = deadline, self.arms, phase

    def finish(self, m: ModelMessage, state: MessageState) -> None:
        del self.pending[m.rid]
        self.final[m.mid] = state

    def die(self, m: ModelMessage, reason: str) -> None:
        self.finish(m, MessageState.DEAD)
        self.dead_reasons[m.mid] = reason

    def fail(self, m: ModelMessage, retry_after: float | None) -> str:
        m.attempts += 1
        m.deadline = None
        if m.attempts >= POLICY.max_attempts:
            self.die(m, "max_attempts")
            return "dead"
        if self.now - m.admitted_at >= POLICY.max_age:
            self.die(m, "max_age")
            return "dead"
        if retry_after is None:
            delay = self.rng.uniform(
                0, min(POLICY.retry_cap, POLICY.retry_base * 2 ** (m.attempts - 1))
            )
        else:
            delay = min(max(retry_after, 0.0), POLICY.retry_cap)
        self.arm(m, self.now + delay, Phase.RETRY_WAIT)
        return "retry"

    def not_pending(self, mid: str) -> str:
        if mid in self.final:
            self.counts["late"] += 1
            return "late"
        self.counts["unknown"] += 1
        return "unknown"

    # ------------------------------------------------------------ rules

    @initialize()
    def start(self) -> None:
        assert self.umh.next_deadline() is None

    @rule(rid=st.sampled_from(RESOURCES))
    def admit(self, rid: str) -> None:
        self.seq[rid] += 1
        mid = f"{rid}:{self.seq[rid]}"
        old = self.pending.get(rid)
        assert self.umh.admit(mid, rid, self.now) == (old.mid if old else None)
        if old is not None:
            self.finish(old, MessageState.SUPERSEDED)
            self.counts["superseded"] += 1
        self.pending[rid] = ModelMessage(mid, rid, self.seq[rid], self.now)
        self.ids.append(mid)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def sent(self, data: st.DataObject) -> None:
        mid = data.draw(st.sampled_from(self.ids))
        self.umh.sent(mid, self.now)
        m = self.current(mid)
        if m is not None and m.phase is Phase.IN_FLIGHT:
            self.arm(m, self.now + POLICY.ack_timeout, Phase.AWAITING_ACK)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def send_failed(self, data: st.DataObject) -> None:
        mid = data.draw(st.sampled_from(self.ids))
        outcome = self.umh.send_failed(mid, self.now, "boom")
        m = self.current(mid)
        if m is None:
            assert outcome.kind == "ignored"
            return
        assert outcome.kind == self.fail(m, None)
        if outcome.kind == "retry":
            assert outcome.retry_at == m.deadline

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        mid = data.draw(st.sampled_from(self.ids + list(STRANGERS)))
        rid = mid.rpartition(":")[0]
        newer = self.pending.get(rid)
        got = self.umh.ack(mid, self.now)
        m = self.current(mid)
        if m is None:
            assert got == self.not_pending(mid)
            # An ACK for an older id never clears the newer pending message.
            if newer is not None:
                view = self.umh.pending_for(rid)
                assert view is not None and view.message_id == newer.mid
            return
        assert got == "acked"
        self.finish(m, MessageState.ACKED)
        self.counts["acked"] += 1

    @rule(
        data=st.data(),
        retry_after=st.none() | st.floats(-5.0, 50.0, allow_nan=False),
    )
    def nack(self, data: st.DataObject, retry_after: float | None) -> None:
        mid = data.draw(st.sampled_from(self.ids + list(STRANGERS)))
        got = self.umh.nack(mid, self.now, "nope", retry_after)
        m = self.current(mid)
        if m is None:
            assert got == self.not_pending(mid)
            return
        if m.phase is Phase.RETRY_WAIT:
            if retry_after is not None:
                at = self.now + min(max(retry_after, 0.0), POLICY.retry_cap)
                assert m.deadline is not None
                if at > m.deadline:
                    self.arm(m, at, Phase.RETRY_WAIT)
            assert got == "nacked"
            return
        expected = self.fail(m, retry_after)
        assert got == ("dead" if expected == "dead" else "nacked")

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), delay=st.sampled_from([0.0, 0.5, 1.0, 3.0, -1.0]))
    def defer(self, data: st.DataObject, delay: float) -> None:
        mid = data.draw(st.sampled_from(self.ids))
        self.umh.defer(mid, self.now, delay)
        m = self.current(mid)
        if m is not None and m.phase is Phase.IN_FLIGHT:
            self.arm(m, self.now + (delay if delay > 0 else 0.0), Phase.RETRY_WAIT)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def dead_letter_now(self, data: st.DataObject) -> None:
        mid = data.draw(st.sampled_from(self.ids))
        got = self.umh.dead_letter_now(mid, self.now, "shutdown")
        m = self.current(mid)
        assert (got is None) == (m is None)
        if m is not None:
            self.die(m, "shutdown")

    @rule(dt=st.floats(0.0, 30.0, allow_nan=False) | st.sampled_from([0.0, 1.0, 5.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.pop()

    @rule()
    def advance_to_next_deadline(self) -> None:
        # Exact ties: land precisely on a deadline.
        nxt = self.umh.next_deadline()
        if nxt is not None and nxt > self.now:
            self.now = nxt
        self.pop()

    def pop(self) -> None:
        got = [(d.kind, d.message_id, d.attempt, d.deadline) for d in self.umh.pop_due(self.now)]
        expected: list[tuple[str, str, int, float]] = []
        while True:
            due = [
                m
                for m in self.pending.values()
                if m.deadline is not None and m.deadline <= self.now
            ]
            if not due:
                break
            m = min(due, key=lambda m: (m.deadline, m.arm))
            deadline = m.deadline
            assert deadline is not None
            if m.phase is Phase.AWAITING_ACK:
                if self.fail(m, None) == "dead":
                    expected.append(("dead", m.mid, m.attempts, deadline))
            else:
                m.deadline = None
                m.phase = Phase.IN_FLIGHT
                self.counts["retries"] += 1
                expected.append(("resend", m.mid, m.attempts + 1, deadline))
        assert got == expected

    # ------------------------------------------------------------ invariants

    @invariant()
    def every_id_in_exactly_one_state(self) -> None:
        for mid in self.ids:
            in_pending = self.current(mid) is not None
            assert in_pending != (mid in self.final)
            expected = MessageState.PENDING if in_pending else self.final[mid]
            assert self.umh.state_of(mid) is expected

    @invariant()
    def next_deadline_is_model_min(self) -> None:
        deadlines = [m.deadline for m in self.pending.values() if m.deadline is not None]
        assert self.umh.next_deadline() == (min(deadlines) if deadlines else None)
        assert self.umh.armed_count() == len(deadlines)
        stale = self.umh.heap_size() - self.umh.armed_count()
        assert stale <= max(1024, 2 * len(deadlines))

    @invariant()
    def one_pending_per_resource_matching_model(self) -> None:
        assert self.umh.pending_count() == len(self.pending)
        for rid in RESOURCES:
            view = self.umh.pending_for(rid)
            m = self.pending.get(rid)
            if m is None:
                assert view is None
                continue
            assert view is not None
            assert (view.message_id, view.phase, view.deadline, view.attempts) == (
                m.mid,
                m.phase,
                m.deadline,
                m.attempts,
            )
            assert len(view.history) == m.attempts <= POLICY.max_attempts

    @invariant()
    def dead_letters_match(self) -> None:
        assert self.umh.dead_lettered == len(self.dead_reasons)
        assert len(self.umh.dead_letters) == len(self.dead_reasons)
        for mid, reason in self.dead_reasons.items():
            dl = self.umh.dead_letters.get(mid)
            assert dl is not None and dl.reason == reason

    @invariant()
    def counters_match(self) -> None:
        umh = self.umh
        assert (umh.acked, umh.late_acks, umh.unknown_acks) == (
            self.counts["acked"],
            self.counts["late"],
            self.counts["unknown"],
        )
        assert umh.superseded == self.counts["superseded"]
        assert umh.retries == self.counts["retries"]


UMHMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestUMHMachine = UMHMachine.TestCase
