"""A feature's neighbours (similar by decoder direction, or firing together), as a list to jump
from: Enter on one posts `OptionList.OptionSelected` with the feature id as the option's id."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.widgets import OptionList
from textual.widgets.option_list import Option

EXPLANATION_WIDTH = 56  # characters of a neighbour's explanation, so a row fits 80 columns


class NeighbourList(OptionList):
    BINDINGS = [Binding("enter", "select", "Open feature")]

    def __init__(self, empty: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.empty = empty

    def show(self, neighbours: list[dict]) -> None:
        """`feature.show` neighbours: `{id, value, explanation}`, closest first."""
        self.clear_options()
        if not neighbours:
            self.add_option(Option(Text(self.empty, style="dim"), disabled=True))
            return
        self.add_options(Option(neighbour_row(neighbour), id=str(neighbour["id"]))
                         for neighbour in neighbours)
        self.highlighted = 0


def neighbour_row(neighbour: dict) -> Text:
    """`  17  0.82  a comma after a clause` on one line."""
    explanation = neighbour.get("explanation")
    if explanation and len(explanation) > EXPLANATION_WIDTH:
        explanation = explanation[:EXPLANATION_WIDTH - 1] + "…"
    return Text.assemble((f"{neighbour['id']:>6}", "bold"), f"  {neighbour['value']:.2f}  ",
                         (explanation or "not explained", "" if explanation else "dim"))
