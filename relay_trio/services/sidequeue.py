"""Side queue: audit and mirror taps that never sit on the request path.

Seed 001 (vault-audit-filter #22): notifying and forwarding inline made every audited request
wait for the slowest side effect, and a dead UDP collector stalled the whole server. Here the
request path only calls :meth:`SideQueue.offer`, which is synchronous and never blocks: each
sink has its own bounded memory channel and its own worker task, so a stalled webhook can
neither slow a request nor starve the audit file. A full queue drops the record and counts it;
every sink write runs under ``timeout``; a sink that raises or hangs is counted and skipped,
never allowed to kill the relay.

Records are pre-encoded JSON documents (``bytes``, no trailing newline).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import attrs
import trio

from ..sinks.base import SideSink, SinkCounters

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class _LaneCounters:
    offered: int = 0
    written: int = 0
    dropped_full: int = 0
    # Offered after drain() closed the queue, or still queued/in flight when it was cancelled.
    dropped_closed: int = 0
    # Records in batches that timed out or raised.
    failed: int = 0
    timeouts: int = 0
    errors: int = 0
    in_flight: int = 0


@attrs.define(eq=False)
class _Lane:
    sink: SideSink
    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    counters: _LaneCounters = attrs.field(factory=_LaneCounters)
    failing: bool = False


def _positive_int(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _positive_finite(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a positive finite number, got {value}")


@attrs.define(eq=False)
class SideQueue:
    """Fans records out to sinks without ever blocking the producer.

    Each sink gets its own bounded channel of ``queue_size`` records and its own worker,
    which sends batches of up to ``batch_max`` records, each write bounded by ``timeout``
    seconds. Per-sink accounting always balances::

        offered == written + dropped_full + dropped_closed + failed + queued + in_flight
    """

    sinks: Sequence[SideSink]
    queue_size: int = attrs.field(default=1000, validator=_positive_int)
    timeout: float = attrs.field(default=2.0, validator=_positive_finite)
    batch_max: int = attrs.field(default=256, validator=_positive_int)
    _lanes: tuple[_Lane, ...] = attrs.field(init=False)
    _started: bool = attrs.field(default=False, init=False)
    _scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    _done: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        names = [sink.name for sink in self.sinks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"side sink names must be unique, duplicated: {duplicates}")
        lanes = []
        for sink in self.sinks:
            send, receive = trio.open_memory_channel[bytes](self.queue_size)
            lanes.append(_Lane(sink, send, receive))
        self._lanes = tuple(lanes)

    def offer(self, record: bytes) -> None:
        """Queue ``record`` for every sink. Synchronous: never blocks, never checkpoints.

        A sink whose queue is full drops the record (``dropped_full``); after :meth:`drain`
        began, records are dropped as ``dropped_closed``. Never raises.
        """
        for lane in self._lanes:
            counters = lane.counters
            counters.offered += 1
            try:
                lane.send.send_nowait(record)
            except trio.WouldBlock:
                counters.dropped_full += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                counters.dropped_closed += 1

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per sink name (a fresh dict; never blocks).

        Keys: ``offered``, ``written``, ``dropped_full``, ``dropped_closed``, ``failed``
        (records), ``timeouts``, ``errors`` (batches), gauges ``queued`` and ``in_flight``,
        plus any counters the sink reports itself (:class:`SinkCounters`).
        """
        out: dict[str, dict[str, int]] = {}
        for lane in self._lanes:
            row = attrs.asdict(lane.counters)
            row["queued"] = lane.send.statistics().current_buffer_used
            if isinstance(lane.sink, SinkCounters):
                row.update(lane.sink.counters())
            out[lane.sink.name] = row
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one worker per sink until :meth:`drain` finishes or the caller cancels.

        Ready (``task_status.started()``) once the workers are spawned. Closes every sink on
        exit (shielded, bounded by ``timeout``). Sink failures never propagate out of here.
        Raises ``RuntimeError`` if called twice.
        """
        if self._started:
            raise RuntimeError("SideQueue.run() may only be called once")
        self._started = True
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    for lane in self._lanes:
                        nursery.start_soon(self._work, lane, name=f"side-sink:{lane.sink.name}")
                    task_status.started()
        finally:
            self._done.set()

    # The timeout is a flush budget, not an abort: when it runs out the workers are cancelled
    # and the leftovers counted, which a caller's cancel scope around drain() could not do.
    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Stop accepting records and let the workers flush what is queued.

        Returns ``True`` if every queued record was attempted (written or counted as failed)
        within ``timeout`` seconds; otherwise cancels the workers, counts what was left as
        ``dropped_closed`` and returns ``False``. Waits a further ``timeout`` (this queue's)
        at most for sinks to close. Checkpoint. If :meth:`run` never started, discards the
        queues and closes the sinks.
        """
        for lane in self._lanes:
            lane.send.close()
        if not self._started:
            flushed = all(lane.send.statistics().current_buffer_used == 0 for lane in self._lanes)
            for lane in self._lanes:
                self._discard(lane)
                await self._close_sink(lane)
            await trio.lowlevel.checkpoint()
            return flushed
        with trio.move_on_after(timeout):
            await self._done.wait()
            return True
        if self._scope is not None:
            self._scope.cancel()
        await self._done.wait()
        return False

    async def _work(self, lane: _Lane) -> None:
        receive = lane.receive
        try:
            async for first in receive:
                batch = [first]
                while len(batch) < self.batch_max:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._deliver(lane, batch)
        finally:
            self._discard(lane)
            await self._close_sink(lane)

    async def _deliver(self, lane: _Lane, batch: list[bytes]) -> None:
        counters = lane.counters
        size = len(batch)
        counters.in_flight = size
        settled = False
        try:
            with trio.move_on_after(self.timeout) as scope:
                try:
                    await lane.sink.write(batch)
                except Exception as exc:
                    counters.errors += 1
                    counters.failed += size
                    settled = True
                    self._note_failure(lane, f"raised {exc!r}")
                else:
                    counters.written += size
                    settled = True
                    if lane.failing:
                        lane.failing = False
                        log.info("side sink %r recovered", lane.sink.name)
            if scope.cancelled_caught:
                counters.timeouts += 1
                counters.failed += size
                settled = True
                self._note_failure(lane, f"timed out after {self.timeout}s")
        finally:
            counters.in_flight = 0
            if not settled:
                # Cancelled from outside (drain timeout or relay shutdown).
                counters.dropped_closed += size

    def _note_failure(self, lane: _Lane, what: str) -> None:
        # Log transitions only: a sink that is down for an hour must not flood the log.
        if not lane.failing:
            lane.failing = True
            log.warning(
                "side sink %r %s; dropping its records until it recovers", lane.sink.name, what
            )

    def _discard(self, lane: _Lane) -> None:
        # Records still buffered will never be written; count them before the channel closes.
        while True:
            try:
                lane.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            lane.counters.dropped_closed += 1
        lane.receive.close()

    async def _close_sink(self, lane: _Lane) -> None:
        with trio.move_on_after(self.timeout, shield=True):
            try:
                await lane.sink.aclose()
            except Exception:
                log.warning("side sink %r failed to close", lane.sink.name, exc_info=True)
