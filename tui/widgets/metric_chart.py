"""A live chart of one training metric against step, for one job or several.

The points live in `DaemonState`, so a chart opened late shows the whole run. A new point only
marks the chart stale; it is redrawn at most `REDRAW_HZ` times a second, so four jobs streaming
fast cost a few renders a second, never one per point (key presses stay prompt), and a chart
out of sight (its screen under another) is not redrawn until its screen is back. Long runs are
thinned to about `MAX_POINTS` per line for drawing, the newest point always kept; the data
itself is never thinned.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.app import RenderResult
from textual_plotext import PlotextPlot
from textual_plotext.plot import Plot

from mistudio_core import units
from tui.state import DaemonState
from tui.widgets import in_sight

REDRAW_HZ = 2
MAX_POINTS = 400
PLOT_FRAME_ROWS = 5  # title, top and bottom frame, tick labels and axis label
COLUMNS_PER_TICK = 12  # step labels far enough apart that plotext never has to drop one


class MetricChart(PlotextPlot):
    def __init__(self, state: DaemonState, metric: str, title: str, *, log_y: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state
        self.metric = metric
        self._caption = title
        self.log_y = log_y
        self.job_ids: list[int] = []
        self.points_drawn = 0  # in the last drawing, after thinning
        self._lines: list[tuple[list[int], list[float], str | None]] = []
        self._stale = True

    def on_mount(self) -> None:
        self.state.metrics_added.subscribe(self, self._on_points)
        self.set_interval(1 / REDRAW_HZ, self._redraw_if_stale)
        self._redraw_if_stale()

    @property
    def caption(self) -> str:
        """The chart's title (set it with `show_jobs`)."""
        return self._caption

    def show_jobs(self, job_ids: list[int], caption: str | None = None) -> None:
        """Draw these jobs' lines, under a new caption if one is given."""
        if job_ids != self.job_ids or caption not in (None, self._caption):
            self.job_ids = list(job_ids)
            self._caption = self._caption if caption is None else caption
            self._stale = True
            self._redraw_if_stale()

    def catch_up(self) -> None:
        """Draw what changed while out of sight."""
        self._redraw_if_stale()

    def _on_points(self, job_id: int) -> None:
        if job_id in self.job_ids:
            self._stale = True

    def _redraw_if_stale(self) -> None:
        """Gather the lines to draw from the state; `render` draws them."""
        if not self._stale or not in_sight(self):
            return
        self._stale = False
        self._lines = []
        for job_id in self.job_ids:
            steps, values = self.state.series(job_id).values(self.metric)
            if self.log_y:  # drawn as log10 on a linear axis (see `log_ticks`)
                kept = [i for i, value in enumerate(values) if value > 0]
                steps, values = [steps[i] for i in kept], [math.log10(values[i]) for i in kept]
            if values:
                kept = thinned(len(values))
                label = f"job {job_id}" if len(self.job_ids) > 1 else None
                self._lines.append(([steps[i] for i in kept], [values[i] for i in kept], label))
        self.points_drawn = sum(len(steps) for steps, _, _ in self._lines)
        self.refresh()

    def _draw(self, plt: Plot) -> None:
        plt.title(self.caption if self._lines else f"{self.caption}: no points yet")
        plt.xlabel("step")
        if not self._lines:
            return
        for steps, values, label in self._lines:
            plt.plot(steps, values, label=label, marker="braille")
        plt.xticks(*step_ticks(min(steps[0] for steps, _, _ in self._lines),
                               max(steps[-1] for steps, _, _ in self._lines),
                               count=max(2, min(5, self.size.width // COLUMNS_PER_TICK))))
        if self.log_y:  # no more ticks than rows (plotext's choice of which to drop varies)
            plt.yticks(*log_ticks(min(min(values) for _, values, _ in self._lines),
                                  max(max(values) for _, values, _ in self._lines),
                                  count=max(2, min(4, self.size.height - PLOT_FRAME_ROWS))))

    def render(self) -> RenderResult:
        """The plot, drawn afresh: a plotext figure keeps state from one build to the next (an
        earlier build at another size changes the ticks of the next), and a drawing must
        depend only on the data and the size. A failure of the plotting library on odd data
        becomes a line saying so instead of taking the dashboard down."""
        self._plot = Plot()
        self._draw(self._plot)
        try:
            return super().render()
        except Exception as error:  # noqa: BLE001 - any failure of the plot library
            return Text(f"{self.caption}: cannot draw ({type(error).__name__}: {error})",
                        style="dim")


def thinned(n: int) -> list[int]:
    """The indices of `n` points to draw: every one up to `2 * MAX_POINTS - 1`, past that an
    even stride, and the last point always (the newest step is where the eye goes)."""
    kept = list(range(0, n, max(1, n // MAX_POINTS)))
    if kept and kept[-1] != n - 1:
        kept.append(n - 1)
    return kept


def step_ticks(first: int, last: int, count: int = 5) -> tuple[list[float], list[str]]:
    """Whole-number step ticks (plotext would label them 531.2)."""
    ticks = sorted({round(first + (last - first) * i / (count - 1)) for i in range(count)})
    return ticks, [units.count(tick) for tick in ticks]


def log_ticks(lowest: float, highest: float, count: int = 4) -> tuple[list[float], list[str]]:
    """Tick positions on a log10 axis, labelled with the values themselves.

    The data is drawn as log10 of itself on a linear axis: plotext's own log scale transforms
    the data in place on every build, so a second render of the same plot fails."""
    if highest - lowest < 1e-9:
        return [lowest], [f"{10 ** lowest:.3g}"]
    ticks = [lowest + (highest - lowest) * i / (count - 1) for i in range(count)]
    return ticks, [f"{10 ** tick:.3g}" for tick in ticks]
