"""One job: its state and timing, live loss/L0/FVE/dead-latent curves with the whole history,
the log tail, cancel (with confirmation), and the result summary when it ends."""

from __future__ import annotations

import time
from collections.abc import Iterable

from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Grid
from textual.widget import Widget
from textual.widgets import Log, Static

from mistudio_core import units
from mistudio_core.errors import MistudioError
from mistudiod.protocol import FINISHED_STATES
from tui import format
from tui.screens.base import DaemonScreen
from tui.screens.features import sae_dir_of
from tui.widgets.jobs_table import STATE_STYLES, short_hook
from tui.widgets.metric_chart import MetricChart

LOG_LINES = 2000  # kept in the log widget
CHARTS = (("loss", "loss", True), ("l0", "L0", False), ("fve", "FVE", False),
          ("dead_pct", "dead %", False))


class JobScreen(DaemonScreen):
    CSS_PATH = "job_detail.tcss"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "cancel", "Cancel job"),
        Binding("l", "toggle_log", "Log"),
        Binding("f", "features", "Features"),
    ]

    def __init__(self, job_id: int) -> None:
        super().__init__()
        self.job_id = job_id
        self._logged = 0  # log entries already written to the log widget
        self._last_logged: int | None = None  # the id of the last of them

    def body(self) -> Iterable[Widget]:
        yield Static(id="job-summary")
        yield Static(id="job-result")
        with Grid(id="charts"):
            for metric, title, log_y in CHARTS:
                yield MetricChart(self.state, metric, title, log_y=log_y, id=f"chart-{metric}")
        yield Log(id="job-log", max_lines=LOG_LINES)

    def on_mount(self) -> None:
        self.sub_title = f"job {self.job_id}"
        for chart in self.query(MetricChart):
            chart.show_jobs([self.job_id])
        self.state.job_changed.subscribe(self, self._on_job)
        self.state.jobs_replaced.subscribe(self, self._on_job)
        self.state.metrics_added.subscribe(self, self._on_points)  # the step in the summary
        self.state.log_added.subscribe(self, self._on_log)
        self.set_interval(1.0, self._tick)
        self._draw()
        self._fetch_history()

    def on_unmount(self) -> None:
        self.link.unwatch_job(self.job_id)

    @work(group="history", exclusive=True)
    async def _fetch_history(self) -> None:
        try:
            await self.link.watch_job(self.job_id)
        except MistudioError as error:
            self.notify(error.message, title="cannot read the job's history", severity="error")

    @property
    def job(self) -> dict | None:
        return self.state.jobs.get(self.job_id)

    def redraw(self) -> None:
        self._draw()
        for chart in self.query(MetricChart):
            chart.catch_up()

    def _on_job(self, changed: dict | None) -> None:
        """A job's new state (or a new job list): the summary and the result."""
        if self.is_current and (changed is None or changed["id"] == self.job_id):
            self._draw_summary()
            self._draw_result()

    def _on_points(self, job_id: int) -> None:
        """New points move the step and progress in the summary."""
        if job_id == self.job_id and self.is_current:
            self._draw_summary()

    def _on_log(self, job_id: int) -> None:
        if job_id == self.job_id and self.is_current:
            self._draw_log()

    def _tick(self) -> None:
        if self.is_current:
            self._draw_summary()  # the elapsed time and ETA count on

    def _draw(self) -> None:
        self._draw_summary()
        self._draw_result()
        self._draw_log()

    def _draw_summary(self) -> None:
        job = self.job
        summary = self.query_one("#job-summary", Static)
        summary.update(summary_text(job) if job else f"job {self.job_id}: waiting for the daemon")

    def _draw_result(self) -> None:
        job = self.job
        result = self.query_one("#job-result", Static)
        finished = job is not None and job["state"] in FINISHED_STATES
        if finished and not result.display:
            self.query_one("#job-log", Log).display = False  # room for the result; `l` shows it
        result.display = finished
        if finished:
            result.update(result_text(job))
            result.set_class(job["state"] != "succeeded", "-failed")

    def _draw_log(self) -> None:
        """Write the entries not written yet; rewrite the log when the history changed other
        than at its end (its beginning, fetched after the tail had streamed in)."""
        entries = self.state.logs.get(self.job_id, [])
        log = self.query_one("#job-log", Log)
        appended = self._logged <= len(entries) and (
            self._logged == 0 or entries[self._logged - 1]["id"] == self._last_logged)
        if not appended:
            log.clear()
            self._logged = 0
        if len(entries) > self._logged:
            log.write_lines([log_line(entry) for entry in entries[self._logged:][-LOG_LINES:]])
        self._logged = len(entries)
        self._last_logged = entries[-1]["id"] if entries else None

    def action_cancel(self) -> None:
        self.app.cancel_job(self.job_id)

    def action_features(self) -> None:
        """The features of the SAE this job made (once it has) or worked on."""
        sae_dir = sae_dir_of(self.job) if self.job else None
        if sae_dir is None:
            self.notify("only a succeeded training job, or a job on an SAE, has features",
                        title="no SAE to browse", severity="warning")
        else:
            self.app.open_features(sae_dir)

    def action_toggle_log(self) -> None:
        log = self.query_one("#job-log", Log)
        log.display = not log.display


def summary_text(job: dict) -> Text:
    """`job 7 · train · running · step 120/1000 12% · elapsed 1m02s · ETA 8m01s`, and the
    run's setup on the second line."""
    params = job.get("params") or {}
    steps = (f" · step {job.get('step') or 0}/{job['total_steps']} {job.get('progress') or 0:.0%}"
             if job.get("total_steps") else "")
    eta = format.eta(job)
    timing = f" · elapsed {units.duration(format.elapsed(job))}" + (
        f" · ETA {units.duration(eta)}" if eta is not None else "")
    attempt = f" (attempt {job['attempt']})" if (job.get("attempt") or 0) > 1 else ""
    first = Text.assemble((f"job {job['id']}", "bold"), f" · {job['kind']} · ",
                          (job["state"], STATE_STYLES.get(job["state"], "")),
                          attempt, steps, timing)
    setup = [format.model_name(job), short_hook(params.get("hook")), job.get("device")]
    if job["kind"] == "train":
        k = f" k={params.get('k')}" if params.get("arch") in ("topk", "batchtopk") else ""
        width = (f"d_sae {params['d_sae']}" if params.get("d_sae")
                 else f"x{params.get('expansion')}")
        setup += [f"{params.get('arch')}{k} {width}",
                  f"{units.count(params.get('tokens'))} tokens"]
    setup.append(f"corpus {format.last_part(params.get('corpus'))}")
    return first + Text("\n" + " · ".join(str(part) for part in setup if part), style="dim")


def result_text(job: dict) -> Text:
    """Where the SAE is and how good it is, or what went wrong and how to fix it."""
    if job["state"] != "succeeded":
        error = job.get("error") or {}
        message = error.get("message") or job["state"]
        hint = f"\nhint: {error['hint']}" if error.get("hint") else ""
        return Text(f"{job['state']}: {message}{hint}")
    result = job.get("result") or {}
    lines = [f"SAE saved in {result.get('path', '?')}"]
    evaluation = result.get("evaluation")
    final = result.get("final_metrics") or {}
    if evaluation:
        lines.append(eval_line(evaluation))
    elif final:
        lines.append("final  " + "  ".join(
            f"{name} {format.number(final.get(name))}" for name in ("loss", "l0", "fve", "dead_pct")
            if name in final))
    return Text("\n".join(lines))


def eval_line(evaluation: dict) -> str:
    """`eval 1M tok: L0 32.0 · FVE 0.874 · dead 1.2% · CE rec 0.962 · KL 0.0412`"""
    parts = [f"L0 {format.number(evaluation.get('l0'), '{:.1f}')}",
             f"FVE {format.number(evaluation.get('fve'), '{:.3f}')}",
             f"dead {format.number(evaluation.get('dead_pct'), '{:.1f}%')}"]
    if evaluation.get("ce_loss_recovered") is not None:
        parts.append(f"CE rec {evaluation['ce_loss_recovered']:.3f}")
        parts.append(f"KL {format.number(evaluation.get('kl_divergence'), '{:.3g}')}")
    return f"eval {units.count(evaluation.get('n_tokens'))} tok: " + " · ".join(parts)


def log_line(entry: dict) -> str:
    at = time.strftime("%H:%M:%S", time.localtime(entry.get("at") or 0))
    level = entry.get("level", "info")
    return f"{at} {'' if level == 'info' else level.upper() + ' '}{entry.get('message', '')}"
