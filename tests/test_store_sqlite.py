"""SqliteStore: group commit, durability before durable() returns, shutdown flush, failures,
and the files it refuses to open (left untouched)."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from relay_trio.stores.base import (
    SEQ_FLOOR,
    Changes,
    DeadLetterQuery,
    DeadLetterRecord,
    MessageRecord,
    ResourceRecord,
    StoreError,
)
from relay_trio.stores.memory import MemoryStore
from relay_trio.stores.sqlite import SqliteStore
from relay_trio.stores.sqlite_file import (
    MAX_ROWS,
    SCHEMA_VERSION,
    CommitResult,
    SqliteFile,
    SyncMode,
    _pieces,
)


def report(i: int, rid: str = "vm") -> Changes:
    c = Changes()
    c.put_resource(ResourceRecord(rid, i, 1.0, 100.0 + i, None, 0))
    c.put_message(MessageRecord(f"{rid}:{i}", rid, i, None, b"{}", 100.0, (), 130.0, "up-0"))
    return c


def rows(path: Path, table: str) -> int:
    """Count rows through an independent connection: what a crash right now would keep."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


@asynccontextmanager
async def running(store: SqliteStore) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield nursery
        nursery.cancel_scope.cancel()


class Gate:
    """Wraps SqliteFile.apply so a test can hold the commit thread inside a commit."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []
        inner: Callable[[SqliteFile, Sequence[Changes]], CommitResult] = SqliteFile.apply

        def apply(file: SqliteFile, batch: Sequence[Changes]) -> CommitResult:
            self.sizes.append(len(batch))
            self.entered.set()
            self.release.wait(10)
            return inner(file, batch)

        monkeypatch.setattr(SqliteFile, "apply", apply)

    async def wait_entered(self) -> None:
        await trio.to_thread.run_sync(self.entered.wait, 10)


async def test_group_commit_and_durable_waits_for_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "relay.db"
    store = SqliteStore(path, "normal", max_dead_letters=10)
    await store.open()
    gate = Gate(monkeypatch)
    done: list[int] = []
    seen_after_durable: list[int] = []

    async def submit(i: int) -> None:
        await store.durable(store.stage(report(i, rid=f"r{i}")))
        done.append(i)
        if i == 7:
            seen_after_durable.append(rows(path, "messages"))

    with trio.fail_after(20):
        async with running(store), trio.open_nursery() as tasks:
            tasks.start_soon(submit, 0)
            await gate.wait_entered()  # commit #1 (one change set) is held on the thread
            for i in range(1, 200):
                tasks.start_soon(submit, i)
            await trio.testing.wait_all_tasks_blocked()
            # Everyone is waiting: nothing committed, nobody answered.
            assert done == []
            assert store.backlog == 200
            assert store.stats().commits == 0
            assert rows(path, "messages") == 0
            gate.release.set()
    assert sorted(done) == list(range(200))
    assert gate.sizes == [1, 199]
    stats = store.stats()
    assert (stats.commits, stats.committed_changes, stats.last_batch_size) == (2, 200, 199)
    assert (stats.pending_rows, stats.backlog) == (200, 0)
    # The row of task 7 (second batch) was on disk when its durable() returned.
    assert seen_after_durable == [200]


async def test_max_batch_caps_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(tmp_path / "relay.db", "off", max_dead_letters=10, max_batch=10)
    await store.open()
    gate = Gate(monkeypatch)
    commits: list[int] = []
    store.on_commit = lambda seconds, size: commits.append(size)
    with trio.fail_after(20):
        async with running(store):
            first = store.stage(report(0))
            await gate.wait_entered()
            tickets = [store.stage(report(i)) for i in range(1, 26)]
            gate.release.set()
            await store.durable(first)
            for t in tickets:
                await store.durable(t)
    assert gate.sizes == [1, 10, 10, 5]
    assert commits == [1, 10, 10, 5]


async def test_shutdown_commits_what_is_staged_then_refuses(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    store = SqliteStore(path, "normal", max_dead_letters=10)
    await store.open()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            tickets = [store.stage(report(i)) for i in range(5)]
            nursery.cancel_scope.cancel()  # before the run loop got to them
        for t in tickets:
            await store.durable(t)
        late = store.stage(report(99))
        with pytest.raises(StoreError, match="closed"):
            await store.durable(late)
    assert rows(path, "messages") == 5
    again = SqliteStore(path, "normal", max_dead_letters=10)
    recovered = await again.open()
    assert [m.message_id for m in recovered.messages] == [f"vm:{i}" for i in range(5)]
    assert recovered.resources == [ResourceRecord("vm", 4, 1.0, 104.0, None, 0)]
    async with running(again):
        pass


async def test_failed_commit_raises_store_error_and_rolls_back_the_whole_batch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "relay.db"
    store = SqliteStore(path, "normal", max_dead_letters=10)
    await store.open()
    gate = Gate(monkeypatch)
    bad = Changes()
    bad.set_meta("too_big", 2**70)  # SQLite integers are 64-bit
    with trio.fail_after(20):
        async with running(store):
            first = store.stage(report(0))
            await gate.wait_entered()
            good = store.stage(report(1))
            failed = store.stage(bad)
            gate.release.set()
            await store.durable(first)
            with pytest.raises(StoreError, match=r"commit to .*relay\.db failed"):
                await store.durable(good)
            with pytest.raises(StoreError):
                await store.durable(failed)
            # The writer keeps going.
            await store.durable(store.stage(report(2)))
    assert rows(path, "messages") == 2
    assert store.stats().pending_rows == 2
    recovered = await SqliteStore(path, "normal", 10).open()
    assert [m.message_id for m in recovered.messages] == ["vm:0", "vm:2"]
    assert "too_big" not in recovered.meta


async def test_query_sees_everything_staged_before_it(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "relay.db", "normal", max_dead_letters=2)
    await store.open()
    with trio.fail_after(20):
        async with running(store):
            for i in range(3):
                c = Changes()
                c.dead_letter(
                    DeadLetterRecord(0, f"a:{i}", "a", i, None, b"1", "max_age", "u", 1.0, 2.0, ())
                )
                store.stage(c)
            page = await store.query_dead_letters(DeadLetterQuery())
    assert [(d.index, d.message_id) for d in page.items] == [(2, "a:1"), (3, "a:2")]
    stats = store.stats()
    assert (stats.dead_letters, stats.dead_letters_pruned) == (2, 1)
    assert stats.file_bytes > 0


async def test_recovered_matches_the_memory_store(tmp_path: Path) -> None:
    path = tmp_path / "data" / "nested" / "relay.db"  # directories are created
    sqlite_store = SqliteStore(path, "full", max_dead_letters=5)
    memory = MemoryStore(max_dead_letters=5)
    assert await sqlite_store.open() == await memory.open()
    changes = [report(1), report(2, "b")]
    c = Changes()
    c.delete_resource("b", 2)
    c.set_meta("event_id_reserved", 4096)
    c.dead_letter(DeadLetterRecord(0, "vm:1", "vm", 1, None, b"1", "max_age", "u", 1.0, 2.0, ()))
    changes.append(c)
    with trio.fail_after(20):
        async with running(sqlite_store):
            for ch in changes:
                await sqlite_store.durable(sqlite_store.stage(ch))
                await memory.durable(memory.stage(ch))
    reopened = await SqliteStore(path, "full", max_dead_letters=5).open()
    assert reopened == await memory.open()
    assert reopened.meta == {SEQ_FLOOR: 2, "event_id_reserved": 4096}
    assert reopened.dead_letter_index == 1


@pytest.mark.parametrize(("sync", "level"), [("normal", 1), ("full", 2), ("off", 0)])
async def test_wal_mode_sync_level_and_schema_version(
    tmp_path: Path, sync: SyncMode, level: int
) -> None:
    store = SqliteStore(tmp_path / "relay.db", sync, max_dead_letters=5)
    await store.open()
    conn = store._file._conn
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (level,)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    async with running(store):
        pass


def snapshot(path: Path) -> tuple[bytes, int, list[str]]:
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(os.listdir(path.parent))


async def expect_refused(path: Path, match: str) -> None:
    before = snapshot(path)
    with pytest.raises(StoreError, match=match) as info:
        await SqliteStore(path, "normal", max_dead_letters=5).open()
    assert "\n" not in str(info.value)
    assert snapshot(path) == before


async def test_not_a_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    path.write_bytes(b"this is not sqlite at all\n" * 200)
    await expect_refused(
        path, f"cannot open {path}: file is not a database; move it aside or restore a backup"
    )


async def test_corrupt_store_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    store = SqliteStore(path, "normal", max_dead_letters=5)
    await store.open()
    async with running(store):
        for i in range(300):
            store.stage(report(i, rid=f"r{i}"))
        await store.durable(store.stage(report(0)))
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 4096
    data[4096:] = b"\xa5" * (len(data) - 4096)  # every page after the header page
    path.write_bytes(bytes(data))
    await expect_refused(path, rf"cannot open {path}: .*malformed.*; move it aside")


async def test_newer_schema_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE future (x)")
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    await expect_refused(
        path,
        rf"{path} schema version 7 is newer than this relay supports \({SCHEMA_VERSION}\): "
        "upgrade relay-trio or point data_dir elsewhere",
    )


async def test_foreign_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE someone_elses (x)")
    conn.commit()
    conn.close()
    await expect_refused(path, "not a relay-trio store")


async def test_unreadable_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    path.mkdir()  # tests run as root: a directory stands in for an unreadable file
    (path / "keep").write_text("x")
    with pytest.raises(StoreError, match=f"cannot open {path}: unable to open database file"):
        await SqliteStore(path, "normal", max_dead_letters=5).open()
    assert os.listdir(path) == ["keep"]


async def test_uncreatable_data_dir_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data dir should be")
    with pytest.raises(StoreError, match=f"cannot create {blocker}"):
        await SqliteStore(blocker / "relay.db", "normal", max_dead_letters=5).open()
    assert blocker.read_text() == "a file where the data dir should be"


async def test_run_before_open_is_an_error(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "relay.db", "normal", max_dead_letters=5)
    with pytest.raises(RuntimeError, match="open"):
        await store.run()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, MAX_ROWS - 1, MAX_ROWS, MAX_ROWS + 1, 3000])
def test_pieces_cover_every_row_in_order_padded_to_a_power_of_two(n: int) -> None:
    rows = list(range(n))
    got = _pieces(rows)
    assert len(got) == -(-n // MAX_ROWS)  # one statement per MAX_ROWS rows
    assert all(len(p) <= MAX_ROWS and len(p) & (len(p) - 1) == 0 for p in got)
    # In order, each row once, then only copies of the last one.
    flat = [x for p in got for x in p]
    assert flat[:n] == rows
    assert set(flat[n:]) <= {n - 1}
    assert rows == list(range(n))  # the caller's list is not changed


@pytest.mark.parametrize("n", [MAX_ROWS - 1, MAX_ROWS, MAX_ROWS + 1, 2 * MAX_ROWS + 3])
async def test_commits_around_the_statement_size_write_every_row(tmp_path: Path, n: int) -> None:
    # One change set per resource (its resource row and message), all in ONE commit; then
    # half of them acknowledged (message deleted, resource updated) in a second one. What
    # a reopen loads must equal the memory store given the same changes.
    path = tmp_path / "relay.db"
    store = SqliteStore(path, "normal", max_dead_letters=5, max_batch=10_000)
    memory = MemoryStore(max_dead_letters=5)
    await store.open()
    await memory.open()
    admitted = [report(1, f"r{i}") for i in range(n)]
    acked = []
    for i in range(0, n, 2):
        c = Changes()
        c.delete_message(f"r{i}:1")
        c.put_resource(ResourceRecord(f"r{i}", 1, 0.5, 200.0, 201.0, 1))
        acked.append(c)
    with trio.fail_after(20):
        async with running(store):
            for group in (admitted, acked):
                tickets = [store.stage(c) for c in group]
                for c in group:
                    memory.stage(c)
                await store.durable(tickets[-1])
            assert store.stats().commits == 2
    assert rows(path, "messages") == n // 2
    assert rows(path, "resources") == n
    assert await SqliteStore(path, "normal", max_dead_letters=5).open() == await memory.open()
