"""Self-tests of the fake upstream: each behaviour, over real sockets (no autojump clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from fake_upstream import Behaviour, run_fake_upstream, serve_on_free_port


def body(message_id: str, attempt: int = 1) -> dict[str, Any]:
    resource_id = message_id.rsplit(":", 1)[0]
    return {
        "message_id": message_id,
        "resource_id": resource_id,
        "kind": None,
        "payload": {"n": 1},
        "attempt": attempt,
    }


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as c:
        yield c


async def test_default_is_a_synchronous_ack(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        async with run_fake_upstream() as up:
            assert up.url.startswith("http://127.0.0.1:")
            assert up.url.endswith("/ingest")
            response = await client.post(up.url, json=body("vm-1:1"))
            assert response.status_code == 200
            assert response.json() == {"ack": True}
            assert [r.body for r in up.received] == [body("vm-1:1")]
            assert [(r.outcome, r.status) for r in up.received] == [("ack", 200)]
            assert up.message_ids() == ["vm-1:1"]


async def test_async_ack_answers_202(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        async with run_fake_upstream(Behaviour(sync_ack=False)) as up:
            response = await client.post(up.url, json=body("vm-1:1"))
            assert (response.status_code, response.json()) == (202, {"ack": False})
            assert up.received[0].outcome == "accepted"
            assert up.callbacks == []  # no callback URL, no callback


async def test_fail_first_then_recover_and_reassignment_resets_budget(
    client: httpx.AsyncClient,
) -> None:
    with trio.fail_after(10):
        async with run_fake_upstream(Behaviour(fail_first=2)) as up:
            statuses = [
                (await client.post(up.url, json=body(f"r:{i}"))).status_code for i in range(3)
            ]
            assert statuses == [503, 503, 200]
            assert [r.outcome for r in up.received] == ["fail", "fail", "ack"]
            up.behaviour = Behaviour(fail_first=1)
            statuses = [
                (await client.post(up.url, json=body(f"r:{i}"))).status_code for i in range(2)
            ]
            assert statuses == [503, 200]


async def test_fail_all_is_down_for_posts_and_probes(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        async with run_fake_upstream(Behaviour(fail_all=True)) as up:
            for i in range(4):
                assert (await client.post(up.url, json=body(f"r:{i}"))).status_code == 503
            assert (await client.get(up.url)).status_code == 503
            up.behaviour = Behaviour()
            assert (await client.get(up.url)).status_code == 200
            assert (await client.post(up.url, json=body("r:9"))).status_code == 200
            assert up.probes == 2
            assert len(up.received) == 5  # probes are not recorded as messages


async def test_stall_delays_the_answer(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        async with run_fake_upstream(Behaviour(stall=0.3)) as up:
            start = trio.current_time()
            response = await client.post(up.url, json=body("vm-1:1"))
            assert response.status_code == 200
            assert trio.current_time() - start >= 0.3


async def test_stall_past_client_deadline_is_recorded_as_disconnected(
    client: httpx.AsyncClient,
) -> None:
    with trio.fail_after(10):
        async with run_fake_upstream(Behaviour(stall=30.0)) as up:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(up.url, json=body("vm-1:1"), timeout=0.2)
            assert up.received[0].outcome in ("pending", "disconnected")
            await up.wait_until(lambda u: u.received[0].outcome == "disconnected")
            assert up.received[0].status is None


async def test_teardown_releases_stalled_requests_promptly(client: httpx.AsyncClient) -> None:
    statuses: list[int] = []

    async def stalled_post(url: str) -> None:
        statuses.append((await client.post(url, json=body("vm-1:1"), timeout=30)).status_code)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async with run_fake_upstream(Behaviour(stall=60.0)) as up:
                nursery.start_soon(stalled_post, up.url)
                await up.wait_received(1)
                start = trio.current_time()
            assert trio.current_time() - start < 2.0
    assert statuses == [200]


async def test_bad_input_paths_and_methods(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        async with run_fake_upstream() as up:
            response = await client.post(up.url, content=b"{not json")
            assert response.status_code == 400
            assert up.received[0].outcome == "bad_request"
            assert (await client.post(up.base_url + "/other", json={})).status_code == 404
            assert (await client.put(up.url, json={})).status_code == 405


async def test_ack_callbacks_drop_then_nack_then_ack(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        async with (
            run_fake_upstream(path="/v1/acks") as relay,
            run_fake_upstream() as up,
        ):
            up.behaviour = Behaviour(
                sync_ack=False,
                ack_callback_url=relay.url,
                ack_callback_headers={"authorization": "Bearer t0ken"},
                drop_acks_first=1,
                nack_first=1,
                nack_retry_after=7.5,
            )
            for i in range(1, 4):
                assert (await client.post(up.url, json=body(f"vm-1:{i}"))).status_code == 202
            await up.wait_callbacks(3)
            await relay.wait_received(2)
            callbacks = sorted(relay.received, key=lambda r: str(r.body["message_id"]))
            assert [r.body for r in callbacks] == [
                {"message_id": "vm-1:2", "status": "nack", "retry_after": 7.5},
                {"message_id": "vm-1:3", "status": "ack"},
            ]
            decided = sorted((c.message_id, c.status, c.http_status) for c in up.callbacks)
            assert decided == [
                ("vm-1:1", "dropped", None),
                ("vm-1:2", "nack", 200),
                ("vm-1:3", "ack", 200),
            ]


async def test_callback_headers_are_sent() -> None:
    seen: list[dict[str, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as client:
            base_url, shutdown = await serve_on_free_port(app, nursery)
            assert base_url.startswith("http://127.0.0.1:")
            async with run_fake_upstream() as up:
                up.behaviour = Behaviour(
                    ack_callback_url=base_url + "/v1/acks",
                    ack_callback_headers={"authorization": "Bearer t0ken"},
                )
                # sync_ack + callback: a synchronous ACK and a later duplicate callback.
                response = await client.post(up.url, json=body("vm-1:1"))
                assert response.json() == {"ack": True}
                await up.wait_callbacks(1)
            shutdown.set()
    assert up.callbacks[0].http_status == 204
    assert seen[0]["authorization"] == "Bearer t0ken"
    assert seen[0]["content-type"] == "application/json"


async def test_callback_delay_and_unreachable_target_is_recorded_not_raised(
    client: httpx.AsyncClient,
) -> None:
    # Find a port nobody listens on: bind, note it, close.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with trio.fail_after(10):
        async with run_fake_upstream() as up:
            up.behaviour = Behaviour(
                sync_ack=False,
                ack_callback_url=f"http://127.0.0.1:{port}/v1/acks",
                ack_callback_delay=0.2,
            )
            start = trio.current_time()
            await client.post(up.url, json=body("vm-1:1"))
            await up.wait_callbacks(1)
            assert trio.current_time() - start >= 0.2
            [callback] = up.callbacks
            assert callback.http_status is None
            assert callback.error is not None and "ConnectError" in callback.error


async def test_clear_forgets_history(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        async with run_fake_upstream() as up:
            await client.post(up.url, json=body("vm-1:1"))
            await client.get(up.url)
            up.clear()
            assert (up.received, up.callbacks, up.probes) == ([], [], 0)
