"""Upstream routing: a sticky rendezvous-hash pick per resource, with hysteresis health.

Pure logic: no I/O, no Trio, no clock. Callers pass ``now`` (from ``trio.current_time()``)
and a seeded :class:`random.Random` for probe jitter, so every decision is reproducible.

Routing (seed 003): each resource sticks to one upstream chosen by rendezvous (highest
random weight) hashing. Unlike ``hash % N``, adding or removing an upstream moves only the
resources whose top choice changes (about ``1/N`` of them), and when an upstream goes
down only *its* resources fail over, each to its own second choice, so the load of a dead
upstream spreads over the survivors instead of piling onto one neighbour.

The score is defined so that other processes (a load balancer in front of N relays, a test
in another language) can compute the same order::

    score(resource_id, url) = int.from_bytes(
        blake2b(resource_id.encode() + b"\\0" + url.encode(), digest_size=8).digest(), "big")

where ``url`` is the upstream URL as configured, except that credentials (``user:pass@``)
read ``***@`` (:func:`relay_trio.core.redact.redact_url`): the router never holds secrets, and
rotating a password moves no resource.

Upstreams are ranked by descending score; ties (practically impossible) go to the lower
index. Python's ``hash()`` is salted per process and must never be used here.

Health (seed 003 hysteresis): ``failures_to_down`` consecutive failures flip an upstream
DOWN; while down, ``successes_to_up`` consecutive successes (probes or real sends) flip it
back UP. A single flaky answer therefore never moves traffic, and a flapping upstream does
not get traffic back until it has proved itself several times in a row.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs

from .redact import redact_url

DEFAULT_RANKING_CACHE_SIZE: Final = 100_000
_SEPARATOR: Final = b"\0"
# 6! = 720 shared ranking tuples at most; beyond that interning could grow without bound.
_INTERN_MAX_UPSTREAMS: Final = 6


def _positive_int(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value!r}")


def _positive_float(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _fraction(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value!r}")


def _url_tuple(urls: Iterable[str]) -> tuple[str, ...]:
    # The router never holds credentials: its urls name upstreams in status, metric labels,
    # log lines and events, and rank resources (so rotating a password moves no resource).
    return tuple(redact_url(url) for url in urls)


@attrs.frozen
class HealthPolicy:
    """How many consecutive outcomes flip an upstream, and how often a down one is probed.

    ``probe_jitter`` is a fraction: each probe delay is drawn uniformly from
    ``probe_interval * [1 - probe_jitter, 1 + probe_jitter]`` so that relays restarted together
    do not probe a recovering upstream in lockstep. Invalid values raise ``ValueError``.
    """

    failures_to_down: int = attrs.field(default=3, validator=_positive_int)
    successes_to_up: int = attrs.field(default=3, validator=_positive_int)
    probe_interval: float = attrs.field(default=5.0, validator=_positive_float)
    probe_jitter: float = attrs.field(default=0.2, validator=_fraction)


@attrs.define(eq=False)
class UpstreamHealth:
    """Mutable health of one upstream; owned by :class:`UpstreamRouter`, read via ``states()``."""

    url: str
    up: bool = True
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    #: When a down upstream should next be probed; ``None`` while up.
    next_probe_at: float | None = None
    successes_total: int = 0
    failures_total: int = 0
    went_down: int = 0
    went_up: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot (for ``/v1/status`` and metrics)."""
        return {
            "url": self.url,
            "up": self.up,
            "failures": self.consecutive_failures,
            "successes": self.consecutive_successes,
            "sends": self.successes_total + self.failures_total,
            "failed": self.failures_total,
            "went_down": self.went_down,
            "went_up": self.went_up,
            "next_probe_at": self.next_probe_at,
        }


def rendezvous_score(resource_id: str, url: str) -> int:
    """The rendezvous weight of ``url`` for ``resource_id`` (see the module docstring).

    Reference implementation for other processes; :class:`UpstreamRouter` computes the same
    value faster by reusing a hash state per resource.
    """
    digest = hashlib.blake2b(
        resource_id.encode() + _SEPARATOR + url.encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


@attrs.define(eq=False)
class UpstreamRouter:
    """Picks an upstream per resource and tracks upstream health with hysteresis.

    Not thread-safe and never blocks: every method is plain synchronous code that finishes
    without awaiting, so under Trio it needs no lock (seed 003's "leaf lock" for free).
    ``urls`` are kept without credentials (``***@``) and must then be distinct (``ValueError``
    otherwise); an empty list is allowed and makes
    :meth:`pick` return ``None``. Membership is fixed: to change the upstream list, build a
    new router (rendezvous hashing keeps most resources where they were).

    ``ranking_cache_size`` bounds the memo of resource -> ranking (resource ids are caller
    input, so the memo is an LRU, never an unbounded dict); 0 disables it.
    """

    urls: tuple[str, ...] = attrs.field(converter=_url_tuple)
    policy: HealthPolicy
    rng: random.Random
    ranking_cache_size: int = DEFAULT_RANKING_CACHE_SIZE
    _health: list[UpstreamHealth] = attrs.field(init=False)
    _encoded_urls: tuple[bytes, ...] = attrs.field(init=False)
    _down_count: int = attrs.field(init=False, default=0)
    _ranked: Callable[[str], tuple[int, ...]] = attrs.field(init=False)
    _memo: functools._lru_cache_wrapper[tuple[int, ...]] | None = attrs.field(
        init=False, default=None
    )
    _orders: dict[tuple[int, ...], tuple[int, ...]] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"upstream urls must be distinct: {list(self.urls)!r}")
        if self.ranking_cache_size < 0:
            raise ValueError("ranking_cache_size must be >= 0")
        self._health = [UpstreamHealth(url) for url in self.urls]
        self._encoded_urls = tuple(url.encode() for url in self.urls)
        # Measured (3 upstreams, 2-core VM): ~3 us to hash a ranking, ~0.2 us for a memo hit.
        # With one upstream there is nothing to hash, so no memo.
        if self.ranking_cache_size and len(self.urls) > 1:
            self._memo = functools.lru_cache(maxsize=self.ranking_cache_size)(self._compute_ranking)
            self._ranked = self._memo
        else:
            self._ranked = self._compute_ranking

    def __len__(self) -> int:
        return len(self.urls)

    # -- routing -----------------------------------------------------------------------

    def _compute_ranking(self, resource_id: str) -> tuple[int, ...]:
        n = len(self._encoded_urls)
        if n <= 1:
            return tuple(range(n))
        # blake2b(resource_id + sep) is hashed once and its state copied per url: the
        # result is identical to rendezvous_score() but skips re-hashing the prefix.
        prefix = hashlib.blake2b(resource_id.encode() + _SEPARATOR, digest_size=8)
        scores = []
        for index, url in enumerate(self._encoded_urls):
            h = prefix.copy()
            h.update(url)
            # Equal-length big-endian digests compare like the integers they encode, so
            # sorting the raw bytes (descending, lower index first on ties) gives the
            # documented order without int conversions.
            scores.append((h.digest(), -index))
        scores.sort(reverse=True)
        order = tuple(-neg for _, neg in scores)
        if n <= _INTERN_MAX_UPSTREAMS:
            # At most n! distinct orders exist: share them so 100k memo entries cost
            # dict slots, not 100k tuples.
            order = self._orders.setdefault(order, order)
        return order

    def ranking(self, resource_id: str) -> list[int]:
        """Upstream indexes in rendezvous order for ``resource_id``, best first.

        Deterministic across processes and restarts; independent of health. Never raises.
        """
        return list(self._ranked(resource_id))

    def pick(self, resource_id: str) -> int | None:
        """The first UP upstream in ``resource_id``'s ranking.

        If every upstream is down, returns the top-ranked one anyway: a send is the cheapest
        probe there is, and a report must still go somewhere. ``None`` only if there are no
        upstreams at all.
        """
        n = len(self.urls)
        if n <= 1:
            return 0 if n else None
        order = self._ranked(resource_id)
        if self._down_count == 0 or self._down_count == len(self.urls):
            return order[0]
        health = self._health
        for index in order:
            if health[index].up:
                return index
        raise AssertionError("unreachable: _down_count out of sync")  # pragma: no cover

    # -- health ------------------------------------------------------------------------

    def _jittered_interval(self) -> float:
        policy = self.policy
        if policy.probe_jitter == 0:
            return policy.probe_interval
        spread = self.rng.uniform(-policy.probe_jitter, policy.probe_jitter)
        return policy.probe_interval * (1 + spread)

    def record_success(self, index: int, now: float) -> bool:
        """Record a successful send or probe to upstream ``index`` at time ``now``.

        Resets its failure streak. Returns ``True`` iff this success flipped it DOWN -> UP.
        Raises ``IndexError`` for an unknown index.
        """
        state = self._health[index]
        state.successes_total += 1
        state.consecutive_failures = 0
        state.consecutive_successes += 1
        if state.up or state.consecutive_successes < self.policy.successes_to_up:
            return False
        state.up = True
        state.went_up += 1
        state.next_probe_at = None
        self._down_count -= 1
        return True

    def record_failure(self, index: int, now: float) -> bool:
        """Record a failed send or probe to upstream ``index`` at time ``now``.

        Resets its success streak. Returns ``True`` iff this failure flipped it UP -> DOWN.
        While (or once) down, the next probe is scheduled at ``now`` plus a jittered
        ``probe_interval``. Raises ``IndexError`` for an unknown index.
        """
        state = self._health[index]
        state.failures_total += 1
        state.consecutive_successes = 0
        state.consecutive_failures += 1
        flipped = False
        if state.up:
            if state.consecutive_failures < self.policy.failures_to_down:
                return False
            state.up = False
            state.went_down += 1
            self._down_count += 1
            flipped = True
        state.next_probe_at = now + self._jittered_interval()
        return flipped

    def due_probes(self, now: float) -> list[int]:
        """Down upstreams whose probe time is ``<= now``, in index order.

        Each returned upstream is re-scheduled at ``now`` plus a jittered interval, so a
        caller that polls twice does not probe twice. The caller reports each probe's
        outcome through :meth:`record_success` / :meth:`record_failure`.
        """
        due = []
        for index, state in enumerate(self._health):
            if state.next_probe_at is not None and state.next_probe_at <= now:
                state.next_probe_at = now + self._jittered_interval()
                due.append(index)
        return due

    def next_probe_at(self) -> float | None:
        """The earliest scheduled probe time among down upstreams, or ``None`` if none is down.

        A prober task sleeps until this (``trio.sleep_until``) and then calls
        :meth:`due_probes`.
        """
        times = [s.next_probe_at for s in self._health if s.next_probe_at is not None]
        return min(times) if times else None

    def is_up(self, index: int) -> bool:
        """Whether upstream ``index`` is currently UP. Raises ``IndexError`` if unknown."""
        return self._health[index].up

    @property
    def down_count(self) -> int:
        """How many upstreams are currently DOWN."""
        return self._down_count

    @property
    def cached_rankings(self) -> int:
        """How many resource rankings are memoised now (always ``<= ranking_cache_size``)."""
        return 0 if self._memo is None else self._memo.cache_info().currsize

    def states(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per upstream, in configuration order (copies, not live state)."""
        return [state.as_dict() for state in self._health]
