"""The jobs table: one row per job, newest first, updated in place as events arrive.

Rows are keyed by job id, so an update touches only its cells and the cursor stays where the
user put it. The time a job has run and its ETA tick once a second from the local clock. The
columns fit 80 terminal columns. Enter (or a click) on a row is DataTable's own `select_cursor`,
which posts `DataTable.RowSelected`: the screen opens the job.
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from mistudio_core import units
from tui import format
from tui.state import DaemonState
from tui.widgets import in_sight

COLUMNS = ("id", "state", "kind", "model", "hook", "progress", "time", "ETA")
STATE_STYLES = {"queued": "yellow", "running": "bold green", "succeeded": "green",
                "failed": "bold red", "cancelled": "dim"}
PROGRESS_WIDTH = 5


class JobsTable(DataTable):
    # DataTable's own enter (select_cursor), shown in the footer under what it does here
    BINDINGS = [Binding("enter", "select_cursor", "Open job")]

    def __init__(self, state: DaemonState, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.state = state
        self._stale = False  # jobs changed while the table was out of sight

    def on_mount(self) -> None:
        for column in COLUMNS:
            self.add_column(column, key=column)
        self.state.jobs_replaced.subscribe(self, self._on_jobs_replaced)
        self.state.job_changed.subscribe(self, self._update_job)
        self.state.metrics_added.subscribe(self, self._update_progress)
        self.set_interval(1.0, self._tick)
        self._rebuild()

    def catch_up(self) -> None:
        """Draw what changed while out of sight."""
        if self._stale:
            self._rebuild()

    def _in_sight(self) -> bool:
        if not in_sight(self):
            self._stale = True
            return False
        return True

    @property
    def selected_job(self) -> int | None:
        if not self.row_count:
            return None
        return int(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)

    def _on_jobs_replaced(self, _: None) -> None:
        if self._in_sight():
            self._rebuild()

    def _rebuild(self) -> None:
        self._stale = False
        selected = self.selected_job
        self.clear()
        for job in self.state.jobs_newest_first():
            self.add_row(*cells(job), key=str(job["id"]))
        if selected is not None and str(selected) in self.rows:
            self.move_cursor(row=self.get_row_index(str(selected)))

    def _update_job(self, job: dict) -> None:
        if not self._in_sight():
            return
        if str(job["id"]) not in self.rows:
            self._rebuild()  # a new job goes on top, where `newest first` puts it
            return
        self._update_cells(self.state.jobs[job["id"]], COLUMNS[1:])

    def _update_progress(self, job_id: int) -> None:
        if not self._in_sight():
            return
        if str(job_id) in self.rows and job_id in self.state.jobs:
            self._update_cells(self.state.jobs[job_id], ("progress", "ETA"))

    def _tick(self) -> None:
        if not in_sight(self):
            return
        for job in self.state.running_jobs():
            if str(job["id"]) in self.rows:
                self._update_cells(job, ("time", "ETA"))

    def _update_cells(self, job: dict, columns: tuple[str, ...]) -> None:
        values = dict(zip(COLUMNS, cells(job), strict=True))
        for column in columns:
            self.update_cell(str(job["id"]), column, values[column])


def cells(job: dict) -> tuple:
    params = job.get("params") or {}
    progress = job.get("progress") or 0.0
    if job["state"] == "succeeded":
        progress = 1.0
    return (
        job["id"],
        Text(job["state"], style=STATE_STYLES.get(job["state"], "")),
        job["kind"],
        format.model_name(job)[:10],
        short_hook(params.get("hook")),
        Text.assemble(format.meter(progress, PROGRESS_WIDTH), f" {progress:4.0%}"),
        units.duration(format.elapsed(job)),
        units.duration(format.eta(job)),
    )


def short_hook(hook: str | None) -> str:
    """`layers.6.resid_post` as `L6 resid_post`, to leave the table room at 80 columns."""
    if not hook:
        return "-"
    parts = hook.split(".")
    return f"L{parts[1]} {parts[2]}" if len(parts) == 3 and parts[0] == "layers" else hook
