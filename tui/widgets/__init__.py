"""The TUI's widgets: each draws one part of the daemon's state from `tui.state.DaemonState`."""

from __future__ import annotations

from textual.dom import NoScreen
from textual.widget import Widget


def in_sight(widget: Widget) -> bool:
    """Is the widget on a current screen (see `tui.screens.base`)? Widgets that redraw on the
    state's signals skip the work while not, and catch up when their screen calls them."""
    try:
        return widget.screen.is_current
    except NoScreen:  # detached: nothing to draw on
        return False
