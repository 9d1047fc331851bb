"""The worker pool against a real queue: placing before claiming, cancels that race a start,
leases, retries and reports. Workers are fakes (or `sleep`), so nothing here imports a model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import threading

import pytest

from mistudio_core.errors import MistudioError
from mistudiod import workers
from mistudiod.gpus import gpu_devices
from mistudiod.jobs import validate_params
from mistudiod.queue import JobQueue
from mistudiod.workers import RunningJob, Settings, WorkerPool, spawn

GiB = 2**30
NO_GPUS = {"available": False, "reason": "no NVIDIA GPU found", "gpus": []}


def gpu_snapshot(free_gib: int) -> dict:
    return {"available": True, "reason": None, "gpus": [
        {"index": 0, "name": "GPU", "memory_free": free_gib * GiB, "memory_total": 80 * GiB,
         "processes": []}]}


class Pool(WorkerPool):
    """A pool that records what it publishes, its wake-ups and (unless `real_start`) the workers
    it would start instead of starting them."""

    def __init__(self, queue: JobQueue, tmp_path, snapshot: dict = NO_GPUS,
                 real_start: bool = False) -> None:
        super().__init__(queue, self._publish, lambda: snapshot, "k" * 40, "ipc://unused",
                         tmp_path, Settings(max_jobs=4, kill_grace_s=5), wake=self._wake)
        self.published: list[str] = []
        self.wakes = 0
        self.started: list[tuple[int, int, str]] = []
        self.real_start = real_start

    def _publish(self, topic: str, content: dict) -> None:
        self.published.append(topic)

    def _wake(self) -> None:
        self.wakes += 1

    async def _start(self, job, device) -> None:
        if self.real_start:
            return await super()._start(job, device)
        self.started.append((job.id, job.attempt, device))


class FakeProcess:
    pid = 4242

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.returncode: int | None = None

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        self.returncode = -signum

    async def wait(self) -> int:
        return self.returncode


def running_job(pool: Pool, queue: JobQueue, tmp_path, lease_s: float = 60,
                **options) -> RunningJob:
    queue.submit("train", {"device": "cpu"}, "u", **options)
    job = queue.claim(lease_s)
    running = RunningJob(job, FakeProcess(), tmp_path / "job.log")
    pool.running[job.id] = running
    return running


def test_a_job_without_room_waits_untouched_and_the_jobs_behind_it_start(queue, tmp_path,
                                                                          monkeypatch):
    needs = {"big": 40 * GiB, "small": 5 * GiB}
    estimated = []

    def estimate(params, devices):
        assert [d.name for d in devices] == ["cuda:0"]  # the snapshot's GPUs
        estimated.append(params["model"])
        return needs[params["model"]], None

    monkeypatch.setattr(workers, "estimate_train_bytes", estimate)
    pool = Pool(queue, tmp_path, gpu_snapshot(free_gib=30))
    big = queue.submit("train", {"device": "auto", "model": "big"}, "u", priority=1)
    cpu = queue.submit("train", {"device": "cpu", "model": "big"}, "u")
    small = queue.submit("train", {"device": "auto", "model": "small"}, "u")

    async def twice():
        await pool.fill()
        await pool.fill()  # the scheduler's next round: nothing changed

    asyncio.run(twice())
    assert pool.started == [(cpu.id, 1, "cpu"), (small.id, 1, "cuda:0")]
    waiting = queue.get(big.id)
    assert (waiting.state, waiting.attempt, waiting.started_at) == ("queued", 0, None)
    assert estimated == ["big", "small"]  # once per job, the CPU job never
    assert [e["message"] for e in queue.logs(big.id)] == [
        "waiting for room on a GPU: the jobs running there need its memory"]


def test_a_job_bigger_than_any_gpu_fails_at_once(queue, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "estimate_train_bytes",
                        lambda params, devices: (100 * GiB, None))
    pool = Pool(queue, tmp_path, gpu_snapshot(free_gib=80))
    job = queue.submit("train", {"device": "auto", "model": "huge"}, "u")
    asyncio.run(pool.fill())
    failed = queue.get(job.id)
    assert failed.state == "failed" and failed.error["code"] == "out_of_memory"
    assert pool.started == []


def test_a_cancel_while_the_job_is_placed_cancels_it(queue, tmp_path, monkeypatch):
    placing, go_on = threading.Event(), threading.Event()

    def slow_estimate(params, devices):  # a config read from the hub, say
        placing.set()
        go_on.wait(10)
        return 30 * GiB, None

    monkeypatch.setattr(workers, "estimate_train_bytes", slow_estimate)
    pool = Pool(queue, tmp_path, gpu_snapshot(free_gib=30))
    job = queue.submit("train", {"device": "auto", "model": "m"}, "u")

    async def scenario():
        fill = asyncio.create_task(pool.fill())
        await asyncio.to_thread(placing.wait, 10)
        queue.request_cancel(job.id)  # what `job.cancel` does meanwhile
        go_on.set()
        await fill

    asyncio.run(scenario())
    cancelled = queue.get(job.id)
    assert (cancelled.state, cancelled.attempt) == ("cancelled", 0)
    assert pool.started == []
    # its reservation was given back: all 30 GiB are free for the next job
    assert pool.placer.place(99, "auto", 30 * GiB, gpu_devices(gpu_snapshot(30))) == "cuda:0"


def test_a_cancel_while_the_worker_starts_stops_it(queue, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "WORKER_COMMAND", ("sleep", "30"))
    pool = Pool(queue, tmp_path, real_start=True)
    job = queue.submit("eval", {"device": "cpu"}, "u")
    placed = queue.placed

    def cancelled_meanwhile(job_id, *args):
        queue.request_cancel(job_id)  # the cancel that came while the worker was spawned
        return placed(job_id, *args)

    monkeypatch.setattr(queue, "placed", cancelled_meanwhile)

    async def scenario():
        await pool.fill()
        try:
            for _ in range(100):
                if not pool.running:
                    return
                await asyncio.sleep(0.05)
        finally:
            for running in pool.running.values():
                running.process.kill()

    asyncio.run(scenario())
    assert queue.get(job.id).state == "cancelled"
    assert pool.wakes == 1


def test_eval_progress_counts_against_its_own_total(queue, tmp_path):
    pool = Pool(queue, tmp_path)
    job = running_job(pool, queue, tmp_path).job

    def report(kind: str, payload: dict) -> None:
        pool.on_report({"job_id": job.id, "attempt": job.attempt, "kind": kind,
                        "payload": payload})

    report("start", {"total": 16})  # training steps
    report("progress", {"tokens": 300, "total": 1200})  # the evaluation's tokens
    progress = queue.get(job.id)
    assert (progress.step, progress.total_steps, progress.progress) == (300, 1200, 0.25)


def test_a_silent_worker_is_killed_once_and_its_error_says_why(queue, tmp_path):
    pool = Pool(queue, tmp_path)
    running = running_job(pool, queue, tmp_path, lease_s=-1)
    job = running.job
    pool.check_leases()
    pool.check_leases()  # not reaped yet: no second kill, no second log line
    assert running.process.signals == [signal.SIGKILL]
    assert [e["message"] for e in queue.logs(job.id)] == [
        "the worker stopped sending heartbeats; killing the worker"]
    asyncio.run(pool._watch(running))
    failed = queue.get(job.id)
    assert failed.state == "failed" and failed.error["code"] == "worker_crashed"
    assert "by the daemon: the worker stopped sending heartbeats" in failed.error["message"]
    assert "OOM" not in failed.error["message"]
    assert pool.running == {} and pool.wakes == 1


def test_a_retry_that_retried_nothing_says_nothing(queue, tmp_path):
    pool = Pool(queue, tmp_path)
    queue.submit("train", {}, "u", max_retries=2)
    job = queue.claim(60)
    error = {"code": "worker_crashed", "message": "the job lost its worker", "hint": ""}
    pool._retry_or_fail(dataclasses.replace(job, attempt=job.attempt - 1), error)  # superseded
    assert (queue.logs(job.id), pool.published, pool.wakes) == ([], [], 0)
    assert queue.get(job.id).state == "running"
    pool._retry_or_fail(job, error)
    assert queue.get(job.id).state == "queued" and pool.wakes == 1
    assert "retrying from the last checkpoint" in queue.logs(job.id)[0]["message"]


def test_a_workerless_job_whose_cancel_was_asked_is_cancelled_not_retried(queue, tmp_path):
    pool = Pool(queue, tmp_path)
    queue.submit("train", {}, "u", max_retries=2)
    job = queue.claim(lease_seconds=-1)
    queue.request_cancel(job.id)
    pool.check_leases()
    assert queue.get(job.id).state == "cancelled"


def test_a_failed_internal_task_is_logged(caplog):
    async def scenario():
        tasks: set[asyncio.Task] = set()

        async def broken():
            raise RuntimeError("lost in a task")

        task = spawn(tasks, broken())
        with contextlib.suppress(RuntimeError):
            await task
        await asyncio.sleep(0)
        return tasks

    assert asyncio.run(scenario()) == set()
    assert "internal task failed" in caplog.text and "lost in a task" in caplog.text


_TRAIN = {"model": "demo", "hook": "layers.1.resid_post", "corpus": "demo"}


@pytest.mark.parametrize(("changes", "field"), [
    ({"tokens": 255, "batch_tokens": 256}, "tokens"),
    ({"lr": 0}, "lr"),
    ({"lr": 1}, "lr"),
    ({"context_size": (1 << 16) + 1}, "context_size"),
])
def test_a_job_the_worker_would_refuse_is_refused_before_it_is_queued(changes, field):
    with pytest.raises(MistudioError) as caught:
        validate_params("train", {**_TRAIN, **changes})
    assert caught.value.field == field and caught.value.hint


def test_the_limits_are_the_cores():
    from mistudio_core.activations import ExtractionConfig
    from mistudio_core.train import TrainConfig

    params = validate_params("train", {**_TRAIN, "tokens": 256, "batch_tokens": 256,
                                       "lr": 0.999, "context_size": 1 << 16})
    TrainConfig(total_tokens=params["tokens"], batch_tokens=params["batch_tokens"],
                lr=params["lr"])
    ExtractionConfig(context_size=params["context_size"])


def test_a_worker_on_several_gpus_sees_them_first_placed_first():
    from mistudiod.worker import _on_visible_gpus

    env = {}
    spec = _on_visible_gpus({"params": {"device": "cuda:3,cuda:1", "k": 4}}, env)
    assert env == {"CUDA_VISIBLE_DEVICES": "3,1"}
    assert spec["params"] == {"device": "auto", "k": 4}  # the loader splits over them
    assert _on_visible_gpus({"params": {"device": "cuda:2,cuda:0"}}, env,
                            device="cuda")["params"]["device"] == "cuda"  # torchrun's ranks
