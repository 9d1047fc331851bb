"""The daemon's status in one line: connected or retrying, its version, uptime and job counts."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from mistudio_core import units
from tui.state import Connection, DaemonState


class StatusLine(Static):
    def __init__(self, state: DaemonState, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state

    def on_mount(self) -> None:
        self.state.connection_changed.subscribe(self, self._redraw)
        self.state.status_changed.subscribe(self, self._redraw)
        self._redraw()

    def _redraw(self, _: Connection | dict | None = None) -> None:
        connection, status = self.state.connection, self.state.status
        self.set_class(not connection.connected, "-disconnected")
        if not connection.connected:
            self.update(Text.assemble(("○ ", "bold"), connection.message))
            return
        self.update(Text.assemble(("● ", "bold"), summary(status)))


def summary(status: dict | None) -> str:
    """`mistudiod 0.1.0 (pid 42) up 1h02m · 2 GPUs · 2 running · 3 queued · 7 done`: fits 80
    columns with pids and counts of a few digits."""
    if status is None:
        return "connected"
    jobs = status.get("jobs") or {}
    done = sum(jobs.get(state, 0) for state in ("succeeded", "failed", "cancelled"))
    gpus = status.get("gpus") or {}
    devices = (f"{gpus.get('count')} GPU" + ("s" if gpus.get("count") != 1 else "")
               if gpus.get("available") else "CPU only")
    return (f"mistudiod {status.get('version', '?')} (pid {status.get('pid')}) up "
            f"{units.duration(status.get('uptime_s'))} · {devices} · "
            f"{jobs.get('running', 0)} running · {jobs.get('queued', 0)} queued · {done} done")
