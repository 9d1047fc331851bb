"""What the TUI knows about the daemon: one cache that every screen reads, and signals that say
what changed.

The link (`tui.link`) writes here from events and from resync snapshots; widgets subscribe to the
signals and redraw from the cache. Keeping the data out of the widgets is what lets a screen open
with the history already there (a job's curve from before the screen existed), survive a
reconnect, and be filled with fixed data for snapshot tests.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from textual.dom import DOMNode
from textual.signal import Signal

HISTORY = 120  # readings kept for sparklines: two minutes at the daemon's 1 Hz
CURVES = 4  # the dashboard draws the loss of at most this many jobs


@dataclass
class Connection:
    connected: bool
    message: str


@dataclass(frozen=True)
class SessionEvent:
    """One event of an interactive session (`session.<id>`): a token of a run, or its end."""

    session: str
    content: dict


@dataclass
class GpuHistory:
    """The latest reading of one GPU (or of the CPU) and its recent utilization and memory."""

    reading: dict
    util: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    memory: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    def add(self, reading: dict) -> None:
        self.reading = reading
        self.util.append(reading.get("util_percent") or 0.0)
        used, total = reading.get("memory_used"), reading.get("memory_total")
        self.memory.append(100.0 * used / total if used is not None and total else 0.0)


class MetricSeries:
    """A job's metric points ordered by step. A resumed run sends some steps again; a repeated
    step replaces the old point, as the daemon's table does."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.points: list[dict] = []

    def add(self, point: dict) -> None:
        step = int(point["step"])
        if not self.steps or step > self.steps[-1]:
            self.steps.append(step)
            self.points.append(point)
            return
        index = bisect.bisect_left(self.steps, step)
        if index < len(self.steps) and self.steps[index] == step:
            self.points[index] = point
        else:
            self.steps.insert(index, step)
            self.points.insert(index, point)

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else -1

    def values(self, name: str) -> tuple[list[int], list[float]]:
        """The steps and values of one metric, skipping points that lack it."""
        pairs = [(s, p[name]) for s, p in zip(self.steps, self.points, strict=True)
                 if p.get(name) is not None]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]

    def __len__(self) -> int:
        return len(self.points)


class DaemonState:
    """The cache, owned by the app. Every `apply_*` updates it and publishes what changed."""

    def __init__(self, owner: DOMNode) -> None:
        self.connection = Connection(False, "connecting to mistudiod...")
        self.status: dict | None = None
        self.gpu_available = False
        self.gpu_reason: str | None = None
        self.gpus: dict[str, GpuHistory] = {}
        self.cpu: GpuHistory | None = None
        self.jobs: dict[int, dict] = {}
        self.metrics: dict[int, MetricSeries] = {}
        self.logs: dict[int, list[dict]] = {}
        self.connection_changed: Signal[Connection] = Signal(owner, "connection_changed")
        self.status_changed: Signal[dict] = Signal(owner, "status_changed")
        # the uuid of the one GPU that has a new reading, or None when the list itself changed
        self.gpus_changed: Signal[str | None] = Signal(owner, "gpus_changed")
        self.job_changed: Signal[dict] = Signal(owner, "job_changed")
        self.jobs_replaced: Signal[None] = Signal(owner, "jobs_replaced")
        self.metrics_added: Signal[int] = Signal(owner, "metrics_added")
        self.log_added: Signal[int] = Signal(owner, "log_added")
        self.session_event: Signal[SessionEvent] = Signal(owner, "session_event")

    # ----- connection and daemon ---------------------------------------------------------------

    def set_connection(self, connected: bool, message: str) -> None:
        if (connected, message) != (self.connection.connected, self.connection.message):
            self.connection = Connection(connected, message)
            self.connection_changed.publish(self.connection)

    def apply_status(self, status: dict) -> None:
        self.status = status
        gpus = status.get("gpus") or {}
        self.gpu_available = bool(gpus.get("available"))
        self.gpu_reason = gpus.get("reason")
        if status.get("cpu"):
            if self.cpu is None:
                self.cpu = GpuHistory(status["cpu"])
            self.cpu.add(status["cpu"])
        self.status_changed.publish(status)

    def apply_gpu_snapshot(self, snapshot: dict) -> None:
        """A whole `gpu.status` reply: the GPU list is replaced (a GPU may have gone)."""
        self.gpu_available = bool(snapshot.get("available"))
        self.gpu_reason = snapshot.get("reason")
        known = self.gpus
        self.gpus = {}
        for reading in snapshot.get("gpus", []):
            history = known.get(reading.get("uuid")) or GpuHistory(reading)
            history.add(reading)
            self.gpus[reading.get("uuid")] = history
        self.gpus_changed.publish(None)

    def apply_gpu(self, reading: dict) -> None:
        """One `gpu.<uuid>` event."""
        uuid = reading.get("uuid")
        known = uuid in self.gpus
        history = self.gpus.setdefault(uuid, GpuHistory(reading))
        history.add(reading)
        self.gpus_changed.publish(uuid if known else None)

    # ----- jobs --------------------------------------------------------------------------------

    def replace_jobs(self, jobs: list[dict]) -> None:
        """A resync's job list: jobs we no longer hear about are dropped, histories are kept."""
        for job in jobs:
            if _new_attempt(self.jobs.get(job["id"]), job):
                self.metrics.pop(job["id"], None)  # refetched whole (see `apply_job`)
        self.jobs = {job["id"]: _received(job) for job in jobs}
        self.jobs_replaced.publish(None)

    def apply_job(self, job: dict) -> bool:
        """A job's new state. True when it is a new attempt (a retry or a resume): the cached
        points are dropped then, and the caller refetches the whole series from the daemon,
        whose table the new attempt rewrites from its checkpoint on."""
        new_attempt = _new_attempt(self.jobs.get(job["id"]), job)
        if new_attempt:
            self.metrics.pop(job["id"], None)
        self.jobs[job["id"]] = _received(job)
        self.job_changed.publish(job)
        return new_attempt

    def apply_metrics(self, job_id: int, points: list[dict], *, live: bool = True) -> None:
        """New points. Streamed (`live`) ones also move the job's progress (the daemon sends no
        state event for a metric, to keep the stream small), by the newest of these points, not
        by the series' last step: after a resume the series still holds the earlier attempt's
        later steps until the new attempt reports them again. Fetched history leaves progress
        to the job as the daemon last described it, for the same reason."""
        if not points:
            return
        series = self.metrics.setdefault(job_id, MetricSeries())
        for point in points:
            series.add(point)
        if live:
            self._advance(job_id, points)
        self.metrics_added.publish(job_id)

    def _advance(self, job_id: int, points: list[dict]) -> None:
        newest = max(points, key=lambda point: int(point["step"]))
        step = int(newest["step"])
        job = self.jobs.get(job_id)
        if job is not None and job["state"] == "running" and step > (job["step"] or 0):
            job["step"] = step
            job["last_metrics"] = newest
            if job.get("total_steps"):
                job["progress"] = step / job["total_steps"]

    def apply_logs(self, job_id: int, entries: list[dict]) -> None:
        """Log entries, merged by their id: one already here is skipped (a resync may fetch
        some we streamed), an earlier one (the start of a log fetched after its tail streamed
        in) slots in before the later ones."""
        lines = self.logs.setdefault(job_id, [])
        last = lines[-1]["id"] if lines else 0
        ids = [entry["id"] for entry in entries]
        if all(a < b for a, b in zip([last, *ids], ids, strict=False)):  # the usual: new lines
            if not entries:
                return
            lines.extend(entries)
        else:
            known = {entry["id"] for entry in lines}
            fresh = {entry["id"]: entry for entry in entries if entry["id"] not in known}
            if not fresh:
                return
            lines.extend(fresh.values())
            lines.sort(key=lambda entry: entry["id"])
        self.log_added.publish(job_id)

    def last_log_id(self, job_id: int) -> int:
        lines = self.logs.get(job_id)
        return lines[-1]["id"] if lines else 0

    def series(self, job_id: int) -> MetricSeries:
        return self.metrics.get(job_id) or MetricSeries()

    def running_jobs(self) -> list[dict]:
        return [job for job in self.jobs.values() if job["state"] == "running"]

    def jobs_newest_first(self) -> list[dict]:
        return sorted(self.jobs.values(), key=lambda job: job["id"], reverse=True)

    # ----- interactive sessions ----------------------------------------------------------------

    def apply_session_event(self, event: SessionEvent) -> None:
        """Not cached: the screen that opened the session keeps its own view of the run, and
        the run's reply replaces that view whole (events may be dropped)."""
        self.session_event.publish(event)


def _new_attempt(old: dict | None, new: dict) -> bool:
    return old is not None and (new.get("attempt") or 0) > (old.get("attempt") or 0)


def _received(job: dict) -> dict:
    """The job with the local time it was read, so its elapsed time can keep counting between
    updates without comparing this machine's clock with the daemon's."""
    return {**job, "received_at": time.monotonic()}
