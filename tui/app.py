"""`mistudio-tui`: the miStudio terminal dashboard (DESIGN.md section 5).

The app owns the daemon state cache and the link that fills it; screens only read the cache and
send requests through the link. It imports neither torch nor any server code, so it starts at
once and runs on a laptop against a daemon reached through a forwarded socket or TCP.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from mistudio_core.errors import MistudioError
from tui.link import DaemonLink
from tui.screens.confirm import ConfirmScreen
from tui.screens.dashboard import DashboardScreen
from tui.screens.feature_card import FeatureCardScreen
from tui.screens.features import FeaturesScreen, sae_dir_of
from tui.screens.help import HelpScreen
from tui.screens.job_detail import JobScreen
from tui.screens.monitor import MonitorScreen
from tui.screens.new_job import NewJobScreen
from tui.screens.sae_picker import SaePickerScreen
from tui.screens.steer import SteerScreen
from tui.state import DaemonState

THEMES = ("textual-dark", "textual-light")


class MistudioApp(App):
    TITLE = "miStudio"
    CSS_PATH = ["app.tcss", "widgets/status_line.tcss", "widgets/gpu_panel.tcss",
                "widgets/request_error.tcss", "widgets/token_text.tcss",
                "widgets/activation_histogram.tcss", "widgets/token_view.tcss",
                "widgets/steering_rows.tcss"]
    HORIZONTAL_BREAKPOINTS = [(130, "-wide")]
    VERTICAL_BREAKPOINTS = [(40, "-tall")]
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

    # ----- navigation (later screens join here and in `get_system_commands`) -------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The command palette (ctrl+p): Textual's own commands (theme, quit, keys,
        screenshot), every screen, and each job by id."""
        yield from super().get_system_commands(screen)
        yield SystemCommand("Dashboard", "GPUs, jobs and loss curves", self.action_dashboard)
        yield SystemCommand("New training job", "the form, with the memory preflight",
                            self.action_new_job)
        yield SystemCommand("Browse features", "an SAE's features: sort, search, open a card",
                            self.open_features)
        yield SystemCommand("Monitor features", "type text, see an SAE's features fire per token",
                            self.open_monitor)
        yield SystemCommand("Steer generation", "an SAE's features added or clamped, beside "
                            "the unsteered text", self.open_steer)
        yield SystemCommand("Help", "what each screen does, and its keys", self.action_help)
        saes = list(dict.fromkeys(sae_dir_of(job) for job in self.state.jobs_newest_first()
                                  if job["kind"] in ("train", "find")
                                  and job["state"] == "succeeded"))
        for sae_dir in filter(None, saes):
            yield SystemCommand(f"Browse features of {sae_dir}", "its features list",
                                partial(self.open_features, sae_dir))
            yield SystemCommand(f"Monitor features of {sae_dir}", "which fire on a text",
                                partial(self.open_monitor, sae_dir))
            yield SystemCommand(f"Steer with {sae_dir}", "its features, beside the baseline",
                                partial(self.open_steer, sae_dir))
        for job in self.state.jobs_newest_first():
            label = f"{job['kind']} job {job['id']} ({job['state']})"
            yield SystemCommand(f"Open {label}", "its curves, log and result",
                                partial(self.open_job, job["id"]))
            if job["state"] in ("queued", "running"):
                yield SystemCommand(f"Cancel {label}", "asks first",
                                    partial(self.cancel_job, job["id"]))

    def open_job(self, job_id: int, *, replace: bool = False) -> None:
        """Show a job's screen: nothing to do if it is the one shown, and one job's screen
        replaces another's rather than piling up over it."""
        if isinstance(self.screen, JobScreen):
            if self.screen.job_id != job_id:
                self.switch_screen(JobScreen(job_id))
        elif replace:
            self.switch_screen(JobScreen(job_id))
        else:
            self.push_screen(JobScreen(job_id))

    def open_features(self, sae_dir: str | None = None) -> None:
        """The features of the SAE in `sae_dir` (a directory on the daemon's machine), or
        with none, the list of SAEs to choose from."""
        if sae_dir is None:
            self._pick_sae("features")
        elif not (isinstance(self.screen, FeaturesScreen) and self.screen.sae_dir == sae_dir):
            self.push_screen(FeaturesScreen(sae_dir))

    def open_feature(self, sae_dir: str, feature_id: int) -> None:
        """A feature's card, over the screen it was chosen from (escape goes back there)."""
        screen = self.screen
        if not (isinstance(screen, FeatureCardScreen) and screen.sae_dir == sae_dir
                and screen.feature_id == feature_id):
            self.push_screen(FeatureCardScreen(sae_dir, feature_id))

    def open_monitor(self, sae_dir: str | None = None, model: str | None = None) -> None:
        """The monitor of the SAE in `sae_dir` (its model given, or read from its config), or
        with none, the list of SAEs to choose from."""
        if sae_dir is None:
            self._pick_sae("monitor")
        elif not (isinstance(self.screen, MonitorScreen) and self.screen.sae_dir == sae_dir):
            self.push_screen(MonitorScreen(sae_dir, model))

    def open_steer(self, sae_dir: str | None = None, feature: int | None = None,
                   model: str | None = None) -> None:
        """Steering with the SAE in `sae_dir`, starting with `feature` if given; with no SAE,
        the list of SAEs to choose from."""
        if sae_dir is None:
            self._pick_sae("steer")
        elif not (isinstance(self.screen, SteerScreen) and self.screen.sae_dir == sae_dir):
            self.push_screen(SteerScreen(sae_dir, feature, model))

    def _pick_sae(self, purpose: str) -> None:
        screen = self.screen
        if not (isinstance(screen, SaePickerScreen) and screen.purpose == purpose):
            self.push_screen(SaePickerScreen(purpose))

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
    app = MistudioApp(args.runtime_dir, tcp=args.tcp, theme=args.theme)
    app.run()
    return app.return_code or 0
