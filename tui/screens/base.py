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

from tui.widgets.status_line import StatusLine

if TYPE_CHECKING:
    from tui.app import MistudioApp
    from tui.link import DaemonLink
    from tui.state import DaemonState


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

    def on_screen_resume(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        """Draw everything from the state, after a time out of sight."""
