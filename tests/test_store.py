"""Store semantics: the SQLite core against the in-memory model, and the documented rules
(dead-letter pruning, filters, cursor paging, seq_floor) on both stores."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import attrs
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relay_trio.stores.base import (
    SEQ_FLOOR,
    AttemptRecord,
    Changes,
    DeadLetterPage,
    DeadLetterQuery,
    DeadLetterRecord,
    MessageRecord,
    Recovered,
    ResourceRecord,
    attempts_from_json,
    attempts_to_json,
)
from relay_trio.stores.memory import MemoryStore
from relay_trio.stores.sqlite_file import SqliteFile

# --- helpers --------------------------------------------------------------------------------


def message(mid: str, *, payload: bytes = b'{"a":1}', due_at: float | None = None) -> MessageRecord:
    rid, _, seq = mid.rpartition(":")
    return MessageRecord(
        mid,
        rid,
        int(seq),
        "scan",
        payload,
        10.0,
        (AttemptRecord(11.0, "nack", "500"),),
        due_at,
        "up-0",
    )


def dead(
    mid: str, *, dead_at: float = 20.0, reason: str = "max_attempts", upstream: str = "up-0"
) -> DeadLetterRecord:
    rid, _, seq = mid.rpartition(":")
    return DeadLetterRecord(
        0,
        mid,
        rid,
        int(seq),
        None,
        b"[1,2]",
        reason,
        upstream,
        1.0,
        dead_at,
        (AttemptRecord(2.0, "timeout", ""),),
    )


class SyncStore(Protocol):
    """What the rule tests need from either store, synchronously."""

    def apply(self, changes: Changes) -> None: ...
    def query(self, q: DeadLetterQuery) -> DeadLetterPage: ...
    def recovered(self) -> Recovered: ...
    def pruned(self) -> int: ...


@attrs.define
class MemoryAdapter:
    store: MemoryStore

    def apply(self, changes: Changes) -> None:
        self.store.apply(changes)

    def query(self, q: DeadLetterQuery) -> DeadLetterPage:
        return self.store.query(q)

    def recovered(self) -> Recovered:
        return self.store.snapshot()

    def pruned(self) -> int:
        return self.store.dead_letters_pruned


@attrs.define
class SqliteAdapter:
    """Each ``recovered`` closes the file and opens it again (a restart)."""

    file: SqliteFile

    def apply(self, changes: Changes) -> None:
        self.file.apply([changes])

    def query(self, q: DeadLetterQuery) -> DeadLetterPage:
        return self.file.query(q)

    def recovered(self) -> Recovered:
        pruned = self.file.dead_letters_pruned
        self.file.close()
        self.file = SqliteFile(self.file.path, "off", self.file.max_dead_letters)
        self.file.dead_letters_pruned = pruned
        return self.file.open()

    def pruned(self) -> int:
        return self.file.dead_letters_pruned


MAX_DEAD = 4


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SyncStore]:
    if request.param == "memory":
        yield MemoryAdapter(MemoryStore(MAX_DEAD))
        return
    f = SqliteFile(tmp_path / "relay.db", "off", MAX_DEAD)
    f.open()
    adapter = SqliteAdapter(f)
    yield adapter
    adapter.file.close()


def one(build: str, *args: object) -> Changes:
    c = Changes()
    getattr(c, build)(*args)
    return c


def dead_ids(page: DeadLetterPage) -> list[str]:
    return [d.message_id for d in page.items]


# --- rules on both stores ---------------------------------------------------------------------


def test_first_open_is_empty_with_seq_floor_zero(store: SyncStore) -> None:
    assert store.recovered() == Recovered([], [], {SEQ_FLOOR: 0}, 0, 0)


def test_pruning_at_exactly_max_keeps_all_and_one_over_prunes_the_oldest(store: SyncStore) -> None:
    for i in range(1, MAX_DEAD + 1):
        store.apply(one("dead_letter", dead(f"r:{i}")))
    assert store.pruned() == 0
    assert dead_ids(store.query(DeadLetterQuery())) == [f"r:{i}" for i in range(1, MAX_DEAD + 1)]
    store.apply(one("dead_letter", dead(f"r:{MAX_DEAD + 1}")))
    assert store.pruned() == 1
    page = store.query(DeadLetterQuery())
    assert dead_ids(page) == [f"r:{i}" for i in range(2, MAX_DEAD + 2)]
    assert [d.index for d in page.items] == list(range(2, MAX_DEAD + 2))
    rec = store.recovered()
    assert (rec.dead_letters, rec.dead_letter_index) == (MAX_DEAD, MAX_DEAD + 1)


def test_many_dead_letters_in_one_change_set_prune_in_order(store: SyncStore) -> None:
    c = Changes()
    for i in range(1, 8):
        c.dead_letter(dead(f"r:{i}"))
    c.delete_dead_letters(["r:7"])
    c.dead_letter(dead("r:8"))
    store.apply(c)
    # 7 in, 3 pruned (1..3), r:7 deleted, r:8 in: 4,5,6,8 -> no more pruning.
    assert dead_ids(store.query(DeadLetterQuery())) == ["r:4", "r:5", "r:6", "r:8"]
    assert store.pruned() == 3


def test_dead_letter_removes_the_message_row_and_index_is_assigned(store: SyncStore) -> None:
    c = Changes()
    c.put_message(message("r:1"))
    c.put_message(message("r:2"))
    c.dead_letter(dead("r:1"))
    store.apply(c)
    rec = store.recovered()
    assert [m.message_id for m in rec.messages] == ["r:2"]
    (d,) = store.query(DeadLetterQuery()).items
    assert d == attrs.evolve(dead("r:1"), index=1)


def test_put_after_dead_letter_in_the_same_batch_keeps_the_message(store: SyncStore) -> None:
    c = Changes()
    c.dead_letter(dead("r:1"))
    c.put_message(message("r:1"))
    store.apply(c)
    assert [m.message_id for m in store.recovered().messages] == ["r:1"]


def test_delete_dead_letters_removes_every_copy(store: SyncStore) -> None:
    for mid in ("r:1", "r:2", "r:1"):
        store.apply(one("dead_letter", dead(mid)))
    store.apply(one("delete_dead_letters", ["r:1", "absent:9"]))
    page = store.query(DeadLetterQuery())
    assert [(d.index, d.message_id) for d in page.items] == [(2, "r:2")]
    assert store.recovered().dead_letters == 1


def test_filters(store: SyncStore) -> None:
    c = Changes()
    c.dead_letter(dead("a:1", reason="max_attempts", upstream="u1"))
    c.dead_letter(dead("b:1", reason="max_age", upstream="u1"))
    c.dead_letter(dead("a:2", reason="max_age", upstream="u2"))
    store.apply(c)
    assert dead_ids(store.query(DeadLetterQuery(resource_id="a"))) == ["a:1", "a:2"]
    assert dead_ids(store.query(DeadLetterQuery(reason="max_age"))) == ["b:1", "a:2"]
    assert dead_ids(store.query(DeadLetterQuery(upstream="u1"))) == ["a:1", "b:1"]
    assert dead_ids(store.query(DeadLetterQuery(resource_id="a", reason="max_age"))) == ["a:2"]
    assert dead_ids(store.query(DeadLetterQuery(message_ids=("a:2", "b:1", "z:1")))) == [
        "b:1",
        "a:2",
    ]
    assert dead_ids(store.query(DeadLetterQuery(message_ids=()))) == []
    assert dead_ids(store.query(DeadLetterQuery(resource_id="nope"))) == []


def test_since_is_inclusive_and_until_exclusive(store: SyncStore) -> None:
    c = Changes()
    for i, at in enumerate((10.0, 20.0, 30.0), start=1):
        c.dead_letter(dead(f"r:{i}", dead_at=at))
    store.apply(c)
    assert dead_ids(store.query(DeadLetterQuery(since=20.0))) == ["r:2", "r:3"]
    assert dead_ids(store.query(DeadLetterQuery(until=20.0))) == ["r:1"]
    assert dead_ids(store.query(DeadLetterQuery(since=10.0, until=30.0))) == ["r:1", "r:2"]
    assert dead_ids(store.query(DeadLetterQuery(since=20.0, until=20.0))) == []
    assert dead_ids(store.query(DeadLetterQuery(since=30.000001))) == []


def test_cursor_paging_at_exact_multiples_of_the_limit(store: SyncStore) -> None:
    c = Changes()
    for i in range(1, 5):  # 4 = 2 pages of 2 exactly
        c.dead_letter(dead(f"r:{i}"))
    store.apply(c)
    first = store.query(DeadLetterQuery(limit=2))
    assert (dead_ids(first), first.next_cursor) == (["r:1", "r:2"], 2)
    second = store.query(DeadLetterQuery(limit=2, after_index=2))
    assert (dead_ids(second), second.next_cursor) == (["r:3", "r:4"], None)
    whole = store.query(DeadLetterQuery(limit=4))
    assert (len(whole.items), whole.next_cursor) == (4, None)
    short = store.query(DeadLetterQuery(limit=3))
    assert short.next_cursor == 3
    assert store.query(DeadLetterQuery(after_index=4)) == DeadLetterPage([], None)


def test_cursor_with_a_filter_skips_non_matching_rows(store: SyncStore) -> None:
    c = Changes()
    for mid in ("a:1", "b:1", "a:2", "b:2"):
        c.dead_letter(dead(mid))
    store.apply(c)
    first = store.query(DeadLetterQuery(resource_id="b", limit=1))
    assert (dead_ids(first), first.next_cursor) == (["b:1"], 2)
    second = store.query(DeadLetterQuery(resource_id="b", limit=1, after_index=2))
    assert (dead_ids(second), second.next_cursor) == (["b:2"], None)


def test_delete_resource_raises_seq_floor_never_lowers_it(store: SyncStore) -> None:
    store.apply(one("put_resource", ResourceRecord("a", 7, 0.5, 3.0, None, 0)))
    store.apply(one("delete_resource", "a", 7))
    assert store.recovered().meta[SEQ_FLOOR] == 7
    assert store.recovered().resources == []
    store.apply(one("delete_resource", "b", 3))
    assert store.recovered().meta[SEQ_FLOOR] == 7
    store.apply(one("delete_resource", "absent", 9))
    assert store.recovered().meta[SEQ_FLOOR] == 9


def test_set_meta_and_upserts(store: SyncStore) -> None:
    c = Changes()
    c.set_meta("event_id_reserved", 5)
    c.set_meta("event_id_reserved", 1000)
    c.put_resource(ResourceRecord("a", 1, 0.0, 1.0, None, 0))
    c.put_resource(ResourceRecord("a", 2, 0.25, 2.0, 1.5, 1))
    c.put_message(message("a:1"))
    c.put_message(message("a:1", payload=b'"new"', due_at=99.5))
    c.delete_message("absent:1")
    store.apply(c)
    rec = store.recovered()
    assert rec.meta == {SEQ_FLOOR: 0, "event_id_reserved": 1000}
    assert rec.resources == [ResourceRecord("a", 2, 0.25, 2.0, 1.5, 1)]
    assert rec.messages == [message("a:1", payload=b'"new"', due_at=99.5)]


def test_reserved_meta_key_is_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Changes().set_meta("dead_letter_index", 3)


@pytest.mark.parametrize("limit", [0, 1001])
def test_query_limit_is_bounded(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        DeadLetterQuery(limit=limit)


def test_changes_len_and_bool() -> None:
    c = Changes()
    assert (len(c), bool(c)) == (0, False)
    c.delete_message("a:1")
    c.set_meta("k", 1)
    assert (len(c), bool(c)) == (2, True)


def test_attempts_json_round_trip() -> None:
    attempts = (AttemptRecord(1.5, "nack", "503 busy"), AttemptRecord(-0.25, "timeout", ""))
    assert attempts_to_json(()) == b"[]"
    assert attempts_from_json(attempts_to_json(attempts)) == attempts


async def test_memory_store_async_surface() -> None:
    store = MemoryStore(max_dead_letters=2)
    assert (await store.open()).messages == []
    ticket = store.stage(one("put_message", message("a:1")))
    assert ticket.done.is_set()
    await store.durable(ticket)
    page = await store.query_dead_letters(DeadLetterQuery())
    assert page == DeadLetterPage([], None)
    assert [m.message_id for m in (await store.open()).messages] == ["a:1"]
    stats = store.stats()
    assert (stats.commits, stats.pending_rows, stats.backlog, stats.file_bytes) == (1, 1, 0, 0)
    with trio.move_on_after(0.01) as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
    assert scope.cancelled_caught


# --- state machine: SQLite core vs the in-memory model ---------------------------------------

RIDS = ("a", "b", "c")
MIDS = tuple(f"{r}:{s}" for r in RIDS for s in (1, 2, 3))
TIMES = st.sampled_from([0.0, 1.0, 2.5, 3.0, -0.0, 1e15])
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=6)
attempts_st = st.lists(
    st.builds(AttemptRecord, TIMES, st.sampled_from(["ack", "nack", "timeout"]), TEXT), max_size=3
).map(tuple)
resource_st = st.builds(
    ResourceRecord,
    st.sampled_from(RIDS),
    st.integers(0, 2**62),
    st.floats(allow_nan=False, allow_infinity=False),
    TIMES,
    st.none() | TIMES,
    st.integers(0, 100),
)


@st.composite
def message_st(draw: st.DrawFn) -> MessageRecord:
    mid = draw(st.sampled_from(MIDS))
    rid, _, seq = mid.rpartition(":")
    return MessageRecord(
        mid,
        rid,
        int(seq),
        draw(st.none() | TEXT),
        draw(st.binary(max_size=20)),
        draw(TIMES),
        draw(attempts_st),
        draw(st.none() | TIMES),
        draw(st.sampled_from(["u1", "u2"])),
        draw(st.binary(max_size=5)),
    )


@st.composite
def dead_st(draw: st.DrawFn) -> DeadLetterRecord:
    mid = draw(st.sampled_from(MIDS))
    rid, _, seq = mid.rpartition(":")
    return DeadLetterRecord(
        0,
        mid,
        rid,
        int(seq),
        draw(st.none() | TEXT),
        draw(st.binary(max_size=20)),
        draw(st.sampled_from(["max_attempts", "max_age"])),
        draw(st.sampled_from(["u1", "u2"])),
        draw(TIMES),
        draw(TIMES),
        draw(attempts_st),
    )


query_st = st.builds(
    DeadLetterQuery,
    resource_id=st.none() | st.sampled_from(RIDS),
    reason=st.none() | st.sampled_from(["max_attempts", "max_age"]),
    upstream=st.none() | st.sampled_from(["u1", "u2"]),
    since=st.none() | TIMES,
    until=st.none() | TIMES,
    message_ids=st.none() | st.lists(st.sampled_from(MIDS), max_size=3).map(tuple),
    after_index=st.integers(0, 12),
    limit=st.integers(1, 4),
)


class SqliteAgainstMemory(RuleBasedStateMachine):
    """Random change sets, grouped into random commits, applied to MemoryStore one by one and
    to SqliteFile as one transaction per commit; queries, counters and the state recovered
    after a reopen must be identical."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="store-machine-"))
        self.memory = MemoryStore(MAX_DEAD)
        self.sqlite = SqliteFile(self.tmp / "relay.db", "off", MAX_DEAD)
        self.sqlite.open()
        self.current = Changes()
        self.batch: list[Changes] = []

    @rule(r=resource_st)
    def put_resource(self, r: ResourceRecord) -> None:
        self.current.put_resource(r)

    @rule(rid=st.sampled_from(RIDS), seq=st.integers(0, 50))
    def delete_resource(self, rid: str, seq: int) -> None:
        self.current.delete_resource(rid, seq)

    @rule(m=message_st())
    def put_message(self, m: MessageRecord) -> None:
        self.current.put_message(m)

    @rule(mid=st.sampled_from(MIDS))
    def delete_message(self, mid: str) -> None:
        self.current.delete_message(mid)

    @rule(mid=st.sampled_from(MIDS), attempts=attempts_st, due_at=st.none() | TIMES)
    def update_message(
        self, mid: str, attempts: tuple[AttemptRecord, ...], due_at: float | None
    ) -> None:
        self.current.update_message(mid, attempts, due_at)

    @rule(d=dead_st())
    def dead_letter(self, d: DeadLetterRecord) -> None:
        self.current.dead_letter(d)

    @rule(ids=st.lists(st.sampled_from(MIDS), max_size=3))
    def delete_dead_letters(self, ids: list[str]) -> None:
        self.current.delete_dead_letters(ids)

    @rule(key=st.sampled_from(["k1", "k2", SEQ_FLOOR]), value=st.integers(-(2**63), 2**63 - 1))
    def set_meta(self, key: str, value: int) -> None:
        self.current.set_meta(key, value)

    @rule()
    def end_change_set(self) -> None:
        self.batch.append(self.current)
        self.current = Changes()

    @precondition(lambda self: bool(self.batch))
    @rule()
    def commit(self) -> None:
        for c in self.batch:
            self.memory.apply(c)
        result = self.sqlite.apply(self.batch)
        self.batch = []
        assert result.pending_rows == len(self.memory.messages)
        assert result.dead_letters == len(self.memory.dead_letters)
        assert result.dead_letters_pruned == self.memory.dead_letters_pruned

    @rule(q=query_st)
    def query(self, q: DeadLetterQuery) -> None:
        assert self.sqlite.query(q) == self.memory.query(q)

    @rule(limit=st.integers(1, 3))
    def page_through(self, limit: int) -> None:
        cursor: int | None = 0
        pages = 0
        while cursor is not None:
            q = DeadLetterQuery(limit=limit, after_index=cursor)
            page = self.sqlite.query(q)
            assert page == self.memory.query(q)
            cursor = page.next_cursor
            pages += 1
            assert pages <= MAX_DEAD + 1

    @rule()
    def reopen(self) -> None:
        pruned = self.sqlite.dead_letters_pruned
        self.sqlite.close()
        self.sqlite = SqliteFile(self.sqlite.path, "off", MAX_DEAD)
        self.sqlite.dead_letters_pruned = pruned
        assert self.sqlite.open() == self.memory.snapshot()

    @invariant()
    def nothing_uncommitted_is_visible(self) -> None:
        # Only commits move state: the memory model never sees staged change sets either.
        assert self.sqlite.dead_letters_pruned == self.memory.dead_letters_pruned

    def teardown(self) -> None:
        self.sqlite.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


SqliteAgainstMemory.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSqliteAgainstMemory = SqliteAgainstMemory.TestCase
