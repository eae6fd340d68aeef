"""Event payloads: one definition (relay_trio.core.event_schemas) that every event a run of
the relay publishes conforms to, and that docs/events.md is generated from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import orjson
import trio
import trio.testing
from relay_helpers import memory_relay

from relay_trio.core import event_schemas as ev
from relay_trio.core.events import TOPICS
from relay_trio.core.model import Accepted, Problem
from relay_trio.services.redrive import RedriveRequest
from relay_trio.stores.base import DeadLetterQuery

DOCS = Path(__file__).parent.parent / "docs"


async def test_every_event_of_a_run_validates_and_every_schema_occurs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, ups = memory_relay(
        tmp_path,
        mode="fail",
        max_attempts=2,
        retry_base=1,
        retry_cap=1,
        rate_per_minute=60,
        burst=1,
        probe_interval=5,
        shutdown_flush="parallel",
    )
    (url,) = ups
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        for rid in ("a", "b", "c"):
            assert isinstance(relay.admit({"resource_id": rid, "payload": rid}), Accepted)
        assert isinstance(relay.admit({"resource_id": "a", "payload": 2}), Problem)  # drops
        await trio.sleep(30)  # failures: upstream down, then dead letters
        assert relay.store.stats().dead_letters == 3
        ups[url].mode = "sent"
        await trio.sleep(30)  # the prober brings it back up
        assert relay.router.states()[0]["up"]
        assert isinstance(relay.admit({"resource_id": "d", "payload": 1}), Accepted)
        assert isinstance(relay.admit({"resource_id": "e", "payload": 1}), Accepted)
        await trio.sleep(1)
        assert relay.acknowledge("d:1", "ack", None, None) == "acked"
        assert relay.acknowledge("e:1", "nack", "busy", 600) == "nacked"
        assert relay.acknowledge("zz:1", "ack", None, None) == "unknown"
        answer = await relay.redrive(RedriveRequest(DeadLetterQuery(resource_id="a")))
        assert answer["redriven"] == 1
        await trio.sleep(2)
        assert isinstance(relay.admit({"resource_id": "e", "payload": 2}), Accepted)  # supersedes
        relay.request_shutdown("test")
        with trio.move_on_after(5):
            await relay.drain()
        relay.finish_shutdown()
        nursery.cancel_scope.cancel()
    page = relay.hub.ring.page(None, 10_000)
    assert page.gap == 0
    seen: set[tuple[str, str | None]] = set()
    for event in page.events:
        body = orjson.loads(event.json)
        assert body["topic"] in TOPICS
        assert ev.validate(body["topic"], body["data"]) == [], body
        schema = ev.schema_for(body["topic"], body["data"])
        assert schema is not None
        seen.add(schema.key)
        if "superseded" in body["data"]:
            seen.add(("reports", "superseded"))
    # Every schema but the cluster-mode ones (tests/test_cluster_events.py) occurs.
    cluster_only = {"nats_connected", "nats_disconnected", "events_lost"}
    single_node = {s.key for s in ev.SCHEMAS if s.key[1] not in cluster_only}
    assert seen == single_node | {("reports", "superseded")}


def test_validate_reports_what_is_wrong() -> None:
    ok = ev.report_dropped("r", "rate_limited")
    assert ev.validate(*ok) == []
    assert ev.validate("drops", {"resource_id": "r"}) == ["drops: missing 'reason'"]
    assert ev.validate("drops", {"resource_id": 1, "reason": "x"}) == [
        "drops: 'resource_id' is int, not string"
    ]
    assert ev.validate("acks", {**ev.ack_received("a:1", "ack", "acked", True, None).data, "x": 1})
    assert ev.validate("system", {"kind": "nope"})
    assert ev.validate("nope", {})
    assert ev.validate("overflow", ev.overflow(64, 9), ev.OVERFLOW) == []


def test_events_page_is_generated_from_the_schemas() -> None:
    spec = importlib.util.spec_from_file_location("gen_events", DOCS / "gen_events.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    page = gen.on_page_markdown((DOCS / "events.md").read_text(), None)
    for schema in (*ev.SCHEMAS, ev.OVERFLOW):
        assert schema.doc in page
        for field in schema.fields:
            assert f"`{field.name}`" in page
    assert gen.MARKER not in page
