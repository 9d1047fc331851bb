"""How often a feature fires at each strength: one text bar per activation bin.

The bins are logarithmic (`find` counts activations in bins of equal width in log10, so the
rare strong activations and the common weak ones both get bins). The empty bins before the first
and after the last non-empty one are left out, and neighbouring bins are merged until the bars fit
`MAX_ROWS` lines, so the histogram reads at 80x24. Text bars rather than a chart: they are exact
(each bar has its count beside it) and draw the same in every terminal.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.widget import Widget

from mistudio_core import units

MAX_ROWS = 12
EIGHTHS = " ▏▎▍▌▋▊▉"  # partial blocks, for bars that end between two cells


def histogram_rows(log10_edges: list[float], counts: list[int],
                   max_rows: int = MAX_ROWS) -> list[tuple[float, float, int]]:
    """`(low, high, count)` per bar, in activation units: the span from the first non-empty bin
    to the last, neighbouring bins merged into at most `max_rows` bars."""
    filled = [i for i, count in enumerate(counts) if count]
    if not filled:
        return []
    first, last = filled[0], filled[-1]
    per_row = math.ceil((last - first + 1) / max_rows)
    rows = []
    for start in range(first, last + 1, per_row):
        end = min(start + per_row, last + 1)
        rows.append((10 ** log10_edges[start], 10 ** log10_edges[end],
                     int(sum(counts[start:end]))))
    return rows


def bar(fraction: float, width: int) -> str:
    """A bar `fraction` of `width` cells long, to an eighth of a cell."""
    eighths = round(max(0.0, min(fraction, 1.0)) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (EIGHTHS[part] if part else "")


class ActivationHistogram(Widget):
    COMPONENT_CLASSES = {"activation-histogram--bar", "activation-histogram--label"}

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.histogram: dict = {}

    def show(self, histogram: dict) -> None:
        """A `feature.show` histogram: `log10_edges` (bins + 1) and `counts` (bins)."""
        self.histogram = histogram or {}
        self.refresh(layout=True)

    def render(self) -> Text:
        rows = histogram_rows(self.histogram.get("log10_edges") or [],
                              self.histogram.get("counts") or [])
        if not rows:
            return Text("no activations counted", style="dim")
        labels = [f"{low:.2g}–{high:.2g}" for low, high, _ in rows]
        numbers = [units.count(count) for _, _, count in rows]
        label_width = max(map(len, labels))
        width = max(self.size.width - label_width - max(map(len, numbers)) - 2, 4)
        most = max(count for _, _, count in rows)
        bar_style = self.get_component_rich_style("activation-histogram--bar")
        label_style = self.get_component_rich_style("activation-histogram--label")
        text = Text()
        for (_, _, count), label, number in zip(rows, labels, numbers, strict=True):
            if text:
                text.append("\n")
            text.append(label.rjust(label_width) + " ", label_style)
            text.append(bar(count / most, width), bar_style)
            text.append(" " + number)
        return text
