"""Text as the model read (or wrote) it, token by token, each shaded by one feature's activation,
with a cursor on one token that the arrow keys move.

The shade is `token_text.token_style`, as on a feature's card, against the strongest activation
shown, so the token the feature fires on most is the full colour. Tokens the model generated are
italic. The tokens are laid out into lines here, never split across two, so the line of the
cursor is known and the scroll container around the widget keeps it in sight.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.color import Color
from textual.geometry import Region, Size
from textual.message import Message
from textual.widget import Widget

from tui.widgets.token_text import token_style, visible


@dataclass
class ShownToken:
    text: str
    activation: float  # of the feature that shades the view (0: it did not fire)
    generated: bool


def token_lines(widths: list[int], width: int) -> list[list[int]]:
    """The indices of the tokens on each line, tokens of these `widths` laid out in `width`
    columns; a token wider than the line gets a line of its own (and is cut there)."""
    lines: list[list[int]] = [[]]
    used = 0
    for index, token_width in enumerate(widths):
        if lines[-1] and used + token_width > width:
            lines.append([])
            used = 0
        lines[-1].append(index)
        used += token_width
    return lines


class TokenView(Widget, can_focus=True):
    BINDINGS = [
        Binding("left", "move(-1)", "Previous token", show=False),
        Binding("right", "move(1)", "Next token", show=False),
        Binding("home", "move_to(0)", "First token", show=False),
        Binding("end", "move_to(-1)", "Last token", show=False),
    ]
    COMPONENT_CLASSES = {"token-view--activation", "token-view--cursor",
                         "token-view--generated"}

    class CursorMoved(Message):
        """The cursor is on another token."""

        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

    def __init__(self, empty: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.empty = empty
        self.tokens: list[ShownToken] = []
        self.cursor = 0

    # ----- what is shown -----------------------------------------------------------------------

    def show(self, tokens: list[ShownToken], cursor: int | None = None) -> None:
        """Show these tokens, the cursor kept where it was (or moved to `cursor`)."""
        self.tokens = list(tokens)
        self._place_cursor(self.cursor if cursor is None else cursor)
        self.refresh(layout=True)

    def append(self, token: ShownToken) -> None:
        """One more token, as a generation streams in."""
        self.tokens.append(token)
        self.refresh(layout=True)

    @property
    def scale(self) -> float:
        return max((token.activation for token in self.tokens), default=0.0)

    # ----- the cursor --------------------------------------------------------------------------

    def action_move(self, step: int) -> None:
        self._place_cursor(self.cursor + step)

    def action_move_to(self, index: int) -> None:
        self._place_cursor(index if index >= 0 else len(self.tokens) + index)

    def _place_cursor(self, index: int) -> None:
        index = max(0, min(index, len(self.tokens) - 1))
        moved = index != self.cursor
        self.cursor = index
        self.refresh()
        self.call_after_refresh(self._keep_cursor_in_sight)
        if moved:
            self.post_message(self.CursorMoved(index))

    def _keep_cursor_in_sight(self) -> None:
        lines = self._lines(self.content_region.width)
        line = next((n for n, indices in enumerate(lines) if self.cursor in indices), 0)
        if self.parent is not None and self.parent.is_scrollable:
            top = self.virtual_region.y + self.styles.gutter.top
            self.parent.scroll_to_region(Region(0, top + line, 1, 1), animate=False)

    # ----- drawing -----------------------------------------------------------------------------

    def _texts(self) -> list[str]:
        return [visible(token.text) or " " for token in self.tokens]  # an empty token: a cell

    def _lines(self, width: int) -> list[list[int]]:
        return token_lines([cell_len(text) for text in self._texts()], max(width, 1))

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(self._lines(width)) if self.tokens else 1

    def render(self) -> Text:
        if not self.tokens:
            return Text(self.empty, style="dim")
        accent = Color.from_rich_color(
            self.get_component_rich_style("token-view--activation").bgcolor)
        cursor = self.get_component_rich_style("token-view--cursor")
        generated = self.get_component_rich_style("token-view--generated")
        base, scale, texts = self.background_colors[1], self.scale, self._texts()
        text = Text(no_wrap=True, overflow="crop")
        for number, indices in enumerate(self._lines(self.content_region.width)):
            if number:
                text.append("\n")
            for index in indices:
                token = self.tokens[index]
                style = token_style(token.activation / scale if scale > 0 else 0.0, base, accent)
                if token.generated:
                    style += generated
                if index == self.cursor:
                    style += cursor if self.has_focus else Style(underline=True)
                text.append(texts[index], style)
        return text

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()
