"""The dashboard: the GPU panel, every job, and the loss curves of the running jobs."""

from __future__ import annotations

from collections.abc import Iterable

from textual.binding import Binding
from textual.containers import Container
from textual.widget import Widget

from tui.screens.base import DaemonScreen
from tui.widgets.gpu_panel import GpuPanel
from tui.widgets.jobs_table import JobsTable
from tui.widgets.metric_chart import MetricChart

CURVES = 4  # the loss of at most this many jobs: running ones first, then the latest


class DashboardScreen(DaemonScreen):
    CSS_PATH = "dashboard.tcss"
    BINDINGS = [
        Binding("n", "app.new_job", "New job"),
        Binding("enter", "open_selected", "Open job", show=False),
        Binding("c", "cancel_selected", "Cancel job"),
    ]

    def body(self) -> Iterable[Widget]:
        yield GpuPanel(self.state, id="gpus")
        with Container(id="dashboard-body"):
            yield JobsTable(self.state, id="jobs")
            yield MetricChart(self.state, "loss", "loss", log_y=True, id="loss-curves")

    def on_mount(self) -> None:
        self.query_one(JobsTable).border_title = "Jobs"
        for signal in (self.state.jobs_replaced, self.state.job_changed,
                       self.state.metrics_added):
            signal.subscribe(self, self._choose_curves)
        self._choose_curves()

    def _choose_curves(self, _: object = None) -> None:
        """Running jobs' curves; when none runs, the most recent runs that have points."""
        jobs = self.state.jobs_newest_first()
        chosen = [job["id"] for job in jobs if job["state"] == "running"][:CURVES]
        if not chosen:
            chosen = [job["id"] for job in jobs if len(self.state.series(job["id"]))][:CURVES]
        chart = self.query_one("#loss-curves", MetricChart)
        chart.show_jobs(sorted(chosen))
        chart.caption = "loss of running jobs" if self.state.running_jobs() else "loss"

    def on_jobs_table_opened(self, event: JobsTable.Opened) -> None:
        self.app.open_job(event.job_id)

    def action_open_selected(self) -> None:
        job_id = self.query_one(JobsTable).selected_job
        if job_id is not None:
            self.app.open_job(job_id)

    def action_cancel_selected(self) -> None:
        job_id = self.query_one(JobsTable).selected_job
        if job_id is None:
            self.notify("no job selected", severity="warning")
        else:
            self.app.cancel_job(job_id)
