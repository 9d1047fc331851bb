"""The features of one SAE: a sortable, searchable list read from the daemon a page at a time.

An SAE may have 65k features, so the screen never asks for all of them: it reads a page of
`PAGE` rows (`feature.list`) for the current sort and search, and the next page when the cursor
comes within `PREFETCH` rows of the end. `s` cycles the sort (id, density, max and mean
activation, score), `S` reverses it. `/` goes to the search box: plain text keeps the features
whose explanation contains it (or the feature of that id), `~text` asks for the explanations
closest in meaning (`feature.search`); typing is debounced, Enter searches at once. `m` monitors
the SAE, on the model its features were found with.

Every request runs in one exclusive worker, so a newer sort or search cancels the one in flight
and keys never wait on the daemon. A failed request leaves the rows shown and says why under
them; `r` reads again, and so does the app reconnecting to the daemon.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import DataTable, Input, Static

from mistudio_core import units
from tui import format
from tui.screens.base import ReadingScreen
from tui.widgets.features_table import FeaturesTable
from tui.widgets.jobs_table import short_hook
from tui.widgets.request_error import RequestError

PAGE = 100
PREFETCH = 20  # rows from the end of those read at which the next page is asked for
SEMANTIC_LIMIT = 50
# A search by meaning embeds the query: the daemon may first have to load the embedding model.
SEMANTIC_TIMEOUT_S = 60.0
DEBOUNCE_S = 0.3
# `mistudio_core.feature_store.SORTS`, named rather than imported: the store would load numpy
# into the TUI. A test keeps the two the same.
SORTS = ("id", "density", "max", "mean", "score")
SEMANTIC_PREFIX = "~"


@dataclass(frozen=True)
class FeatureQuery:
    """What the list shows: its order and its search (`~text` for a semantic search)."""

    sort: str = "id"
    descending: bool = False
    search: str = ""

    @property
    def semantic(self) -> bool:
        return bool(self.meaning)

    @property
    def meaning(self) -> str:
        """The text of a semantic search (`~text`), else nothing."""
        if not self.search.startswith(SEMANTIC_PREFIX):
            return ""
        return self.search.removeprefix(SEMANTIC_PREFIX).strip()

    @property
    def words(self) -> str:
        """The text of a plain search, else nothing."""
        return "" if self.search.startswith(SEMANTIC_PREFIX) else self.search

    def request(self, sae_dir: str, offset: int) -> tuple[str, dict]:
        """The daemon request for the page at `offset` (a semantic search has one page)."""
        if self.semantic:
            return "feature.search", {"sae_dir": sae_dir, "query": self.meaning,
                                      "limit": SEMANTIC_LIMIT}
        content = {"sae_dir": sae_dir, "sort": self.sort, "descending": self.descending,
                   "limit": PAGE, "offset": offset}
        if self.words:
            content["search"] = self.words
        return "feature.list", content


def sae_dir_of(job: dict) -> str | None:
    """The SAE a job made or worked on: a succeeded train job's result path, or the `sae_dir`
    of a find, explain, score or correlate job."""
    if job["kind"] == "train":
        return (job.get("result") or {}).get("path") if job["state"] == "succeeded" else None
    return (job.get("params") or {}).get("sae_dir")


class FeaturesScreen(ReadingScreen):
    CSS_PATH = "features.tcss"
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("slash", "search", "Search"),
        Binding("s", "next_sort", "Sort"),
        Binding("S", "reverse", "Reverse"),
        Binding("r", "reload", "Reload"),
        Binding("m", "monitor", "Monitor"),
    ]

    def __init__(self, sae_dir: str) -> None:
        super().__init__()
        self.sae_dir = sae_dir
        self.feature_query = FeatureQuery()
        self.features: list[dict] = []  # the rows read so far, in order
        self.total = 0  # how many match in all
        self.meta: dict = {}
        self.d_sae: int | None = None
        self.reading = False
        self._failed: tuple[FeatureQuery, int] | None = None  # the request to retry
        self._debounce: Timer | None = None

    def body(self) -> Iterable[Widget]:
        yield Static(id="features-sae")
        with Horizontal(id="features-bar"):
            yield Input(placeholder="/ search explanations or an id; ~ by meaning",
                        compact=True, id="features-search")
            yield Static(id="features-count")
        yield FeaturesTable(id="features-table")
        yield RequestError(id="features-error")

    def on_mount(self) -> None:
        self.sub_title = f"features of {format.last_part(self.sae_dir)}"
        self.state.connection_changed.subscribe(self, self._on_connection)
        self.query_one(FeaturesTable).focus()
        self._draw_header()
        self.load()

    # ----- reading -----------------------------------------------------------------------------

    def load(self, offset: int = 0) -> None:
        """Read the page at `offset` for the current query (0: start the list afresh)."""
        self.reading = True
        self._draw_count()
        self._fetch(self.feature_query, offset)

    @work(group="features", exclusive=True)
    async def _fetch(self, query: FeatureQuery, offset: int) -> None:
        msg_type, content = query.request(self.sae_dir, offset)
        reply = await self.read("cannot read the features", msg_type, content, **(
            {"timeout": SEMANTIC_TIMEOUT_S} if query.semantic else {}))
        self.reading = False
        self._failed = (query, offset) if reply is None else None
        if reply is None:
            self._draw_count()
        else:
            self.show_page(query, offset, reply)

    def show_page(self, query: FeatureQuery, offset: int, reply: dict) -> None:
        """Show a `feature.list` (or, for a semantic query, `feature.search`) reply for the
        page at `offset`; a page that no longer follows the rows shown is dropped."""
        if query != self.feature_query or offset != (len(self.features) if offset else 0):
            return
        if query.semantic:
            page, self.total = reply["results"], len(reply["results"])
        else:
            page, self.total = reply["features"], reply["total"]
            self.meta = reply.get("meta") or self.meta
            self.d_sae = reply.get("d_sae", self.d_sae)
        self.features = self.features + page if offset else list(page)
        self.query_one(FeaturesTable).show(page, semantic=query.semantic, append=offset > 0)
        self._draw_header()
        self._draw_count()

    @on(DataTable.RowHighlighted, "#features-table")
    def _near_the_end(self, event: DataTable.RowHighlighted) -> None:
        """Ask for the next page before the cursor reaches the last row read."""
        if (not self.reading and not self.feature_query.semantic and self._failed is None
                and len(self.features) < self.total
                and event.cursor_row >= len(self.features) - PREFETCH):
            self.load(len(self.features))

    # ----- drawing -----------------------------------------------------------------------------

    def _draw_header(self) -> None:
        """`pythia-160m · L6 resid_post · 12.3K features · 1M tokens of pile.jsonl`, from the
        find's record (`meta`)."""
        meta = self.meta
        corpus = f" of {format.last_part(meta['corpus'])}" if meta.get("corpus") else ""
        parts = [format.last_part(meta.get("model_id")) if meta.get("model_id") else None,
                 short_hook(meta.get("hook")) if meta.get("hook") else None,
                 f"{units.count(self.d_sae)} features" if self.d_sae else None,
                 f"{units.count(meta['n_tokens'])} tokens{corpus}"
                 if meta.get("n_tokens") else None]
        shown = [part for part in parts if part] or [self.sae_dir]
        self.query_one("#features-sae", Static).update(" · ".join(shown))

    def _draw_count(self) -> None:
        """`37 of 12.3K match · by max ↓`, or what is being read."""
        query = self.feature_query
        if not self.features and (self.reading or self._failed):
            text = Text("reading…" if self.reading else "not read", style="dim")
        elif query.semantic:
            text = Text(f"{self.total} closest in meaning")
        else:
            matched = (f"{units.count(self.total)} of {units.count(self.d_sae)} match"
                       if query.words else f"{units.count(self.total)} features")
            text = Text.assemble(matched, " · by ", (query.sort, "bold"),
                                 " ↓" if query.descending else " ↑")
        self.query_one("#features-count", Static).update(text)

    # ----- keys --------------------------------------------------------------------------------

    def _change(self, **changes) -> None:
        self.feature_query = replace(self.feature_query, **changes)
        self.load()

    def action_next_sort(self) -> None:
        if self.feature_query.semantic:
            self.notify("a search by meaning is ranked by how well explanations match; clear "
                        "the ~ to sort", severity="warning")
            return
        sort = SORTS[(SORTS.index(self.feature_query.sort) + 1) % len(SORTS)]
        self._change(sort=sort, descending=sort != "id")  # strongest first, ids from 0

    def action_reverse(self) -> None:
        if not self.feature_query.semantic:
            self._change(descending=not self.feature_query.descending)

    def action_reload(self) -> None:
        if self._failed is not None and self._failed[1] and self._failed[0] == self.feature_query:
            self.load(self._failed[1])  # the next page that failed: the rows read stay
        else:
            self.load()

    def action_monitor(self) -> None:
        """Monitor this SAE, on the model its features were found with."""
        self.app.open_monitor(self.sae_dir, self.meta.get("model_id"))

    def action_search(self) -> None:
        self.query_one("#features-search", Input).focus()

    def action_back(self) -> None:
        """Out of the search box first, then out of the screen."""
        if self.focused is self.query_one("#features-search", Input):
            self.query_one(FeaturesTable).focus()
        else:
            self.app.pop_screen()

    @on(Input.Changed, "#features-search")
    def _typed(self) -> None:
        if self._debounce is not None:
            self._debounce.stop()
        self._debounce = self.set_timer(DEBOUNCE_S, self._search)

    @on(Input.Submitted, "#features-search")
    def _submitted(self) -> None:
        self._search()
        self.query_one(FeaturesTable).focus()

    def _search(self) -> None:
        if self._debounce is not None:
            self._debounce.stop()
            self._debounce = None
        search = self.query_one("#features-search", Input).value.strip()
        if search != self.feature_query.search:
            self._change(search=search)

    @on(DataTable.RowSelected, "#features-table")
    def _open_card(self, event: DataTable.RowSelected) -> None:
        self.app.open_feature(self.sae_dir, int(event.row_key.value))
