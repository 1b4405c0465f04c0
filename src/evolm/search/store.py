"""The run database: every variant, its lineage, state, metrics and adapter, in SQLite.

WAL mode lets several worker processes (one per GPU) share a run: each claims a pending variant
in an immediate (write-locked) transaction, so no variant is ever handed to two workers. A claim
whose worker died (its process is gone, or its heartbeat is stale) goes back to pending, and the
variant is retrained from its starting weights, which are never overwritten.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from evolm.config import ConfigError
from evolm.runs import RunDir
from evolm.search.evolution import Plan
from evolm.search.genes import Genes

SCHEMA = """
CREATE TABLE IF NOT EXISTS variants (
    id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    genes TEXT NOT NULL,
    origin TEXT NOT NULL,
    parents TEXT NOT NULL,
    mutated TEXT NOT NULL,
    init_from INTEGER REFERENCES variants(id),
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done')),
    worker TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    fitness REAL,
    metrics TEXT,
    adapter TEXT,
    created REAL NOT NULL,
    finished REAL,
    UNIQUE (generation, slot)
)
"""
# work done once per run after the last generation (the baseline, the test split), claimed like a variant
STAGES = """
CREATE TABLE IF NOT EXISTS stages (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('running', 'done')),
    worker TEXT,
    heartbeat REAL
)
"""


@dataclass(frozen=True)
class Variant:
    id: int
    generation: int
    slot: int
    genes: Genes
    origin: str
    parents: list[int]
    mutated: list[str]
    init_from: int | None
    state: str
    worker: str | None
    attempts: int
    fitness: float | None
    metrics: dict[str, Any]
    adapter: str | None  # relative to the run folder
    created: float
    finished: float | None


def open_search_run(path: str | Path) -> RunDir:
    """The run folder at `path`, for --resume and `evolm analyze`: it must hold a search run's
    config and database (an ES run folder has no database)."""
    run = RunDir(Path(path))
    if not run.config_file.is_file() or not run.database.is_file():
        raise ConfigError(f"{path} is not an evolm search run folder (config.yaml and run.db expected)")
    return run


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_gone(worker: str) -> bool:
    """True when `worker` ran on this host and its process no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(SCHEMA)
        self.db.execute(STAGES)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the database's write lock from its first statement."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- reading

    def variants(self, generation: int | None = None) -> list[Variant]:
        where, args = ("WHERE generation = ?", (generation,)) if generation is not None else ("", ())
        rows = self.db.execute(f"SELECT * FROM variants {where} ORDER BY generation, slot", args).fetchall()
        return [_variant(row) for row in rows]

    def get(self, variant_id: int) -> Variant:
        row = self.db.execute("SELECT * FROM variants WHERE id = ?", (variant_id,)).fetchone()
        if row is None:
            raise KeyError(f"no variant {variant_id} in {self.path}")
        return _variant(row)

    def latest_generation(self) -> int:
        """-1 before the first generation exists."""
        return self.db.execute("SELECT COALESCE(MAX(generation), -1) FROM variants").fetchone()[0]

    def finished(self, generations: int) -> bool:
        latest = self.latest_generation()
        return latest == generations - 1 and all(v.state == "done" for v in self.variants(latest))

    # --- writing

    def add_generation(self, breed: Callable[[int, list[Variant]], list[Plan]]) -> bool:
        """Atomically insert the next generation when the latest one is complete (or none exists):
        `breed(generation, every variant so far)` gives its plans; an empty list means the run is over."""
        with self.transaction() as db:
            latest = self.latest_generation()
            everything = self.variants()
            if any(v.state != "done" for v in everything if v.generation == latest):
                return False
            plans = breed(latest + 1, everything)
            now = time.time()
            db.executemany(
                "INSERT INTO variants (generation, slot, genes, origin, parents, mutated, init_from, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(latest + 1, slot, json.dumps(p.genes.to_dict()), p.origin, json.dumps(p.parents),
                  json.dumps(p.mutated), p.init_from, now) for slot, p in enumerate(plans)],
            )
            return bool(plans)

    def claim(self, worker: str) -> Variant | None:
        """Hand the first pending variant (oldest generation, lowest slot) to `worker`, or None."""
        with self.transaction() as db:
            row = db.execute("SELECT id FROM variants WHERE state = 'pending'"
                             " ORDER BY generation, slot LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE variants SET state = 'running', worker = ?, heartbeat = ?, attempts = attempts + 1"
                       " WHERE id = ?", (worker, time.time(), row["id"]))
        return self.get(row["id"])

    def beat(self, variant_id: int, worker: str) -> None:
        self.db.execute("UPDATE variants SET heartbeat = ? WHERE id = ? AND worker = ? AND state = 'running'",
                        (time.time(), variant_id, worker))

    def finish(self, variant_id: int, worker: str, fitness: float, metrics: dict[str, Any], adapter: str) -> bool:
        """Record a result; False (and nothing written) when the claim was lost to another worker."""
        cursor = self.db.execute(
            "UPDATE variants SET state = 'done', fitness = ?, metrics = ?, adapter = ?, finished = ?"
            " WHERE id = ? AND worker = ? AND state = 'running'",
            (fitness, json.dumps(metrics), adapter, time.time(), variant_id, worker),
        )
        return cursor.rowcount == 1

    def release(self, variant_id: int, worker: str) -> None:
        """Give a claim back (Ctrl-C, an error): the variant will be trained again from its start."""
        self.db.execute("UPDATE variants SET state = 'pending', worker = NULL"
                        " WHERE id = ? AND worker = ? AND state = 'running'", (variant_id, worker))

    def requeue_stale(self, stale_after_s: float) -> list[int]:
        """Claims of dead workers back to pending; returns their variant ids."""
        with self.transaction() as db:
            rows = db.execute("SELECT id, worker, heartbeat FROM variants WHERE state = 'running'").fetchall()
            stale = [r["id"] for r in rows if _stale(r, stale_after_s)]
            db.executemany("UPDATE variants SET state = 'pending', worker = NULL WHERE id = ?", [(i,) for i in stale])
        return stale

    # --- stages: once-per-run work after the last generation

    def claim_stage(self, name: str, worker: str, stale_after_s: float) -> str:
        """'claimed' (it is `worker`'s to do), 'done', or 'busy' (a live worker holds it). A claim of a dead
        or silent worker is taken over."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM stages WHERE name = ?", (name,)).fetchone()
            if row is not None and (row["state"] == "done" or not _stale(row, stale_after_s)):
                return row["state"] if row["state"] == "done" else "busy"
            db.execute("INSERT OR REPLACE INTO stages (name, state, worker, heartbeat) VALUES (?, 'running', ?, ?)",
                       (name, worker, time.time()))
        return "claimed"

    def beat_stage(self, name: str, worker: str) -> None:
        self.db.execute("UPDATE stages SET heartbeat = ? WHERE name = ? AND worker = ?", (time.time(), name, worker))

    def end_stage(self, name: str, worker: str, done: bool) -> None:
        """Mark a claimed stage done, or (done=False: an error, Ctrl-C) give it back."""
        if done:
            self.db.execute("UPDATE stages SET state = 'done' WHERE name = ? AND worker = ?", (name, worker))
        else:
            self.db.execute("DELETE FROM stages WHERE name = ? AND worker = ? AND state = 'running'", (name, worker))


def _stale(row: sqlite3.Row, stale_after_s: float) -> bool:
    """A running claim whose worker process is gone or has sent no heartbeat for stale_after_s."""
    return _process_gone(row["worker"] or "") or time.time() - (row["heartbeat"] or 0) > stale_after_s


def _variant(row: sqlite3.Row) -> Variant:
    return Variant(
        id=row["id"], generation=row["generation"], slot=row["slot"], genes=Genes.from_dict(json.loads(row["genes"])),
        origin=row["origin"], parents=json.loads(row["parents"]), mutated=json.loads(row["mutated"]),
        init_from=row["init_from"], state=row["state"], worker=row["worker"], attempts=row["attempts"],
        fitness=row["fitness"], metrics=json.loads(row["metrics"] or "{}"), adapter=row["adapter"],
        created=row["created"], finished=row["finished"],
    )
