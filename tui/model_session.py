"""A screen's interactive session in the daemon: a model and its SAEs loaded in the daemon's
model host (`session.open`), ready for monitor and steer runs.

The session is opened when first needed, and again when the screen's model changes (the old one
is closed then); `close` ends it when the screen goes. A session runs one request at a time, so a
new run first cancels the one still going and waits for its end, rather than being refused as
`busy`.

The open and each run are asyncio tasks of their own, which the screen's workers only wait on
(`asyncio.shield`). A worker is cancelled when the screen goes or a newer run replaces it; had
it sent the request itself, the reply would be lost with it, and with the reply the id of a
session nobody would close, or the end of a run that the next request would find still going.
"""

from __future__ import annotations

import asyncio
import contextlib

from mistudio_core.errors import MistudioError
from tui.link import DaemonLink

# Loading a large model, or a long generation on a slow device: the screen says what it waits
# for, and a person cancels sooner if they want.
SESSION_TIMEOUT_S = 3600.0


class ModelSession:
    def __init__(self, link: DaemonLink, sae_dirs: list[str]) -> None:
        self.link = link
        self.sae_dirs = sae_dirs
        self.model: str | None = None  # the model of the session open or being opened
        self.opened: dict | None = None  # the `session.open` reply, once it is open
        self.last_run = 0  # the latest run whose reply came back (older runs' events are stale)
        self._opening: asyncio.Task | None = None
        self._running: asyncio.Task | None = None

    @property
    def id(self) -> str | None:
        return self.opened["session"] if self.opened else None

    @property
    def running(self) -> bool:
        return self._running is not None and not self._running.done()

    async def open(self, model: str) -> dict:
        """The `session.open` reply of a session on `model`: the one open or being opened, or
        a new one (after closing the session on another model, and after a failed open)."""
        opening = self._opening
        failed = opening is not None and opening.done() and (
            opening.cancelled() or opening.exception() is not None)
        if opening is None or failed or model != self.model:
            self.model = model
            self._opening = _detached(self._open(model, opening))
        return await asyncio.shield(self._opening)

    async def _open(self, model: str, previous: asyncio.Task | None) -> dict:
        await self._end(previous)
        self.opened, self.last_run = None, 0
        opened = await self.link.request("session.open", {
            "model": model, "sae_dirs": self.sae_dirs}, timeout=SESSION_TIMEOUT_S)
        self.opened = opened
        self.link.follow_session(opened["session"])
        return opened

    async def run(self, msg_type: str, content: dict) -> dict:
        """A `session.monitor` or `session.steer` reply (the session must be open). The run
        before it, if it still goes, is cancelled first."""
        if self.running:
            await self.cancel()
            with contextlib.suppress(MistudioError):
                await asyncio.shield(self._running)
        self._running = _detached(self._run(self.id, msg_type, content))
        return await asyncio.shield(self._running)

    async def _run(self, session_id: str, msg_type: str, content: dict) -> dict:
        try:
            reply = await self.link.request(msg_type, {**content, "session": session_id},
                                            timeout=SESSION_TIMEOUT_S)
        except MistudioError as error:
            if error.field == "session" and session_id == self.id:
                self._forget()  # closed for idling, or its model host restarted
            raise
        if session_id == self.id:
            self.last_run = max(self.last_run, reply["run"])
        return reply

    def _forget(self) -> None:
        """The daemon no longer has the session: the next `open` opens a new one."""
        self.link.unfollow_session(self.id)
        self.opened = self._opening = None

    async def cancel(self) -> bool:
        """Stop the running request at its next token; whether one was running."""
        if not self.running:
            return False
        reply = await self.link.request("session.cancel", {"session": self.id})
        return reply["cancelled"]

    async def close(self) -> None:
        """End the session (a run still going stops), once an open in flight has answered."""
        opening, self._opening = self._opening, None
        await self._end(opening)

    async def _end(self, opening: asyncio.Task | None) -> None:
        """Close the session `opening` opened, if it did."""
        if opening is None:
            return
        try:
            opened = await asyncio.shield(opening)
        except MistudioError:
            return  # it never opened
        self.link.unfollow_session(opened["session"])
        with contextlib.suppress(MistudioError):  # gone with the daemon, or closed for idling
            await self.link.request("session.close", {"session": opened["session"]})


def _detached(coroutine) -> asyncio.Task:
    """A task that outlives the worker waiting on it. Its failure is read by that worker, or,
    when the worker has gone, by nobody: it is marked read so that asyncio does not warn."""
    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task
