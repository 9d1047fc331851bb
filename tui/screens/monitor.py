"""Monitor: which features fire as the model reads a text, or as it writes after it, token by
token (`session.monitor`).

Type or paste the text, say how many tokens to generate after it (0 only reads it) and press
`ctrl+r`; a generation streams in token by token. The tokens are shaded by one feature's
activation: at first the strongest feature of the token under the cursor, then the one chosen
with Enter in the list beside them, which shows the token under the cursor's strongest features
per SAE (left and right move the cursor, tab goes to the list). `o` opens the card of the
highlighted feature (of the shading one, from the text), once `find` has made the cards.

The daemon reports each token's `TOP` strongest features, and also every token's activation of
the features it is asked to watch: a chosen feature is watched, and choosing one runs the text
again (a generation with the same seed gives the same tokens), so its shading is exact, weak
firings beside stronger features included.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual import on
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.validation import Integer
from textual.widget import Widget
from textual.widgets import Input, Label, OptionList, Static, TextArea

from mistudiod.sessions import MONITOR_FIELDS
from tui.screens.session_screen import SessionScreen
from tui.widgets.feature_hits import FeatureHits, FeatureRef
from tui.widgets.token_text import visible
from tui.widgets.token_view import ShownToken, TokenView

TOP = 10  # features reported per token: the list's rows, and what shading can show
NEW_TOKENS = MONITOR_FIELDS["max_new_tokens"]


class MonitorScreen(SessionScreen):
    CSS_PATH = ["session.tcss", "monitor.tcss"]
    BINDINGS = [Binding("o", "open_card", "Open card")]
    FIELDS = {**SessionScreen.FIELDS, "text": "#monitor-text", "max_new_tokens": "#new-tokens"}
    WHAT = "monitor"

    def __init__(self, sae_dir: str, model: str | None = None) -> None:
        super().__init__(sae_dir, model)
        self.tokens: list[dict] = []  # the run's token reports (`TokenFeatures`), in order
        self.reply: dict | None = None  # the last run's, once it is back
        self.shading: FeatureRef | None = None
        self.chosen = False  # the shading feature was chosen, not the default
        self.rewatching = False  # the run repeats the last one to watch the chosen feature
        self.sae_dirs: dict[str, str] = {}  # SAE name -> directory, of the SAEs with cards

    def body(self) -> Iterable[Widget]:
        yield from self.model_row()
        yield TextArea(id="monitor-text", compact=True,
                       placeholder="type or paste the text to read, then ctrl+r")
        with Horizontal(classes="row"):
            yield Label("new tokens", classes="label")
            yield Input(str(NEW_TOKENS.default), compact=True, id="new-tokens",
                        validators=[Integer(int(NEW_TOKENS.min), int(NEW_TOKENS.max))])
            yield Static("0 reads the text; N generates N tokens after it", classes="note")
        with Horizontal(id="monitor-body"):
            with VerticalScroll(id="monitor-tokens", can_focus=False):
                yield TokenView("ctrl+r reads the text", id="monitor-view")
            yield FeatureHits("no token under the cursor", id="monitor-features")
        yield Static(id="monitor-summary")
        yield self.error_line()

    def on_mount(self) -> None:
        super().on_mount()
        self.sub_title = f"monitor · {self.sae_dir}"
        self.query_one("#monitor-tokens").border_title = "tokens"
        self.query_one("#monitor-text", TextArea).focus()

    def session_opened(self, opened: dict) -> None:
        self.sae_dirs = {sae["name"]: sae["sae_dir"] for sae in opened["saes"] if sae["features"]}
        self.shading, self.chosen = None, False  # the SAEs' names may have changed

    # ----- runs --------------------------------------------------------------------------------

    def run_request(self) -> tuple[str, dict] | None:
        new_tokens = self.query_one("#new-tokens", Input)
        if not new_tokens.validate(new_tokens.value).is_valid:
            self.notify(f"new tokens: a whole number from {NEW_TOKENS.min} to "
                        f"{NEW_TOKENS.max}", title="cannot run", severity="error")
            return None
        request = {"text": self.query_one("#monitor-text", TextArea).text,
                   "max_new_tokens": int(new_tokens.value), "top": TOP}
        if self.chosen and self.shading is not None:
            request["watch"] = {self.shading.sae: [self.shading.id]}
        return "session.monitor", request

    def action_run(self) -> None:
        self.rewatching = False
        super().action_run()

    def begin_run(self) -> None:
        if self.rewatching:  # the same tokens come back: the view stays until they do
            return
        self.tokens, self.reply = [], None
        self._draw_tokens(cursor=0)
        self._draw_summary()

    def stream(self, content: dict) -> None:
        if self.rewatching:
            return
        token = content["token"]
        self.tokens.append(token)
        if not self.is_current:
            return
        if self.shading is None:
            self._choose_default()
            self._draw_tokens()
        else:
            self.query_one(TokenView).append(self._shown(token))
        self.query_one("#monitor-tokens").scroll_end(animate=False)  # the newest in sight
        if len(self.tokens) == 1:
            self._draw_features()
        self._draw_summary()

    def show_reply(self, reply: dict) -> None:
        self.rewatching = False
        self.reply, self.tokens = reply, reply["tokens"]
        if not self.chosen:
            self.shading = None  # the default for this text
        self.redraw()

    def redraw(self) -> None:
        if self.shading is None:
            self._choose_default()
        self._draw_tokens()
        self._draw_features()
        self._draw_summary()

    def _choose_default(self) -> None:
        """The strongest feature of the token under the cursor (of the first SAE that fires)."""
        cursor = self.query_one(TokenView).cursor
        if cursor < len(self.tokens):
            hits = [(sae, hits[0]) for sae, hits in self.tokens[cursor]["features"].items()
                    if hits]
            if hits:
                self.shading = FeatureRef(hits[0][0], hits[0][1]["id"])

    # ----- the cursor and the shading feature --------------------------------------------------

    @on(TokenView.CursorMoved)
    def _cursor_moved(self) -> None:
        self._draw_features()

    @on(OptionList.OptionSelected, "#monitor-features")
    def _shade_by(self, event: OptionList.OptionSelected) -> None:
        feature = self.query_one(FeatureHits).feature_at(event.option_index)
        if feature is not None:
            self.shading, self.chosen = feature, True
            self._draw_tokens()
            self._draw_features()
            self._draw_summary()
            if self.reply is not None and not self.running:
                self.rewatching = True  # run again, watching it: its activation on every token
                super().action_run()

    def action_open_card(self) -> None:
        """The card of the highlighted feature in the list, or from the text of the shading
        one."""
        hits = self.query_one(FeatureHits)
        feature = hits.highlighted_feature if hits.has_focus else self.shading
        if feature is None:
            self.notify("no feature to open: run first", severity="warning")
        elif feature.sae not in self.sae_dirs:
            self.notify(f"`mistudio find {self.sae_dir} --model M --corpus C` makes them",
                        title=f"no feature cards for {feature.sae} yet", severity="warning")
        else:
            self.app.open_feature(self.sae_dirs[feature.sae], feature.id)

    # ----- drawing -----------------------------------------------------------------------------

    def activation(self, token: dict) -> float:
        """The shading feature's activation on the token: watched, or among the token's
        strongest (0 where it is neither)."""
        if self.shading is None:
            return 0.0
        hits = [*(token.get("watched", {}).get(self.shading.sae) or []),
                *(token["features"].get(self.shading.sae) or [])]
        return next((hit["activation"] for hit in hits if hit["id"] == self.shading.id), 0.0)

    def _shown(self, token: dict) -> ShownToken:
        return ShownToken(token["token"], self.activation(token), token["generated"])

    def _draw_tokens(self, cursor: int | None = None) -> None:
        self.query_one(TokenView).show([self._shown(token) for token in self.tokens], cursor)
        self.query_one("#monitor-tokens").border_title = (
            f"tokens shaded by {self.feature_label(self.shading)}" if self.shading else "tokens")

    def feature_label(self, feature: FeatureRef) -> str:
        """`feature 15`, and of which SAE when the session has several."""
        several = self.session.opened and len(self.session.opened["saes"]) > 1
        return f"feature {feature.id}" + (f" of {feature.sae}" if several else "")

    def _draw_features(self) -> None:
        hits = self.query_one(FeatureHits)
        cursor = self.query_one(TokenView).cursor
        if cursor >= len(self.tokens):
            hits.show({}, None)
            hits.border_title = "features"
            return
        token = self.tokens[cursor]
        hits.show(token["features"], self.shading)
        hits.border_title = f"'{visible(token['token'])}' · {cursor + 1} of {len(self.tokens)}"

    def _draw_summary(self) -> None:
        self.query_one("#monitor-summary", Static).update(summary_text(
            self.tokens, self.reply, self.running,
            self.feature_label(self.shading) if self.shading else None,
            self.query_one(TokenView).scale))


def summary_text(tokens: list[dict], reply: dict | None, running: bool,
                 shading: str | None, scale: float) -> str:
    """`7 tokens read, 20 generated (length) · feature 15 peaks at 3.77`, or the run going."""
    generated = sum(token["generated"] for token in tokens)
    if running:
        return f"generating… {generated} tokens" if generated else "reading…"
    if reply is None:
        return "ctrl+r reads the text (and generates the new tokens after it)"
    read = f"{len(tokens) - generated} tokens read"
    if reply["mode"] == "generate":
        read += f", {generated} generated ({reply['stopped']})"
    if shading is None:
        return read + " · no feature fired"
    if scale <= 0:
        return read + f" · {shading} does not fire on these tokens"
    return read + f" · {shading} peaks at {scale:.3g}"
