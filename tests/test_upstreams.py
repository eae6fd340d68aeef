"""Tests for relay_trio.core.routing: rendezvous routing and hysteresis health."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from relay_trio.core.routing import HealthPolicy, UpstreamRouter, rendezvous_score

URLS3 = ["http://a/ingest", "http://b/ingest", "http://c/ingest"]

resource_ids = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)
url_lists = st.lists(
    st.from_regex(r"http://[a-z0-9]{1,12}(:[0-9]{2,5})?/ingest", fullmatch=True),
    min_size=1,
    max_size=8,
    unique=True,
)


def make(
    urls: list[str] | None = None,
    policy: HealthPolicy | None = None,
    *,
    seed: int = 0,
    cache: int = 100_000,
) -> UpstreamRouter:
    return UpstreamRouter(
        URLS3 if urls is None else urls,
        policy or HealthPolicy(),
        random.Random(seed),
        ranking_cache_size=cache,
    )


def reference_ranking(resource_id: str, urls: list[str]) -> list[int]:
    return sorted(range(len(urls)), key=lambda i: (-rendezvous_score(resource_id, urls[i]), i))


# -- policy and construction ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failures_to_down": 0},
        {"successes_to_up": 0},
        {"probe_interval": 0.0},
        {"probe_interval": -1.0},
        {"probe_jitter": -0.1},
        {"probe_jitter": 1.0},
    ],
)
def test_policy_rejects_invalid_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HealthPolicy(**kwargs)  # type: ignore[arg-type]


def test_duplicate_urls_rejected() -> None:
    with pytest.raises(ValueError, match="distinct"):
        make(["http://a/ingest", "http://a/ingest"])


def test_negative_cache_size_rejected() -> None:
    with pytest.raises(ValueError):
        make(cache=-1)


def test_no_upstreams_picks_none() -> None:
    router = make([])
    assert router.pick("vm-1") is None
    assert router.ranking("vm-1") == []
    assert router.states() == []
    assert router.next_probe_at() is None


def test_single_upstream_always_picked_even_when_down() -> None:
    router = make(["http://only/ingest"], HealthPolicy(failures_to_down=1))
    assert router.pick("vm-1") == 0
    assert router.record_failure(0, now=0.0)
    assert router.pick("vm-1") == 0
    assert router.cached_rankings == 0  # nothing to hash, nothing memoised


# -- rendezvous ranking --------------------------------------------------------------------


def test_ranking_golden_values() -> None:
    """Pinned values: the hash is a wire contract (load balancers, other relays)."""
    assert rendezvous_score("vm-1", "http://a/ingest") == 9135615644278523506
    assert rendezvous_score("vm-1", "http://c/ingest") == 10040043864083291036
    router = make()
    assert router.ranking("vm-1") == [2, 0, 1]
    assert router.ranking("node:7") == [0, 2, 1]
    assert router.ranking("tenant.x") == [2, 0, 1]


def test_ranking_is_stable_across_processes_with_different_hash_seeds() -> None:
    code = (
        "import random; from relay_trio.core.routing import UpstreamRouter, HealthPolicy;"
        f"r = UpstreamRouter({URLS3!r}, HealthPolicy(), random.Random());"
        "print([r.ranking(f'vm-{i}') for i in range(50)])"
    )
    outputs = set()
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        )
        outputs.add(result.stdout)
    router = make()
    assert outputs == {str([router.ranking(f"vm-{i}") for i in range(50)]) + "\n"}


@settings(max_examples=200, deadline=None)
@given(urls=url_lists, resource_id=resource_ids)
def test_ranking_matches_reference_and_is_a_permutation(urls: list[str], resource_id: str) -> None:
    cached = make(urls)
    uncached = make(urls, cache=0)
    expected = reference_ranking(resource_id, urls)
    assert cached.ranking(resource_id) == expected
    assert cached.ranking(resource_id) == expected  # memo hit gives the same answer
    assert uncached.ranking(resource_id) == expected
    assert sorted(expected) == list(range(len(urls)))


def test_ranking_returns_a_fresh_list() -> None:
    router = make()
    first = router.ranking("vm-1")
    first.reverse()
    assert router.ranking("vm-1") == [2, 0, 1]


def test_ranking_memo_is_bounded() -> None:
    router = make(cache=10)
    for i in range(100):
        router.ranking(f"vm-{i}")
    assert router.cached_rankings == 10
    assert make(cache=0).cached_rankings == 0


def test_load_spreads_evenly() -> None:
    router = make([f"http://u{i}/ingest" for i in range(4)])
    counts = [0] * 4
    for i in range(8000):
        index = router.pick(f"vm-{i}")
        assert index is not None
        counts[index] += 1
    # Expected 2000 each; 4 sigma of a binomial(8000, 1/4) is ~155.
    assert all(1800 < c < 2200 for c in counts), counts


@settings(max_examples=60, deadline=None)
@given(urls=url_lists, new_url=st.from_regex(r"http://new[0-9]{1,4}/ingest", fullmatch=True))
def test_adding_an_upstream_moves_only_resources_that_now_prefer_it(
    urls: list[str], new_url: str
) -> None:
    before = make(urls)
    after = make([*urls, new_url])
    new_index = len(urls)
    moved = 0
    ids = [f"res-{i}" for i in range(300)]
    for rid in ids:
        old_top, new_top = before.pick(rid), after.pick(rid)
        if old_top != new_top:
            assert new_top == new_index
            moved += 1
        # The relative order of the old upstreams never changes.
        assert [i for i in after.ranking(rid) if i != new_index] == before.ranking(rid)
    # ~1/(N+1) of ids move; allow generous slack for small samples.
    assert moved <= len(ids) * (1 / (len(urls) + 1)) + 60


@settings(max_examples=60, deadline=None)
@given(urls=url_lists.filter(lambda u: len(u) >= 2), data=st.data())
def test_removing_an_upstream_moves_only_its_resources(
    urls: list[str], data: st.DataObject
) -> None:
    removed = data.draw(st.integers(0, len(urls) - 1))
    remaining = [u for i, u in enumerate(urls) if i != removed]
    before, after = make(urls), make(remaining)
    for i in range(300):
        rid = f"res-{i}"
        old_url = urls[before.ranking(rid)[0]]
        new_top = after.pick(rid)
        assert new_top is not None
        if old_url != urls[removed]:
            assert remaining[new_top] == old_url
        else:
            assert remaining[new_top] == urls[before.ranking(rid)[1]]


@settings(max_examples=60, deadline=None)
@given(urls=url_lists.filter(lambda u: len(u) >= 2), data=st.data())
def test_failover_moves_only_the_failed_upstreams_resources(
    urls: list[str], data: st.DataObject
) -> None:
    router = make(urls, HealthPolicy(failures_to_down=1))
    ids = [f"res-{i}" for i in range(200)]
    before = {rid: router.pick(rid) for rid in ids}
    failed = data.draw(st.integers(0, len(urls) - 1))
    assert router.record_failure(failed, now=0.0)
    for rid in ids:
        if before[rid] != failed:
            assert router.pick(rid) == before[rid]
        else:
            assert router.pick(rid) == router.ranking(rid)[1]
    # Recovery returns every resource to exactly where it was.
    assert router.record_success(failed, now=1.0) is False  # needs 3 in a row
    router.record_success(failed, now=2.0)
    assert router.record_success(failed, now=3.0)
    assert {rid: router.pick(rid) for rid in ids} == before


def test_all_down_picks_top_ranked() -> None:
    router = make(policy=HealthPolicy(failures_to_down=1))
    for i in range(3):
        router.record_failure(i, now=0.0)
    assert router.down_count == 3
    for rid in ("vm-1", "node:7", "tenant.x"):
        assert router.pick(rid) == router.ranking(rid)[0]


# -- hysteresis ----------------------------------------------------------------------------


def test_three_failures_flip_down_three_successes_flip_up() -> None:
    router = make(policy=HealthPolicy(probe_jitter=0.0))
    assert not router.record_failure(1, now=10.0)
    assert not router.record_failure(1, now=11.0)
    assert router.is_up(1)
    assert router.record_failure(1, now=12.0)
    assert not router.is_up(1)
    assert router.next_probe_at() == 17.0
    assert not router.record_failure(1, now=13.0)  # already down: no second flip
    assert router.next_probe_at() == 18.0  # pushed back from the latest failure
    assert not router.record_success(1, now=14.0)
    assert not router.record_success(1, now=15.0)
    assert router.record_success(1, now=16.0)
    assert router.is_up(1)
    assert router.next_probe_at() is None
    state = router.states()[1]
    assert state == {
        "url": "http://b/ingest",
        "up": True,
        "failures": 0,
        "successes": 3,
        "sends": 7,
        "failed": 4,
        "went_down": 1,
        "went_up": 1,
        "next_probe_at": None,
    }


def test_a_success_resets_the_failure_streak() -> None:
    router = make()
    for _ in range(5):
        router.record_failure(0, now=0.0)
        router.record_failure(0, now=0.0)
        router.record_success(0, now=0.0)
    assert router.is_up(0)
    assert router.states()[0]["failures"] == 0


def test_a_failure_resets_the_success_streak_while_down() -> None:
    router = make(policy=HealthPolicy(failures_to_down=1))
    router.record_failure(0, now=0.0)
    for _ in range(5):
        assert not router.record_success(0, now=1.0)
        assert not router.record_success(0, now=1.0)
        assert not router.record_failure(0, now=1.0)
    assert not router.is_up(0)


def test_due_probes_reschedules_with_jitter_within_bounds() -> None:
    policy = HealthPolicy(failures_to_down=1, probe_interval=10.0, probe_jitter=0.2)
    router = make(policy=policy, seed=42)
    router.record_failure(0, now=100.0)
    router.record_failure(2, now=100.0)
    first = router.next_probe_at()
    assert first is not None
    assert 108.0 <= first <= 112.0
    assert router.due_probes(107.9) == []
    due = router.due_probes(112.0)
    assert due == [0, 2]
    assert router.due_probes(112.0) == []  # re-scheduled: no double probe
    for state in router.states():
        if not state["up"]:
            assert 120.0 <= state["next_probe_at"] <= 124.0
    # Jitter actually varies between draws (seeded, so this is deterministic).
    times = {router.states()[i]["next_probe_at"] for i in (0, 2)}
    assert len(times) == 2


def test_jitter_covers_the_whole_band() -> None:
    policy = HealthPolicy(failures_to_down=1, probe_interval=10.0, probe_jitter=0.2)
    router = make(["http://only/ingest"], policy, seed=3)
    router.record_failure(0, now=0.0)
    delays = []
    for step in range(1, 401):
        now = step * 100.0
        assert router.due_probes(now) == [0]
        scheduled = router.next_probe_at()
        assert scheduled is not None
        delays.append(scheduled - now)
    assert 8.0 <= min(delays) < 8.2
    assert 11.8 < max(delays) <= 12.0


def test_jitter_is_reproducible_from_the_seed() -> None:
    def schedule(seed: int) -> list[float | None]:
        router = make(policy=HealthPolicy(failures_to_down=1), seed=seed)
        for i in range(3):
            router.record_failure(i, now=0.0)
        return [s["next_probe_at"] for s in router.states()]

    assert schedule(7) == schedule(7)
    assert schedule(7) != schedule(8)


def test_unknown_index_raises() -> None:
    router = make()
    with pytest.raises(IndexError):
        router.record_success(3, now=0.0)
    with pytest.raises(IndexError):
        router.record_failure(3, now=0.0)
    with pytest.raises(IndexError):
        router.is_up(3)


class RouterMachine(RuleBasedStateMachine):
    """Model-based check of hysteresis, probe scheduling and failover picks."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.n = 0
        self.policy = HealthPolicy()
        self.router = make()
        self.up: list[bool] = []
        self.fail_streak: list[int] = []
        self.ok_streak: list[int] = []

    @initialize(
        n=st.integers(1, 5),
        to_down=st.integers(1, 4),
        to_up=st.integers(1, 4),
        jitter=st.sampled_from([0.0, 0.2, 0.5]),
        seed=st.integers(0, 1000),
    )
    def setup(self, n: int, to_down: int, to_up: int, jitter: float, seed: int) -> None:
        self.n = n
        self.policy = HealthPolicy(
            failures_to_down=to_down, successes_to_up=to_up, probe_interval=5.0, probe_jitter=jitter
        )
        self.router = make([f"http://u{i}/ingest" for i in range(n)], self.policy, seed=seed)
        self.up = [True] * n
        self.fail_streak = [0] * n
        self.ok_streak = [0] * n

    @rule(dt=st.floats(0, 20))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(data=st.data())
    def failure(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, self.n - 1))
        was_up = self.up[i]
        self.fail_streak[i] += 1
        self.ok_streak[i] = 0
        if was_up and self.fail_streak[i] >= self.policy.failures_to_down:
            self.up[i] = False
        flipped = self.router.record_failure(i, self.now)
        assert flipped == (was_up and not self.up[i])
        if not self.up[i]:
            scheduled = self.router.states()[i]["next_probe_at"]
            spread = self.policy.probe_interval * self.policy.probe_jitter
            assert (
                self.now + self.policy.probe_interval - spread
                <= scheduled
                <= self.now + self.policy.probe_interval + spread
            )

    @rule(data=st.data())
    def success(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, self.n - 1))
        was_up = self.up[i]
        self.ok_streak[i] += 1
        self.fail_streak[i] = 0
        if not was_up and self.ok_streak[i] >= self.policy.successes_to_up:
            self.up[i] = True
        flipped = self.router.record_success(i, self.now)
        assert flipped == (not was_up and self.up[i])

    @precondition(lambda self: self.n > 0)
    @rule()
    def probe(self) -> None:
        expected = [
            i
            for i, s in enumerate(self.router.states())
            if s["next_probe_at"] is not None and s["next_probe_at"] <= self.now
        ]
        assert self.router.due_probes(self.now) == expected
        for i in expected:
            assert self.router.states()[i]["next_probe_at"] > self.now

    @invariant()
    def health_matches_model(self) -> None:
        for i, state in enumerate(self.router.states()):
            assert state["up"] == self.up[i] == self.router.is_up(i)
            assert (state["next_probe_at"] is None) == self.up[i]
        assert self.router.down_count == self.up.count(False)
        earliest = self.router.next_probe_at()
        if all(self.up):
            assert earliest is None
        else:
            assert earliest == min(
                s["next_probe_at"] for s in self.router.states() if s["next_probe_at"] is not None
            )

    @invariant()
    def pick_is_first_up_in_ranking(self) -> None:
        for rid in ("vm-1", "vm-2", "node:3", "t.4"):
            ranking = self.router.ranking(rid)
            live = [i for i in ranking if self.up[i]]
            assert self.router.pick(rid) == (live[0] if live else ranking[0])


TestRouterMachine = RouterMachine.TestCase
TestRouterMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
