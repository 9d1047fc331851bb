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


@dataclass
class Connection:
    connected: bool
    message: str


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
        self.gpus_changed: Signal[None] = Signal(owner, "gpus_changed")
        self.job_changed: Signal[dict] = Signal(owner, "job_changed")
        self.jobs_replaced: Signal[None] = Signal(owner, "jobs_replaced")
        self.metrics_added: Signal[int] = Signal(owner, "metrics_added")
        self.log_added: Signal[int] = Signal(owner, "log_added")

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
        history = self.gpus.setdefault(reading.get("uuid"), GpuHistory(reading))
        history.add(reading)
        self.gpus_changed.publish(None)

    # ----- jobs --------------------------------------------------------------------------------

    def replace_jobs(self, jobs: list[dict]) -> None:
        """A resync's job list: jobs we no longer hear about are dropped, histories are kept."""
        self.jobs = {job["id"]: _received(job) for job in jobs}
        self.jobs_replaced.publish(None)

    def apply_job(self, job: dict) -> None:
        self.jobs[job["id"]] = _received(job)
        self.job_changed.publish(job)

    def apply_metrics(self, job_id: int, points: list[dict]) -> None:
        """New points; they also move the job's progress (the daemon sends no state event for
        a metric, to keep the stream small)."""
        if not points:
            return
        series = self.metrics.setdefault(job_id, MetricSeries())
        for point in points:
            series.add(point)
        job = self.jobs.get(job_id)
        if job is not None and job["state"] == "running" and series.last_step > (job["step"] or 0):
            job["step"] = series.last_step
            job["last_metrics"] = series.points[-1]
            if job.get("total_steps"):
                job["progress"] = series.last_step / job["total_steps"]
        self.metrics_added.publish(job_id)

    def apply_logs(self, job_id: int, entries: list[dict]) -> None:
        """Log entries, deduplicated by their id (a resync may fetch some we streamed)."""
        lines = self.logs.setdefault(job_id, [])
        last = lines[-1]["id"] if lines else 0
        fresh = [entry for entry in entries if entry["id"] > last]
        if fresh:
            lines.extend(fresh)
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

    def gpu_of_job(self, job_id: int) -> dict | None:
        """The GPU a job's worker has memory on, from the GPUs' process lists."""
        for history in self.gpus.values():
            for process in history.reading.get("processes") or []:
                if process.get("job_id") == job_id:
                    return history.reading
        return None


def _received(job: dict) -> dict:
    """The job with the local time it was read, so its elapsed time can keep counting between
    updates without comparing this machine's clock with the daemon's."""
    return {**job, "received_at": time.monotonic()}
