"""The features a steer run steers with, one row each: the feature's id, its strength and the
mode (`add` the feature's direction, or `clamp` its activation to the strength).

The strength is typed, or nudged a step at a time with the up and down keys (the slider of a
keyboard). Each field checks its own syntax as it is typed, with the ranges of the daemon's own
schema (`mistudiod.sessions.STEERING`); whether the feature exists is the daemon's to say.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.validation import Integer, Number
from textual.widgets import Input, Label, Select

from mistudiod.sessions import STEERING

STEP = 0.5  # a nudge of the strength: in `add` mode 1 is the feature's strongest firing
DEFAULT_STRENGTH = 4.0
FEATURE = STEERING.fields["feature"]
MODE = STEERING.fields["mode"]


class StrengthInput(Input):
    BINDINGS = [
        Binding("up", "nudge(1)", "Stronger", show=False),
        Binding("down", "nudge(-1)", "Weaker", show=False),
    ]

    def action_nudge(self, steps: int) -> None:
        """One step up or down; text that is not a number counts as 0."""
        try:
            value = float(self.value)
        except ValueError:
            value = 0.0
        self.value = f"{round(value + steps * STEP, 6):g}"


class SteeringRow(Horizontal):
    """One steering; `steering()` is the request's item, or None while a field is invalid."""

    # Above the fields' own ctrl+d (delete right; the delete key still does that).
    BINDINGS = [Binding("ctrl+d", "remove", "Remove feature", priority=True)]

    class RemoveWanted(Message):
        """The row's remove key: the screen removes it and moves the focus to a neighbour."""

        def __init__(self, row: SteeringRow) -> None:
            super().__init__()
            self.row = row

    def __init__(self, feature: int | None = None) -> None:
        super().__init__()
        self.feature = feature  # the id to start with, if any

    def compose(self) -> ComposeResult:
        yield Label("feature", classes="label")
        yield Input("" if self.feature is None else str(self.feature), placeholder="id",
                    compact=True, validators=[Integer(int(FEATURE.min), int(FEATURE.max))],
                    classes="steer-feature")
        yield Label("strength", classes="label")
        yield StrengthInput(f"{DEFAULT_STRENGTH:g}", placeholder="4", compact=True,
                            validators=[Number()], classes="steer-strength")
        yield Select([(choice, choice) for choice in MODE.choices], value=MODE.default,
                     allow_blank=False, compact=True, classes="steer-mode")

    def action_remove(self) -> None:
        self.post_message(self.RemoveWanted(self))

    def fields(self) -> tuple[Input, Input]:
        return self.query_one(".steer-feature", Input), self.query_one(".steer-strength", Input)

    def steering(self) -> dict | None:
        feature, strength = self.fields()
        valid = [field.validate(field.value).is_valid for field in (feature, strength)]  # marked
        if not all(valid):
            return None
        return {"feature": int(feature.value), "strength": float(strength.value),
                "mode": self.query_one(".steer-mode", Select).value}
