"""Webhook sink: POSTs each record to a URL with httpx under the side timeout."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import httpx
import trio


class WebhookError(Exception):
    """The webhook answered with a non-2xx status."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"webhook {url} answered HTTP {status}")
        self.url = url
        self.status = status


@attrs.define(eq=False)
class WebhookSink:
    """POSTs each batch to ``url`` as one JSON array (``application/json``).

    Uses ``client`` if given (the caller owns and closes it); otherwise creates its own
    ``httpx.AsyncClient`` with no httpx timeout (the queue's cancel scope is the deadline)
    and closes it in :meth:`aclose`. A non-2xx answer raises :class:`WebhookError`.
    """

    url: str
    client: httpx.AsyncClient | None = None
    name: str = "webhook"
    _http: httpx.AsyncClient = attrs.field(init=False)
    _owns_client: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._owns_client = self.client is None
        self._http = self.client if self.client is not None else httpx.AsyncClient(timeout=None)

    async def write(self, batch: Sequence[bytes]) -> None:
        """POST the batch. Checkpoint; raises ``WebhookError`` or ``httpx.HTTPError``."""
        body = b"[" + b",".join(batch) + b"]"
        response = await self._http.post(
            self.url, content=body, headers={"content-type": "application/json"}
        )
        if not response.is_success:
            raise WebhookError(self.url, response.status_code)

    async def aclose(self) -> None:
        """Close the client if this sink created it. Checkpoint."""
        if self._owns_client:
            await self._http.aclose()
        else:
            await trio.lowlevel.checkpoint()
