"""The TUI's one connection to the daemon: follows events into the state, resyncs when the
stream cannot be trusted, and reconnects by itself.

It runs as a Textual worker in the app's event loop and never blocks it: every socket is a
pyzmq asyncio socket, so a daemon that is slow or gone costs the UI nothing but a status line.
The daemon publishes `daemon.status` every second; a silence of `QUIET_AFTER_S` means it is gone,
and the link says "disconnected, retrying" and reconnects with back-off (rereading the connection
file: a restarted daemon has a new key). The client marks an event `resync` after a gap in a
topic's sequence numbers or from a daemon session it has not seen (the first event of every
connection), and a resync re-reads the daemon's status, GPUs, job list and the history of the
jobs whose curves are on screen, so nothing shown is stale or has holes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import zmq

from mistudio_core.errors import MistudioError
from mistudiod.client import Client, Event
from tui.state import DaemonState

QUIET_AFTER_S = 3.5
REQUEST_TIMEOUT_S = 10.0
MAX_RETRY_DELAY_S = 4.0
JOB_LIST_LIMIT = 500


class DaemonLink:
    def __init__(self, state: DaemonState, runtime_dir: str | Path | None = None,
                 *, tcp: bool = False) -> None:
        self.state = state
        self.runtime_dir = runtime_dir
        self.tcp = tcp
        self.client: Client | None = None
        self.watched: set[int] = set()  # jobs whose whole history a screen shows
        self.resyncs = 0

    # ----- requests for screens ----------------------------------------------------------------

    async def request(self, msg_type: str, content: dict | None = None, *,
                      buffers: list = (), timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """A request to the daemon; MistudioError when it refuses or cannot be reached."""
        if self.client is None or not self.state.connection.connected:
            raise MistudioError("not connected to the daemon", code="no_daemon",
                                hint="the TUI reconnects by itself once mistudiod is running")
        return await self.client.request(msg_type, content, buffers=buffers, timeout=timeout)

    async def watch_job(self, job_id: int) -> None:
        """Keep a job's whole history: fetch what came before (a chart opened late still starts
        at step 0) and keep it through resyncs."""
        self.watched.add(job_id)
        if self.client is not None and self.state.connection.connected:
            if job_id not in self.state.jobs:  # older than the job list we keep
                self.state.apply_job((await self.request("job.show", {"id": job_id}))["job"])
            await self._fetch_history(job_id, logs=True)

    async def upload_corpus(self, path: str,
                            on_progress: Callable[[int, int], None] | None = None) -> dict:
        """Upload a local file as a corpus (see `Client.upload_corpus`)."""
        await self.request("daemon.health")  # fails plainly when disconnected
        return await self.client.upload_corpus(path, on_progress=on_progress)

    def unwatch_job(self, job_id: int) -> None:
        self.watched.discard(job_id)

    # ----- the connection loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Connect, follow, and on silence or error reconnect; until the app ends."""
        delay = 0.25
        while True:
            try:
                if self.client is None:
                    self.client = Client(self.runtime_dir, tcp=self.tcp, timeout=REQUEST_TIMEOUT_S)
                    self.client.subscribe("daemon.status", "gpu.", "job.")
                else:
                    self.client.reconnect()
                await self._follow(self.client)
                reason = "the daemon stopped answering"
            except MistudioError as error:
                reason = error.message
            except zmq.ZMQError as error:
                reason = str(error)
            delay = 0.25 if self.state.connection.connected else min(2 * delay,
                                                                     MAX_RETRY_DELAY_S)
            self.state.set_connection(False, f"disconnected ({reason}), retrying")
            await asyncio.sleep(delay)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def _follow(self, client: Client) -> None:
        """Apply events until the daemon goes quiet; resync whenever the stream says so."""
        while (event := await client.next_event(timeout=QUIET_AFTER_S)) is not None:
            if event.resync:
                await self._resync(client)
            self._apply(event)

    async def _resync(self, client: Client) -> None:
        state = self.state
        status = await client.request("daemon.status")
        state.apply_status(status)
        state.apply_gpu_snapshot(await client.request("gpu.status"))
        state.replace_jobs((await client.request("job.list", {"limit": JOB_LIST_LIMIT}))["jobs"])
        for job in state.running_jobs():
            await self._fetch_history(job["id"], logs=job["id"] in self.watched)
        for job_id in self.watched - {job["id"] for job in state.running_jobs()}:
            await self._fetch_history(job_id, logs=True)
        self.resyncs += 1
        state.set_connection(True, f"connected to mistudiod {status.get('version', '')} "
                                   f"(pid {status.get('pid')})")

    async def _fetch_history(self, job_id: int, *, logs: bool) -> None:
        state, client = self.state, self.client
        try:
            points = await client.request("job.metrics", {
                "id": job_id, "since_step": state.series(job_id).last_step})
            state.apply_metrics(job_id, points["points"])
            if logs:
                entries = await client.request("job.logs", {
                    "id": job_id, "since": state.last_log_id(job_id)})
                state.apply_logs(job_id, entries["logs"])
        except MistudioError as error:
            if error.code != "not_found":  # a job the daemon no longer has: nothing to show
                raise

    def _apply(self, event: Event) -> None:
        topic, content, state = event.topic, event.content, self.state
        if topic == "daemon.status":
            state.apply_status(content)
        elif topic.startswith("gpu."):
            state.apply_gpu(content)
        elif topic.endswith(".state"):
            state.apply_job(content["job"])
        elif topic.endswith(".metrics"):
            state.apply_metrics(content["job_id"], [content["point"]])
        elif topic.endswith(".log"):
            job_id = content["job_id"]
            state.apply_logs(job_id, [{k: v for k, v in content.items() if k != "job_id"}])
