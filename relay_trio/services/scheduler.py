"""The UMH deadline scheduler: one Trio task sleeping until the earliest deadline.

There is no task or timer object per message: the task sleeps in a cancel scope whose deadline
is :meth:`UnconfirmedMessages.next_deadline`, and :meth:`DeadlineScheduler.wake` pulls that
deadline earlier when a nearer deadline is armed. When it wakes it hands every expired
deadline to a synchronous ``on_due`` callback, in batches so a mass expiry cannot starve the
rest of the relay.

Example::

    scheduler = DeadlineScheduler(umh, on_due=handle_due)
    await nursery.start(scheduler.run)
    ...
    umh.sent(message_id, trio.current_time())
    scheduler.wake()
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import trio

from ..core.umh import Due, UnconfirmedMessages


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class DeadlineScheduler:
    """Drives an :class:`UnconfirmedMessages` from Trio time.

    ``on_due`` is called synchronously from the scheduler task with a non-empty list of
    :class:`Due` items in deadline order; it must not block (use ``send_nowait`` and
    ``umh.defer`` on ``trio.WouldBlock``). An exception it raises propagates out of
    :meth:`run` and crashes the enclosing nursery, on purpose: losing retries silently is worse.
    ``umh.defer`` from ``on_due`` should use a positive delay: a zero delay re-arms a deadline
    that is already due, so the task would spin (checkpointing) until the channel has room.
    """

    umh: UnconfirmedMessages
    on_due: Callable[[list[Due]], None]
    #: Expirations processed per ``pop_due`` call before the task checkpoints.
    batch_size: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    #: How many times the task woke up (deadline reached or pulled in by :meth:`wake`).
    wakeups: int = attrs.field(default=0, init=False)
    _scope: trio.CancelScope | None = attrs.field(default=None, init=False)

    @property
    def sleeping(self) -> bool:
        """True while the task is parked waiting for the next deadline."""
        return self._scope is not None

    @property
    def sleeping_until(self) -> float | None:
        """The time the parked task will wake at; ``None`` if it is not parked or has no
        deadline to wait for (then it sleeps until :meth:`wake`)."""
        scope = self._scope
        if scope is None or math.isinf(scope.deadline):
            return None
        return scope.deadline

    def wake(self) -> None:
        """Re-check the UMH's next deadline after arming one. Never blocks; not a checkpoint.

        If the parked task is sleeping toward a later deadline (or none), its wake-up time is
        pulled in to the new earliest deadline. Cheap (amortised O(1)): call it after every
        ``sent``/``send_failed``/``nack``/``defer``. If the task is not parked (it is running
        ``on_due``), nothing is needed: it re-reads the next deadline before parking.
        """
        scope = self._scope
        if scope is None:
            return
        deadline = self.umh.next_deadline()
        if deadline is not None and deadline < scope.deadline:
            scope.deadline = deadline

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Reports readiness at once; exactly one checkpoint per wake-up."""
        task_status.started()
        while True:
            deadline = self.umh.next_deadline()
            # Equivalent to trio.sleep_until(deadline), but the scope stays reachable so that
            # wake() can move its deadline earlier instead of cancelling and restarting.
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._scope = None
            self.wakeups += 1
            # At most batch_size expirations per wake-up: if more are due, next_deadline() is
            # already past, so the next sleep is just a checkpoint and other tasks get to run.
            due = self.umh.pop_due(trio.current_time(), limit=self.batch_size)
            if due:
                self.on_due(due)
