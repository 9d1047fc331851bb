"""The command palette's entries (ctrl+p): every action of every screen, and each job by id."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from tui.app import MistudioApp


class MistudioCommands(Provider):
    def commands(self) -> list[tuple[str, Callable[[], object], str]]:
        app: MistudioApp = self.app  # type: ignore[assignment]
        entries = [
            ("Dashboard", app.action_dashboard, "GPUs, jobs and loss curves"),
            ("New training job", app.action_new_job, "the form, with the memory preflight"),
            ("Help", app.action_help, "what each screen does, and its keys"),
            ("Toggle light/dark theme", app.action_toggle_theme, "switch the colour theme"),
            ("Quit", app.exit, "leave the TUI (jobs keep running in the daemon)"),
        ]
        for job in app.state.jobs_newest_first():
            label = f"{job['kind']} job {job['id']} ({job['state']})"
            entries.append((f"Open {label}", partial(app.open_job, job["id"]),
                            "its curves, log and result"))
            if job["state"] in ("queued", "running"):
                entries.append((f"Cancel {label}", partial(app.cancel_job, job["id"]),
                                "asks first"))
        return entries

    async def discover(self) -> Hits:
        for name, callback, help_text in self.commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self.commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
