"""The sender pool: N tasks sending what admission and retries queue, one attempt each.

The sender never retries on its own (seed 000): a failed or timed-out send is reported
back to delivery, which hands it to the unconfirmed-message handler like a NACK.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import trio

from ..upstreams.base import Outbound, SendResult, Upstream
from ..upstreams.http import HttpUpstream

OnResults = Callable[[Sequence[Outbound], Sequence[SendResult]], None]


@attrs.define(eq=False)
class SenderPool:
    """``tasks`` sender tasks reading one bounded channel of :class:`Outbound`.

    Each task takes what is queued (up to ``batch_max``) and groups it by upstream. A
    group for an :class:`HttpUpstream` (one request per message anyway) is sent message by
    message, each in its own task holding one slot of that upstream's ``limiter`` and
    reported on its own as soon as it ends: a hung request costs one slot for at most
    ``send_timeout``, never its batch-mates nor the sender task, which only waits when
    every slot of that upstream is busy (back-pressure to admission through the channel).
    Any other upstream (the file sink) gets the whole group in one ``send_batch`` call.
    Every message gets exactly one result, reported through ``on_results``, a deadline
    miss included (reported as ``FAILED``), so nothing handed to the pool is lost.
    """

    upstreams: Sequence[Upstream]
    receive_channel: trio.MemoryReceiveChannel[Outbound]
    on_results: OnResults
    send_timeout: float
    tasks: int = 8
    batch_max: int = 256
    #: Messages taken from the channel whose result is not reported yet.
    in_flight: int = attrs.field(default=0, init=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the send channel is closed and drained and every send has ended (or
        until cancelled)."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.tasks):
                nursery.start_soon(self._worker, nursery)
            task_status.started()

    async def _worker(self, nursery: trio.Nursery) -> None:
        rx = self.receive_channel
        while True:
            try:
                first = await rx.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            batch = [first]
            while len(batch) < self.batch_max:
                try:
                    batch.append(rx.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            self.in_flight += len(batch)
            await self._deliver(batch, nursery)

    async def _deliver(self, batch: list[Outbound], nursery: trio.Nursery) -> None:
        groups: dict[int, list[Outbound]] = {}
        for message in batch:
            groups.setdefault(message.upstream, []).append(message)
        # Messages whose result this task still owes (the rest belong to _send_one tasks).
        owed = len(batch)
        try:
            for index, group in groups.items():
                upstream = self.upstreams[index]
                if isinstance(upstream, HttpUpstream):
                    for message in group:
                        slot = object()
                        await upstream.limiter.acquire_on_behalf_of(slot)
                        nursery.start_soon(self._send_one, upstream, message, slot)
                        owed -= 1
                else:
                    results = await upstream.send_batch(group, self.send_timeout)
                    self.on_results(group, results)
                    owed -= len(group)
                    self.in_flight -= len(group)
        finally:
            self.in_flight -= owed

    async def _send_one(self, upstream: HttpUpstream, message: Outbound, slot: object) -> None:
        try:
            result = await upstream.send_one(message, self.send_timeout)
            self.on_results((message,), (result,))
        finally:
            upstream.limiter.release_on_behalf_of(slot)
            self.in_flight -= 1
