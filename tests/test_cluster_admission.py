"""The compare-and-set admission against the single-node limiter: same arrivals, same
decisions, whichever instances they reach and however their KV round trips interleave."""

from __future__ import annotations

import asyncio
import random

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_trio.cluster.admission import CasAdmission, Conflict, KeyValue
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
