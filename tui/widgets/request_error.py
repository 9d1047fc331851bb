"""The line that says a request to the daemon failed, why, and how to try again.

Screens that read from the daemon on demand (the features browser, a feature card) keep what
they last showed when a request fails and say so here rather than in a toast that vanishes: the
user can read the daemon's hint and press `r` once the cause is fixed (or whatever key the screen
names as `retry`).
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from mistudio_core.errors import MistudioError


class RequestError(Static):
    def __init__(self, retry: str = "r retries", **kwargs) -> None:
        super().__init__(**kwargs)
        self.retry = retry
        self.display = False

    def show(self, what: str, error: MistudioError) -> None:
        """`what` failed (`cannot list the features`) with the daemon's message and hint."""
        hint = f"\nhint: {error.hint}" if error.hint else ""
        self.update(Text.assemble((f"{what}: ", "bold"), error.message, hint,
                                  (f"  ({self.retry})", "dim")))
        self.display = True

    def clear(self) -> None:
        self.display = False
