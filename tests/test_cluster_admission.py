"""The compare-and-set admission against the single-node limiter: same arrivals, same
decisions, whichever instances they reach and however their KV round trips interleave."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from relay_trio.cluster.admission import CasAdmission, Conflict, Decision, KeyValue
from relay_trio.core.limiter import LeakyBucket


@attrs.define(eq=False)
class MemoryKV:
    """JetStream KV semantics in memory: revisions grow, update/create check them. Every
    call yields to the loop a random number of times, so round trips interleave."""

    rng: random.Random
    data: dict[str, tuple[bytes, int]] = attrs.field(factory=dict)
    revision: int = 0

    async def _hop(self) -> None:
        for _ in range(self.rng.randrange(3)):
            await asyncio.sleep(0)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        await self._hop()
        return self.data.get(key)

    async def create(self, key: str, value: bytes) -> int:
        await self._hop()
        if key in self.data:
            raise Conflict(key)
        self.revision += 1
        self.data[key] = (value, self.revision)
        return self.revision

    async def update(self, key: str, value: bytes, revision: int) -> int:
        await self._hop()
        if key not in self.data or self.data[key][1] != revision:
            raise Conflict(key)
        self.revision += 1
        self.data[key] = (value, self.revision)
        return self.revision


def _kv(rng: random.Random) -> KeyValue:
    return MemoryKV(rng)


arrival_groups = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=120.0),  # gap before the group (seconds)
        st.lists(st.tuples(st.sampled_from("xyz"), st.integers(0, 2)), min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(
    groups=arrival_groups,
    rate=st.sampled_from([1.0, 6.0, 60.0]),
    burst=st.integers(1, 3),
    seed=st.integers(0, 2**32),
)
def test_cas_admission_decides_like_the_single_node_limiter(
    groups: list[tuple[float, list[tuple[str, int]]]], rate: float, burst: int, seed: int
) -> None:
    bucket = LeakyBucket.per_minute(rate, burst)
    rng = random.Random(seed)
    kv = _kv(rng)
    nodes = [CasAdmission(kv, bucket, stale_threshold=1e9) for _ in range(3)]
    # The single-node model: one level per resource.
    model: dict[str, tuple[float, float]] = {}
    seqs: dict[str, list[int]] = {}
    now = 1_700_000_000.0

    async def run() -> None:
        nonlocal now
        for gap, arrivals in groups:
            now += gap
            # The model decides the group's arrivals one by one at the same instant: per
            # resource, how many are admitted.
            expected: dict[str, int] = {}
            for rid, _node in arrivals:
                level, last = model.get(rid, (0.0, now))
                ok, level, _ = bucket.offer(level, last, now)
                model[rid] = (level, now)
                expected[rid] = expected.get(rid, 0) + ok
            # The cluster decides the same arrivals concurrently on the instances named.
            decisions = await asyncio.gather(
                *(nodes[node].admit(rid, now) for rid, node in arrivals)
            )
            got: dict[str, int] = {}
            for (rid, _), d in zip(arrivals, decisions, strict=True):
                got[rid] = got.get(rid, 0) + d.admitted
                if d.admitted:
                    seqs.setdefault(rid, []).append(d.seq)
            assert got == expected

    asyncio.run(run())
    for ids in seqs.values():
        # Never the same id twice, and no id skipped.
        assert sorted(ids) == list(range(1, len(ids) + 1))


RIDS = st.sampled_from(["x", "y"])


class InterleavedInstances(RuleBasedStateMachine):
    """Three instances, each with its own cache, share one KV whose round trips interleave
    at random; arrivals (concurrent, on any instance), ACKs and the passing of time are
    compared with the single-node model: one leaky bucket and one stale-ACK clock per
    resource. Decisions per resource and reason must match, ids must never repeat."""

    THRESHOLD = 90.0

    def __init__(self) -> None:
        super().__init__()
        self.bucket = LeakyBucket.per_minute(2.0, 2)
        self.rng = random.Random(0)
        kv = MemoryKV(self.rng)
        self.nodes = [CasAdmission(kv, self.bucket, stale_threshold=self.THRESHOLD) for _ in "abc"]
        self.now = 1_700_000_000.0
        # The model: per resource (level, last), last id, awaiting-ACK-since.
        self.level: dict[str, tuple[float, float]] = {}
        self.seq: dict[str, int] = {}
        self.awaiting: dict[str, float | None] = {}
        self.ids: set[str] = set()

    @initialize(seed=st.integers(0, 2**32))
    def seed(self, seed: int) -> None:
        self.rng.seed(seed)

    @rule(gap=st.sampled_from([0.0, 0.5, 10.0, 29.0, 45.0, 100.0]))
    def wait(self, gap: float) -> None:
        self.now += gap

    @rule(arrivals=st.lists(st.tuples(RIDS, st.integers(0, 2)), min_size=1, max_size=6))
    def arrive(self, arrivals: list[tuple[str, int]]) -> None:
        """Arrivals at one instant, decided concurrently on the instances named."""
        now = self.now
        expected: Counter[tuple[str, str]] = Counter()
        for rid, _ in arrivals:
            since = self.awaiting.get(rid)
            if since is not None and now - since >= self.THRESHOLD:
                expected[rid, "stale_ack"] += 1
                continue
            level, last = self.level.get(rid, (0.0, now))
            ok, level, _ = self.bucket.offer(level, last, now)
            if not ok:
                expected[rid, "rate_limited"] += 1
                continue
            self.level[rid] = (level, now)
            self.seq[rid] = self.seq.get(rid, 0) + 1
            self.awaiting[rid] = now if since is None else since
            expected[rid, "admitted"] += 1

        async def decide() -> list[Decision]:
            return list(
                await asyncio.gather(*(self.nodes[n].admit(rid, now) for rid, n in arrivals))
            )

        got: Counter[tuple[str, str]] = Counter()
        for (rid, _), d in zip(arrivals, asyncio.run(decide()), strict=True):
            got[rid, "admitted" if d.admitted else d.reason] += 1
            if d.admitted:
                message_id = f"{rid}:{d.seq}"
                assert message_id not in self.ids, message_id
                self.ids.add(message_id)
        assert got == expected

    @rule(acks=st.lists(st.tuples(RIDS, st.integers(0, 2), st.booleans()), max_size=3))
    def ack(self, acks: list[tuple[str, int, bool]]) -> None:
        """ACKs of each resource's latest (or an older) message, on any instances at once."""
        todo: dict[str, tuple[int, int]] = {}
        for rid, node, latest in acks:
            seq = self.seq.get(rid, 0)
            if not seq or rid in todo:
                continue
            acked = seq if latest else seq - 1
            todo[rid] = (node, acked)
            if acked >= seq:  # an older ACK never clears a newer message's clock
                self.awaiting[rid] = None

        async def record() -> None:
            await asyncio.gather(
                *(self.nodes[n].acknowledged(rid, s, self.now) for rid, (n, s) in todo.items())
            )

        asyncio.run(record())

    @invariant()
    def ids_have_no_gaps(self) -> None:
        for rid, seq in self.seq.items():
            assert {i for i in self.ids if i.rsplit(":", 1)[0] == rid} == {
                f"{rid}:{k}" for k in range(1, seq + 1)
            }


InterleavedInstances.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
test_interleaved_instances_decide_like_one_node = InterleavedInstances.TestCase


def test_interleaved_instances_do_conflict() -> None:
    """The interleaving is real: concurrent admissions on three instances of one resource
    lose compare-and-set races (and still admit exactly the bucket's burst)."""
    kv = MemoryKV(random.Random(7))
    bucket = LeakyBucket.per_minute(1.0, 5)
    nodes = [CasAdmission(kv, bucket, stale_threshold=1e9) for _ in range(3)]

    async def run() -> list[Decision]:
        return list(await asyncio.gather(*(nodes[i % 3].admit("hot", 100.0) for i in range(12))))

    decisions = asyncio.run(run())
    assert sorted(d.seq for d in decisions if d.admitted) == [1, 2, 3, 4, 5]
    assert sum(n.conflicts for n in nodes) > 0


def test_each_conflict_in_a_row_is_followed_by_the_backoff() -> None:
    """A lost compare-and-set race is followed by ``backoff(n)`` (n: conflicts in a row for
    this arrival) before the retry, for admissions and ACKs alike."""

    @attrs.define
    class LosingKV(MemoryKV):
        lose: int = 0

        async def update(self, key: str, value: bytes, revision: int) -> int:
            if self.lose:
                self.lose -= 1
                raise Conflict(key)
            return await super().update(key, value, revision)

    kv = LosingKV(random.Random(1))
    waits: list[int] = []

    async def backoff(lost: int) -> None:
        waits.append(lost)

    node = CasAdmission(kv, LeakyBucket.per_minute(60.0, 5), stale_threshold=1e9, backoff=backoff)

    async def run() -> None:
        assert (await node.admit("r", 100.0)).seq == 1  # create: no conflict
        kv.lose = 3
        assert (await node.admit("r", 100.0)).seq == 2
        assert waits == [1, 2, 3]
        waits.clear()
        kv.lose = 2
        await node.acknowledged("r", 2, 101.0)
        assert waits == [1, 2]

    asyncio.run(run())
    assert node.conflicts == 5
