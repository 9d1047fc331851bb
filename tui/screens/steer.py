"""Steer: generate from a prompt twice side by side, as the model does (baseline) and with
features added to its activations or clamped (steered), streamed token by token
(`session.steer`).

Each feature to steer with is a row (its id, its strength, `add` or `clamp`): `ctrl+n` adds
one, `ctrl+d` removes the row with the cursor, up and down on a strength nudge it. Both sides
are sampled with the same seed, so whatever differs is the steering's doing. When the run ends,
each pane says how strongly each steered feature fired on its side (the mean over its generated
tokens).
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual import on
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.validation import Integer, Number
from textual.widget import Widget
from textual.widgets import Input, Label, Static

from mistudiod.schema import Field
from mistudiod.sessions import STEER_FIELDS
from tui.screens.session_screen import SessionScreen
from tui.widgets.steering_rows import SteeringRow

SIDES = ("baseline", "steered")
# The run's fields beside the prompt, with their labels; their kinds, ranges and defaults are the
# daemon's (`STEER_FIELDS`).
PARAMS = {"max_new_tokens": "new tokens", "seed": "seed", "temperature": "temperature"}


def validator(field: Field) -> Integer | Number:
    if field.kind is int:
        return Integer(int(field.min), int(field.max))
    return Number(field.min, field.max)


class SteerScreen(SessionScreen):
    CSS_PATH = ["session.tcss", "steer.tcss"]
    BINDINGS = [Binding("ctrl+n", "add_steering", "Add feature")]
    FIELDS = {**SessionScreen.FIELDS, "prompt": "#prompt", "steerings": "#steerings",
              **{name: f"#{name}" for name in PARAMS}}
    WHAT = "steer"

    def __init__(self, sae_dir: str, feature: int | None = None,
                 model: str | None = None) -> None:
        super().__init__(sae_dir, model)
        self.feature = feature
        self.d_sae: int | None = None  # the SAE's, once the session is open
        self.streamed: dict[str, list[str]] = {side: [] for side in SIDES}
        self.reply: dict | None = None
        self.prompt = ""  # of the run shown

    def body(self) -> Iterable[Widget]:
        yield from self.model_row()
        with Horizontal(classes="row"):
            yield Label("prompt", classes="label")
            yield Input(compact=True, id="prompt", placeholder="the text both sides continue")
        with Horizontal(classes="row", id="steer-params"):
            for name, label in PARAMS.items():
                field = STEER_FIELDS[name]
                yield Label(label, classes="param-label")
                yield Input(f"{field.default:g}", compact=True, validators=[validator(field)],
                            id=name)
        with VerticalScroll(id="steerings", can_focus=False):
            yield SteeringRow(self.feature)
        with Horizontal(id="steer-panes"):
            for side in SIDES:
                with VerticalScroll(id=f"{side}-pane", classes="pane"):
                    yield Static(id=f"{side}-text")
                    yield Static(id=f"{side}-means", classes="means")
        yield self.error_line()

    def on_mount(self) -> None:
        super().on_mount()
        self.sub_title = f"steer · {self.sae_dir}"
        self.query_one("#steerings").border_title = (
            "features to steer with (ctrl+n adds, ctrl+d removes, ↑↓ nudge a strength)")
        for side in SIDES:
            self.query_one(f"#{side}-pane").border_title = side
        self._draw_panes()
        self.query_one("#prompt", Input).focus()

    def session_opened(self, opened: dict) -> None:
        self.d_sae = opened["saes"][0]["d_sae"]

    # ----- the steerings -----------------------------------------------------------------------

    def action_add_steering(self) -> None:
        row = SteeringRow()
        self.query_one("#steerings").mount(row)
        self.call_after_refresh(lambda: row.fields()[0].focus())

    @on(SteeringRow.RemoveWanted)
    def _remove_steering(self, event: SteeringRow.RemoveWanted) -> None:
        rows = list(self.query(SteeringRow))
        index = rows.index(event.row)
        neighbours = rows[:index] + rows[index + 1:]
        if neighbours:
            neighbours[max(index - 1, 0)].fields()[0].focus()
        else:
            self.query_one("#prompt", Input).focus()
        event.row.remove()

    # ----- runs --------------------------------------------------------------------------------

    def run_request(self) -> tuple[str, dict] | None:
        params = {name: self.query_one(f"#{name}", Input) for name in PARAMS}
        steerings = [row.steering() for row in self.query(SteeringRow)]
        valid = [field.validate(field.value).is_valid for field in params.values()]  # marked
        if None in steerings or not all(valid):
            self.notify("fix the fields marked in red first", title="cannot steer",
                        severity="error")
            return None
        return "session.steer", {
            "prompt": self.query_one("#prompt", Input).value, "steerings": steerings,
            **{name: STEER_FIELDS[name].kind(field.value) for name, field in params.items()}}

    def begin_run(self) -> None:
        self.streamed = {side: [] for side in SIDES}
        self.reply = None
        self.prompt = self.query_one("#prompt", Input).value
        self._draw_panes()

    def stream(self, content: dict) -> None:
        side = content["side"]
        self.streamed[side].append(content["token"])
        if self.is_current:
            self._draw_pane(side)
            self.query_one(f"#{side}-pane").scroll_end(animate=False)  # the newest in sight

    def redraw(self) -> None:
        self._draw_panes()

    def show_reply(self, reply: dict) -> None:
        self.reply = reply
        self._draw_panes()

    def fields_at_fault(self, error) -> list[Widget]:
        """A steering's field marks the rows it can be: for an unknown feature, the rows whose
        id the SAE does not have; for another field, every row's."""
        rows = list(self.query(SteeringRow))
        if error.field == "feature":
            features = [row.fields()[0] for row in rows]
            unknown = [field for field in features if self.d_sae is not None
                       and field.value.isdigit() and int(field.value) >= self.d_sae]
            return unknown or features
        if error.field == "strength":
            return [row.fields()[1] for row in rows]
        return super().fields_at_fault(error)

    # ----- drawing -----------------------------------------------------------------------------

    def _draw_panes(self) -> None:
        for side in SIDES:
            self._draw_pane(side)

    def _draw_pane(self, side: str) -> None:
        reply = self.reply
        generation = reply[side] if reply else None
        continuation = generation["text"] if generation else "".join(self.streamed[side])
        text = Text.assemble((self.prompt, "dim"), continuation) if (
            self.prompt or continuation) else Text("ctrl+r runs", style="dim")
        self.query_one(f"#{side}-text", Static).update(text)
        pane = self.query_one(f"#{side}-pane")
        pane.border_subtitle = ending(generation, reply) if generation else (
            f"{len(self.streamed[side])} tokens…" if self.running else "")
        means = self.query_one(f"#{side}-means", Static)
        means.display = reply is not None
        if reply is not None:
            means.update(means_text(reply, side))


def ending(generation: dict, reply: dict) -> str:
    """`40 tokens`, `12 tokens, then end of text`, `cancelled after 12 tokens`."""
    count = len(generation["tokens"])
    if reply.get("cancelled"):
        return f"cancelled after {count} tokens"
    return f"{count} tokens" + (", then end of text" if generation["stopped_at_eos"] else "")


def means_text(reply: dict, side: str) -> Text:
    """`mean activation · 5: 0.137 · 9: 0` (a side that generated nothing has none)."""
    parts = [f"{label}: {'-' if mean is None else f'{mean:.3g}'}" for label, mean in zip(
        reply["features"], reply["mean_activation"][side], strict=True)]
    return Text("mean activation · " + " · ".join(parts), style="bold")
