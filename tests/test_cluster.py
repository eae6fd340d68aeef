"""Cluster mode on a real nats-server: N relay instances share admission and delivery."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from relay_trio.relay import Relay
from relay_trio.server import RelayServer
from nats_helpers import NatsServer, running_nats
from relay_helpers import MemoryUpstream, eventually, make_config

pytestmark = pytest.mark.slow


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    yield from running_nats(tmp_path)


def cluster_config(tmp_path: Path, nats: NatsServer, name: str, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "store": "nats",
        "nats_url": nats.url,
        "instance_id": name,
        "upstreams": ["http://upstream.invalid/"],
        "ack_timeout": 1.0,
        "retry_base": 0.2,
        "retry_cap": 1.0,
        "nats_heartbeat": 0.5,
    }
    base.update(overrides)
    return make_config(tmp_path / name, **base)


@asynccontextmanager
async def instances(
    tmp_path: Path, nats: NatsServer, names: list[str], mode: str = "ack", **overrides: Any
) -> AsyncIterator[list[tuple[RelayServer, httpx.AsyncClient, MemoryUpstream]]]:
    out: list[tuple[RelayServer, httpx.AsyncClient, MemoryUpstream]] = []
    async with trio.open_nursery() as nursery:
        for name in names:
            up = MemoryUpstream("http://upstream.invalid/", mode)
            config = cluster_config(tmp_path, nats, name, **overrides)
            relay = Relay(config, upstream_factory=lambda _u, _d, up=up: up)
            server = RelayServer(config, relay)
            urls = await nursery.start(server.serve)
            client = httpx.AsyncClient(base_url=urls[0], timeout=10)
            out.append((server, client, up))
        try:
            yield out
        finally:
            for server, client, _ in out:
                await client.aclose()
                server.relay.request_shutdown("test")


async def test_one_bucket_and_unique_ids_across_two_instances(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with instances(tmp_path, nats_server, ["a", "b"]) as [(_, a, _ua), (_, b, _ub)]:
        first = await a.post("/v1/reports", json={"resource_id": "vm-1", "payload": {"n": 1}})
        assert first.status_code == 202, first.text
        second = await b.post("/v1/reports", json={"resource_id": "vm-1", "payload": {"n": 2}})
        assert second.status_code == 429
        assert second.json()["reason"] == "rate_limited"
        assert first.json()["message_id"] == "vm-1:1"
