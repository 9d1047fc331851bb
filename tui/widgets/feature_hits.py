"""The strongest features on one token, per SAE, strongest first (a monitor reply's `features`).
Enter posts `OptionList.OptionSelected`; `feature_at` says which feature an option is. The
feature that shades the text is marked."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.widgets import OptionList
from textual.widgets.option_list import Option


@dataclass(frozen=True)
class FeatureRef:
    """A feature of one of the session's SAEs (named as the session names them)."""

    sae: str
    id: int


class FeatureHits(OptionList):
    BINDINGS = [Binding("enter", "select", "Shade by it")]

    def __init__(self, empty: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.empty = empty
        self.refs: list[FeatureRef | None] = []  # per option: its feature (None: a heading)

    def show(self, features: dict[str, list[dict]], shading: FeatureRef | None) -> None:
        """A token's `{sae: [{id, activation, explanation}]}`; SAE headings when there are
        several. The highlight stays on the same row."""
        highlighted = self.highlighted
        self.clear_options()
        self.refs = []
        for sae, hits in features.items():
            if len(features) > 1:
                self._add(Option(Text(sae, style="bold"), disabled=True), None)
            for hit in hits:
                ref = FeatureRef(sae, hit["id"])
                self._add(Option(hit_row(hit, ref == shading)), ref)
        if not self.refs:
            self._add(Option(Text(self.empty, style="dim"), disabled=True), None)
        choices = [index for index, ref in enumerate(self.refs) if ref is not None]
        if choices:
            self.highlighted = highlighted if highlighted in choices else choices[0]

    def _add(self, option: Option, ref: FeatureRef | None) -> None:
        self.add_option(option)
        self.refs.append(ref)

    def feature_at(self, index: int | None) -> FeatureRef | None:
        return self.refs[index] if index is not None and 0 <= index < len(self.refs) else None

    @property
    def highlighted_feature(self) -> FeatureRef | None:
        return self.feature_at(self.highlighted)


def hit_row(hit: dict, shading: bool) -> Table:
    """`● 17  3.41  a comma after a`, the explanation wrapped under itself:
                    `clause`."""
    explanation = hit.get("explanation")
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(ratio=1)
    table.add_row(Text.assemble(("●" if shading else " ", "bold"), (f"{hit['id']:>6}", "bold")),
                  f"{hit['activation']:.3g}",
                  Text(explanation or "not explained", style="" if explanation else "dim"))
    return table
