"""Text as the model read it, each token shaded by how strongly one feature fired on it.

A token's shade is its activation over a scale, the feature's max activation, so the examples of
one card compare with each other: a weak example from a low quantile group looks faint beside a
top one. The shade blends the widget's background into the theme's warning colour (read from the
`example-list--activation` component class, so it follows the theme), with a floor so that a
token that fired at all is never mistaken for one that did not. The peak token is bold and
underlined. Whitespace that would vanish is made visible (a newline reads `⏎`, a tab `⇥`), so a
feature that fires on line breaks shows where.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.color import Color
from textual.widget import Widget

VISIBLE = str.maketrans({"\n": "⏎", "\r": "␍", "\t": "⇥"})
MIN_SHADE = 0.2  # the shade of the weakest activation above zero
DARK_TEXT = Color(0, 0, 0)
LIGHT_TEXT = Color(255, 255, 255)


def visible(token: str) -> str:
    """The token with its line breaks and tabs drawn, so it takes one line and can be seen."""
    return token.translate(VISIBLE)


def token_style(fraction: float, base: Color, accent: Color) -> Style:
    """The background of a token that fired at `fraction` of the scale (nothing below zero),
    with text that stays readable on it."""
    if fraction <= 0:
        return Style()
    shade = base.blend(accent, MIN_SHADE + (1 - MIN_SHADE) * min(fraction, 1.0))
    text = DARK_TEXT if shade.brightness > 0.5 else LIGHT_TEXT
    return Style(bgcolor=shade.rich_color, color=text.rich_color)


def shaded_tokens(example: dict, scale: float, base: Color, accent: Color) -> Text:
    """One example (a `feature.show` example: `tokens`, `token_ids`, `acts`, `center`) as
    text, padding left out."""
    text = Text(no_wrap=False)
    center = example.get("center")
    for index, (token, token_id, act) in enumerate(zip(
            example["tokens"], example["token_ids"], example["acts"], strict=True)):
        if token_id < 0:  # padding outside the text
            continue
        style = token_style(act / scale if scale > 0 else 0.0, base, accent)
        if index == center:
            style += Style(bold=True, underline=True)
        text.append(visible(token), style)
    return text


class ExampleList(Widget):
    """Examples one per row: a label (the peak value, a quantile group's range) and the shaded
    text, wrapped under itself."""

    COMPONENT_CLASSES = {"example-list--activation", "example-list--label"}

    def __init__(self, empty: str = "none", **kwargs) -> None:
        super().__init__(**kwargs)
        self.empty = empty
        self.rows: list[tuple[str, dict]] = []
        self.scale = 1.0

    def show(self, rows: Sequence[tuple[str, dict]], scale: float) -> None:
        """Draw these `(label, example)` rows, shaded against `scale`."""
        self.rows = list(rows)
        self.scale = scale
        self.refresh(layout=True)

    def render(self) -> Table | Text:
        if not self.rows:
            return Text(self.empty, style="dim")
        accent = Color.from_rich_color(
            self.get_component_rich_style("example-list--activation").bgcolor)
        label_style = self.get_component_rich_style("example-list--label")
        base = self.background_colors[1]
        table = Table.grid(padding=(0, 1))
        table.add_column(justify="right", no_wrap=True)
        table.add_column(ratio=1)
        for label, example in self.rows:
            table.add_row(Text(label, style=label_style),
                          shaded_tokens(example, self.scale, base, accent))
        return table
