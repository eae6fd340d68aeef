"""One owner, one budget: the staged shutdown never outlasts ``shutdown_timeout`` (virtual time)."""

from __future__ import annotations

from pathlib import Path

import attrs
import trio
from relay_helpers import MemoryUpstream, make_config

from relay_trio.relay import Relay
from relay_trio.shutdown import Shutdown


@attrs.define(eq=False)
class NeverClosing(MemoryUpstream):
    """Accepts every send (the ACK never comes) and hangs when asked to close."""

    async def aclose(self) -> None:
        await trio.sleep_forever()


class Silent:
    def stopping(self, status: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass


async def test_every_stage_fits_in_shutdown_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    config = make_config(tmp_path, store="memory", shutdown_timeout=20, send_timeout=2)
    relay = Relay(config, upstream_factory=lambda url, _t: NeverClosing(url, mode="sent"))
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        assert not isinstance(relay.admit({"resource_id": "r", "payload": 1}), Exception)
        shutdown = Shutdown(config, relay, Silent())
        shutdown.http_done.set()  # no HTTP server in this test
        relay.request_shutdown("test")
        # The drain waits for an ACK that never comes: it is cut at drain_budget; the
        # upstream client that never closes is cut at half the close budget.
        await shutdown.run(nursery.cancel_scope, None)
    elapsed = trio.current_time() - start
    assert elapsed == config.drain_budget + config.close_budget / 2
    assert elapsed <= config.shutdown_timeout
    assert shutdown.reason == "test"
