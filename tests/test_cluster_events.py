"""Cluster mode, one event log: three relay instances on a real nats-server share one event
stream; ids are its sequence, every ring mirrors it, SSE resumes on any instance."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from chromium_cdp import launch_chromium
from nats_helpers import NatsServer, running_nats
from relay_helpers import MemoryUpstream, eventually

try:  # branch cluster1 moves the instance helpers to nats_helpers
    from nats_helpers import cluster_config, instances  # type: ignore[attr-defined,unused-ignore]
except ImportError:
    from test_cluster import cluster_config, instances  # type: ignore[attr-defined,no-redef,unused-ignore]
from test_sse import sse_events
from test_statuspage_browser import wait_for

from relay_trio.cluster.names import EVENTS_STREAM
from relay_trio.cluster.node import ClusterNode, ClusterUnavailable
from relay_trio.core import event_schemas as ev
from relay_trio.relay import Relay

pytestmark = pytest.mark.slow

#: Every instance admits whatever the tests send.
OPEN: dict[str, Any] = {"rate_per_minute": 600000.0, "burst": 1000}


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    yield from running_nats(tmp_path)


async def read_until(
    response: httpx.Response, done: Any, within: float = 10.0
) -> list[dict[str, Any]]:
    """SSE events (gap frames included) until ``done(events)`` holds."""
    out: list[dict[str, Any]] = []
    with trio.fail_after(within):
        async with aclosing(sse_events(response)) as events:
            async for event in events:
                out.append(event)
                if done(out):
                    return out
    raise AssertionError(f"stream ended after {out}")


def reports(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "reports"]


async def post(client: httpx.AsyncClient, resource: str) -> str:
    r = await client.post("/v1/reports", json={"resource_id": resource, "payload": {}})
    assert r.status_code == 202, r.text
    return str(r.json()["message_id"])


def node(relay: Relay) -> ClusterNode:
    assert relay.cluster is not None
    return relay.cluster


def logged(relay: Relay) -> list[dict[str, Any]]:
    """The events in a relay's ring (its mirror of the log), decoded."""
    return [orjson.loads(e.json) for e in relay.hub.ring.page(None, 1000).events]


def reconnected(relay: Relay, instance: str) -> bool:
    """``relay``'s mirror has the ``nats_connected`` event ``instance`` published last."""
    return any(
        e["instance"] == instance and e["data"].get("kind") == "nats_connected"
        for e in logged(relay)
    )


def settled(relays: list[Relay], reports: int) -> bool:
    """Every mirror has every event: each instance's ``started``, the reports and their
    synchronous ACKs (the upstreams acknowledge at once), nothing else."""
    return all(r.hub.ring.last_id == len(relays) + 2 * reports for r in relays)


async def settle(relays: list[Relay], reports: int) -> None:
    """Wait (10 s at most) until :func:`settled`; if it never is, fail naming what each
    mirror holds (its last id and how many events of each topic)."""
    with trio.move_on_after(10):
        while not settled(relays, reports):  # noqa: ASYNC110 - mirrors fill from NATS
            await trio.sleep(0.01)
    held = []
    for r in relays:
        ring = r.hub.ring
        topics = Counter(e.topic for e in ring.page(0, 1000).events)
        held.append((ring.last_id, dict(topics)))
    expected = len(relays) + 2 * reports
    assert settled(relays, reports), f"expected last id {expected} everywhere, got {held}"


async def test_a_report_posted_to_a_reaches_sse_on_b_and_c_with_the_same_id(
    tmp_path: Path, nats: NatsServer
) -> None:
    async with instances(tmp_path, nats, ["a", "b", "c"], **OPEN) as nodes:
        (_, a, _), (_, b, _), (_, c, _) = nodes
        got: dict[str, list[dict[str, Any]]] = {}

        async def follow(name: str, client: httpx.AsyncClient, ready: trio.Event) -> None:
            async with client.stream("GET", "/v1/events/stream?topic=reports") as r:
                assert r.status_code == 200
                ready.set()
                got[name] = await read_until(r, lambda es: len(reports(es)) == 1)

        async with trio.open_nursery() as nursery:
            for name, client in (("a", a), ("b", b), ("c", c)):
                ready = trio.Event()
                nursery.start_soon(follow, name, client, ready)
                await ready.wait()
            message_id = await post(a, "vm-1")
        frames = [got[n][0] for n in ("a", "b", "c")]
        assert {f["id"] for f in frames} == {frames[0]["id"]}
        for frame in frames:
            body = frame["data"]
            assert body["id"] == int(frame["id"])
            assert body["instance"] == "a"
            assert body["data"]["message_id"] == message_id
            assert ev.validate("reports", body["data"]) == []
        # Every event any instance published (started, reports, ...) conforms to its schema
        # and names its instance.
        page = (await c.get("/v1/events?after=0&limit=1000")).json()
        assert {e["instance"] for e in page["events"]} >= {"a", "b", "c"}
        for event in page["events"]:
            assert ev.validate(event["topic"], event["data"]) == [], event


async def test_a_client_cut_off_from_a_resumes_on_c_with_exactly_the_missed_events(
    tmp_path: Path, nats: NatsServer
) -> None:
    async with instances(tmp_path, nats, ["a", "b", "c"], **OPEN) as nodes:
        clients = [client for _, client, _ in nodes]
        a, _b, c = clients
        async with a.stream("GET", "/v1/events/stream") as r:
            sent = [await post(clients[i % 3], f"first-{i}") for i in range(3)]
            seen = await read_until(
                r, lambda es: [e["data"]["data"]["message_id"] for e in reports(es)] == sent
            )
        last_id = int(seen[-1]["id"])
        # While the client is away, every instance admits reports; then one more, the sentinel.
        missed = [await post(clients[i % 3], f"missed-{i}") for i in range(6)]
        sentinel = await post(a, "sentinel")
        expected = {*missed, sentinel}

        def admitted(events: list[dict[str, Any]]) -> list[str]:
            return [e["data"]["data"]["message_id"] for e in reports(events)]

        async with c.stream(
            "GET", "/v1/events/stream", headers={"Last-Event-ID": str(last_id)}
        ) as r:
            resumed = await read_until(r, lambda es: expected <= set(admitted(es)))
        ids = [int(e["id"]) for e in resumed]
        assert "gap" not in {e["event"] for e in resumed}
        assert ids == sorted(set(ids)) and ids[0] > last_id
        # Each report exactly once. The log's order across instances is the order their
        # publishes reached the stream (docs/cluster.md), not the order of the 202s; each
        # instance's own reports keep theirs.
        got = admitted(resumed)
        assert sorted(got) == sorted(expected)
        for k in range(3):  # missed[i] went to instance i % 3, the sentinel to A
            mine = [m for i, m in enumerate(missed) if i % 3 == k] + [sentinel] * (k == 0)
            assert [m for m in got if m in mine] == mine
        # Exactly the log after last_id, as any instance pages it: nothing more, nothing less
        # (once A's own mirror has caught up with what C already showed: a page is what the
        # instance has mirrored so far).
        relay_a = nodes[0][0].relay
        await eventually(lambda: relay_a.hub.ring.last_id >= ids[-1])
        page = (await a.get(f"/v1/events?after={last_id}&limit=1000")).json()
        logged = [e for e in page["events"] if e["id"] <= ids[-1]]
        assert [e["id"] for e in logged] == ids
        assert [orjson.dumps(e) for e in logged] == [orjson.dumps(e["data"]) for e in resumed]


async def test_paging_returns_the_same_ids_and_data_on_every_instance(
    tmp_path: Path, nats: NatsServer
) -> None:
    async with instances(tmp_path, nats, ["a", "b", "c"], **OPEN) as nodes:
        relays = [server.relay for server, _, _ in nodes]
        clients = [client for _, client, _ in nodes]

        async def load(i: int) -> None:
            body = b"".join(
                orjson.dumps({"resource_id": f"r{i}-{j}", "payload": {"j": j}}) + b"\n"
                for j in range(40)
            )
            r = await clients[i].post("/v1/reports:batch", content=body)
            assert r.status_code == 200

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(load, i)
        await post(clients[0], "last")
        await settle(relays, 121)
        bodies = [(await c.get("/v1/events?after=0&limit=1000")).content for c in clients]
        assert bodies[0] == bodies[1] == bodies[2]
        events = orjson.loads(bodies[0])["events"]
        assert [e["id"] for e in events] == list(range(events[0]["id"], events[-1]["id"] + 1))
        assert {e["instance"] for e in events if e["topic"] == "reports"} == {"a", "b", "c"}
        # A cursor walk with a topic filter is the same everywhere too.
        walks = []
        for client in clients:
            walk: list[dict[str, Any]] = []
            after = 0
            while True:
                page = (await client.get(f"/v1/events?after={after}&limit=7&topic=reports")).json()
                if not page["events"]:
                    break
                walk += page["events"]
                after = page["next_after"]
            walks.append(walk)
        assert walks[0] == walks[1] == walks[2]
        assert len(walks[0]) == 121


async def test_ids_older_than_the_mirror_come_from_the_stream_and_gone_ones_get_gap(
    tmp_path: Path, nats: NatsServer
) -> None:
    # The stream keeps at most 40 events and the byte cap is charged differently: a ring
    # event costs its JSON, its SSE frame and bookkeeping, so each ring holds fewer events
    # than the stream. Ids below the ring are read from the stream; below it, a gap.
    small: dict[str, Any] = {**OPEN, "event_ring_size": 40, "event_ring_bytes": 6000}
    async with instances(tmp_path, nats, ["a", "b", "c"], **small) as nodes:
        relays = [server.relay for server, _, _ in nodes]
        a, b, c = (client for _, client, _ in nodes)
        for i in range(60):
            await post((a, b, c)[i % 3], f"vm-{i}")
        await settle(relays, 60)
        ring = relays[1].hub.ring
        last = ring.last_id
        info = await node(relays[1]).bridge.call(
            node(relays[1]).link.js.stream_info,
            EVENTS_STREAM,
        )
        first = info.state.first_seq
        assert info.state.last_seq == last
        assert 1 < first < ring.first_id - 5, (first, ring.first_id)

        # Paging from 0 on B: a gap for what the stream dropped, then every id to the end.
        walk: list[dict[str, Any]] = []
        gaps = 0
        after = 0
        while True:
            page = (await b.get(f"/v1/events?after={after}&limit=9")).json()
            gaps += page["gap"]
            if not page["events"]:
                break
            walk += page["events"]
            after = page["next_after"]
        assert gaps == first - 1
        assert [e["id"] for e in walk] == list(range(first, last + 1))
        kept = (await c.get(f"/v1/events?after={first - 1}&limit=1000")).json()
        assert kept["gap"] == 0 and kept["events"] == walk

        # SSE on C from id 1: one gap frame, then the stream's events, then the ring's.
        async with c.stream("GET", "/v1/events/stream", headers={"Last-Event-ID": "1"}) as r:
            got = await read_until(r, lambda es: es[-1].get("id") == str(last))
        assert got[0]["event"] == "gap" and got[0]["data"] == {"missed": first - 2}
        assert [e["data"] for e in got[1:]] == walk

        # A deleted event older than the mirror: the stream no longer has it → gap.
        hole = first + 2
        await node(relays[0]).bridge.call(
            node(relays[0]).link.js.delete_msg,
            EVENTS_STREAM,
            hole,
        )
        page = (await a.get(f"/v1/events?after={first}&limit=4")).json()
        assert [e["id"] for e in page["events"]] == [first + 1, hole + 1, hole + 2, hole + 3]
        assert page["gap"] == 1
        async with a.stream("GET", "/v1/events/stream", headers={"Last-Event-ID": str(first)}) as r:
            got = await read_until(r, lambda es: es[-1].get("id") == str(last))
        assert [e.get("event") == "gap" for e in got[:3]] == [False, True, False]
        assert got[1]["data"] == {"missed": 1}
        assert [int(e["id"]) for e in got if "id" in e] == [
            i for i in range(first + 1, last + 1) if i != hole
        ]


async def test_nats_down_never_blocks_admission_and_events_are_published_on_reconnect(
    tmp_path: Path, nats: NatsServer
) -> None:
    async with instances(tmp_path, nats, ["a", "b"], **OPEN) as nodes:
        (sa, a, _), (sb, b, _) = nodes
        relay_a, relay_b = sa.relay, sb.relay
        await post(a, "before")
        nats.stop()
        await eventually(lambda: not node(relay_a).connected.value)
        with trio.fail_after(2):  # answered at once, never waiting for NATS
            refused = await a.post("/v1/reports", json={"resource_id": "x", "payload": {}})
        assert refused.status_code == 503
        for n in range(5):
            relay_a.publish("system", {"kind": "test", "n": n})  # synchronous: never blocks
        assert relay_a.status()["cluster"]["events"]["outbox"] >= 5
        nats.start()
        await eventually(lambda: reconnected(relay_b, "a"), within=20)
        page = (await b.get("/v1/events?after=0&limit=1000")).json()
        from_a = [e for e in page["events"] if e["instance"] == "a"]
        kinds = [e["data"].get("kind") for e in from_a if e["topic"] == "system"]
        # In the order a produced them: disconnected, the five, connected (or connected
        # first when the reconnect raced the publishes; never lost, never twice).
        tests = [e["data"]["n"] for e in from_a if e["data"].get("kind") == "test"]
        assert tests == [0, 1, 2, 3, 4]
        assert kinds.count("nats_disconnected") == 1
        assert kinds.count("nats_connected") == 1
        assert kinds.index("nats_disconnected") < kinds.index("test")
        assert relay_a.status()["cluster"]["events"]["lost"] == 0


async def test_an_overflowing_outbox_reports_its_loss_before_the_kept_events(
    tmp_path: Path, nats: NatsServer
) -> None:
    # A 10-event log: the outbox keeps at most 5 events of its own while NATS is away.
    tight: dict[str, Any] = {**OPEN, "event_ring_size": 10}
    async with instances(tmp_path, nats, ["a", "b"], **tight) as nodes:
        (sa, _, _), (sb, b, _) = nodes
        relay_a, relay_b = sa.relay, sb.relay
        await eventually(lambda: relay_a.status()["cluster"]["events"]["outbox"] == 0)
        nats.stop()
        await eventually(lambda: not node(relay_a).connected.value)
        for n in range(25):
            relay_a.publish("system", {"kind": "test", "n": n})
        outbox = relay_a.status()["cluster"]["events"]
        assert outbox["outbox"] == 5
        assert outbox["lost"] == 21  # nats_disconnected and 25 tests, 5 kept
        nats.start()
        await eventually(lambda: reconnected(relay_b, "a"), within=20)
        # nats_connected may have pushed one more out before the loss report went.
        lost = relay_a.status()["cluster"]["events"]["lost"]
        assert lost in (21, 22)
        page = (await b.get("/v1/events?after=0&limit=1000")).json()
        assert page["gap"] == page["events"][0]["id"] - 1
        from_a = [e["data"] for e in page["events"] if e["instance"] == "a"]
        at = from_a.index({"kind": "events_lost", "instance": "a", "lost": lost})
        assert ev.validate("system", from_a[at]) == []
        kept = [d["n"] for d in from_a[at + 1 :] if d.get("kind") == "test"]
        assert kept == list(range(lost - 1, 25))  # the newest, in order
        assert relay_b.metrics.render().count(b"relay_cluster_events_lost_total 0") == 1
        assert relay_a.metrics.render().count(b"relay_cluster_events_lost_total %d" % lost) == 1


async def test_the_status_page_on_b_shows_which_instance_produced_each_event(
    tmp_path: Path, nats: NatsServer
) -> None:
    async with (
        instances(tmp_path, nats, ["a", "b"], **OPEN) as nodes,
        launch_chromium(tmp_path / "chromium") as browser,
    ):
        (_, a, _), (sb, _, _) = nodes
        session = await browser.open_page(sb.urls[0] + "/")
        await wait_for(browser, session, "window.relayPage.state === 'live'")
        message_id = await post(a, "vm-page")
        log = "document.getElementById('log').textContent"
        await wait_for(browser, session, f"{log}.includes({orjson.dumps(message_id).decode()})")
        line = await browser.evaluate(
            session,
            "[...document.querySelectorAll('#log div')].map(d => d.textContent)"
            f".find(t => t.includes(' reports ') && t.includes('{message_id}'))",
        )
        assert " reports @a {" in line


async def test_a_draining_instance_publishes_its_last_events_and_ends_streams_without_an_id(
    tmp_path: Path, nats: NatsServer
) -> None:
    async with instances(tmp_path, nats, ["a", "b"], **OPEN) as nodes:
        (sa, a, _), (sb, _, _) = nodes
        async with a.stream("GET", "/v1/events/stream?topic=system") as r:
            sa.relay.request_shutdown("test")
            got = await read_until(r, lambda es: es[-1].get("event") == "shutdown")
        final = got[-1]
        assert "id" not in final
        assert final["data"]["data"] == {"kind": "shutdown", "reason": "test"}
        # The draining event went through the outbox into the log before the end.
        await eventually(
            lambda: any(
                e["instance"] == "a" and e["data"].get("kind") == "draining"
                for e in logged(sb.relay)
            )
        )


async def test_an_event_stream_contradicting_the_config_refuses_the_start(
    tmp_path: Path, nats: NatsServer
) -> None:
    async with instances(tmp_path, nats, ["a"], event_ring_size=100):
        pass
    relay = Relay(
        cluster_config(tmp_path, nats, "b", event_ring_size=200),
        upstream_factory=lambda _url, _deadline: MemoryUpstream("http://upstream.invalid/"),
    )
    with pytest.raises(BaseException) as caught:  # a group around it: unwrapped below
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
    errors = [caught.value]
    while isinstance(errors[-1], BaseExceptionGroup):
        errors.append(errors[-1].exceptions[0])
    assert isinstance(errors[-1], ClusterUnavailable)
    assert str(errors[-1]) == (
        "JetStream stream RELAY_EVENTS has max_msgs=100 but the config needs 200; "
        "delete it or fix the config"
    )
