"""State on disk: one SQLite database (stdlib) in the state dir.

Every write is its own transaction, so a killed agent loses at most the operation it was in the
middle of; WAL mode lets the dashboard and a CLI process read and write at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

from backend.capsules.models import Capsule, Event, Snapshot, State

log = logging.getLogger("wrenn.store")

UNREADABLE = "unreadable"
"""`extra` key of the stand-in for a record that cannot be read (its row is never rewritten)."""
_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "template": (str,),
    "image_dir": (str,),
    "memory_mib": (int,),
    "vcpus": (int,),
    "created_at": (int, float),
    "host_port": (int,),
    "access_token": (str,),
    "network": (str,),
    "reason": (str,),
    "pid": (int, type(None)),
    "started_at": (int, float, type(None)),
    "generation": (int,),
    "auto_pause_s": (int,),
    "last_activity": (int, float),
    "accel": (str,),
    "envd_host": (str,),
    "net_slot": (int, type(None)),
    "extra": (dict,),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS capsules (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    capsule_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (capsule_id, generation)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    capsule_id TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_capsule ON events (capsule_id, id);
CREATE TABLE IF NOT EXISTS metrics (
    capsule_id TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # 0600 before SQLite first opens it: SQLite gives the -wal and -shm files the
        # database's own mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for existing in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))):
            with contextlib.suppress(FileNotFoundError):
                if existing.stat().st_mode & 0o077:
                    existing.chmod(0o600)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._capsules_cache: tuple[tuple[int, int], list[Capsule]] | None = None
        self._capsule_writes = 0
        """Writes on this connection that can change the capsules table."""

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        self._capsule_writes += 1
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            self._capsules_cache = None
            raise
        finally:
            self._capsule_writes += 1
        self._db.execute("COMMIT")

    # -- capsules ---------------------------------------------------------------------------

    @staticmethod
    def _encode(capsule: Capsule) -> str:
        data = asdict(capsule)
        data["state"] = capsule.state.value
        return json.dumps(data)

    @staticmethod
    def _decode(text: str) -> Capsule:
        """A record as stored; ValueError (with the reason) when it cannot be one."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON {type(raw).__name__}, not an object")
        known = {f.name for f in fields(Capsule)}
        raw = {k: v for k, v in raw.items() if k in known}
        try:
            raw["state"] = State(raw["state"])
        except KeyError:
            raise ValueError("no state") from None
        except ValueError:
            raise ValueError(f"unknown state {raw['state']!r}") from None
        for name, types in _TYPES.items():
            if name in raw and (not isinstance(raw[name], types) or isinstance(raw[name], bool)):
                raise ValueError(f"field {name} is {raw[name]!r}")
        try:
            return Capsule(**raw)
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def _decode_row(cls, capsule_id: str, text: str) -> Capsule:
        """One bad record must not take every list down: it reads as an `error` capsule
        saying why, which can be destroyed (its row is left as it is until then)."""
        try:
            capsule = cls._decode(text)
            if capsule.id != capsule_id:
                raise ValueError(f"record names id {capsule.id!r}")
            return capsule
        except ValueError as exc:
            reason = f"unreadable state record: {exc}"
            log.warning("capsule %s: %s", capsule_id, reason)
            return Capsule(
                id=capsule_id,
                state=State.ERROR,
                template="?",
                image_dir="",
                memory_mib=0,
                vcpus=0,
                created_at=0.0,
                host_port=0,
                access_token="",
                reason=reason,
                extra={UNREADABLE: True},
            )

    def put(self, capsule: Capsule) -> None:
        if capsule.extra.get(UNREADABLE):
            log.warning("not writing over the unreadable record of %s", capsule.id)
            return
        self._capsule_writes += 1
        self._db.execute(
            "INSERT INTO capsules (id, data, state, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET data=excluded.data, state=excluded.state, "
            "updated_at=excluded.updated_at",
            (capsule.id, self._encode(capsule), capsule.state.value, time.time()),
        )

    def touch(self, capsule_id: str, when: float) -> bool:
        """Set a running capsule's last activity, in one transaction with reading its state:
        a state another process committed meanwhile (a pause) is never written over."""
        with self.transaction() as db:
            row = db.execute("SELECT data FROM capsules WHERE id = ?", (capsule_id,)).fetchone()
            if row is None:
                return False
            capsule = self._decode_row(capsule_id, row[0])
            if capsule.state != State.RUNNING:
                return False
            touched = capsule.with_(last_activity=when)
            db.execute(
                "UPDATE capsules SET data = ?, updated_at = ? WHERE id = ?",
                (self._encode(touched), time.time(), capsule_id),
            )
        return True

    def get(self, capsule_id: str) -> Capsule | None:
        row = self._db.execute("SELECT data FROM capsules WHERE id = ?", (capsule_id,)).fetchone()
        return self._decode_row(capsule_id, row[0]) if row else None

    def list_capsules(self) -> list[Capsule]:
        """Every capsule, oldest first. The dashboard and the sampler each ask once a second;
        decoding 120 rows costs ~4 ms, so the answer is kept until the capsules may have
        changed: a put, delete or transaction on this connection (the sampler's metric
        writes do not count), or a commit by any other connection (a CLI process), which
        moves PRAGMA data_version. Inside a transaction nothing is kept."""
        if self._db.in_transaction:
            return self._read_capsules()
        version = (self._db.execute("PRAGMA data_version").fetchone()[0], self._capsule_writes)
        cached = self._capsules_cache
        if cached is not None and cached[0] == version:
            return list(cached[1])
        capsules = self._read_capsules()
        self._capsules_cache = (version, capsules)
        return list(capsules)

    def _read_capsules(self) -> list[Capsule]:
        rows = self._db.execute("SELECT id, data FROM capsules ORDER BY rowid").fetchall()
        return [self._decode_row(r[0], r[1]) for r in rows]

    def delete(self, capsule_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM capsules WHERE id = ?", (capsule_id,))
            db.execute("DELETE FROM snapshots WHERE capsule_id = ?", (capsule_id,))
            db.execute("DELETE FROM metrics WHERE capsule_id = ?", (capsule_id,))

    # -- snapshots --------------------------------------------------------------------------

    def put_snapshot(self, snapshot: Snapshot) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO snapshots (capsule_id, generation, data) VALUES (?, ?, ?)",
            (snapshot.capsule_id, snapshot.generation, json.dumps(asdict(snapshot))),
        )

    def snapshots(self, capsule_id: str) -> list[Snapshot]:
        rows = self._db.execute(
            "SELECT data FROM snapshots WHERE capsule_id = ? ORDER BY generation", (capsule_id,)
        ).fetchall()
        return [Snapshot(**json.loads(r[0])) for r in rows]

    def delete_snapshot(self, capsule_id: str, generation: int) -> None:
        self._db.execute(
            "DELETE FROM snapshots WHERE capsule_id = ? AND generation = ?",
            (capsule_id, generation),
        )

    # -- events -----------------------------------------------------------------------------

    def add_event(self, capsule_id: str, kind: str, message: str) -> None:
        self._db.execute(
            "INSERT INTO events (capsule_id, ts, kind, message) VALUES (?, ?, ?, ?)",
            (capsule_id, time.time(), kind, message),
        )

    def events(self, capsule_id: str | None = None, limit: int = 50) -> list[Event]:
        if capsule_id is None:
            rows = self._db.execute(
                "SELECT capsule_id, ts, kind, message FROM events ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT capsule_id, ts, kind, message FROM events WHERE capsule_id = ? "
                "ORDER BY id DESC LIMIT ?",
                (capsule_id, limit),
            ).fetchall()
        return [Event(*r) for r in reversed(rows)]

    # -- metric history (written by the sampler) --------------------------------------------

    def put_metrics(self, capsule_id: str, data: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO metrics (capsule_id, data, updated_at) VALUES (?, ?, ?)",
            (capsule_id, data, time.time()),
        )

    def get_metrics(self, capsule_id: str) -> str | None:
        row = self._db.execute(
            "SELECT data FROM metrics WHERE capsule_id = ?", (capsule_id,)
        ).fetchone()
        return str(row[0]) if row else None
