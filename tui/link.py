"""The TUI's one connection to the daemon: follows events into the state, resyncs when the
stream cannot be trusted, and reconnects by itself.

It runs as a Textual worker in the app's event loop and never blocks it: every socket is a
pyzmq asyncio socket, so a daemon that is slow or gone costs the UI nothing but a status line.
The daemon publishes `daemon.status` every second; a silence of `QUIET_AFTER_S` means it is gone,
and the link says "disconnected, retrying" and reconnects with back-off (rereading the connection
file: a restarted daemon has a new key). The client marks an event `resync` after a gap in a
topic's sequence numbers or from a daemon session it has not seen (the first event of every
connection), and the link resyncs on that event and on the first event after every
(re)connect: it re-reads the daemon's status, GPUs, job list and the history of the jobs whose
curves are on screen (the running ones, the watched ones, and the latest finished ones that the
dashboard falls back to), so nothing shown is stale or has holes. Logs are kept only for the
jobs a screen watches.

The monitor and steer screens follow their interactive sessions' events (`session.<id>`) through
the same connection (`follow_session`): the link passes them on as the state's `session_event`
and closes the sessions still open when the TUI quits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import zmq

from mistudio_core.errors import MistudioError
from mistudiod.client import Client, Event
from mistudiod.protocol import FINISHED_STATES
from tui.state import CURVES, DaemonState, SessionEvent

QUIET_AFTER_S = 3.5
REQUEST_TIMEOUT_S = 10.0
MAX_RETRY_DELAY_S = 4.0
CLOSE_TIMEOUT_S = 2.0  # per session still open when the TUI quits
JOB_LIST_LIMIT = 500
METRICS_PAGE = 10_000  # points per `job.metrics` request (the daemon's default limit)
LOGS_PAGE = 1000  # entries per `job.logs` request (the daemon's default limit)


class DaemonLink:
    def __init__(self, state: DaemonState, runtime_dir: str | Path | None = None,
                 *, tcp: bool = False) -> None:
        self.state = state
        self.runtime_dir = runtime_dir
        self.tcp = tcp
        self.client: Client | None = None
        # jobs whose whole history (log included) a screen shows, with how many screens do
        self.watched: Counter[int] = Counter()
        self.sessions: set[str] = set()  # the interactive sessions whose events screens follow
        self.resyncs = 0

    # ----- requests for screens ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.client is not None and self.state.connection.connected

    def _require_connected(self) -> Client:
        if not self.connected:
            raise MistudioError("not connected to the daemon", code="no_daemon",
                                hint="the TUI reconnects by itself once mistudiod is running")
        return self.client

    async def request(self, msg_type: str, content: dict | None = None, *,
                      buffers: list = (), timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """A request to the daemon; MistudioError when it refuses or cannot be reached."""
        return await self._require_connected().request(msg_type, content, buffers=buffers,
                                                       timeout=timeout)

    async def watch_job(self, job_id: int) -> None:
        """Keep a job's whole history: fetch what came before (a chart opened late still starts
        at step 0, a log opened late at its first line) and keep it through resyncs. Offline,
        the job is only marked: the resync on reconnecting fetches its history."""
        self.watched[job_id] += 1
        if self.connected:
            if job_id not in self.state.jobs:  # older than the job list we keep
                self.state.apply_job((await self.request("job.show", {"id": job_id}))["job"])
            await self._fetch_history(job_id, logs=True, whole_log=self.watched[job_id] == 1)

    def unwatch_job(self, job_id: int) -> None:
        """A screen no longer shows the job; once none does, its log is no longer kept."""
        self.watched[job_id] -= 1
        if self.watched[job_id] <= 0:
            del self.watched[job_id]
            self.state.logs.pop(job_id, None)

    def follow_session(self, session_id: str) -> None:
        """Pass the session's events on (`DaemonState.session_event`) from now on."""
        self.sessions.add(session_id)
        if self.client is not None:
            self.client.subscribe(_session_topic(session_id))

    def unfollow_session(self, session_id: str) -> None:
        """The session is closed: its events are no longer followed."""
        self.sessions.discard(session_id)
        if self.client is not None:
            self.client.unsubscribe(_session_topic(session_id))

    async def upload_corpus(self, path: str,
                            on_progress: Callable[[int, int], None] | None = None) -> dict:
        """Upload a local file as a corpus (see `Client.upload_corpus`)."""
        return await self._require_connected().upload_corpus(path, on_progress=on_progress)

    # ----- the connection loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Connect, follow, and on silence or error reconnect; until the app ends."""
        delay = 0.25
        while True:
            try:
                if self.client is None:
                    self.client = Client(self.runtime_dir, tcp=self.tcp, timeout=REQUEST_TIMEOUT_S)
                    self.client.subscribe("daemon.status", "gpu.", "job.",
                                          *map(_session_topic, self.sessions))
                else:
                    self.client.reconnect()
                await self._follow()
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
        """Close the sessions screens left open (their models stay loaded in the daemon's
        model host, for whoever asks next), then the connection."""
        if self.client is None:
            return
        for session_id in list(self.sessions) if self.connected else ():
            with contextlib.suppress(MistudioError):
                await self.client.request("session.close", {"session": session_id},
                                          timeout=CLOSE_TIMEOUT_S)
        self.sessions.clear()
        await self.client.close()
        self.client = None

    async def _follow(self) -> None:
        """Apply events until the daemon goes quiet. Resync whenever the stream says so, and on
        the first event after every (re)connect: events may have been missed meanwhile even
        when the sequence numbers run on. A gap in a session's events needs none: nothing of
        them is cached, and the run's reply carries its whole result."""
        while (event := await self.client.next_event(timeout=QUIET_AFTER_S)) is not None:
            gap = event.resync and not event.topic.startswith("session.")
            if gap or not self.state.connection.connected:
                await self._resync()
            await self._apply(event)

    async def _resync(self) -> None:
        state, client = self.state, self.client
        status = await client.request("daemon.status")
        state.apply_status(status)
        state.apply_gpu_snapshot(await client.request("gpu.status"))
        state.replace_jobs((await client.request("job.list", {"limit": JOB_LIST_LIMIT}))["jobs"])
        running = [job["id"] for job in state.running_jobs()]
        for job_id in running:
            await self._fetch_history(job_id, logs=job_id in self.watched)
        for job_id in set(self.watched) - set(running):
            await self._fetch_history(job_id, logs=True)
        # The dashboard's curves when nothing runs: the latest finished jobs (one short request
        # each once their points are here).
        finished = [job["id"] for job in state.jobs_newest_first()
                    if job["state"] in FINISHED_STATES][:CURVES]
        for job_id in set(finished) - set(running) - set(self.watched):
            await self._fetch_history(job_id, logs=False)
        self.resyncs += 1
        state.set_connection(True, f"connected to mistudiod {status.get('version', '')} "
                                   f"(pid {status.get('pid')})")

    async def _fetch_history(self, job_id: int, *, logs: bool, whole_log: bool = False) -> None:
        """The job's points after those we have, and with `logs` its log entries after the last
        we have (all of them with `whole_log`), a page at a time."""
        state, client = self.state, self.client
        try:
            since = state.series(job_id).last_step
            while True:
                points = (await client.request("job.metrics", {
                    "id": job_id, "since_step": since, "limit": METRICS_PAGE}))["points"]
                state.apply_metrics(job_id, points, live=False)
                if len(points) < METRICS_PAGE:
                    break
                since = int(points[-1]["step"])
            since = 0 if whole_log else state.last_log_id(job_id)
            while logs:
                entries = (await client.request("job.logs", {
                    "id": job_id, "since": since, "limit": LOGS_PAGE}))["logs"]
                state.apply_logs(job_id, entries)
                if len(entries) < LOGS_PAGE:
                    break
                since = entries[-1]["id"]
        except MistudioError as error:
            if error.code != "not_found":  # a job the daemon no longer has: nothing to show
                raise

    async def _apply(self, event: Event) -> None:
        topic, content, state = event.topic, event.content, self.state
        if topic == "daemon.status":
            state.apply_status(content)
        elif topic.startswith("session."):
            session_id = topic.removeprefix("session.")
            if session_id in self.sessions:
                state.apply_session_event(SessionEvent(session_id, content))
        elif topic.startswith("gpu."):
            state.apply_gpu(content)
        elif topic.endswith(".state"):
            job = content["job"]
            if state.apply_job(job):  # a new attempt rewrites the series: read it afresh
                await self._fetch_history(job["id"], logs=job["id"] in self.watched)
        elif topic.endswith(".metrics"):
            state.apply_metrics(content["job_id"], [content["point"]])
        elif topic.endswith(".log"):
            job_id = content["job_id"]
            if job_id in self.watched:  # other jobs' logs are not kept (see `watch_job`)
                state.apply_logs(job_id, [{k: v for k, v in content.items() if k != "job_id"}])


def _session_topic(session_id: str) -> str:
    return f"session.{session_id}"
