// relay-trio status page.
//
// Keeps up with a busy relay: ONE event subscription (the SSE stream, read with fetch so
// that a read token can travel in the Authorization header, never in the URL), events
// only bump per-second counters (bucketed by the event's own timestamp), and the charts,
// panels and log are redrawn once per second. Gauges come from /v1/status every few
// seconds. Everything is kept for a 15-minute window.
(() => {
  'use strict';
  const WINDOW = 900;        // seconds shown and kept
  const POLL_MS = 3000;      // /v1/status period
  const BACKFILL = 2000;     // events replayed from the ring when the page opens
  const LOG_KEEP = 1000;     // events kept for the log
  const LOG_SHOW = 200;      // log lines drawn
  const DL_SHOW = 8;         // newest dead letters listed
  const TOKEN_KEY = 'relay-trio-read-token';
  const ADMIN_KEY = 'relay-trio-admin-token';   // redrive: sessionStorage, never the URL

  // Per-second series from events (index into a bucket) and from counter deltas.
  const S = { admitted: 0, rate_limited: 1, stale_ack: 2, other_rejected: 3, acked: 4, nacked: 5,
    late: 6, retries: 7, send_failures: 8, dead: 9, events: 10 };
  const NS = 11;
  const OTHER_REJECTED = ['invalid', 'malformed', 'too_large', 'unauthorized', 'draining', 'overloaded'];

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);
  let skewMs = 0;                     // server clock minus browser clock (Date header)
  const nowSec = () => Math.floor((Date.now() + skewMs) / 1000);
  const buckets = new Map();          // second -> Float64Array(NS)
  const gauges = [];                  // {t, pending, queue, inflight, subs, resources, kept}
  const log = [];                     // newest last: {id, topic, at, data}
  let logDirty = true;
  let lastId = null;                  // last SSE id seen (resume point)
  let received = 0;                   // events received by this page
  let prevCounters = null, prevPollSec = null;
  let status = null;
  const upstreamChange = new Map();   // url -> RFC 3339 time of the last up/down change
  const upstreamSeen = new Map();     // url -> up flag at the previous poll
  let dlCursor = 0, dlTotalSeen = 0, dlWanted = true;
  const deadLetters = [];             // newest first
  let connState = 'connecting';

  function bucket(sec) {
    let b = buckets.get(sec);
    if (b === undefined) { b = new Float64Array(NS); buckets.set(sec, b); }
    return b;
  }
  function spread(fromSec, toSec, index, amount) {
    // A counter delta seen between two polls, spread evenly over the seconds in between.
    if (!(amount > 0)) return;
    const n = Math.max(1, toSec - fromSec);
    for (let s = toSec - n + 1; s <= toSec; s++) bucket(s)[index] += amount / n;
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (token) h.Authorization = 'Bearer ' + token;
    return h;
  }

  // --- read token: asked for in the page, kept for this tab only (sessionStorage) -----
  let tokenWaiters = [];
  function askToken(httpStatus) {
    $('auth-msg').textContent = httpStatus === 403
      ? 'That read token was refused. Enter the read token:'
      : 'This relay requires a read token:';
    $('auth').hidden = false;
    setState('locked', 'read token required');
    return new Promise((resolve) => tokenWaiters.push(resolve));
  }
  $('auth').addEventListener('submit', (ev) => {
    ev.preventDefault();
    token = $('auth-token').value.trim() || null;
    if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
    $('auth').hidden = true;
    const waiters = tokenWaiters; tokenWaiters = [];
    waiters.forEach((w) => w());
  });

  function setState(cls, text) {
    connState = cls;
    const el = $('state');
    el.className = cls; el.textContent = text;
  }

  // --- the one event subscription --------------------------------------------------
  function onEvent(topic, id, raw) {
    received++;
    if (id !== null) lastId = id;
    let ev;
    try { ev = JSON.parse(raw); } catch (_) { ev = { data: raw }; }
    const data = ev.data !== undefined ? ev.data : ev;
    const at = typeof ev.at === 'string' ? ev.at : null;
    // Cluster mode: every event names the relay instance that produced it.
    const instance = typeof ev.instance === 'string' ? ev.instance : null;
    const sec = at ? Math.floor(Date.parse(at) / 1000) : nowSec();
    const b = bucket(sec);
    b[S.events]++;
    if (topic === 'reports') b[S.admitted]++;
    else if (topic === 'drops') {
      if (data.reason === 'rate_limited') b[S.rate_limited]++;
      else if (data.reason === 'stale_ack') b[S.stale_ack]++;
      // Other reasons publish no event: they come from counter deltas (poll()).
    } else if (topic === 'acks') {
      if (data.outcome === 'acked') b[S.acked]++;
      else if (data.outcome === 'nacked' || data.outcome === 'dead') b[S.nacked]++;
      else b[S.late]++;
    } else if (topic === 'deadletter') {
      b[S.dead]++; dlWanted = true;
    } else if (topic === 'system' || topic === 'shutdown') {
      if (data.kind === 'upstream_down' || data.kind === 'upstream_up') {
        upstreamChange.set(data.upstream, at || new Date().toISOString());
      } else if (data.kind === 'draining') setState('draining', 'draining');
      else if (data.kind === 'shutdown') setState('stopped', 'relay shut down');
    }
    log.push({ id, topic, at, instance, data });
    if (log.length > LOG_KEEP * 1.5) log.splice(0, log.length - LOG_KEEP);
    logDirty = true;
  }

  function onFrame(frame) {
    let topic = 'message', id = null, data = '';
    for (const line of frame.split('\n')) {
      if (line === '' || line[0] === ':') continue;          // heartbeat / comment
      const c = line.indexOf(':');
      const field = c < 0 ? line : line.slice(0, c);
      let value = c < 0 ? '' : line.slice(c + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'event') topic = value;
      else if (field === 'id') id = Number(value);
      else if (field === 'data') data = data ? data + '\n' + value : value;
    }
    if (data) onEvent(topic, id, data);
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  async function follow() {
    let backoff = 1000;
    for (;;) {
      const h = headers({ Accept: 'text/event-stream' });
      if (lastId !== null) h['Last-Event-ID'] = String(lastId);
      try {
        const r = await fetch('/v1/events/stream', { headers: h, cache: 'no-store' });
        if (r.status === 401 || r.status === 403) { await askToken(r.status); continue; }
        if (!r.ok || !r.body) throw new Error('HTTP ' + r.status);
        if (connState !== 'draining') setState('live', 'live');
        backoff = 1000;
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            onFrame(buf.slice(0, i));
            buf = buf.slice(i + 2);
          }
        }
      } catch (_) { /* network error: reconnect below */ }
      if (connState !== 'stopped') setState('reconnecting', 'stream reconnecting');
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 15000);
    }
  }

  // --- /v1/status: gauges, counters the stream does not carry, upstreams ----------------
  let polling = false;
  async function poll() {
    if (polling) return;
    polling = true;
    try { await pollOnce(); } finally { polling = false; }
  }
  async function pollOnce() {
    let r;
    try { r = await fetch('/v1/status', { headers: headers(), cache: 'no-store' }); }
    catch (_) { setState('down', 'status unavailable'); return; }
    if (r.status === 401 || r.status === 403) { await askToken(r.status); return pollOnce(); }
    if (!r.ok) { setState('down', 'status HTTP ' + r.status); return; }
    const date = Date.parse(r.headers.get('Date') || '');
    if (!Number.isNaN(date)) skewMs = date - Date.now();
    status = await r.json();
    const t = nowSec();
    const c = status.counters || {}, g = status.gauges || {};
    if (prevCounters) {
      const d = (k) => (c[k] || 0) - (prevCounters[k] || 0);
      spread(prevPollSec, t, S.other_rejected, OTHER_REJECTED.reduce((a, k) => a + d('rejected_' + k), 0));
      spread(prevPollSec, t, S.retries, d('umh_retries'));
      spread(prevPollSec, t, S.send_failures, d('umh_send_failures'));
    }
    prevCounters = c; prevPollSec = t;
    gauges.push({ t, pending: g.pending_messages || 0, queue: g.send_queue || 0,
      inflight: g.sends_in_flight || 0, subs: g.sse_subscribers || 0, resources: g.resources || 0,
      kept: g.dead_letters_kept || 0 });
    while (gauges.length && gauges[0].t < t - WINDOW) gauges.shift();
    for (const u of status.upstreams || []) {
      const before = upstreamSeen.get(u.url);
      if (before !== undefined && before !== u.up && !upstreamChange.has(u.url)) {
        upstreamChange.set(u.url, new Date(Date.now() + skewMs).toISOString());
      }
      upstreamSeen.set(u.url, u.up);
    }
    if (status.draining) setState('draining', 'draining');
    if (lastId === null && status.events) lastId = Math.max(0, status.events.last_id - BACKFILL);
    if (dlWanted || (g.dead_letters_kept || 0) !== dlTotalSeen) await fetchDeadLetters();
    drawTiles(); drawUpstreams();
  }

  // --- dead letters: paged oldest first; keep the newest ------------------------------
  async function fetchDeadLetters() {
    dlWanted = false;
    for (let page = 0; page < 20; page++) {
      // `after`/`next_after` (in-memory list) and `cursor`/`next_cursor` (store) both page
      // by the dead letter's index; each server ignores the other's parameter.
      const q = '/v1/deadletters?limit=1000&after=' + dlCursor + '&cursor=' + dlCursor;
      let r;
      try { r = await fetch(q, { headers: headers(), cache: 'no-store' }); } catch (_) { return; }
      if (!r.ok) return;
      const body = await r.json();
      const items = body.dead_letters || body.items || [];
      for (const d of items) deadLetters.unshift(d);
      if (deadLetters.length > DL_SHOW) deadLetters.length = DL_SHOW;
      dlTotalSeen += items.length;
      const before = dlCursor;
      const lastIndex = items.length ? items[items.length - 1].index : undefined;
      if (typeof lastIndex === 'number') dlCursor = lastIndex;
      else if (typeof body.next_after === 'number') dlCursor = body.next_after;
      const more = body.next_cursor !== undefined ? body.next_cursor !== null : items.length > 0;
      if (!items.length || !more || dlCursor === before) break;
    }
    if (status && status.gauges) dlTotalSeen = status.gauges.dead_letters_kept || 0;
    drawDeadLetters();
  }

  // --- redrive: admin token asked for in the page, kept for this tab (sessionStorage) --
  let redriveWaiting = null;          // message id waiting for the admin token
  function showRedrive(text, ok) {
    const p = $('redrive-result');
    p.textContent = text; p.className = ok ? 'ok' : 'bad';
  }
  async function redrive(messageId) {
    const admin = sessionStorage.getItem(ADMIN_KEY);
    const h = { 'Content-Type': 'application/json' };
    if (admin) h.Authorization = 'Bearer ' + admin;
    let r;
    try {
      r = await fetch('/v1/deadletters:redrive', { method: 'POST', headers: h, cache: 'no-store',
        body: JSON.stringify({ message_ids: [messageId] }) });
    } catch (_) { showRedrive('redrive ' + messageId + ': relay unreachable', false); return; }
    if (r.status === 401 || r.status === 403) {
      if (admin) sessionStorage.removeItem(ADMIN_KEY);
      redriveWaiting = messageId;
      $('admin-msg').textContent = (admin ? 'Admin token refused. ' : '')
        + 'Admin token to redrive ' + messageId + ': ';
      $('admin-auth').hidden = false;
      $('admin-token').focus();
      return;
    }
    let body = {};
    try { body = await r.json(); } catch (_) { /* keep the status line */ }
    window.relayPage.redrive = { status: r.status, body };
    if (!r.ok) {
      showRedrive('redrive ' + messageId + ': HTTP ' + r.status + ' ' + (body.title || ''), false);
      return;
    }
    const skipped = Object.entries(body.skipped_by_reason || {}).map(([k, n]) => n + ' ' + k);
    showRedrive('redrive ' + messageId + ': ' + body.redriven + ' redriven of ' + body.matched
      + ' matched' + (skipped.length ? ', skipped ' + skipped.join(', ') : ''), body.redriven > 0);
    // The dead letter left the store: list the panel again from the start.
    deadLetters.length = 0; dlCursor = 0; dlTotalSeen = 0;
    await fetchDeadLetters();
  }
  $('admin-auth').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const admin = $('admin-token').value.trim();
    $('admin-token').value = '';
    $('admin-auth').hidden = true;
    if (admin) sessionStorage.setItem(ADMIN_KEY, admin);
    const waiting = redriveWaiting; redriveWaiting = null;
    if (waiting && admin) redrive(waiting);
  });

  // --- drawing (once per second) -----------------------------------------------------
  const fmt = (n) => (n >= 1e6 ? (n / 1e6).toFixed(1) + 'M' : n >= 1e4 ? (n / 1e3).toFixed(1) + 'k'
    : String(Math.round(n * 10) / 10));
  const hms = (iso) => (iso ? iso.slice(11, 19) : '');

  function tile(label, value) {
    const d = document.createElement('div'); d.className = 'tile';
    const b = document.createElement('b'); b.textContent = value;
    const s = document.createElement('span'); s.textContent = label;
    d.append(b, s); return d;
  }
  function lastSecondRate(index) {
    // The last complete second.
    const b = buckets.get(nowSec() - 1);
    return b ? b[index] : 0;
  }
  function drawTiles() {
    if (!status) return;
    const c = status.counters || {}, g = status.gauges || {};
    $('meta').textContent = 'v' + status.version + ' · up ' + Math.round(status.uptime_seconds) + ' s · '
      + received + ' events received by this page · times in UTC';
    $('tiles').replaceChildren(
      tile('admitted /s', fmt(lastSecondRate(S.admitted))),
      tile('reports admitted', fmt(c.reports_admitted || 0)),
      tile('rejected', fmt(Object.keys(c).filter((k) => k.startsWith('rejected_'))
        .reduce((a, k) => a + c[k], 0))),
      tile('pending', fmt(g.pending_messages || 0)),
      tile('send queue', fmt(g.send_queue || 0)),
      tile('dead letters kept', fmt(g.dead_letters_kept || 0)),
      tile('resources', fmt(g.resources || 0)),
      tile('SSE subscribers', fmt(g.sse_subscribers || 0)),
    );
  }

  function cell(tr, text, cls) {
    const td = document.createElement('td'); td.textContent = text;
    if (cls) td.className = cls;
    tr.append(td); return td;
  }
  function drawUpstreams() {
    const rows = (status && status.upstreams) || [];
    const body = $('upstreams');
    body.replaceChildren(...rows.map((u) => {
      const tr = document.createElement('tr');
      const state = cell(tr, '');
      const badge = document.createElement('span');
      badge.className = 'badge ' + (u.up ? 'up' : 'down'); badge.textContent = u.up ? 'up' : 'down';
      state.append(badge);
      cell(tr, u.url, 'url').title = u.url;
      const changed = upstreamChange.get(u.url);
      cell(tr, changed ? hms(changed) : (u.went_down || u.went_up ? 'before this page' : 'never'));
      cell(tr, fmt(u.sends || 0));
      cell(tr, fmt(u.failed || 0));
      cell(tr, String(u.failures || 0));
      return tr;
    }));
    window.relayPage.upstreams = rows.map((u) => ({ url: u.url, up: u.up, sends: u.sends,
      failed: u.failed, changed_at: upstreamChange.get(u.url) || null }));
  }

  function drawDeadLetters() {
    const body = $('deadletters');
    if (!deadLetters.length) {
      const tr = document.createElement('tr');
      const td = cell(tr, 'no dead letters', 'empty'); td.colSpan = 6;
      body.replaceChildren(tr);
    } else {
      body.replaceChildren(...deadLetters.map((d) => {
        const tr = document.createElement('tr');
        cell(tr, hms(d.dead_at));
        cell(tr, d.message_id, 'mid').title = d.message_id;
        cell(tr, d.reason);
        const attempts = d.attempts || [];
        cell(tr, String(attempts.length));
        const last = attempts[attempts.length - 1];
        cell(tr, last ? (last.detail || last.outcome || '') : '');
        const button = document.createElement('button');
        button.className = 'redrive'; button.textContent = 'redrive';
        button.title = 'POST /v1/deadletters:redrive for ' + d.message_id;
        button.addEventListener('click', () => redrive(d.message_id));
        cell(tr, '').append(button);
        return tr;
      }));
    }
    window.relayPage.deadLetters = deadLetters.map((d) => d.message_id);
  }

  function drawLog() {
    if (!logDirty) return;
    logDirty = false;
    const text = $('log-filter').value.trim().toLowerCase();
    const topic = $('log-topic').value;
    const out = [];
    for (let i = log.length - 1; i >= 0 && out.length < LOG_SHOW; i--) {
      const e = log[i];
      if (topic && e.topic !== topic) continue;
      const json = e.json || (e.json = JSON.stringify(e.data));
      if (text && !json.toLowerCase().includes(text) && !e.topic.includes(text)
          && !(e.instance && e.instance.toLowerCase().includes(text))) continue;
      const d = document.createElement('div');
      const t = document.createElement('span'); t.className = 't';
      t.textContent = (e.at ? e.at.slice(11, 23) : '            ') + ' ' + (e.id === null ? '' : '#' + e.id) + ' ';
      const k = document.createElement('span'); k.className = 'topic-' + e.topic; k.textContent = e.topic + ' ';
      d.append(t, k);
      if (e.instance) {
        const n = document.createElement('span'); n.className = 'instance'; n.textContent = '@' + e.instance + ' ';
        d.append(n);
      }
      d.append(document.createTextNode(json));
      out.push(d);
    }
    $('log').replaceChildren(...out);
    window.relayPage.logShown = out.length;
  }
  $('log-filter').addEventListener('input', () => { logDirty = true; drawLog(); });
  $('log-topic').addEventListener('change', () => { logDirty = true; drawLog(); });

  // --- charts (uPlot) ----------------------------------------------------------------
  const C = { green: '#3fb950', orange: '#d29922', red: '#f85149', blue: '#58a6ff',
    purple: '#a371f7', grey: '#8b949e', teal: '#39c5cf' };
  const two = (n) => String(n).padStart(2, '0');
  const utcTime = (sec) => {
    const d = new Date(sec * 1000);
    return two(d.getUTCHours()) + ':' + two(d.getUTCMinutes()) + ':' + two(d.getUTCSeconds());
  };
  let xRange = [nowSec() - 60, nowSec()];   // every chart shows the same span
  const axis = { stroke: '#8b949e', grid: { stroke: '#21262d', width: 1 }, ticks: { stroke: '#30363d', width: 1 } };
  const CHARTS = {
    reports: { title: 'Reports / s', series: [['admitted', C.green], ['rate limited', C.orange],
      ['stale ack', C.red], ['other rejected', C.purple]] },
    delivery: { title: 'Delivery / s', series: [['acks', C.green], ['nacks', C.orange],
      ['retries', C.blue], ['send failures', C.red], ['late/unknown acks', C.grey]] },
    pending: { title: 'Pending messages', series: [['pending', C.blue], ['send queue', C.purple],
      ['in flight', C.teal]] },
    deadletters: { title: 'Dead letters', series: [['new / s', C.red], ['kept', C.grey]] },
    subscribers: { title: 'SSE subscribers', series: [['subscribers', C.blue]] },
    resources: { title: 'Resources tracked', series: [['resources', C.teal]] },
  };
  const plots = {};
  window.relayCharts = {};
  window.relayPage = { received: 0, lastEventId: null, upstreams: [], deadLetters: [], logShown: 0 };

  function makeCharts() {
    for (const [name, spec] of Object.entries(CHARTS)) {
      const el = $('chart-' + name);
      const width = Math.max(200, el.clientWidth - 4);
      const series = [{}].concat(spec.series.map(([label, color], i) => ({
        label, stroke: color, width: 1.6, points: { show: false },
        fill: i === 0 ? color + '1f' : undefined,
        scale: name === 'deadletters' && label === 'kept' ? 'kept' : 'y',
        value: (u, v) => (v === null || v === undefined ? '–' : fmt(v)),
      })));
      const axes = [Object.assign({ space: 75, values: (u, vals) => vals.map(utcTime) }, axis),
        Object.assign({ size: 48, values: (u, vals) => vals.map(fmt) }, axis)];
      const scales = { x: { time: true, auto: false, range: () => xRange },
        y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } };
      if (name === 'deadletters') {
        axes.push(Object.assign({ scale: 'kept', side: 1, size: 48, values: (u, vals) => vals.map(fmt) },
          axis, { grid: { show: false } }));
        scales.kept = { range: (u, min, max) => [0, Math.max(1, max * 1.1)] };
      }
      const empty = [[]].concat(spec.series.map(() => []));
      plots[name] = new uPlot({ width, height: 170, series, axes, scales,
        legend: { live: false }, cursor: { drag: { x: false, y: false } } }, empty, el);
    }
  }

  function rateData(indices) {
    const now = nowSec() - 1;                      // the last complete second
    let first = now - WINDOW + 1;
    let oldest = Infinity;
    for (const k of buckets.keys()) if (k < oldest) oldest = k;
    first = Math.max(first, Math.min(oldest, now));
    const xs = [], ys = indices.map(() => []);
    for (let s = first; s <= now; s++) {
      xs.push(s);
      const b = buckets.get(s);
      indices.forEach((idx, j) => ys[j].push(b ? Math.round(b[idx] * 100) / 100 : 0));
    }
    return [xs].concat(ys);
  }
  function gaugeData(keys) {
    return [gauges.map((g) => g.t)].concat(keys.map((k) => gauges.map((g) => g[k])));
  }
  function drawCharts() {
    const cutoff = nowSec() - WINDOW;
    for (const k of buckets.keys()) if (k < cutoff) buckets.delete(k);
    const dead = rateData([S.dead]);
    xRange = [Math.min(dead[0][0] || nowSec(), ...gauges.slice(0, 1).map((g) => g.t)), nowSec() - 1];
    if (xRange[1] - xRange[0] < 60) xRange[0] = xRange[1] - 60;
    const data = {
      reports: rateData([S.admitted, S.rate_limited, S.stale_ack, S.other_rejected]),
      delivery: rateData([S.acked, S.nacked, S.retries, S.send_failures, S.late]),
      pending: gaugeData(['pending', 'queue', 'inflight']),
      // Gauge samples are sparser than seconds: 'kept' is carried forward per second.
      deadletters: [dead[0], dead[1], carry(dead[0], 'kept')],
      subscribers: gaugeData(['subs']),
      resources: gaugeData(['resources']),
    };
    for (const [name, d] of Object.entries(data)) {
      window.relayCharts[name] = d;
      if (plots[name]) plots[name].setData(d);
    }
  }
  function carry(xs, key) {
    let j = 0, last = null;
    return xs.map((x) => {
      while (j < gauges.length && gauges[j].t <= x) last = gauges[j++][key];
      return last;
    });
  }

  function tick() {
    window.relayPage.received = received;
    window.relayPage.lastEventId = lastId;
    window.relayPage.state = connState;
    drawCharts(); drawTiles(); drawLog();
  }

  window.addEventListener('resize', () => {
    for (const [name, p] of Object.entries(plots)) {
      p.setSize({ width: Math.max(200, $('chart-' + name).clientWidth - 4), height: 170 });
    }
  });

  async function start() {
    makeCharts();
    await poll();                 // learns the token need, the clock skew and the resume id
    follow();
    setInterval(poll, POLL_MS);
    setInterval(tick, 1000);
    tick();
  }
  start();
})();
