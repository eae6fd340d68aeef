"""The SQLite file behind :class:`~relay_trio.stores.sqlite.SqliteStore`: synchronous.

:class:`SqliteFile` opens (refusing unreadable, corrupt, foreign or newer-schema files without
touching them), migrates and loads the database, applies a batch of :class:`Changes` in ONE
transaction and answers dead-letter queries. It owns the only connection and is called from
one worker thread at a time, never from the Trio thread. Schema changes go in ``MIGRATIONS``.

Longer than 400 lines: the schema, its migrations and the row conversions sit next to
the one class that uses them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import attrs
import orjson

from .base import (
    DEAD_LETTER_INDEX,
    SEQ_FLOOR,
    Changes,
    DeadLetterPage,
    DeadLetterQuery,
    DeadLetterRecord,
    DeleteDeadLetters,
    DeleteIdempotencyKeys,
    DeleteMessage,
    DeleteResource,
    IdempotencyRecord,
    MessageRecord,
    Recovered,
    ResourceRecord,
    SetMeta,
    StoreError,
    UpdateMessage,
    attempts_from_json,
    attempts_to_json,
)

_R = TypeVar("_R")
_T = TypeVar("_T")

SyncMode = Literal["normal", "full", "off"]
SYNC_PRAGMA: Final = {"normal": "NORMAL", "full": "FULL", "off": "OFF"}

_SCHEMA_V1 = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE resources (
    resource_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    level REAL NOT NULL,
    last REAL NOT NULL,
    last_acked_at REAL,
    acked_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE messages (
    message_id TEXT PRIMARY KEY,
    resource_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT,
    payload BLOB NOT NULL,
    admitted_at REAL NOT NULL,
    attempts BLOB NOT NULL,
    due_at REAL,
    upstream TEXT NOT NULL,
    meta BLOB NOT NULL
);
CREATE TABLE dead_letters (
    idx INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    upstream TEXT NOT NULL,
    admitted_at REAL NOT NULL,
    dead_at REAL NOT NULL,
    attempts BLOB NOT NULL
);
CREATE INDEX dead_letters_message_id ON dead_letters (message_id);
CREATE INDEX dead_letters_resource_id ON dead_letters (resource_id, idx);
CREATE INDEX dead_letters_reason ON dead_letters (reason, idx);
CREATE INDEX dead_letters_upstream ON dead_letters (upstream, idx);
CREATE INDEX dead_letters_dead_at ON dead_letters (dead_at);
"""


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)


_SCHEMA_V2 = """
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    fingerprint BLOB NOT NULL,
    message_id TEXT NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX idempotency_created_at ON idempotency (created_at);
"""


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Version 2: ingest idempotency keys (issue 16)."""
    for statement in _SCHEMA_V2.split(";"):
        if statement.strip():
            conn.execute(statement)


MIGRATIONS: Final[list[Callable[[sqlite3.Connection], None]]] = [
    _migrate_0_to_1,
    _migrate_1_to_2,
]
"""``MIGRATIONS[v]`` turns schema version ``v`` into ``v + 1`` (inside the open transaction).
Version 0 is an empty file; the current version is ``len(MIGRATIONS)``."""

SCHEMA_VERSION: Final = len(MIGRATIONS)


@attrs.frozen
class _Table:
    """A table written by key (last write per key wins): its name, key and column count."""

    name: str
    key: str
    columns: int


_RESOURCES: Final = _Table("resources", "resource_id", 6)
_MESSAGES: Final = _Table("messages", "message_id", 10)
_IDEMPOTENCY: Final = _Table("idempotency", "key", 4)

#: Rows per multi-row statement at most. A commit writes a table's rows in ONE statement
#: per ``MAX_ROWS`` (the last one padded to a power of two by repeating its last row or key:
#: a repeated upsert or delete changes nothing, and a handful of statement texts then serve
#: every batch from the connection's cache) instead of one ``executemany`` step per row.
#: The sqlite3 module releases the GIL around each step and takes it back after: a step per
#: row was a GIL hand-off per row with the busy Trio thread (measured: the writer and the
#: Trio thread together never above one core, the machine half idle). The padding's extra
#: row work runs with the GIL released, on the other core.
MAX_ROWS: Final = 1024


def _pieces(rows: list[_T]) -> list[list[_T]]:
    """``rows`` cut into pieces of ``MAX_ROWS``, the last padded to a power of two with
    copies of its last element. Empty for no rows."""
    pieces = [rows[i : i + MAX_ROWS] for i in range(0, len(rows), MAX_ROWS)]
    if pieces:
        last = pieces[-1]
        last += [last[-1]] * ((1 << (len(last) - 1).bit_length()) - len(last))
    return pieces


@functools.cache
def _put_sql(table: _Table, rows: int) -> str:
    row = "(" + ",".join("?" * table.columns) + ")"
    return f"INSERT OR REPLACE INTO {table.name} VALUES " + ",".join([row] * rows)


@functools.cache
def _delete_sql(table: _Table, rows: int) -> str:
    return f"DELETE FROM {table.name} WHERE {table.key} IN ({','.join('?' * rows)})"


_UPDATE_MESSAGE = "UPDATE messages SET attempts = ?, due_at = ? WHERE message_id = ?"
_INSERT_DEAD_LETTER = "INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_DELETE_DEAD_LETTERS = "DELETE FROM dead_letters WHERE message_id = ?"
_PRUNE_DEAD_LETTERS = (
    "DELETE FROM dead_letters WHERE idx IN (SELECT idx FROM dead_letters ORDER BY idx LIMIT ?)"
)
_PUT_META = "INSERT OR REPLACE INTO meta VALUES (?, ?)"

MessageRow = tuple[str, str, int, str | None, bytes, float, bytes, float | None, str, bytes]
DeadLetterRow = tuple[int, str, str, int, str | None, bytes, str, str, float, float, bytes]


def _message_row(m: MessageRecord) -> MessageRow:
    return (
        m.message_id,
        m.resource_id,
        m.seq,
        m.kind,
        m.payload,
        m.admitted_at,
        attempts_to_json(m.attempts),
        m.due_at,
        m.upstream,
        m.meta,
    )


def _dead_letter_row(index: int, d: DeadLetterRecord) -> DeadLetterRow:
    return (
        index,
        d.message_id,
        d.resource_id,
        d.seq,
        d.kind,
        d.payload,
        d.reason,
        d.upstream,
        d.admitted_at,
        d.dead_at,
        attempts_to_json(d.attempts),
    )


def _message(row: MessageRow) -> MessageRecord:
    mid, rid, seq, kind, payload, admitted_at, attempts, due_at, upstream, meta = row
    return MessageRecord(
        mid,
        rid,
        seq,
        kind,
        bytes(payload),
        admitted_at,
        attempts_from_json(attempts),
        due_at,
        upstream,
        bytes(meta),
    )


def _dead_letter(row: DeadLetterRow) -> DeadLetterRecord:
    idx, mid, rid, seq, kind, payload, reason, upstream, admitted_at, dead_at, attempts = row
    return DeadLetterRecord(
        idx,
        mid,
        rid,
        seq,
        kind,
        bytes(payload),
        reason,
        upstream,
        admitted_at,
        dead_at,
        attempts_from_json(attempts),
    )


@attrs.frozen
class CommitResult:
    """What one commit changed in the counters (read on the Trio thread afterwards)."""

    pending_rows: int
    dead_letters: int
    dead_letters_pruned: int
    file_bytes: int


@attrs.define(eq=False)
class SqliteFile:
    """The synchronous core: one connection to ``path``. Not thread-safe: callers serialise.

    Every method blocks on disk I/O; call it from a worker thread, never the Trio thread.
    """

    path: Path
    sync: SyncMode
    max_dead_letters: int
    _conn: sqlite3.Connection | None = attrs.field(init=False, default=None)
    _meta: dict[str, int] = attrs.field(init=False, factory=dict)
    _message_ids: set[str] = attrs.field(init=False, factory=set)
    _dead_letters: int = attrs.field(init=False, default=0)
    _dead_letter_index: int = attrs.field(init=False, default=0)
    dead_letters_pruned: int = attrs.field(init=False, default=0)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def _fail(self, what: str, advice: str) -> StoreError:
        return StoreError(f"cannot open {self.path}: {what}; {advice}")

    def open(self) -> Recovered:
        """Create or open the file, migrate its schema, load everything.

        Raises :class:`StoreError` (and leaves the file exactly as it was) when it cannot be
        opened, is not a database, is corrupt, is another program's database, or has a newer
        schema version than :data:`SCHEMA_VERSION`.
        """
        if self._conn is not None:
            raise RuntimeError("SqliteFile is already open")
        if self.sync not in SYNC_PRAGMA:
            raise ValueError(f"sync must be one of {', '.join(SYNC_PRAGMA)}, got {self.sync!r}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create {self.path.parent}: {exc.strerror}; "
                "fix the permissions or point data_dir elsewhere"
            ) from None
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, cached_statements=32
            )
        except sqlite3.Error as exc:
            raise self._fail(
                str(exc), "check that it is a readable database file, or move it aside"
            ) from None
        try:
            recovered = self._open(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return recovered

    def _open(self, conn: sqlite3.Connection) -> Recovered:
        # Read-only checks first: nothing is written until the file is known to be ours.
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._fail(str(exc), "move it aside or restore a backup") from None
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} schema version {version} is newer than this relay supports "
                f"({SCHEMA_VERSION}): upgrade relay-trio or point data_dir elsewhere"
            )
        if version == 0 and tables:
            raise self._fail(
                "not a relay-trio store (it holds other tables)",
                "move it aside or point data_dir elsewhere",
            )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {SYNC_PRAGMA[self.sync]}")
            conn.execute("PRAGMA busy_timeout = 2000")
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for migrate in MIGRATIONS[version:]:
                        migrate(conn)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            return self._load(conn)
        except sqlite3.Error as exc:
            raise self._fail(str(exc), "move it aside or restore a backup") from None

    def _load(self, conn: sqlite3.Connection) -> Recovered:
        resources = [
            ResourceRecord(*row)
            for row in conn.execute("SELECT * FROM resources ORDER BY resource_id")
        ]
        messages = [
            _message(row) for row in conn.execute("SELECT * FROM messages ORDER BY message_id")
        ]
        meta = {k: v for k, v in conn.execute("SELECT key, value FROM meta")}
        idempotency = [
            IdempotencyRecord(key, bytes(fp), mid, created_at)
            for key, fp, mid, created_at in conn.execute(
                "SELECT * FROM idempotency ORDER BY created_at, key"
            )
        ]
        count, last = conn.execute(
            "SELECT count(*), coalesce(max(idx), 0) FROM dead_letters"
        ).fetchone()
        self._dead_letter_index = max(meta.pop(DEAD_LETTER_INDEX, 0), last)
        meta.setdefault(SEQ_FLOOR, 0)
        self._meta = meta
        self._message_ids = {m.message_id for m in messages}
        self._dead_letters = count
        return Recovered(
            resources=resources,
            messages=messages,
            meta=dict(meta),
            dead_letters=count,
            dead_letter_index=self._dead_letter_index,
            idempotency=idempotency,
        )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("SqliteFile is not open")
        return self._conn

    def apply(self, batch: Sequence[Changes]) -> CommitResult:
        """Apply every change set of ``batch``, in order, in ONE transaction. Blocks.

        Same visible result as applying each operation one by one. Cheaper: operations on
        different tables commute, and within ``resources``/``messages`` only the last operation
        per key matters, so each of those becomes two ``executemany`` (deletes, upserts);
        dead-letter inserts/deletes keep their order (consecutive runs share one
        ``executemany``). On failure everything is rolled back and :class:`StoreError` raised.
        """
        conn = self._connection()
        resources: dict[str, ResourceRecord | None] = {}
        messages: dict[str, MessageRecord | None] = {}
        keys: dict[str, IdempotencyRecord | None] = {}
        # Updates of rows this batch did not write itself (applied after the upserts).
        updates: dict[str, tuple[bytes, float | None, str]] = {}
        meta = dict(self._meta)
        index = self._dead_letter_index
        # Dead-letter runs, in order: (True, insert rows) or (False, message ids to delete).
        runs: list[tuple[bool, list[DeadLetterRow] | list[tuple[str]]]] = []
        for changes in batch:
            for op in changes.ops:
                # Most frequent first: every admission stages a resource and a message,
                # every ACK a message delete and a resource.
                if isinstance(op, ResourceRecord):
                    resources[op.resource_id] = op
                elif isinstance(op, MessageRecord):
                    messages[op.message_id] = op
                    if updates:
                        updates.pop(op.message_id, None)
                elif isinstance(op, DeleteMessage):
                    messages[op.message_id] = None
                    if updates:
                        updates.pop(op.message_id, None)
                elif isinstance(op, UpdateMessage):
                    mid = op.message_id
                    if mid in messages:
                        written = messages[mid]
                        if written is not None:
                            messages[mid] = written._replace(attempts=op.attempts, due_at=op.due_at)
                    else:
                        updates[mid] = (attempts_to_json(op.attempts), op.due_at, mid)
                elif isinstance(op, DeleteResource):
                    resources[op.resource_id] = None
                    meta[SEQ_FLOOR] = max(meta.get(SEQ_FLOOR, 0), op.seq)
                elif isinstance(op, SetMeta):
                    meta[op.key] = op.value
                elif isinstance(op, DeadLetterRecord):
                    index += 1
                    messages[op.message_id] = None
                    updates.pop(op.message_id, None)
                    if not runs or not runs[-1][0]:
                        runs.append((True, []))
                    runs[-1][1].append(_dead_letter_row(index, op))  # type: ignore[arg-type]
                elif isinstance(op, IdempotencyRecord):
                    keys[op.key] = op
                elif isinstance(op, DeleteIdempotencyKeys):
                    keys.update(dict.fromkeys(op.keys))
                elif isinstance(op, DeleteDeadLetters):
                    if not runs or runs[-1][0]:
                        runs.append((False, []))
                    runs[-1][1].extend((mid,) for mid in op.message_ids)  # type: ignore[misc]
                else:  # pragma: no cover - exhaustive
                    raise TypeError(f"unknown store operation {op!r}")
        dead_letters = self._dead_letters
        pruned = 0
        try:
            conn.execute("BEGIN")
            try:
                if resources:
                    # A ResourceRecord is already its row (same fields, same order).
                    self._write(conn, _RESOURCES, resources, None)
                if messages:
                    # A message admitted and settled within this batch never reaches the
                    # file: only ids the file holds need a DELETE.
                    in_file = self._message_ids
                    self._write(
                        conn,
                        _MESSAGES,
                        {k: v for k, v in messages.items() if v is not None or k in in_file},
                        _message_row,
                    )
                if updates:
                    conn.executemany(_UPDATE_MESSAGE, updates.values())
                if keys:
                    self._write(conn, _IDEMPOTENCY, keys, tuple)
                for insert, rows in runs:
                    if insert:
                        conn.executemany(_INSERT_DEAD_LETTER, rows)
                        dead_letters += len(rows)
                        excess = dead_letters - self.max_dead_letters
                        if excess > 0:
                            conn.execute(_PRUNE_DEAD_LETTERS, (excess,))
                            dead_letters -= excess
                            pruned += excess
                    else:
                        dead_letters -= conn.executemany(_DELETE_DEAD_LETTERS, rows).rowcount
                changed_meta = [(k, v) for k, v in meta.items() if self._meta.get(k) != v]
                if index != self._dead_letter_index:
                    changed_meta.append((DEAD_LETTER_INDEX, index))
                if changed_meta:
                    conn.executemany(_PUT_META, changed_meta)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:
            # sqlite3.Error, or a value SQLite cannot hold (OverflowError for an int beyond 64
            # bits): the whole batch is rolled back and fails; the writer itself keeps going.
            raise StoreError(f"commit to {self.path} failed: {exc}") from None
        # Committed: only now does the in-memory view move.
        self._meta = meta
        self._dead_letter_index = index
        self._dead_letters = dead_letters
        self.dead_letters_pruned += pruned
        ids = self._message_ids
        for mid, m in messages.items():
            if m is None:
                ids.discard(mid)
            else:
                ids.add(mid)
        return CommitResult(
            pending_rows=len(ids),
            dead_letters=dead_letters,
            dead_letters_pruned=self.dead_letters_pruned,
            file_bytes=self.file_bytes(),
        )

    @staticmethod
    def _write(
        conn: sqlite3.Connection,
        table: _Table,
        latest: dict[str, _R | None],
        row: Callable[[_R], tuple[object, ...]] | None,
    ) -> None:
        """Delete the keys mapped to ``None``, upsert the others (``row`` turns a record
        into its row; ``None`` when the record already is one): one multi-row statement per
        :data:`MAX_ROWS` rows each (see there)."""
        for keys in _pieces([k for k, v in latest.items() if v is None]):
            conn.execute(_delete_sql(table, len(keys)), keys)
        if row is None:
            puts: list[Any] = [v for v in latest.values() if v is not None]
        else:
            puts = [row(v) for v in latest.values() if v is not None]
        for piece in _pieces(puts):
            conn.execute(_put_sql(table, len(piece)), list(chain.from_iterable(piece)))

    def query(self, q: DeadLetterQuery) -> DeadLetterPage:
        """One page of dead letters matching ``q``, oldest first. Blocks."""
        conn = self._connection()
        where = ["idx > ?"]
        params: list[object] = [q.after_index]
        for column, value in (
            ("resource_id", q.resource_id),
            ("reason", q.reason),
            ("upstream", q.upstream),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if q.since is not None:
            where.append("dead_at >= ?")
            params.append(q.since)
        if q.until is not None:
            where.append("dead_at < ?")
            params.append(q.until)
        if q.message_ids is not None:
            where.append("message_id IN (SELECT value FROM json_each(?))")
            params.append(orjson.dumps(list(q.message_ids)).decode())
        params.append(q.limit + 1)
        sql = f"SELECT * FROM dead_letters WHERE {' AND '.join(where)} ORDER BY idx LIMIT ?"
        try:
            rows = conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"reading dead letters from {self.path} failed: {exc}") from None
        items = [_dead_letter(row) for row in rows[: q.limit]]
        return DeadLetterPage(items, items[-1].index if len(rows) > q.limit else None)

    def file_bytes(self) -> int:
        """Size of the database file plus its write-ahead log."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(OSError):
                total += os.stat(path).st_size
        return total

    def close(self) -> None:
        """Close the connection (a no-op when not open). Blocks (WAL checkpoint)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
