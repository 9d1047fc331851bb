"""`mistudio-tui`: the miStudio terminal dashboard (DESIGN.md section 5).

The app owns the daemon state cache and the link that fills it; screens only read the cache and
send requests through the link. It imports neither torch nor any server code, so it starts at
once and runs on a laptop against a daemon reached through a forwarded socket or TCP.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding

from mistudio_core.errors import MistudioError
from tui.commands import MistudioCommands
from tui.link import DaemonLink
from tui.screens.confirm import ConfirmScreen
from tui.screens.dashboard import DashboardScreen
from tui.screens.help import HelpScreen
from tui.screens.job_detail import JobScreen
from tui.screens.new_job import NewJobScreen
from tui.state import DaemonState

THEMES = ("textual-dark", "textual-light")


class MistudioApp(App):
    TITLE = "miStudio"
    CSS_PATH = ["app.tcss", "widgets/status_line.tcss", "widgets/gpu_panel.tcss"]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (130, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]
    COMMANDS = App.COMMANDS | {MistudioCommands}
    BINDINGS = [
        Binding("f1,question_mark", "help", "Help"),
        Binding("d", "dashboard", "Dashboard"),
        Binding("t", "toggle_theme", "Theme"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, runtime_dir: str | Path | None = None, *, tcp: bool = False,
                 connect: bool = True, theme: str = THEMES[0]) -> None:
        """`connect=False` leaves the link idle, for tests that fill the state themselves."""
        super().__init__()
        self.state = DaemonState(self)
        self.link = DaemonLink(self.state, runtime_dir, tcp=tcp)
        self.connect = connect
        self.theme = theme

    def on_mount(self) -> None:
        self.push_screen(DashboardScreen())
        if self.connect:
            self.run_worker(self.link.run(), name="daemon link", group="link", exclusive=True)

    async def on_unmount(self) -> None:
        await self.link.close()

    # ----- navigation (later screens join here and in tui.commands) -----------------------------

    def open_job(self, job_id: int, *, replace: bool = False) -> None:
        screen = JobScreen(job_id)
        if replace:
            self.switch_screen(screen)
        else:
            self.push_screen(screen)

    def action_dashboard(self) -> None:
        while not isinstance(self.screen, DashboardScreen) and len(self.screen_stack) > 2:
            self.pop_screen()

    def action_new_job(self) -> None:
        if not isinstance(self.screen, NewJobScreen):
            self.push_screen(NewJobScreen())

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def action_toggle_theme(self) -> None:
        self.theme = THEMES[(THEMES.index(self.theme) + 1) % len(THEMES)] \
            if self.theme in THEMES else THEMES[0]

    # ----- job actions -------------------------------------------------------------------------

    def cancel_job(self, job_id: int) -> None:
        """Ask, then cancel: a running job is stopped (its checkpoint stays)."""
        job = self.state.jobs.get(job_id)
        if job is not None and job["state"] not in ("queued", "running"):
            self.notify(f"job {job_id} has already {job['state']}", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._cancel(job_id)

        self.push_screen(ConfirmScreen(f"Cancel job {job_id}? A running job stops at once.",
                                       yes="Cancel job"), answered)

    @work(group="cancel")
    async def _cancel(self, job_id: int) -> None:
        try:
            reply = await self.link.request("job.cancel", {"id": job_id})
        except MistudioError as error:
            self.notify(error.message, title=f"job {job_id} not cancelled", severity="error")
            return
        self.state.apply_job(reply["job"])
        self.notify(f"job {job_id}: cancel requested")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mistudio-tui",
                                     description="miStudio's terminal dashboard.")
    parser.add_argument("--runtime-dir", type=Path,
                        help="the daemon's socket directory (MISTUDIO_RUNTIME_DIR)")
    parser.add_argument("--tcp", action="store_true",
                        help="connect over the daemon's CurveZMQ TCP endpoints (the connection "
                             "file names them; copy it from the server)")
    parser.add_argument("--theme", choices=THEMES, default=THEMES[0])
    args = parser.parse_args(argv)
    MistudioApp(args.runtime_dir, tcp=args.tcp, theme=args.theme).run()
    return 0
