"""The dashboard: the GPU panel, every job, and the loss curves of the running jobs."""

from __future__ import annotations

from collections.abc import Iterable

from textual import on
from textual.binding import Binding
from textual.containers import Container
from textual.widget import Widget
from textual.widgets import DataTable

from tui.screens.base import DaemonScreen
from tui.state import CURVES  # the loss of at most this many jobs: running ones, else the latest
from tui.widgets.gpu_panel import GpuPanel
from tui.widgets.jobs_table import JobsTable
from tui.widgets.metric_chart import MetricChart


class DashboardScreen(DaemonScreen):
    CSS_PATH = "dashboard.tcss"
    BINDINGS = [
        Binding("n", "app.new_job", "New job"),
        Binding("c", "cancel_selected", "Cancel job"),
        Binding("f", "features", "Features"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._fallback = False  # no job runs: the chart shows the latest jobs that have points

    def body(self) -> Iterable[Widget]:
        yield GpuPanel(self.state, id="gpus")
        with Container(id="dashboard-body"):
            yield JobsTable(self.state, id="jobs")
            yield MetricChart(self.state, "loss", "loss", log_y=True, id="loss-curves")

    def on_mount(self) -> None:
        self.query_one(JobsTable).border_title = "Jobs"
        self.state.jobs_replaced.subscribe(self, self._on_jobs)
        self.state.job_changed.subscribe(self, self._on_jobs)
        self.state.metrics_added.subscribe(self, self._on_points)
        self._choose_curves()

    def redraw(self) -> None:
        self._choose_curves()
        self.query_one(JobsTable).catch_up()
        self.query_one(GpuPanel).catch_up()
        self.query_one(MetricChart).catch_up()

    def _on_jobs(self, _: object) -> None:
        if self.is_current:
            self._choose_curves()

    def _on_points(self, job_id: int) -> None:
        """Points choose curves only when nothing runs and a job not drawn has its first
        ones (a finished job's history, fetched on a resync); a running job is drawn already."""
        if (self._fallback and self.is_current
                and job_id not in self.query_one(MetricChart).job_ids):
            self._choose_curves()

    def _choose_curves(self) -> None:
        """Running jobs' curves; when none runs, the most recent runs that have points."""
        jobs = self.state.jobs_newest_first()
        chosen = [job["id"] for job in jobs if job["state"] == "running"][:CURVES]
        self._fallback = not chosen
        if self._fallback:
            chosen = [job["id"] for job in jobs if len(self.state.series(job["id"]))][:CURVES]
        self.query_one(MetricChart).show_jobs(
            sorted(chosen), caption="loss" if self._fallback else "loss of running jobs")

    @on(DataTable.RowSelected, "#jobs")
    def _open_job(self, event: DataTable.RowSelected) -> None:
        self.app.open_job(int(event.row_key.value))

    def action_features(self) -> None:
        """The SAEs to browse the features of (a job's own: `f` on its screen)."""
        self.app.open_features()

    def action_cancel_selected(self) -> None:
        job_id = self.query_one(JobsTable).selected_job
        if job_id is None:
            self.notify("no job selected", severity="warning")
        else:
            self.app.cancel_job(job_id)
