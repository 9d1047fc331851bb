"""A one-line history of a percentage, newest on the right, on a fixed 0-100 scale.

Textual's `Sparkline` scales each line to its own minimum and maximum, which turns a flat 2%
into a wall of spikes; a utilization history has to be read against 100%, as nvitop draws it.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widget import Widget

BLOCKS = " ▁▂▃▄▅▆▇█"


class PercentHistory(Widget):
    DEFAULT_CSS = """
    PercentHistory {
        height: 1;
    }
    """

    def __init__(self, values: Sequence[float] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.values = values

    def show(self, values: Sequence[float]) -> None:
        self.values = values
        self.refresh()

    def render(self) -> Text:
        return history_line(self.values, self.size.width)


def history_line(values: Sequence[float], width: int) -> Text:
    """The last `width` readings as blocks of eight heights, coloured like the meters."""
    recent = list(values)[-width:] if width > 0 else []
    text = Text(" " * (width - len(recent)))
    for value in recent:
        share = min(max(value, 0.0), 100.0) / 100
        style = "red" if share > 0.85 else "yellow" if share > 0.6 else "green"
        text.append(BLOCKS[max(1, round(share * 8))], style)
    return text
