"""Headless Chromium driven over the DevTools protocol on a pipe (no driver, no extra package).

``--remote-debugging-pipe`` makes Chromium read protocol commands from fd 3 and write
replies and events to fd 4, each message a JSON object ended by a NUL byte. Two
``os.pipe()`` pairs wrapped in :class:`trio.lowlevel.FdStream` are all it takes, so the
browser is driven from Trio without a websocket client or a chromedriver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

#: Flags for running as root in a container, with nothing phoning home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)


def chromium_path() -> str | None:
    """The Chromium executable on PATH, if any."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class CdpError(Exception):
    """A DevTools command failed, or a page script threw."""


@attrs.define(eq=False)
class Chromium:
    """One browser process; :meth:`call` sends a command and waits for its reply."""

    to_browser: trio.lowlevel.FdStream
    from_browser: trio.lowlevel.FdStream
    next_id: int = 0
    waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = attrs.field(factory=dict)
    #: Uncaught page exceptions and console errors (``Runtime.enable`` turns them on).
    page_errors: list[str] = attrs.field(factory=list)

    async def read_replies(self) -> None:
        """Route replies to their callers until the browser closes the pipe."""
        buffer = b""
        while chunk := await self.from_browser.receive_some(1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = orjson.loads(raw)
                self._note_event(message)
                slot = self.waiting.pop(message.get("id", -1), None)
                if slot is not None:
                    slot[1].append(message)
                    slot[0].set()
        # The browser is gone: nobody waits for a reply that cannot come.
        for done, box in self.waiting.values():
            box.append({"error": "browser closed the pipe"})
            done.set()
        self.waiting.clear()

    def _note_event(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        params = message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.page_errors.append(
                str(details.get("exception", {}).get("description") or details.get("text"))
            )
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.page_errors.append(" ".join(str(a.get("value")) for a in params.get("args", [])))

    async def call(
        self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None
    ) -> dict[str, Any]:
        """Send one command; return its ``result`` (raises :class:`CdpError` on error)."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        done, box = trio.Event(), list[dict[str, Any]]()
        self.waiting[self.next_id] = (done, box)
        await self.to_browser.send_all(orjson.dumps(message) + b"\0")
        with trio.fail_after(30):
            await done.wait()
        reply = box[0]
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def open_page(self, url: str, width: int = 1400, height: int = 900) -> str:
        """Open ``url`` in a new tab of the given viewport; return its session id."""
        target = await self.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        session: str = attached["sessionId"]
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        await self.call("Runtime.enable", {}, session)
        await self.call("Page.navigate", {"url": url}, session)
        return session

    async def evaluate(self, session: str, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (promises awaited)."""
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session,
        )
        if "exceptionDetails" in result:
            raise CdpError(str(result["exceptionDetails"]))
        return result["result"].get("value")

    async def screenshot(self, session: str) -> bytes:
        """A PNG of the whole page."""
        import base64

        result = await self.call(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session
        )
        return base64.b64decode(result["data"])


@asynccontextmanager
async def launch_chromium(user_data_dir: Path) -> AsyncIterator[Chromium]:
    """Run headless Chromium for the block; closes (then kills) it on exit."""
    executable = chromium_path()
    if executable is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    commands_r, commands_w = os.pipe()
    replies_r, replies_w = os.pipe()
    # A tiny exec wrapper maps our pipe ends onto the fds 3 and 4 the protocol expects
    # (a POSIX shell cannot name fds above 9).
    script = (
        "import fcntl, os, sys\n"
        "fds = [int(sys.argv[1]), int(sys.argv[2])]\n"
        "high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]\n"
        "[os.close(fd) for fd in fds if fd not in (3, 4)]\n"
        "os.dup2(high[0], 3); os.dup2(high[1], 4); [os.close(fd) for fd in high]\n"
        "os.execv(sys.argv[3], sys.argv[3:])\n"
    )
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-c",
            script,
            str(commands_r),
            str(replies_w),
            executable,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={user_data_dir}",
            "about:blank",
        ],
        pass_fds=(commands_r, replies_w),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=None if os.environ.get("CHROMIUM_STDERR") else subprocess.DEVNULL,
    )
    os.close(commands_r)
    os.close(replies_w)
    browser = Chromium(trio.lowlevel.FdStream(commands_w), trio.lowlevel.FdStream(replies_r))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(browser.read_replies)
            try:
                yield browser
            finally:
                with trio.move_on_after(5) as closing:
                    closing.shield = True
                    with suppress(CdpError, trio.BrokenResourceError, trio.ClosedResourceError):
                        await browser.call("Browser.close")
                    await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        await browser.to_browser.aclose()
        await browser.from_browser.aclose()
