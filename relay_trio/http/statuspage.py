"""The live status page served at ``GET /`` and its static assets (``GET /static/NAME``).

The page is a small HTML shell; its script (``static/statuspage.js``) and the charting
library (uPlot, vendored from npm with its licence) ship inside the package, so the page
works offline and behind firewalls: no CDN, no build step.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Final

#: Content types by file suffix; files with any other suffix are not served.
CONTENT_TYPES: Final = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
}

STATUS_PAGE: Final = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>relay-trio status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/uPlot.min.css">
<link rel="stylesheet" href="/static/statuspage.css">
</head><body>
<header><h1>relay-trio</h1><span id="state">connecting&hellip;</span><span id="meta"></span></header>
<form id="auth" autocomplete="off" hidden><p id="auth-msg"></p>
<input id="auth-token" type="password" placeholder="read token" aria-label="read token">
<button type="submit">Connect</button></form>
<section class="tiles" id="tiles"></section>
<section class="charts">
<div class="panel"><h2>Reports / s</h2><div class="chart" id="chart-reports"></div></div>
<div class="panel"><h2>Delivery / s</h2><div class="chart" id="chart-delivery"></div></div>
<div class="panel"><h2>Pending messages</h2><div class="chart" id="chart-pending"></div></div>
<div class="panel"><h2>Dead letters</h2><div class="chart" id="chart-deadletters"></div></div>
<div class="panel"><h2>SSE subscribers</h2><div class="chart" id="chart-subscribers"></div></div>
<div class="panel"><h2>Resources tracked</h2><div class="chart" id="chart-resources"></div></div>
</section>
<section class="row">
<div class="panel"><h2>Upstreams</h2><table><thead><tr><th>state</th><th>upstream</th>
<th>last change</th><th>sends</th><th>failed</th><th>failing streak</th></tr></thead>
<tbody id="upstreams"></tbody></table></div>
<div class="panel" id="deadletters-panel"><h2>Newest dead letters</h2><table><thead><tr>
<th>dead at</th><th>message</th><th>reason</th><th>attempts</th><th>last error</th><th></th></tr></thead>
<tbody id="deadletters"></tbody></table>
<form id="admin-auth" autocomplete="off" hidden><span id="admin-msg"></span>
<input id="admin-token" type="password" placeholder="admin token" aria-label="admin token">
<button type="submit">Redrive</button></form>
<p id="redrive-result" role="status"></p>
<p class="note">From GET /v1/deadletters; full history with <code>relay-trio</code> or the API.</p>
</div>
</section>
<section class="panel"><h2>Event log</h2>
<div id="log-controls"><input id="log-filter" type="search" placeholder="filter: resource, message id, reason&hellip;">
<select id="log-topic"><option value="">all topics</option><option>reports</option><option>acks</option>
<option>drops</option><option>deadletter</option><option>system</option></select></div>
<div id="log"></div></section>
<script src="/static/uPlot.iife.min.js"></script>
<script src="/static/statuspage.js"></script>
</body></html>
"""


@cache
def static_assets() -> dict[str, tuple[bytes, str]]:
    """Every servable file of ``relay_trio/static``: name -> (bytes, content type).

    Read once from the installed package and kept in memory (about 70 KB), so serving an
    asset never touches the disk and a request path never reaches the filesystem.
    """
    assets: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("relay_trio").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            assets[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return assets


__all__ = ["STATUS_PAGE", "static_assets"]
