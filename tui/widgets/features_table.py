"""The features browser's table: one row per feature of the page read so far.

Rows are keyed by feature id; Enter (DataTable's `select_cursor`) posts `DataTable.RowSelected`
and the screen opens the feature's card. A list reads id, density, max activation, score and
explanation; a semantic search reads id, how closely the explanation matches, and the
explanation. The explanation is cut to the width left by the other columns, so a row is one line
at 80 columns.
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

MISSING = "-"  # a score not computed, an explanation not written

LIST_COLUMNS = (("id", "id"), ("density", "density"), ("max", "max act"), ("score", "score"),
                ("explanation", "explanation"))
SEARCH_COLUMNS = (("id", "id"), ("match", "match"), ("explanation", "explanation"))
NUMBERS_WIDTH = {False: 36, True: 18}  # the other columns (5-digit ids), padding, scrollbar
MIN_EXPLANATION = 16


class FeaturesTable(DataTable):
    # DataTable's own enter (select_cursor), shown in the footer under what it does here
    BINDINGS = [Binding("enter", "select_cursor", "Open card")]

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.semantic: bool | None = None  # the columns shown: a list's or a semantic search's

    def show(self, features: list[dict], *, semantic: bool, append: bool) -> None:
        """Rows for `features` (`feature.list` rows, or `feature.search` results when
        `semantic`), after the rows shown when `append`, else instead of them."""
        if semantic != self.semantic:
            self.clear(columns=True)
            for key, label in SEARCH_COLUMNS if semantic else LIST_COLUMNS:
                self.add_column(label, key=key)
            self.semantic = semantic
        elif not append:
            self.clear()
        table_width = self.size.width or self.app.size.width  # the screen's, before layout
        width = max(table_width - NUMBERS_WIDTH[semantic], MIN_EXPLANATION)
        for feature in features:
            self.add_row(*(search_cells(feature, width) if semantic
                           else list_cells(feature, width)), key=str(feature["id"]))
        if not append and self.row_count:
            self.move_cursor(row=0)


def list_cells(feature: dict, width: int) -> tuple:
    return (feature["id"], Text(density(feature.get("density")), justify="right"),
            number(feature.get("max_act"), "{:.3g}"), number(feature.get("score"), "{:.2f}"),
            explanation_cell(feature.get("explanation"), width))


def search_cells(result: dict, width: int) -> tuple:
    return (result["id"], number(result.get("score"), "{:.2f}"),
            explanation_cell(result.get("explanation"), width))


def number(value: float | None, template: str) -> Text:
    return Text(MISSING if value is None else template.format(value), justify="right")


def density(value: float | None) -> str:
    """The share of tokens the feature fires on, as a percentage: `31%`, `0.31%`, `0.0012%`."""
    if value is None:
        return MISSING
    return "0%" if value == 0 else f"{100 * value:.2g}%"


def explanation_cell(text: str | None, width: int) -> Text:
    if not text:
        return Text(MISSING, style="dim")
    text = " ".join(text.split())  # one line
    return Text(text if len(text) <= width else text[:width - 1] + "…")
