"""The worker pool: claims queued jobs, runs each in its own process, and settles the outcome.

Up to `max_jobs` workers run at once. A queued job is placed (mistudiod.placement) before it is
claimed, so a job that must wait for room on a GPU stays queued untouched, and the jobs behind
it that fit (a CPU job, a smaller one) start meanwhile. Each report a worker PUSHes (log lines,
metric points, progress, heartbeats, the final `done`) is checked against the attempt it was
started for, stored in the queue and republished on `job.<id>.log|metrics|state`. When a worker
exits the pool settles its job: `done` with a result means succeeded, with an error means failed
(a mistake in the job, which no retry would fix); an exit without `done` (a crash, the OOM
killer, a kill -9) fails the job with the exit status as the reason, or queues it again to
resume from its checkpoint while it has retries left. Nothing a worker does can stop the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from mistudio_core.errors import MistudioError
from mistudiod.gpus import gpu_devices, has_gpus, job_gpu_memory
from mistudiod.jobs import FEATURE_KINDS, UNITS
from mistudiod.placement import Placer, estimate_train_bytes
from mistudiod.queue import Job, JobQueue

log = logging.getLogger("mistudiod.workers")

Publish = Callable[[str, dict], None]
# Exit statuses of a worker that reported its own end (see mistudiod.worker.main).
_REPORTED_EXITS = (0, 1, 2, 130)
# What a worker runs; it reads its assignment as JSON on stdin.
WORKER_COMMAND = (sys.executable, "-m", "mistudiod.worker")


@dataclass
class Settings:
    max_jobs: int = 4
    lease_s: float = 60.0
    heartbeat_s: float = 5.0
    kill_grace_s: float = 10.0


_CANCELLED = {"code": "cancelled", "hint": "", "message": "cancelled while running"}


@dataclass
class RunningJob:
    job: Job
    process: asyncio.subprocess.Process
    log_path: Path
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: dict | None = None
    total: int = 0
    tokens_per_s: float = 0.0  # activations extracted and consumed per second, lately
    last_progress: tuple[float, int] | None = None  # (monotonic time, done) of the last report
    killed_reason: str | None = None  # why the daemon SIGKILLed the worker, once it has


class WorkerPool:
    """`gpu_snapshot` returns the GPU manager's latest reading (the daemon's 1 Hz snapshot),
    from which the placer takes each GPU's free memory and what our workers hold; `wake` asks
    the daemon's scheduler for another `fill` (a job ended or went back to the queue)."""

    def __init__(self, queue: JobQueue, publish: Publish, gpu_snapshot: Callable[[], dict],
                 key: str, endpoint: str, runs_dir: Path, settings: Settings,
                 on_finished: Callable[[Job, str], None] = lambda job, state: None,
                 wake: Callable[[], None] = lambda: None,
                 threads_per_job: int | None = None) -> None:
        self.queue = queue
        self.publish = publish
        self.gpu_snapshot = gpu_snapshot
        self.placer = Placer()
        self.key = key
        self.endpoint = endpoint
        self.runs_dir = runs_dir
        self.settings = settings
        self.on_finished = on_finished
        self.wake = wake
        self.threads_per_job = threads_per_job
        self.running: dict[int, RunningJob] = {}
        self.stopping = False
        self._filling = asyncio.Lock()
        self._starting: set[int] = set()  # claimed, its worker being spawned: not running yet
        # queued train job -> its preflight bytes, and its split over GPUs when it needs one
        self._estimates: dict[int, tuple[int | None, dict[str, int] | None]] = {}
        self._waiting: set[int] = set()  # queued jobs told they wait for room
        self._tasks: set[asyncio.Task] = set()

    def owners(self) -> dict[int, int]:
        """Worker pid -> job id, for the GPU panel's process list."""
        return {r.process.pid: job_id for job_id, r in self.running.items()}

    def throughputs(self) -> dict[int, float]:
        """Job id -> tokens per second of its latest metric point."""
        return {job_id: r.tokens_per_s for job_id, r in self.running.items()}

    def running_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.running.values():
            counts[r.job.kind] = counts.get(r.job.kind, 0) + 1
        return counts

    # ----- starting jobs -----------------------------------------------------------------------

    async def fill(self) -> None:
        """Start queued jobs, in queue order, while there are free slots: each one that has room
        on a device now; one that must wait for room lets the jobs behind it start."""
        async with self._filling:
            queued = self.queue.queued()
            for job in queued:
                if self.stopping or len(self.running) >= self.settings.max_jobs:
                    break
                ahead = self._ahead_on_same_sae(job, queued)
                if ahead is not None:
                    if job.id not in self._waiting:
                        self._waiting.add(job.id)
                        self._log(job, f"waiting for job {ahead}, on the same SAE's features")
                    continue
                await self._try_start(job)
            ids = {job.id for job in queued}
            self._estimates = {i: e for i, e in self._estimates.items() if i in ids}
            self._waiting &= ids

    def _ahead_on_same_sae(self, job: Job, queued: list[Job]) -> int | None:
        """An earlier job, running or queued, on the features of the SAE that `job` works on.

        find writes the features that explain reads, explain the explanations that score and
        correlate read: jobs on one SAE's features run in the order they were submitted, so a
        pipeline submitted at once (`--detach`) works whatever the number of slots."""
        if job.kind not in FEATURE_KINDS:
            return None
        earlier = [r.job for r in self.running.values()] + [j for j in queued if j.id < job.id]
        return next((j.id for j in earlier if j.kind in FEATURE_KINDS
                     and j.params.get("sae_dir") == job.params.get("sae_dir")), None)

    async def _try_start(self, job: Job) -> None:
        """Place a queued job, then claim and start it; a job that can never run fails."""
        claimed = None
        try:
            device = await self._place(job)
            if device is None:  # no room now: it stays queued until a running job ends
                if job.id not in self._waiting:
                    self._waiting.add(job.id)
                    self._log(job, "waiting for room on a GPU: the jobs running there need "
                                   "its memory")
                return
            # a cancel while it was placed finds it queued and cancels it: nothing to claim
            claimed = None if self.stopping else self.queue.claim(self.settings.lease_s,
                                                                   job.id)
            if claimed is None:
                self.placer.release(job.id)
                return
            await self._start(claimed, device)
        except MistudioError as error:  # it can never run as asked
            self.placer.release(job.id)
            self._fail_to_start(claimed, job, error.to_dict())
        except Exception as error:  # the machine or a bug: this job fails, not the pool
            log.exception("job %d could not be started", job.id)
            self.placer.release(job.id)
            self._fail_to_start(claimed, job, {
                "code": "job_failed", "hint": "the daemon's log has the traceback",
                "message": f"could not start the job: {type(error).__name__}: {error}"})

    def _fail_to_start(self, claimed: Job | None, job: Job, error: dict) -> None:
        claimed = claimed or self.queue.claim(self.settings.lease_s, job.id)
        if claimed is not None:  # else it was cancelled meanwhile
            self._settle(claimed, "failed", error=error)

    async def _place(self, job: Job) -> str | None:
        requested = job.params["device"]
        snapshot = self.gpu_snapshot()
        count = job.params.get("gpus", 1) if job.kind == "train" else 1
        if requested == "cpu" or not has_gpus(snapshot):  # the placer says cpu, or no such GPU
            return self.placer.place(job.id, requested, None, [], count=count)
        # the device list imports torch and the estimate reads a config: off the event loop
        devices, (need, split) = await asyncio.to_thread(self._devices_and_need, job, snapshot)
        return self.placer.place(job.id, requested, need, devices, job_gpu_memory(snapshot),
                                 count, split)

    def _devices_and_need(self, job: Job, snapshot: dict) -> tuple[list, tuple]:
        """The snapshot's GPUs and what the job needs on one, or its split over several
        (estimated once per job)."""
        devices = gpu_devices(snapshot)
        if job.kind != "train":
            return devices, (None, None)
        if job.id not in self._estimates:
            self._estimates[job.id] = estimate_train_bytes(job.params, devices)
        return devices, self._estimates[job.id]

    async def _start(self, job: Job, device: str) -> None:
        params = {**job.params, "device": device}
        if job.kind == "train" and not params.get("out"):
            params["out"] = str(self.runs_dir / f"job-{job.id}")
        log_path = self.runs_dir / "logs" / f"job-{job.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        spec = {"key": self.key, "endpoint": self.endpoint, "job_id": job.id,
                "attempt": job.attempt, "kind": job.kind, "params": params,
                "resume": job.resume, "heartbeat_s": self.settings.heartbeat_s,
                "threads": self.threads_per_job if device == "cpu" else None,
                "parent_pid": os.getpid()}
        self._starting.add(job.id)
        try:
            with open(log_path, "ab") as stderr:
                process = await asyncio.create_subprocess_exec(
                    *WORKER_COMMAND, stdin=asyncio.subprocess.PIPE, stdout=stderr,
                    stderr=stderr, env=worker_environment(),
                )
        finally:
            self._starting.discard(job.id)
        if self.stopping:  # the daemon began to stop meanwhile: the job resumes at the next start
            _signal(process, signal.SIGKILL)
            return
        running = RunningJob(job, process, log_path)
        self.running[job.id] = running  # watched from now on, whatever happens next
        self.queue.placed(job.id, job.attempt, device, process.pid, self.settings.lease_s)
        spawn(self._tasks, self._watch(running))
        process.stdin.write(json.dumps(spec).encode())
        await process.stdin.drain()
        process.stdin.close()
        note = "resuming from its last checkpoint" if job.resume else "starting"
        self._log(job, f"attempt {job.attempt} {note} on {device} (worker pid {process.pid})")
        self._publish_state(job.id)
        current = self.queue.get(job.id)
        if current is not None and current.cancel_requested:  # cancelled while it started
            self.stop_job(job.id)

    # ----- reports -----------------------------------------------------------------------------

    def on_report(self, content: dict) -> None:
        """Handle one worker report; reports of a superseded attempt are ignored."""
        running = self.running.get(content.get("job_id"))
        if running is None or content.get("attempt") != running.job.attempt:
            log.debug("ignored a report of a superseded attempt: %s", content.get("job_id"))
            return
        job, kind, payload = running.job, content.get("kind"), content.get("payload") or {}
        self.queue.heartbeat(job.id, job.attempt, self.settings.lease_s)  # any report is alive
        if kind == "start":
            running.total = int(payload.get("total") or 0)
            self.queue.progress(job.id, job.attempt, 0, running.total)
            self._publish_state(job.id)
        elif kind == "log":
            self._log(job, str(payload.get("message", "")), str(payload.get("level", "info")))
        elif kind == "metrics":
            self.queue.add_metrics(job.id, job.attempt, payload)
            running.tokens_per_s = float(payload.get("tokens_per_s", 0.0))
            self.queue.progress(job.id, job.attempt, int(payload["step"]), running.total,
                                payload)
            self.publish(f"job.{job.id}.metrics", {"job_id": job.id, "point": payload})
        elif kind == "progress":  # tokens read or features done, out of the latest total
            done = int(payload.get("done", payload.get("tokens", 0)))
            running.total = int(payload.get("total") or running.total)
            self._measure_throughput(running, done)
            self.queue.progress(job.id, job.attempt, done, running.total)
            self._publish_state(job.id)
        elif kind == "checkpoint":
            self._log(job, f"checkpoint at step {payload.get('step')}")
        elif kind == "done":
            running.outcome = payload
            running.done.set()

    @staticmethod
    def _measure_throughput(running: RunningJob, done: int) -> None:
        """Tokens per second between a token-counting job's last two progress reports (find
        and eval read the model's activations as training does: the extraction gauge)."""
        if UNITS.get(running.job.kind) != "tok":
            return
        now = time.monotonic()
        if running.last_progress is not None:
            then, before = running.last_progress
            if now > then and done >= before:
                running.tokens_per_s = (done - before) / (now - then)
        running.last_progress = (now, done)

    def _log(self, job: Job, message: str, level: str = "info") -> None:
        entry = self.queue.add_log(job.id, job.attempt, message, level)
        self.publish(f"job.{job.id}.log", {"job_id": job.id, **entry})

    def _publish_state(self, job_id: int) -> None:
        job = self.queue.get(job_id)
        if job is not None:
            self.publish(f"job.{job_id}.state", {"job": job.to_dict()})

    # ----- ends --------------------------------------------------------------------------------

    async def _watch(self, running: RunningJob) -> None:
        status = await running.process.wait()
        if status in _REPORTED_EXITS and not running.done.is_set():
            # the last reports may still be on their way through the socket
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(running.done.wait(), timeout=2.0)
        if self.stopping:  # the daemon is shutting down: the job resumes at the next start
            return
        self.running.pop(running.job.id, None)
        self.placer.release(running.job.id)
        self._conclude(running, status)
        self.wake()  # its slot and its memory are free

    def _conclude(self, running: RunningJob, status: int) -> None:
        job = self.queue.get(running.job.id)
        outcome = running.outcome
        if job.cancel_requested:
            self._settle(job, "cancelled", error=_CANCELLED)
        elif outcome is not None and outcome.get("ok"):
            self._settle(job, "succeeded", result=outcome.get("result"))
        elif outcome is not None and outcome["error"]["code"] != "out_of_memory":
            self._settle(job, "failed", error=outcome["error"])
        else:
            self._retry_or_fail(job, outcome["error"] if outcome
                                else _crash(status, running.log_path, running.killed_reason))

    def _retry_or_fail(self, job: Job, error: dict) -> None:
        """A crash: resume from the checkpoint while retries are left, else fail (a job whose
        cancel was asked for is cancelled instead)."""
        if job.cancel_requested:
            self._settle(job, "cancelled", error=_CANCELLED)
        elif job.failures < job.max_retries:
            if not self.queue.retry(job.id, job.attempt, error):
                return  # superseded or already ended: nothing was retried
            self._log(job, f"{error['message']}; retrying from the last checkpoint "
                           f"({job.failures + 1} of {job.max_retries} retries)", "warning")
            self._publish_state(job.id)
            self.wake()
        else:
            self._settle(job, "failed", error=error)

    def _settle(self, job: Job, state: str, result: dict | None = None,
                error: dict | None = None) -> None:
        if not self.queue.finish(job.id, job.attempt, state, result, error):
            return
        message = f"job {state}" + (f": {error['message']}" if error else "")
        self._log(job, message, "info" if state == "succeeded" else "warning")
        self._publish_state(job.id)
        self.on_finished(job, state)

    # ----- cancel, leases, shutdown ------------------------------------------------------------

    def stop_job(self, job_id: int) -> None:
        """SIGTERM a running job's worker, then SIGKILL it if it has not ended in time."""
        running = self.running.get(job_id)
        if running is not None:
            _signal(running.process, signal.SIGTERM)
            spawn(self._tasks, self._kill_later(running))

    async def _kill_later(self, running: RunningJob) -> None:
        try:
            await asyncio.wait_for(running.process.wait(), self.settings.kill_grace_s)
        except TimeoutError:
            self._kill(running, f"it did not stop within {self.settings.kill_grace_s:g} s of "
                                "SIGTERM")

    def _kill(self, running: RunningJob, reason: str) -> None:
        """SIGKILL a worker once, saying why in the job's log and later in its error."""
        if running.killed_reason is not None:  # killed already, not reaped yet
            return
        running.killed_reason = reason
        self._log(running.job, f"{reason}; killing the worker", "warning")
        _signal(running.process, signal.SIGKILL)

    def check_leases(self) -> None:
        """Kill workers whose heartbeats stopped (their jobs then fail or retry as crashes);
        a running job with no worker at all is settled as one at once."""
        for job in self.queue.expired():
            running = self.running.get(job.id)
            if running is not None:
                self._kill(running, "the worker stopped sending heartbeats")
            elif job.id not in self._starting and not self.stopping:
                self._retry_or_fail(job, {"code": "worker_crashed", "hint": "",
                                          "message": "the job lost its worker"})

    async def stop(self) -> None:
        """Stop every worker (their jobs stay `running` and resume at the next start)."""
        self.stopping = True
        for running in self.running.values():
            _signal(running.process, signal.SIGTERM)
        waits = [r.process.wait() for r in self.running.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.settings.kill_grace_s)
        except TimeoutError:
            for running in self.running.values():
                _signal(running.process, signal.SIGKILL)
        for task in list(self._tasks):
            task.cancel()


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)


def spawn(tasks: set[asyncio.Task], coroutine: Coroutine) -> asyncio.Task:
    """Run `coroutine` as a task held in `tasks` until it ends; its failure is logged, not lost
    with the task."""
    task = asyncio.get_running_loop().create_task(coroutine)
    tasks.add(task)

    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed", exc_info=task.exception())

    task.add_done_callback(done)
    return task


def _crash(status: int, log_path: Path, killed_reason: str | None = None) -> dict:
    """The error of a worker that ended without reporting why (`killed_reason`: the daemon
    killed it, and why)."""
    if status < 0:
        name = _signal_name(-status)
        if killed_reason is not None and -status == signal.SIGKILL:
            cause = f" (by the daemon: {killed_reason})"
        elif -status == signal.SIGKILL:
            cause = " (the kernel's OOM killer sends SIGKILL when memory runs out)"
        else:
            cause = ""
        message = f"the worker process was killed by {name}{cause}"
    else:
        message = f"the worker process exited with status {status} without a report"
    return {"code": "worker_crashed", "message": message,
            "hint": f"its output is in {log_path}; `mistudio job logs` has the job's log"}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return f"signal {number}"


def worker_environment() -> dict[str, str]:
    """The daemon's environment without systemd's notify and watchdog variables, which are
    the daemon's alone."""
    private = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    environment = {name: value for name, value in os.environ.items() if name not in private}
    # CUDA numbers GPUs as NVML (the placer's list) does: by PCI bus, not fastest first.
    return {**environment, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def cpu_threads_per_job(max_jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // max_jobs)
