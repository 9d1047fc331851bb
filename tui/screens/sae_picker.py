"""Which SAE to work with: the SAEs the daemon knows (`feature.sources`: directories under its
runs directory and the results of its training jobs), newest first, those with found features
marked. Enter opens what the picker was opened for: the features browser (an SAE without
features says how to find them instead), the monitor or the steer screen, which need no found
features. `m` monitors the SAE under the cursor whatever the picker is for."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.widget import Widget
from textual.widgets import DataTable, Static

from mistudio_core import units
from tui import format
from tui.screens.base import ReadingScreen
from tui.widgets.jobs_table import short_hook
from tui.widgets.request_error import RequestError

COLUMNS = ("SAE", "model", "hook", "features", "explained")
# What Enter opens -> the sub-title and the note above the list.
PURPOSES = {"features": ("features", "Choose an SAE (newest first)."),
            "monitor": ("monitor", "Choose an SAE to monitor (newest first)."),
            "steer": ("steer", "Choose an SAE to steer with (newest first).")}


class SaeTable(DataTable):
    BINDINGS = [Binding("enter", "select_cursor", "Open")]

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)


class SaePickerScreen(ReadingScreen):
    CSS_PATH = "sae_picker.tcss"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("r", "reload", "Reload"),
        Binding("m", "monitor", "Monitor"),
    ]

    def __init__(self, purpose: str = "features") -> None:
        super().__init__()
        self.purpose = purpose
        self.saes: dict[str, dict] = {}  # by path

    def body(self) -> Iterable[Widget]:
        yield Static(PURPOSES[self.purpose][1], id="picker-note")
        yield SaeTable(id="saes")
        yield RequestError(id="picker-error")

    def on_mount(self) -> None:
        self.sub_title = PURPOSES[self.purpose][0]
        table = self.query_one(SaeTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        table.focus()
        self.state.connection_changed.subscribe(self, self._on_connection)
        self.action_reload()

    def action_reload(self) -> None:
        self._fetch()

    @work(group="sources", exclusive=True)
    async def _fetch(self) -> None:
        reply = await self.read("cannot list the SAEs", "feature.sources")
        self._failed = reply is None
        if reply is not None:
            self.show_sources(reply["saes"])

    def show_sources(self, saes: list[dict]) -> None:
        """Rows for a `feature.sources` reply's SAEs, in its order (newest first)."""
        self.saes = {sae["path"]: sae for sae in saes}
        table = self.query_one(SaeTable)
        table.clear()
        for sae in saes:
            table.add_row(*cells(sae), key=sae["path"])
        note = (PURPOSES[self.purpose][1] if saes else
                "No SAE yet: train one (n on the dashboard), then find its features with "
                "`mistudio find SAE_DIR --model M --corpus C`.")
        self.query_one("#picker-note", Static).update(note)

    @on(DataTable.RowSelected, "#saes")
    def _open(self, event: DataTable.RowSelected) -> None:
        sae = self.saes[event.row_key.value]
        if self.purpose == "monitor":
            self.app.open_monitor(sae["path"], sae.get("model"))
        elif self.purpose == "steer":
            self.app.open_steer(sae["path"], model=sae.get("model"))
        elif sae.get("has_features"):
            self.app.open_features(sae["path"])
        else:
            self.notify(f"`mistudio find {sae['path']} --model M --corpus C` finds them",
                        title="no features found for this SAE yet", severity="warning")

    def action_monitor(self) -> None:
        table = self.query_one(SaeTable)
        if table.row_count:
            sae = self.saes[table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value]
            self.app.open_monitor(sae["path"], sae.get("model"))


def cells(sae: dict) -> tuple:
    """The SAE as its last two path parts (`runs/pythia-l6`), so the table fits 80 columns."""
    path = "/".join(sae["path"].rstrip("/").split("/")[-2:])
    explained = (Text(f"{units.count(sae.get('n_explained') or 0)}") if sae.get("has_features")
                 else Text("not found yet", style="dim"))
    return (Text(path, style="" if sae.get("has_features") else "dim"),
            format.last_part(sae.get("model")), short_hook(sae.get("hook")),
            units.count(sae.get("d_sae")), explained)
