"""Configuration: one frozen object, set by flag > environment > TOML file > default.

Every field ``some_name`` is set by the flag ``--some-name``, the environment variable
``RELAY_TRIO_SOME_NAME`` or the key ``some_name`` in the TOML file. Durations are seconds
(floats allowed); lists are comma-separated in the environment and repeatable as flags.

Longer than 400 lines: one table of every setting with its help text, the parsing of
flags, environment and TOML, and the checks that relate settings to each other; a setting
and its check stay side by side.
"""

from __future__ import annotations

import math
import resource
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from .redact import redact_url, redact_value
from .webhooks import parse_secrets

ENV_PREFIX: Final = "RELAY_TRIO_"
FLUSH_MODES: Final = ("sequential", "parallel", "none")
STORES: Final = ("sqlite", "memory", "nats")
STORE_SYNC: Final = ("normal", "full", "off")
MIB: Final = 1024 * 1024
#: Share of ``shutdown_timeout`` for the drain; the rest closes streams and stops HTTP.
DRAIN_SHARE: Final = 0.8
#: File descriptors the default ``http_max_connections`` leaves for the rest of the process.
FD_RESERVE_BASE: Final = 64
#: ... and for each HTTP upstream (its client's connection pool holds up to 64).
FD_RESERVE_PER_HTTP_UPSTREAM: Final = 64
#: The default ``http_max_connections`` never goes below this.
MIN_HTTP_CONNECTIONS: Final = 16
#: Share of ``shutdown_timeout`` stream connections get to finish their lines.
RECEIVER_SHARE: Final = 0.1
#: Share of ``shutdown_timeout`` (at most 1 s) for the store's last commit and closing clients.
CLOSE_SHARE: Final = 0.05


class ConfigError(ValueError):
    """A setting has an invalid value, or settings the user chose cannot fit together.

    ``str()`` is one line naming the setting(s); ``setting`` is the first of ``settings``.
    """

    def __init__(self, setting: str, message: str, *others: str) -> None:
        names = (setting, *others)
        label = f"setting {setting}" if not others else "settings " + " and ".join(names)
        super().__init__(f"invalid {label}: {message}")
        self.setting = setting
        self.settings = names


def _opt(default: Any, help: str, kind: str = "", **kw: Any) -> Any:
    return attrs.field(default=default, metadata={"help": help, "kind": kind}, **kw)


@attrs.frozen(kw_only=True)
class RelayConfig:
    """Every setting of the relay, with the defaults from the design document."""

    host: str = _opt("127.0.0.1", "Address the HTTP server binds.")
    port: int = _opt(8080, "HTTP port; 0 picks any free port.")
    data_dir: str = _opt("./relay-trio-data", "Directory for the embedded sink and spool files.")
    upstreams: tuple[str, ...] = _opt(
        (),
        "Upstream URLs (http(s)://... or file://PATH.jsonl). Default: file://<data_dir>/upstream.jsonl.",
        "list",
    )
    rate_per_minute: float = _opt(1.0, "Leaky-bucket rate per resource, reports per minute.")
    burst: int = _opt(1, "Leaky-bucket burst per resource.")
    dry_run: bool = _opt(False, "Count rate-limit rejections but admit everything.")
    stale_ack_threshold: float = _opt(
        14400.0,
        "Reject a resource's reports (stale_ack) when its sends stay unacknowledged this long.",
    )
    eviction_interval: float | None = _opt(
        None, "Seconds between eviction sweeps. Default: half of stale_ack_threshold.", "optfloat"
    )
    resource_ttl: float = _opt(14400.0, "Evict a resource idle for this long.")
    max_resources: int = _opt(100_000, "Cap on tracked resources (LRU eviction beyond).")
    send_timeout: float = _opt(
        10.0,
        "Deadline for one send attempt to an upstream. Unset: 10, or less to fit a "
        "shutdown_timeout you set.",
    )
    sender_tasks: int = _opt(8, "Number of concurrent sender tasks.")
    upstream_concurrency: int = _opt(
        64,
        "Concurrent requests to one HTTP upstream; a hung request holds one slot for at most send_timeout.",
    )
    upstream_max_response_bytes: int = _opt(
        65536,
        "Largest HTTP upstream answer read; a longer one is a failed attempt and is not kept.",
    )
    send_queue_size: int = _opt(10_000, "Bound of the channel between admission and senders.")
    ack_timeout: float = _opt(30.0, "How long a sent message waits for its ACK.")
    retry_base: float = _opt(30.0, "Base of the capped exponential retry backoff.")
    retry_cap: float = _opt(600.0, "Cap of the retry backoff.")
    max_attempts: int = _opt(10, "Send attempts before a message is dead-lettered.")
    max_age: float = _opt(14400.0, "Age after which an unacknowledged message is dead-lettered.")
    max_dead_letters: int = _opt(
        10_000, "Dead letters kept in the store (oldest pruned beyond, counted in a metric)."
    )
    store: str = _opt(
        "sqlite",
        "Where admitted reports and dead letters live: sqlite (data_dir/relay.db), memory, "
        "or nats (cluster mode: NATS JetStream at nats_url, shared by every instance).",
    )
    nats_url: str = _opt(
        "nats://127.0.0.1:4222",
        "Cluster mode: NATS server URL(s), comma-separated (store = nats).",
    )
    instance_id: str = _opt(
        "", "Cluster mode: this instance's name in the members list. Default: hostname-pid."
    )
    nats_heartbeat: float = _opt(
        2.0,
        "Cluster mode: seconds between membership heartbeats (a member is up while its last "
        "one is under two intervals old; the entry expires after three).",
    )
    nats_replicas: int = _opt(
        1, "Cluster mode: JetStream replicas of every stream and KV bucket (1 or 3 servers)."
    )
    store_sync: str = _opt(
        "normal",
        "SQLite synchronous mode: normal survives a process crash, full also a power cut, off neither.",
    )
    recovery_rate: float = _opt(
        500.0, "Overdue messages found at start are resent at most this many per second."
    )
    failures_to_down: int = _opt(3, "Consecutive failures that mark an upstream down.")
    successes_to_up: int = _opt(3, "Consecutive successes that mark a down upstream up.")
    probe_interval: float = _opt(5.0, "Seconds between probes of a down upstream (jittered).")
    max_body_bytes: int = _opt(MIB, "Largest accepted request body for single reports and acks.")
    batch_max_bytes: int = _opt(16 * MIB, "Largest accepted body for POST /v1/reports:batch.")
    batch_max_lines: int = _opt(10_000, "Most reports in one batch request.")
    event_ring_size: int = _opt(10_000, "Events kept in the event log.")
    event_ring_bytes: int = _opt(64 * MIB, "Bytes kept in the event log.")
    heartbeat_interval: float = _opt(15.0, "Seconds between SSE heartbeat comments.")
    subscriber_buffer: int = _opt(1000, "Events buffered per SSE subscriber before it is dropped.")
    max_subscribers: int = _opt(1000, "Global cap on SSE subscribers.")
    max_subscribers_per_topic: int | None = _opt(
        None, "Cap on SSE subscribers per topic. Default: max_subscribers.", "optint"
    )
    sse_write_budget: float = _opt(
        8000.0,
        "SSE socket writes per second the hub plans for; with many subscribers it flushes less often.",
    )
    coalesce_interval: float = _opt(0.025, "Minimum seconds between SSE fan-out writes under load.")
    write_timeout: float = _opt(
        10.0,
        "Deadline for one HTTP response/SSE write; a peer that stops reading is dropped. "
        "Unset: 10, or half a shutdown_timeout you set if less.",
    )
    http_max_connections: int | None = _opt(
        None,
        "Open HTTP connections at most; beyond it a new connection closes the oldest one not "
        "serving a request, or is refused. Default: the file-descriptor limit (RLIMIT_NOFILE) "
        "minus a reserve for upstreams, stores and the stream port, at least 16.",
        "optint",
    )
    http_read_timeout: float = _opt(
        10.0,
        "A request head and body must arrive within this many seconds of their first byte "
        "(of the connection, for the first request), or the connection is closed.",
    )
    keep_alive_timeout: float = _opt(
        75.0, "Close an HTTP keep-alive connection idle for this long between requests."
    )
    shutdown_flush: str = _opt("sequential", "Flush mode on shutdown: sequential, parallel, none.")
    shutdown_timeout: float = _opt(
        30.0,
        "Budget for the whole staged shutdown. Unset: 30, or more to hold the send_timeout, "
        "write_timeout and flush you set.",
    )
    ingest_token: str | None = _opt(
        None,
        "Token for report ingest: HTTP bearer token and the stream handshake (@FILE reads a file).",
        "secret",
    )
    ack_token: str | None = _opt(
        None, "Bearer token for POST /v1/acks (@FILE reads a file).", "secret"
    )
    admin_token: str | None = _opt(
        None, "Bearer token for /admin routes (@FILE reads a file).", "secret"
    )
    read_token: str | None = _opt(
        None, "Bearer token for read APIs (@FILE reads a file).", "secret"
    )
    upstream_signing_secrets: tuple[str, ...] = _opt(
        (),
        "Signing secrets of the upstreams, same order as upstreams: whsec_BASE64 (Standard "
        "Webhooks), several separated by spaces during a rotation, - for none, @FILE reads a file.",
        "secretlist",
    )
    idempotency_window: float = _opt(
        86400.0, "How long an ingest idempotency key is remembered (seconds)."
    )
    idempotency_max_keys: int = _opt(
        100_000,
        "Idempotency keys remembered at most (oldest expire first, counted in a metric).",
    )
    otel_endpoint: str | None = _opt(
        None,
        "OTLP/HTTP traces endpoint (e.g. http://127.0.0.1:4318/v1/traces); needs the otel extra.",
        "optstr",
    )
    side_audit_file: str | None = _opt(
        None, "Mirror admitted reports to this JSONL file.", "optstr"
    )
    side_udp: str | None = _opt(
        None, "Mirror admitted reports as UDP datagrams to HOST:PORT.", "optstr"
    )
    side_webhook: str | None = _opt(None, "Mirror admitted reports to this webhook URL.", "optstr")
    side_queue_size: int = _opt(1000, "Bound of each side sink's queue (drops beyond).")
    side_timeout: float = _opt(2.0, "Deadline for one side-sink write.")
    stream_listen: tuple[str, ...] = _opt(
        (), "Stream receiver addresses: tcp://HOST:PORT, unix:///PATH, vsock://CID:PORT.", "list"
    )
    stream_max_connections: int = _opt(50, "Concurrent stream connections.")
    stream_slot_wait: float = _opt(5.0, "How long a new stream connection waits for a slot.")
    stream_idle_timeout: float = _opt(10.0, "Idle read deadline per stream connection.")
    stream_max_frame: int = _opt(16 * MIB, "Largest stream line (report) in bytes.")
    log_level: str = _opt("info", "Log level: debug, info, warning, error.")
    log_format: str = _opt(
        "text",
        "Log format: text, or json (one object per line: time, level, logger, message, ids).",
    )
    #: Names of the settings given by flag, environment or file (not defaults or derived).
    explicit: frozenset[str] = attrs.field(
        default=frozenset(),
        eq=False,
        repr=False,
        metadata={"help": "Settings the user gave explicitly.", "kind": "internal"},
    )

    @property
    def effective_upstreams(self) -> tuple[str, ...]:
        """The upstream list, with the embedded JSONL file sink when none is configured."""
        if self.upstreams:
            return self.upstreams
        return ("file://" + str(Path(self.data_dir).absolute() / "upstream.jsonl"),)

    def signing_keys(self) -> dict[str, tuple[bytes, ...]]:
        """Each signed upstream's URL → its HMAC keys (``upstream_signing_secrets`` decoded;
        validated at load, so this does not raise for a loaded config)."""
        return {
            url: keys
            for url, entry in zip(
                self.effective_upstreams, self.upstream_signing_secrets, strict=False
            )
            if (keys := parse_secrets(entry))
        }

    @property
    def effective_eviction_interval(self) -> float:
        """Eviction ticker period: configured, or half the stale-ACK threshold."""
        if self.eviction_interval is not None:
            return self.eviction_interval
        return self.stale_ack_threshold / 2

    @property
    def effective_max_subscribers_per_topic(self) -> int:
        """Per-topic subscriber cap: configured, or the global cap."""
        if self.max_subscribers_per_topic is not None:
            return self.max_subscribers_per_topic
        return self.max_subscribers

    @property
    def http_fd_reserve(self) -> int:
        """File descriptors kept out of ``http_max_connections``'s default: a base for the
        process (listeners, logs, spool and sink files, stores, the event loop), plus
        the HTTP upstream clients' pools and the stream port's connections."""
        http_upstreams = sum(
            1 for url in self.effective_upstreams if url.startswith(("http://", "https://"))
        )
        stream = self.stream_max_connections if self.stream_listen else 0
        return FD_RESERVE_BASE + FD_RESERVE_PER_HTTP_UPSTREAM * http_upstreams + stream

    def effective_http_max_connections(self, nofile: int | None = None) -> int:
        """The HTTP connection cap: configured, or ``max(16, nofile - http_fd_reserve)``
        where ``nofile`` defaults to this process's soft RLIMIT_NOFILE."""
        if self.http_max_connections is not None:
            return self.http_max_connections
        if nofile is None:
            soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            nofile = soft if soft != resource.RLIM_INFINITY else 1 << 20
        return max(MIN_HTTP_CONNECTIONS, nofile - self.http_fd_reserve)

    @property
    def drain_budget(self) -> float:
        """The part of ``shutdown_timeout`` the staged drain may use (the rest stops HTTP)."""
        return self.shutdown_timeout * DRAIN_SHARE

    @property
    def close_budget(self) -> float:
        """The last part of ``shutdown_timeout``: the store's final commit and closing the
        upstream clients (after HTTP has stopped)."""
        return min(1.0, self.shutdown_timeout * CLOSE_SHARE)

    @property
    def receiver_drain_budget(self) -> float:
        """How long stream connections get to finish their current lines at shutdown."""
        return min(self.stream_idle_timeout, self.shutdown_timeout * RECEIVER_SHARE)

    def drain_budget_needed(self) -> float:
        """Worst-case drain time: receiver, in-flight sends, then the flush's sends.

        Seed 002: an outer deadline must be the sum of the budgets it contains, or a step
        that is "within its own deadline" is cut off by the outer one.
        """
        flush_rounds = {
            "sequential": len(self.effective_upstreams),
            "parallel": 1,
            "none": 0,
        }.get(self.shutdown_flush, 0)
        receiver = self.receiver_drain_budget if self.stream_listen else 0.0
        return receiver + self.send_timeout * (1 + flush_rounds)

    def summary(self) -> dict[str, Any]:
        """The settings as JSON-ready values, for people and dashboards: every token is
        ``set``/``unset`` and every URL is shown without credentials (``***@``)."""
        out: dict[str, Any] = {}
        for f in config_fields():
            value = getattr(self, f.name)
            if f.metadata["kind"] == "secret":
                value = "set" if value else "unset"
            elif f.metadata["kind"] == "secretlist":
                value = ["unset" if v.strip() == "-" else "set" for v in value]
            else:
                value = redact_value(value)
            out[f.name] = value
        return out


def config_fields() -> Iterator[attrs.Attribute[Any]]:
    """The configuration fields in declaration order (for the CLI and the docs)."""
    for f in attrs.fields(RelayConfig):
        if f.metadata["kind"] != "internal":
            yield f


def field_kind(f: attrs.Attribute[Any]) -> str:
    """How a field's text form is parsed: int, float, bool, list, str or an opt*/secret kind."""
    kind: str = f.metadata["kind"]
    if kind:
        return kind
    return type(f.default).__name__


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "bool": _parse_bool,
    "str": str,
    "optstr": str,
    "secret": str,
    "optint": int,
    "optfloat": float,
}


def coerce(f: attrs.Attribute[Any], value: object) -> Any:
    """Turn a flag/env/TOML value into the field's type. Raises :class:`ConfigError`."""
    kind = field_kind(f)
    try:
        if kind in ("list", "secretlist"):
            if isinstance(value, str):
                return tuple(part.strip() for part in value.split(",") if part.strip())
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise ValueError("expected a list of strings")
        if isinstance(value, str):
            return _PARSERS[kind](value)
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind in ("int", "optint") and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in ("float", "optfloat") and isinstance(value, int | float):
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if kind in ("str", "optstr", "secret") and isinstance(value, str):
            return value
        raise ValueError(f"expected {kind}, got {type(value).__name__}")
    except ValueError as exc:
        raise ConfigError(f.name, str(exc)) from None


def _read_secret(name: str, value: str | None) -> str | None:
    if value is None or not value.startswith("@"):
        return value
    try:
        token = Path(value[1:]).read_text().strip()
    except OSError as exc:
        raise ConfigError(name, f"cannot read token file: {exc.strerror}") from None
    if not token:
        raise ConfigError(name, "token file is empty")
    return token


def load_config(
    flags: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> RelayConfig:
    """Merge defaults < TOML file < environment < flags, then validate.

    ``flags`` maps field names to values already given on the command line (absent =
    not given). Raises :class:`ConfigError` naming the first bad setting; never returns an
    invalid configuration.
    """
    by_name = {f.name: f for f in config_fields()}
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except OSError as exc:
            raise ConfigError("config", f"cannot read {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{config_file} is not valid TOML: {exc}") from None
        for key, raw in data.items():
            if key not in by_name:
                raise ConfigError(key, "unknown setting in config file")
            values[key] = coerce(by_name[key], raw)
    for name, f in by_name.items():
        env_value = (env or {}).get(ENV_PREFIX + name.upper())
        if env_value is not None:
            values[name] = coerce(f, env_value)
    for name, raw in (flags or {}).items():
        if name not in by_name:
            raise ConfigError(name, "unknown setting")
        values[name] = coerce(by_name[name], raw)
    for name, f in by_name.items():
        if field_kind(f) == "secret" and name in values:
            values[name] = _read_secret(name, values[name])
        elif field_kind(f) == "secretlist" and name in values:
            values[name] = tuple(str(_read_secret(name, v)) for v in values[name])
    config = derive_defaults(RelayConfig(**values, explicit=frozenset(values)))
    validate(config)
    return config


#: Defaults of the settings :func:`derive_defaults` may lower to fit the shutdown budget.
_DEFAULT_WRITE_TIMEOUT: Final = 10.0
_DEFAULT_SEND_TIMEOUT: Final = 10.0
_DEFAULT_SHUTDOWN_TIMEOUT: Final = 30.0


def _flush_rounds(config: RelayConfig) -> int:
    """Send rounds the shutdown flush may take: one per upstream when sequential."""
    return {"sequential": len(config.effective_upstreams), "parallel": 1}.get(
        config.shutdown_flush, 0
    )


def derive_defaults(config: RelayConfig) -> RelayConfig:
    """Fit the defaults of unset settings around the ones the user set.

    Seed 002 nests the budgets: ``shutdown_timeout`` must hold ``write_timeout`` and the
    drain (``send_timeout`` x (1 + flush rounds) plus the receiver's share). When the
    user sets ``shutdown_timeout``, unset ``write_timeout`` (half of it, at most 10 s) and
    ``send_timeout`` (what the drain budget allows, at most 10 s) shrink to fit; when the
    user does not, ``shutdown_timeout`` grows from 30 s to hold the others. Values the user
    set are never changed: if those cannot fit, :func:`validate` names them.
    """
    given = config.explicit
    changes: dict[str, Any] = {}
    if "shutdown_timeout" in given:
        budget = config.shutdown_timeout
        if "write_timeout" not in given:
            changes["write_timeout"] = min(_DEFAULT_WRITE_TIMEOUT, budget / 2)
        if "send_timeout" not in given:
            receiver = config.receiver_drain_budget if config.stream_listen else 0.0
            fit = (config.drain_budget - receiver) / (1 + _flush_rounds(config))
            changes["send_timeout"] = min(_DEFAULT_SEND_TIMEOUT, fit, budget / 2)
    else:
        receiver = config.stream_idle_timeout if config.stream_listen else 0.0
        drain = receiver + config.send_timeout * (1 + _flush_rounds(config))
        # The write watchdog cuts a stuck write up to 1.25 x write_timeout after it started.
        required = max(drain / DRAIN_SHARE, config.write_timeout * 1.25, config.send_timeout * 1.25)
        if required >= _DEFAULT_SHUTDOWN_TIMEOUT:
            changes["shutdown_timeout"] = float(math.floor(required) + 1)
    positive = {k: v for k, v in changes.items() if math.isfinite(v) and v > 0}
    return attrs.evolve(config, **positive) if positive else config


def _require(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise ConfigError(setting, message)


def validate(config: RelayConfig) -> None:
    """Check ranges and budgets that must fit together. Raises :class:`ConfigError`."""
    c = config
    for f in config_fields():
        value = getattr(c, f.name)
        if isinstance(value, float):
            _require(math.isfinite(value), f.name, "must be a finite number")
    _require(0 <= c.port <= 65535, "port", "must be between 0 and 65535")
    _require(c.rate_per_minute > 0, "rate_per_minute", "must be > 0")
    _require(c.burst >= 1, "burst", "must be >= 1")
    for name in (
        "stale_ack_threshold",
        "resource_ttl",
        "send_timeout",
        "ack_timeout",
        "retry_base",
        "retry_cap",
        "max_age",
        "heartbeat_interval",
        "shutdown_timeout",
        "side_timeout",
        "write_timeout",
        "probe_interval",
        "stream_slot_wait",
        "stream_idle_timeout",
        "http_read_timeout",
        "keep_alive_timeout",
    ):
        _require(getattr(c, name) > 0, name, "must be > 0")
    _require(c.coalesce_interval >= 0, "coalesce_interval", "must be >= 0")
    _require(c.sse_write_budget > 0, "sse_write_budget", "must be > 0")
    _require(c.effective_eviction_interval > 0, "eviction_interval", "must be > 0")
    _require(c.retry_cap >= c.retry_base, "retry_cap", "must be >= retry_base")
    for name in (
        "max_resources",
        "sender_tasks",
        "upstream_concurrency",
        "upstream_max_response_bytes",
        "send_queue_size",
        "max_attempts",
        "max_dead_letters",
        "failures_to_down",
        "successes_to_up",
        "max_body_bytes",
        "batch_max_bytes",
        "batch_max_lines",
        "event_ring_size",
        "event_ring_bytes",
        "subscriber_buffer",
        "max_subscribers",
        "side_queue_size",
        "stream_max_connections",
        "stream_max_frame",
    ):
        _require(getattr(c, name) >= 1, name, "must be >= 1")
    _require(
        c.http_max_connections is None or c.http_max_connections >= 1,
        "http_max_connections",
        "must be >= 1",
    )
    _require(
        c.effective_max_subscribers_per_topic >= 1, "max_subscribers_per_topic", "must be >= 1"
    )
    _require(
        c.shutdown_flush in FLUSH_MODES,
        "shutdown_flush",
        f"must be one of {', '.join(FLUSH_MODES)}",
    )
    _require(c.store in STORES, "store", f"must be one of {', '.join(STORES)}")
    _require(c.nats_heartbeat > 0, "nats_heartbeat", "must be > 0")
    _require(c.nats_replicas in (1, 3, 5), "nats_replicas", "must be 1, 3 or 5")
    _require(c.store_sync in STORE_SYNC, "store_sync", f"must be one of {', '.join(STORE_SYNC)}")
    _require(c.recovery_rate > 0, "recovery_rate", "must be > 0")
    _require(
        c.log_level in ("debug", "info", "warning", "error"),
        "log_level",
        "must be debug, info, warning or error",
    )
    _require(c.log_format in ("text", "json"), "log_format", "must be text or json")
    for url in c.effective_upstreams:
        _require(
            url.startswith(("http://", "https://", "file://")) and len(url) > len("file://"),
            "upstreams",
            f"{redact_url(url)!r} must start with http://, https:// or file://",
        )
    _require(c.idempotency_window > 0, "idempotency_window", "must be > 0")
    _require(c.idempotency_max_keys >= 1, "idempotency_max_keys", "must be >= 1")
    _require(
        len(c.upstream_signing_secrets) <= len(c.effective_upstreams),
        "upstream_signing_secrets",
        f"has {len(c.upstream_signing_secrets)} entries for {len(c.effective_upstreams)} upstream(s)",
    )
    for i, entry in enumerate(c.upstream_signing_secrets, 1):
        try:
            parse_secrets(entry)
        except ValueError as exc:
            raise ConfigError("upstream_signing_secrets", f"entry {i}: {exc}") from None
    # Upstreams are known (routed, labelled, shown) by their URL without credentials.
    shown = [redact_url(url) for url in c.effective_upstreams]
    _require(
        len(set(shown)) == len(shown),
        "upstreams",
        f"must be distinct once credentials are hidden: {shown!r}",
    )
    # Seed 002: the shutdown budget must contain the budgets it waits on, or a drain
    # that is "within its deadline" is cut off by the outer one. Derived defaults always
    # fit (derive_defaults), so these name settings the user chose.
    _require_fit(
        c,
        c.shutdown_timeout > c.write_timeout,
        "write_timeout",
        f"shutdown_timeout ({c.shutdown_timeout:g}s) must exceed write_timeout "
        f"({c.write_timeout:g}s): a write to a client that stopped reading is only cut at its "
        "write deadline",
    )
    _require_fit(
        c,
        c.shutdown_timeout > c.send_timeout,
        "send_timeout",
        f"shutdown_timeout ({c.shutdown_timeout:g}s) must exceed send_timeout "
        f"({c.send_timeout:g}s): in-flight sends are drained within it",
    )
    needed = c.drain_budget_needed()
    _require_fit(
        c,
        c.drain_budget >= needed,
        "send_timeout",
        f"shutdown_timeout ({c.shutdown_timeout:g}s) leaves {c.drain_budget:g}s to drain, but "
        f"send_timeout ({c.send_timeout:g}s) with shutdown_flush={c.shutdown_flush} over "
        f"{len(c.effective_upstreams)} upstream(s) needs {needed:g}s",
    )


def _require_fit(config: RelayConfig, ok: bool, other: str, message: str) -> None:
    """A budget check between ``shutdown_timeout`` and ``other``: the error names both
    when the user set both, else the one the user set (or ``shutdown_timeout``)."""
    if ok:
        return
    given = config.explicit
    names = [n for n in ("shutdown_timeout", other) if n in given] or ["shutdown_timeout"]
    raise ConfigError(names[0], message, *names[1:])
