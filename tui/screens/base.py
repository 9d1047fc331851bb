"""What every screen of the TUI shares: the header, the daemon's status line and the footer of
keys, around the screen's own body; and the rule that a screen out of sight does no drawing.

A screen under another one (a job's screen over the dashboard) still receives the state's
signals. Its handlers return at once while it is not current (`is_current`), and `redraw`
catches up when it is shown again (`ScreenResume`). A modal over a screen leaves it current:
it shows through.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, Header

from mistudio_core.errors import MistudioError
from tui.widgets.request_error import RequestError
from tui.widgets.status_line import StatusLine

if TYPE_CHECKING:
    from tui.app import MistudioApp
    from tui.link import DaemonLink
    from tui.state import Connection, DaemonState


class DaemonScreen(Screen):
    app: MistudioApp

    @property
    def state(self) -> DaemonState:
        return self.app.state

    @property
    def link(self) -> DaemonLink:
        return self.app.link

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine(self.state)
        yield from self.body()
        yield Footer()

    def body(self) -> Iterable[Widget]:
        raise NotImplementedError

    def remove(self):
        """Cancel the screen's workers first, then remove it. Textual cancels a node's workers
        at its own unmount, after its children are gone: a form check waking in between found
        its widgets missing and crashed the app (seen leaving the new-job form while the daemon
        restarted on a loaded machine)."""
        self.workers.cancel_node(self)
        return super().remove()

    def on_screen_resume(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        """Draw everything from the state, after a time out of sight."""


class ReadingScreen(DaemonScreen):
    """A screen that reads what it shows from the daemon on demand (`action_reload`). A failed
    read keeps what was shown and says why in the screen's `RequestError` rather than in a toast
    that vanishes; `r` reads again, and so does the daemon coming back or the screen being shown
    again. Subclasses subscribe `_on_connection` to the state's `connection_changed`."""

    _failed: object = None  # what could not be read (anything true), until it is

    async def read(self, what: str, msg_type: str, content: dict | None = None,
                   **options) -> dict | None:
        """The daemon's reply, or None once the failure is shown (`what`: `cannot read ...`)."""
        try:
            reply = await self.link.request(msg_type, content, **options)
        except MistudioError as error:
            self.query_one(RequestError).show(what, error)
            return None
        self.query_one(RequestError).clear()
        return reply

    def action_reload(self) -> None:
        raise NotImplementedError

    def _on_connection(self, connection: Connection) -> None:
        if connection.connected and self._failed and self.is_current:
            self.action_reload()

    def redraw(self) -> None:
        if self._failed and self.link.connected:
            self.action_reload()
