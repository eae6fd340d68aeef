"""Server processes for the benchmarks: ``python -m benchmarks.servers '<json args>'``.

Each prints ``READY {"url": ...}`` once it serves on 127.0.0.1 (port chosen by the OS)
and runs until SIGTERM. ``kind`` is one of:

* ``relay``: the real relay (``RelayServer``) with config overrides; optional event-log
  prefill (``fill_bytes``), the naive whole-log-copy pager (``naive_pages``), a strict
  one-event-per-write hub (``per_event_hub``) and a scheduled SSE publisher (``sse``).
* ``quart``: a bare hypercorn + quart-trio app that parses the body and returns 202.
* ``starlette``: the same tiny app on uvicorn + Starlette.
* ``sse_starlette``: sse-starlette on uvicorn with the same scheduled publisher.

This launcher is benchmark code: it adds no route to the product; the SSE publisher is a
task in this process calling ``relay.publish``.
"""

from __future__ import annotations

import cProfile
import json
import logging
import resource
import signal
import socket
import sys
import tempfile
import time
from functools import partial
from typing import Any

import orjson
import trio

from ._common import emit, raise_fd_limit


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- the relay ---------------------------------------------------------------------------


def _naive_ring_class() -> type:
    from relay_trio.core.events import EventRing, Page

    class NaiveRing(EventRing):
        """The seed-004 failure, in Python: copy the whole log per pull, then filter/slice."""

        def page(self, after: int | None, limit: int, topic: str | None = None) -> Page:
            snapshot = list(self._events[self._head :])  # the whole log, every pull
            first = self.first_id
            start = first - 1 if after is None else max(after, first - 1)
            gap = 0 if after is None else max(0, first - 1 - after)
            chosen = [e for e in snapshot if e.id > start and (topic is None or e.topic == topic)]
            events = chosen[:limit]
            next_after = events[-1].id if len(events) == limit else max(start, self.last_id)
            return Page(events, next_after, gap)

    return NaiveRing


def _per_event_hub_class() -> type:
    from relay_trio.services.hub import EventHub

    class PerEventHub(EventHub):
        """One SSE write per event per subscriber (no coalescing at all)."""

        def _flush(self) -> None:
            batch = self._pending
            if not batch:
                return
            self._pending = []
            self.flushes += 1
            for event in batch:
                for sub in list(self._subs):
                    if event.id <= sub.live_after:
                        continue
                    if sub.topics is None or event.topic in sub.topics:
                        self._deliver(sub, (event.sse, 1, event.id))

    return PerEventHub


async def _sse_publisher(
    publish: Any,
    count_subscribers: Any,
    stats: Any,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """Publish ``rate`` events/s for ``duration`` s on a fixed schedule.

    Starts once ``expect`` subscribers are connected (or after ``wait_subs`` seconds).
    Each event carries its *planned* time ``t``: a publisher woken late catches up, and
    the lateness counts in the measured latency; an event more than ``max_late`` seconds
    behind schedule is skipped (never delivered), so an overloaded server cannot slow
    the schedule and still score 100%.
    """
    rate, duration, expect = spec["rate"], spec["duration"], spec["expect"]
    # Several publishers (cluster instances) share one schedule: this one takes every
    # `stride`-th event from `offset` on.
    stride, offset = spec.get("stride", 1), spec.get("offset", 0)
    with trio.move_on_after(spec.get("wait_subs", 60)):
        while count_subscribers() < expect:  # noqa: ASYNC110 - polling another component
            await trio.sleep(0.05)
    subscribed = count_subscribers()
    total = round(rate * duration)
    period = 1.0 / rate
    max_late = spec.get("max_late", 1.0)
    cpu0, wall0 = _cpu(), time.monotonic()
    t0 = trio.current_time() + 0.2
    wall_t0 = time.time() + 0.2
    published = skipped = 0
    for seq in range(offset, total, stride):
        target = t0 + seq * period
        now = trio.current_time()
        if now > target + max_late:
            skipped += 1  # far behind schedule: drop it rather than burst
            continue
        if now < target:
            await trio.sleep_until(target)
        # "t" is the planned publish time, so publisher lateness counts as latency.
        publish({"kind": "bench", "seq": seq, "t": wall_t0 + seq * period})
        published += 1
    await trio.sleep_until(t0 + duration + spec.get("grace", 1.0))
    cpu = _cpu() - cpu0
    wall = time.monotonic() - wall0
    return {
        "subscribers_at_start": subscribed,
        "subscribers_at_end": count_subscribers(),
        "planned": total,
        "published": published,
        "skipped": skipped,
        "cpu_seconds": round(cpu, 3),
        "wall_seconds": round(wall, 3),
        "cpu_percent": round(100 * cpu / wall, 1),
        **stats(),
    }


def run_relay(args: dict[str, Any]) -> None:
    from relay_trio.core.config import load_config
    from relay_trio.core.events import EventRing
    from relay_trio.relay import Relay
    from relay_trio.server import RelayServer, tune_gc_for_serving

    tmp = tempfile.mkdtemp(prefix="relay-bench-")
    overrides: dict[str, Any] = {
        "data_dir": tmp,
        "port": 0,
        "log_level": "warning",
        **args.get("config", {}),
    }
    config = load_config(overrides, {}, None)
    relay = Relay(config)
    if args.get("naive_pages"):
        relay.hub.ring = _naive_ring_class()(config.event_ring_size, config.event_ring_bytes)
    if args.get("per_event_hub"):
        old = relay.hub
        relay.hub = _per_event_hub_class()(
            old.ring,
            max_subscribers=old.max_subscribers,
            max_subscribers_per_topic=old.max_subscribers_per_topic,
            subscriber_buffer=old.subscriber_buffer,
            heartbeat_interval=old.heartbeat_interval,
            coalesce_interval=0.0,
            sse_write_budget=float("inf"),
        )
        relay.events.hub = relay.hub  # the publisher must feed the replacement
        # ...and streams that write each queued chunk separately (no joining).
        import relay_trio.services.hub

        relay_trio.services.hub.JOIN_LIMIT = 0  # type: ignore[misc]
    fill = int(args.get("fill_bytes", 0))

    def fill_ring() -> None:
        # After start: the relay continues its event ids from the store into an empty ring.
        ring: EventRing = relay.hub.ring
        i = 0
        while ring.bytes_used < fill:
            i += 1
            rid = f"vm-{i:08d}"
            ring.publish(
                "reports",
                {"message_id": f"{rid}:1", "resource_id": rid, "kind": "scan"},
                "2026-01-01T00:00:00.000Z",
            )

    if args.get("write_budget"):
        relay.hub.sse_write_budget = float(args["write_budget"])
    server = RelayServer(config, relay)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(server.serve, install_signal_handlers=True))
            if fill:
                fill_ring()
            tune_gc_for_serving()  # as `relay-trio run` does
            ring = relay.hub.ring
            emit(
                "READY",
                {
                    "url": urls[0],
                    "stream": server.receiver.bound if server.receiver else [],
                    "events": len(ring),
                    "event_bytes": ring.bytes_used,
                },
            )
            if args.get("gc_disable"):
                import gc

                gc.disable()
            if args.get("gc_threshold"):
                import gc

                gc.set_threshold(*args["gc_threshold"])
            lag = args.get("lag_monitor")
            if lag:
                nursery.start_soon(_lag_monitor, float(lag))
            spec = args.get("sse")
            if spec:
                pauses = _gc_pauses()

                def stats() -> dict[str, Any]:
                    hub = relay.hub
                    return {
                        "overflowed": hub.overflowed,
                        "flushes": hub.flushes,
                        "chunks": hub.chunks,
                        **pauses(),
                    }

                result = await _sse_publisher(
                    lambda data: relay.publish("system", data),
                    lambda: relay.hub.subscriber_count("system"),
                    stats,
                    spec,
                )
                emit("RESULT", result)

    _profiled(args, lambda: trio.run(main))


def _gc_pauses() -> Any:
    """Start timing the garbage collector; the returned function summarises so far."""
    import gc

    started: list[float] = []
    by_gen: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            by_gen[info["generation"]].append(time.perf_counter() - started[0])

    gc.callbacks.append(callback)

    def summary() -> dict[str, Any]:
        gc.callbacks.remove(callback)
        every = [t for ts in by_gen.values() for t in ts]
        return {
            "gc_collections": [len(by_gen[g]) for g in (0, 1, 2)],
            "gc_pause_total_ms": round(sum(every) * 1000, 1),
            "gc_pause_max_ms": round(max(every, default=0.0) * 1000, 1),
            "gc_threshold": list(gc.get_threshold()),
        }

    return summary


async def _lag_monitor(duration: float) -> None:
    """How late a 1 ms sleep wakes up: the event loop's stall distribution."""
    import gc

    lags: list[float] = []
    gcs0 = sum(st["collections"] for st in gc.get_stats())
    end = trio.current_time() + duration
    while trio.current_time() < end:
        t = time.perf_counter()
        await trio.sleep(0.001)
        lags.append(time.perf_counter() - t - 0.001)
    lags.sort()
    emit(
        "RESULT",
        {
            "loop_lag_p50_ms": round(lags[len(lags) // 2] * 1000, 2),
            "loop_lag_p99_ms": round(lags[int(len(lags) * 0.99)] * 1000, 2),
            "loop_lag_max_ms": round(lags[-1] * 1000, 2),
            "gc_collections": sum(st["collections"] for st in gc.get_stats()) - gcs0,
        },
    )


def _profiled(args: dict[str, Any], fn: Any) -> None:
    path = args.get("cprofile")
    if not path:
        fn()
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
        prof.dump_stats(path)


# -- bare quart-trio on hypercorn ------------------------------------------------------


def run_quart(args: dict[str, Any]) -> None:
    import hypercorn.trio
    from hypercorn.config import Config
    from quart import Response, request
    from quart_trio import QuartTrio

    app = QuartTrio("bare")
    counter = [0]

    @app.post("/v1/reports")
    async def post_report() -> Response:
        body = await request.get_data(cache=False)
        obj = orjson.loads(body)
        counter[0] += 1
        return Response(
            orjson.dumps({"message_id": f"{obj['resource_id']}:{counter[0]}"}),
            status=202,
            content_type="application/json",
        )

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.keep_alive_timeout = 75

    async def main() -> None:
        stop = trio.Event()

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    stop.set()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            binds = await nursery.start(
                partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait)
            )
            emit("READY", {"url": binds[0]})
            await stop.wait()
            nursery.cancel_scope.deadline = trio.current_time() + 5

    _profiled(args, lambda: trio.run(main))


# -- uvicorn + starlette ---------------------------------------------------------------


def _uvicorn_serve(app: Any, on_started: Any = None) -> None:
    import asyncio

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=4096,
        timeout_keep_alive=75,
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        emit(
            "READY",
            {
                "url": f"http://127.0.0.1:{port}",
                "loop": type(asyncio.get_running_loop()).__module__,
                "http": getattr(config.http_protocol_class, "__name__", "?"),
            },
        )
        if on_started is not None:
            background = asyncio.create_task(on_started())  # noqa: F841, RUF006
        await task

    config.load()
    factory = config.get_loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def run_starlette(args: dict[str, Any]) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    counter = [0]

    async def post_report(request: Request) -> Response:
        obj = orjson.loads(await request.body())
        counter[0] += 1
        return Response(
            orjson.dumps({"message_id": f"{obj['resource_id']}:{counter[0]}"}),
            status_code=202,
            media_type="application/json",
        )

    app = Starlette(routes=[Route("/v1/reports", post_report, methods=["POST"])])
    _uvicorn_serve(app)


def run_sse_starlette(args: dict[str, Any]) -> None:
    import asyncio

    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    subs: set[asyncio.Queue[dict[str, Any]]] = set()
    dropped = [0]
    buffer = int(args.get("buffer", 1000))
    next_id = [0]

    async def stream(request: Request) -> EventSourceResponse:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=buffer)
        subs.add(queue)

        async def gen() -> Any:
            try:
                while True:
                    yield await queue.get()
            finally:
                subs.discard(queue)

        return EventSourceResponse(gen(), ping=15)

    def publish(data: dict[str, Any]) -> None:
        next_id[0] += 1
        body = orjson.dumps({"id": next_id[0], "topic": "system", "at": "", "data": data}).decode()
        item = {"id": str(next_id[0]), "event": "system", "data": body}
        for q in list(subs):
            try:
                q.put_nowait(item)
            except asyncio.QueueFull:
                dropped[0] += 1

    spec = args["sse"]

    async def publisher() -> None:
        # The same schedule as the relay's publisher, on asyncio.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.get("wait_subs", 60)
        while len(subs) < spec["expect"] and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        subscribed = len(subs)
        rate, duration = spec["rate"], spec["duration"]
        total, period = round(rate * duration), 1.0 / rate
        max_late = spec.get("max_late", 1.0)
        cpu0, wall0 = _cpu(), time.monotonic()
        t0 = loop.time() + 0.2
        wall_t0 = time.time() + 0.2
        published = skipped = 0
        for seq in range(total):
            target = t0 + seq * period
            now = loop.time()
            if now > target + max_late:
                skipped += 1
                continue
            if now < target:
                await asyncio.sleep(target - now)
            publish({"kind": "bench", "seq": seq, "t": wall_t0 + seq * period})
            published += 1
        await asyncio.sleep(max(0.0, t0 + duration + spec.get("grace", 1.0) - loop.time()))
        cpu = _cpu() - cpu0
        wall = time.monotonic() - wall0
        emit(
            "RESULT",
            {
                "subscribers_at_start": subscribed,
                "subscribers_at_end": len(subs),
                "planned": total,
                "published": published,
                "skipped": skipped,
                "cpu_seconds": round(cpu, 3),
                "wall_seconds": round(wall, 3),
                "cpu_percent": round(100 * cpu / wall, 1),
                "overflowed": dropped[0],
            },
        )

    app = Starlette(routes=[Route("/v1/events/stream", stream)])
    _uvicorn_serve(app, publisher)


KINDS = {
    "relay": run_relay,
    "quart": run_quart,
    "starlette": run_starlette,
    "sse_starlette": run_sse_starlette,
}


def main() -> None:
    args: dict[str, Any] = json.loads(sys.argv[1])
    raise_fd_limit()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    KINDS[args["kind"]](args)


if __name__ == "__main__":
    main()
