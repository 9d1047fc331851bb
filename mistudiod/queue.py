"""The job queue: jobs, their metric points and logs, corpora and the audit trail, in SQLite.

The daemon is the only writer (one connection, in its event loop); workers never touch the
database, they report over a socket. WAL keeps readers (`sqlite3` from a shell, backups) from
blocking it, `busy_timeout` covers the moments they hold a lock, and `synchronous=NORMAL` makes
every commit survive a crash of the process (a kill -9 loses nothing committed).

A job's life: queued -> running -> succeeded | failed | cancelled. `claim` moves the best queued
job (or the one the worker pool has found room for) to running in one statement, `UPDATE ...
WHERE id = (SELECT ...) RETURNING`, and increments `attempt`. `attempt` is the fencing token:
every later write about a running job names the attempt it belongs to, so a report from a worker
of an earlier attempt (one presumed dead and replaced) can change nothing. A running job holds a
lease that heartbeats extend. When the daemon starts, every row still `running` belongs to its
previous life; `recover` puts them back in the queue marked to resume from their last
checkpoint.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from mistudiod.protocol import FINISHED_STATES, JOB_STATES


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    params: dict
    state: str
    priority: int
    attempt: int
    failures: int
    max_retries: int
    resume: bool
    owner: str
    device: str | None
    worker_pid: int | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    lease_until: float | None
    step: int
    total_steps: int
    progress: float
    last_metrics: dict | None
    result: dict | None
    error: dict | None

    @classmethod
    def from_row(cls, row: dict) -> Job:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        for name in ("params", "last_metrics", "result", "error"):
            values[name] = json.loads(row[name]) if row[name] else None
        values["params"] = values["params"] or {}
        values["resume"] = bool(row["resume"])
        values["cancel_requested"] = bool(row["cancel_requested"])
        return cls(**values)

    def to_dict(self) -> dict:
        """The job as clients see it (params included; nothing secret is ever stored)."""
        document = dict(self.__dict__)
        document["elapsed_s"] = (
            None if self.started_at is None
            else (self.finished_at or time.time()) - self.started_at
        )
        return document


class JobQueue:
    def __init__(self, path: Path) -> None:
        connection = sqlite3.connect(str(path), isolation_level=None, timeout=5.0)
        self.db = sqlite_utils.Database(connection)
        for pragma in ("journal_mode=WAL", "busy_timeout=5000", "synchronous=NORMAL",
                       "foreign_keys=ON"):
            self.db.execute(f"PRAGMA {pragma}")
        self._create_tables()

    def close(self) -> None:
        self.db.conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _create_tables(self) -> None:
        self.db["jobs"].create(
            {"id": int, "kind": str, "params": str, "state": str, "priority": int,
             "attempt": int, "failures": int, "max_retries": int, "resume": int, "owner": str,
             "device": str, "worker_pid": int, "cancel_requested": int, "created_at": float,
             "started_at": float, "finished_at": float, "lease_until": float, "step": int,
             "total_steps": int, "progress": float, "last_metrics": str, "result": str,
             "error": str},
            pk="id", not_null={"kind", "params", "state", "created_at"},
            defaults={"priority": 0, "attempt": 0, "failures": 0, "max_retries": 0,
                      "resume": 0, "owner": "", "cancel_requested": 0, "step": 0,
                      "total_steps": 0, "progress": 0.0},
            if_not_exists=True,
        )
        self.db["jobs"].create_index(["state", "priority", "id"], if_not_exists=True)
        self.db["metrics"].create(
            {"job_id": int, "step": int, "attempt": int, "at": float, "point": str},
            pk=("job_id", "step"), foreign_keys=[("job_id", "jobs", "id")], if_not_exists=True,
        )
        self.db["logs"].create(
            {"id": int, "job_id": int, "attempt": int, "at": float, "level": str,
             "message": str},
            pk="id", foreign_keys=[("job_id", "jobs", "id")], if_not_exists=True,
        )
        self.db["logs"].create_index(["job_id", "id"], if_not_exists=True)
        self.db["corpora"].create(
            {"name": str, "size": int, "sha256": str, "added_at": float, "added_by": str},
            pk="name", if_not_exists=True,
        )
        self.db["audit"].create(
            {"id": int, "at": float, "who": str, "action": str, "target": str, "detail": str},
            pk="id", if_not_exists=True,
        )

    # ----- jobs --------------------------------------------------------------------------------

    def submit(self, kind: str, params: dict, owner: str, priority: int = 0,
               max_retries: int = 0) -> Job:
        row = self.db.execute(
            "INSERT INTO jobs (kind, params, state, priority, max_retries, owner, created_at)"
            " VALUES (?, ?, 'queued', ?, ?, ?, ?) RETURNING *",
            [kind, json.dumps(params), priority, max_retries, owner, time.time()],
        )
        return self._job(row)

    def get(self, job_id: int) -> Job | None:
        return self._job(self.db.execute("SELECT * FROM jobs WHERE id = ?", [job_id]))

    def list(self, states: tuple[str, ...] = JOB_STATES, limit: int = 100) -> list[Job]:
        marks = ",".join("?" * len(states))
        cursor = self.db.execute(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id DESC LIMIT ?",
            [*states, limit],
        )
        return [Job.from_row(row) for row in _rows(cursor)]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATES, 0)
        for state, n in self.db.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
            counts[state] = n
        return counts

    def queued(self, limit: int = 1000) -> list[Job]:
        """The queued jobs in the order `claim` takes them: highest priority, then oldest."""
        cursor = self.db.execute(
            "SELECT * FROM jobs WHERE state = 'queued' ORDER BY priority DESC, id LIMIT ?",
            [limit],
        )
        return [Job.from_row(row) for row in _rows(cursor)]

    def claim(self, lease_seconds: float, job_id: int | None = None) -> Job | None:
        """Atomically take the queued job with the highest priority (oldest first), or job
        `job_id` if it is still queued (the pool places a job before it claims it)."""
        now = time.time()
        if job_id is None:
            target = ("SELECT id FROM jobs WHERE state = 'queued'"
                      " ORDER BY priority DESC, id LIMIT 1")
            values = [now, now + lease_seconds]
        else:
            target = "SELECT id FROM jobs WHERE state = 'queued' AND id = ?"
            values = [now, now + lease_seconds, job_id]
        return self._job(self.db.execute(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, device = NULL,"
            " worker_pid = NULL, started_at = coalesce(started_at, ?), lease_until = ?"
            f" WHERE id = ({target}) RETURNING *",
            values,
        ))

    def placed(self, job_id: int, attempt: int, device: str, pid: int,
               lease_seconds: float) -> bool:
        """Record where a claimed job's worker runs; its lease starts afresh with the worker."""
        return self._fenced("device = ?, worker_pid = ?, lease_until = ?", job_id, attempt,
                            [device, pid, time.time() + lease_seconds])

    def heartbeat(self, job_id: int, attempt: int, lease_seconds: float) -> bool:
        return self._fenced("lease_until = ?", job_id, attempt, [time.time() + lease_seconds])

    def progress(self, job_id: int, attempt: int, step: int, total: int,
                 metrics: dict | None = None) -> bool:
        progress = step / total if total else 0.0
        if metrics is None:
            return self._fenced("step = ?, total_steps = ?, progress = ?", job_id, attempt,
                                [step, total, progress])
        return self._fenced("step = ?, total_steps = ?, progress = ?, last_metrics = ?",
                            job_id, attempt, [step, total, progress, json.dumps(metrics)])

    def finish(self, job_id: int, attempt: int, state: str, result: dict | None = None,
               error: dict | None = None) -> bool:
        """End a running attempt; False if the attempt was superseded or already ended."""
        assert state in FINISHED_STATES
        return self._fenced(
            "state = ?, finished_at = ?, result = ?, error = ?, lease_until = NULL",
            job_id, attempt,
            [state, time.time(), _json(result), _json(error)],
        )

    def retry(self, job_id: int, attempt: int, error: dict) -> bool:
        """Queue a failed attempt again, to resume from its last checkpoint."""
        return self._fenced(
            "state = 'queued', failures = failures + 1, resume = 1, error = ?,"
            " lease_until = NULL, worker_pid = NULL",
            job_id, attempt, [_json(error)],
        )

    def request_cancel(self, job_id: int) -> Job | None:
        """Cancel a queued job at once; flag a running one (the daemon then stops its worker)."""
        now = time.time()
        with self._transaction():
            self.db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?,"
                " error = json_object('code', 'cancelled', 'message', 'cancelled while queued',"
                " 'hint', '') WHERE id = ? AND state = 'queued'",
                [now, job_id],
            )
            self.db.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'",
                [job_id],
            )
        return self.get(job_id)

    def recover(self) -> list[Job]:
        """Requeue the jobs a previous daemon left running, to resume from their checkpoints."""
        cursor = self.db.execute(
            "UPDATE jobs SET state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued'"
            " END, resume = 1, lease_until = NULL, worker_pid = NULL,"
            " finished_at = CASE WHEN cancel_requested THEN ? END"
            " WHERE state = 'running' RETURNING *",
            [time.time()],
        )
        return [Job.from_row(row) for row in _rows(cursor)]

    def expired(self) -> list[Job]:
        cursor = self.db.execute(
            "SELECT * FROM jobs WHERE state = 'running' AND lease_until < ?", [time.time()]
        )
        return [Job.from_row(row) for row in _rows(cursor)]

    def _fenced(self, assignments: str, job_id: int, attempt: int, values: list = ()) -> bool:
        cursor = self.db.execute(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND attempt = ? AND state = 'running'",
            [*values, job_id, attempt],
        )
        return cursor.rowcount == 1

    def _job(self, cursor: sqlite3.Cursor) -> Job | None:
        rows = _rows(cursor)
        return Job.from_row(rows[0]) if rows else None

    # ----- metrics and logs --------------------------------------------------------------------

    def add_metrics(self, job_id: int, attempt: int, point: dict) -> None:
        """Store a metric point; a resumed run's repeat of a step replaces the earlier one."""
        self.db.execute(
            "INSERT OR REPLACE INTO metrics (job_id, step, attempt, at, point)"
            " VALUES (?, ?, ?, ?, ?)",
            [job_id, int(point["step"]), attempt, time.time(), json.dumps(point)],
        )

    def metrics(self, job_id: int, since_step: int = -1, limit: int = 10_000) -> list[dict]:
        cursor = self.db.execute(
            "SELECT point FROM metrics WHERE job_id = ? AND step > ? ORDER BY step LIMIT ?",
            [job_id, since_step, limit],
        )
        return [json.loads(point) for (point,) in cursor]

    def add_log(self, job_id: int, attempt: int, message: str, level: str = "info") -> dict:
        row = self.db.execute(
            "INSERT INTO logs (job_id, attempt, at, level, message) VALUES (?, ?, ?, ?, ?)"
            " RETURNING id, at, level, message",
            [job_id, attempt, time.time(), level, message],
        )
        return _rows(row)[0]

    def logs(self, job_id: int, since_id: int = 0, limit: int = 1000) -> list[dict]:
        cursor = self.db.execute(
            "SELECT id, at, level, message FROM logs WHERE job_id = ? AND id > ?"
            " ORDER BY id LIMIT ?",
            [job_id, since_id, limit],
        )
        return _rows(cursor)

    # ----- corpora and audit -------------------------------------------------------------------

    def add_corpus(self, name: str, size: int, sha256: str, who: str) -> dict:
        record = {"name": name, "size": size, "sha256": sha256, "added_at": time.time(),
                  "added_by": who}
        self.db["corpora"].upsert(record, pk="name")
        return record

    def corpora(self) -> list[dict]:
        return list(self.db["corpora"].rows_where(order_by="name"))

    def audit(self, who: str, action: str, target: str = "", detail: dict | None = None) -> None:
        self.db.execute(
            "INSERT INTO audit (at, who, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            [time.time(), who, action, target, _json(detail)],
        )

    def audit_log(self, limit: int = 100) -> list[dict]:
        cursor = self.db.execute(
            "SELECT id, at, who, action, target, detail FROM audit ORDER BY id DESC LIMIT ?",
            [limit],
        )
        return _rows(cursor)

    def integrity_check(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]


def _rows(cursor: sqlite3.Cursor) -> list[dict]:
    names = [column[0] for column in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _json(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value, default=str)
