"""One feature's card: what it fires on and what it does, read with `feature.show`.

From the top: its statistics; its explanations with their scores; the top examples with each
token shaded by the activation; one example from each quantile group, strongest group first, so
the weak end of its range shows too; the histogram of its activations; the tokens its decoder
direction promotes and suppresses; and the features similar to it (decoder cosine) and firing
with it (Jaccard), as lists: Enter on one opens that feature's card over this one, `escape` comes
back. It all scrolls, so it reads at 80x24.

`e` explains this one feature again (the offline `stats` explainer) and `s` scores its latest
explanation (the offline `rule` scorer), as jobs: the card says how each job is doing, from the
job events the app already follows, and reads the feature again once it succeeds. `m` monitors
the SAE, `S` steers with this feature (`s` being score). Reading runs in an exclusive worker; a
failed read keeps what was shown and says why, and `r` (or the app reconnecting) reads again.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widget import Widget
from textual.widgets import OptionList, Static

from mistudio_core import units
from mistudio_core.errors import MistudioError
from mistudiod.protocol import FINISHED_STATES
from tui import format
from tui.screens.base import ReadingScreen
from tui.widgets.activation_histogram import ActivationHistogram
from tui.widgets.features_table import density
from tui.widgets.neighbour_list import NeighbourList
from tui.widgets.request_error import RequestError
from tui.widgets.token_text import ExampleList, visible

EXPLAINER = "stats"  # `e`: offline, quick, needs only the stored examples
SCORER = "rule"  # `s`: offline as well
LOGITS = 8  # promoted and suppressed tokens shown
QUANTILE_EXAMPLES = 1  # examples shown per quantile group
DOING = {"explain": "explaining", "score": "scoring"}
DONE = {"explain": "explained", "score": "scored"}


class FeatureCardScreen(ReadingScreen):
    CSS_PATH = "feature_card.tcss"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("e", "explain", "Explain"),
        Binding("s", "score", "Score"),
        Binding("r", "reload", "Reload"),
        Binding("m", "monitor", "Monitor"),
        Binding("S", "steer", "Steer"),
        Binding("tab", "app.focus_next", "Next list"),
    ]

    def __init__(self, sae_dir: str, feature_id: int) -> None:
        super().__init__()
        self.sae_dir = sae_dir
        self.feature_id = feature_id
        self.card: dict | None = None
        self.jobs: dict[str, int] = {}  # the latest job of each kind submitted from here
        self._reloaded: set[int] = set()  # succeeded jobs whose results were read

    def body(self) -> Iterable[Widget]:
        with VerticalScroll(id="card"):
            yield Static(f"feature {self.feature_id}: reading…", id="card-stats")
            yield Static(id="card-explanations")
            yield Static(id="card-jobs")
            yield Static("Top examples", classes="section")
            yield ExampleList(empty="none: it never fired on the corpus", id="card-top")
            yield Static("Across its range (one example per quantile group)", classes="section")
            yield ExampleList(empty="none", id="card-quantiles")
            yield Static("Activation histogram", classes="section")
            yield ActivationHistogram(id="card-histogram")
            yield Static("Logit effects", classes="section")
            yield Static(id="card-logits")
            yield Static("Similar features (decoder cosine)", classes="section")
            yield NeighbourList("none yet: `mistudio correlate SAE_DIR` finds them",
                                id="card-similar")
            yield Static("Co-occurring features (Jaccard)", classes="section")
            yield NeighbourList("none yet: `mistudio correlate SAE_DIR` finds them",
                                id="card-cooccurring")
        yield RequestError(id="card-error")

    def on_mount(self) -> None:
        self.sub_title = f"feature {self.feature_id} of {format.last_part(self.sae_dir)}"
        self.query_one("#card", VerticalScroll).focus()
        self.state.connection_changed.subscribe(self, self._on_connection)
        self.state.job_changed.subscribe(self, self._on_jobs)
        self.state.jobs_replaced.subscribe(self, self._on_jobs)
        self._follow_jobs()
        self.action_reload()

    # ----- reading -----------------------------------------------------------------------------

    def action_reload(self) -> None:
        self._fetch()

    @work(group="card", exclusive=True)
    async def _fetch(self) -> None:
        reply = await self.read(f"cannot read feature {self.feature_id}", "feature.show",
                                {"sae_dir": self.sae_dir, "id": self.feature_id})
        self._failed = reply is None
        if reply is not None:
            self.show_card(reply["feature"])

    def show_card(self, card: dict) -> None:
        """Draw a `feature.show` card."""
        self.card = card
        self.query_one("#card-stats", Static).update(stats_text(card))
        self.query_one("#card-explanations", Static).update(explanations_text(card))
        scale = card.get("max_act") or max((e["value"] for e in card.get("top", [])), default=1)
        self.query_one("#card-top", ExampleList).show(
            [(f"{example['value']:.3g}", example) for example in card.get("top", [])], scale)
        self.query_one("#card-quantiles", ExampleList).show(quantile_rows(card), scale)
        self.query_one(ActivationHistogram).show(card.get("histogram") or {})
        self.query_one("#card-logits", Static).update(logits_table(card.get("logits") or {}))
        self.query_one("#card-similar", NeighbourList).show(card.get("similar") or [])
        self.query_one("#card-cooccurring", NeighbourList).show(card.get("cooccurring") or [])

    def redraw(self) -> None:
        self._follow_jobs()
        super().redraw()

    @on(OptionList.OptionSelected)
    def _jump(self, event: OptionList.OptionSelected) -> None:
        self.app.open_feature(self.sae_dir, int(event.option.id))

    def action_monitor(self) -> None:
        self.app.open_monitor(self.sae_dir)

    def action_steer(self) -> None:
        self.app.open_steer(self.sae_dir, self.feature_id)

    # ----- explain and score -------------------------------------------------------------------

    def action_explain(self) -> None:
        self._submit("explain", {"sae_dir": self.sae_dir, "explainer": EXPLAINER,
                                 "features": str(self.feature_id), "overwrite": True})

    def action_score(self) -> None:
        """Score the latest explanation, whichever explainer wrote it."""
        explanations = (self.card or {}).get("explanations") or []
        if not explanations:
            self.notify("press e to explain it first", title="no explanation to score",
                        severity="warning")
            return
        self._submit("score", {"sae_dir": self.sae_dir, "scorer": SCORER,
                               "explainer": explanations[0]["explainer"],
                               "features": str(self.feature_id), "overwrite": True})

    @work(group="submit")
    async def _submit(self, kind: str, params: dict) -> None:
        try:
            reply = await self.link.request("job.submit", {"kind": kind, "params": params})
        except MistudioError as error:
            self.notify(error.message + (f"\nhint: {error.hint}" if error.hint else ""),
                        title=f"{kind} not submitted", severity="error")
            return
        self.jobs[kind] = reply["job"]["id"]
        self.state.apply_job(reply["job"])  # its later states arrive as events

    def _on_jobs(self, _: dict | None) -> None:
        if self.is_current:
            self._follow_jobs()

    def _follow_jobs(self) -> None:
        """How each job submitted from here is doing; read the card again when one succeeds."""
        lines = []
        for kind, job_id in self.jobs.items():
            job = self.state.jobs.get(job_id)
            if job is None:
                continue
            lines.append(job_line(kind, job))
            if job["state"] == "succeeded" and job_id not in self._reloaded:
                self._reloaded.add(job_id)
                self.action_reload()
        jobs = self.query_one("#card-jobs", Static)
        jobs.display = bool(lines)
        jobs.update(Text("\n").join(lines))


def stats_text(card: dict) -> Text:
    """`feature 42 of 12.3K · fired 3.1K times (0.31%) · max 12.4 · mean 3.1`"""
    return Text.assemble(
        (f"feature {card['id']}", "bold"), f" of {units.count(card.get('d_sae'))}",
        f" · fired {units.count(card.get('n_fired'))} times ({density(card.get('density'))})",
        f" · max {format.number(card.get('max_act'), '{:.3g}')}",
        f" · mean {format.number(card.get('mean_act'), '{:.3g}')}")


def explanations_text(card: dict) -> Table | Text:
    """Each explanation (latest first) under its explainer's name, with its scores."""
    explanations = card.get("explanations") or []
    if not explanations:
        return Text("not explained yet: e explains it", style="dim")
    table = Table.grid(padding=(0, 1))
    table.add_column(style="dim", no_wrap=True)
    table.add_column(ratio=1)
    for explanation in explanations:
        scores = [f"{score['scorer']} {format.number(score['value'], '{:.2f}')}"
                  for score in card.get("scores") or []
                  if score["explainer"] == explanation["explainer"]]
        text = Text(f"“{explanation['text']}”", style="bold")
        text.append("\n" + (" · ".join(scores) if scores else "not scored: s scores it"),
                    style="dim" if not scores else "")
        table.add_row(explanation["explainer"], text)
    return table


def quantile_rows(card: dict) -> list[tuple[str, dict]]:
    """Examples of the quantile groups, the strongest group first, labelled by its range."""
    rows = []
    for group in reversed(card.get("quantiles") or []):
        for example in group["examples"][:QUANTILE_EXAMPLES]:
            rows.append((f"{group['low']:.2g}–{group['high']:.2g}", example))
    return rows


def logits_table(logits: dict) -> Table | Text:
    """The promoted and suppressed tokens side by side, strongest first."""
    promoted, suppressed = logits.get("promoted") or [], logits.get("suppressed") or []
    if not promoted and not suppressed:
        return Text("not computed", style="dim")
    table = Table.grid(padding=(0, 1))
    for justify in ("left", "right", "left", "right"):
        table.add_column(justify=justify, no_wrap=True)
    table.add_row(Text("promoted", "bold"), "", Text("   suppressed", "bold"), "")
    for index in range(min(max(len(promoted), len(suppressed)), LOGITS)):
        row: list[Text | str] = []
        for side, prefix in ((promoted, ""), (suppressed, "   ")):
            if index < len(side):
                token, value = side[index]
                row += [Text(f"{prefix}'{visible(token)}'"), f"{value:+.3g}"]
            else:
                row += ["", ""]
        table.add_row(*row)
    return table


def job_line(kind: str, job: dict) -> Text:
    """`explaining… (job 12, running 40%)`, `explained (job 12)`, or what went wrong."""
    state = job["state"]
    if state not in FINISHED_STATES:
        progress = f" {job['progress']:.0%}" if state == "running" and job.get("progress") else ""
        return Text(f"{DOING[kind]}… (job {job['id']}, {state}{progress})", style="yellow")
    if state == "succeeded":
        return Text(f"{DONE[kind]} (job {job['id']})", style="green")
    error = job.get("error") or {}
    hint = f" · hint: {error['hint']}" if error.get("hint") else ""
    return Text(f"{kind} {state} (job {job['id']}): {error.get('message', state)}{hint}",
                style="red")
