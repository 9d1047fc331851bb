"""What the monitor and steer screens share: one interactive session of the daemon, for one SAE
and the model it reads, and runs on it that stream.

The model field starts with the model the SAE was trained on (the SAE's config, through
`feature.sources`, unless the screen was given it), and the session opens at once, so the model
loads while the text is typed; a model typed later is opened on Enter or on the next run.
`ctrl+r` runs (cancelling a run still going), `ctrl+g` cancels; the screen closes its session
when it goes.

A run streams its tokens as the daemon's `session.<id>` events, which the subclass draws as
they come (`stream`), and its reply, which holds the whole result, replaces them (`show_reply`):
events of an older run, or ones that trail the reply, are dropped by their run number. A refused
run says why under the screen, with the daemon's hint, and marks the field at fault; the session
stays usable. A session the daemon no longer has (closed after idling, or gone with a restart) is
opened anew by the next run.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import Input, Label, Static, TextArea

from mistudio_core.errors import MistudioError
from tui import format
from tui.model_session import ModelSession
from tui.screens.base import DaemonScreen
from tui.state import Connection, SessionEvent
from tui.widgets.request_error import RequestError

INVALID = "-daemon-invalid"


class SessionScreen(DaemonScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+r", "run", "Run", priority=True),
        Binding("ctrl+g", "cancel", "Cancel run", priority=True),
    ]
    # A request field -> the widget that holds it, marked when the daemon refuses the field.
    FIELDS: dict[str, str] = {"model": "#model"}
    WHAT = "run"  # what a run is called in messages

    def __init__(self, sae_dir: str, model: str | None = None) -> None:
        super().__init__()
        self.sae_dir = sae_dir
        self.initial_model = model
        self.session: ModelSession | None = None  # made on mount, with the app's link
        self.running = False

    # ----- layout ------------------------------------------------------------------------------

    def model_row(self) -> Iterable[Widget]:
        with Horizontal(classes="row"):
            yield Label("model", classes="label")
            yield Input(self.initial_model or "", compact=True, id="model",
                        placeholder="the model the SAE reads: a hub id or a directory")
        yield Static(id="session-status")

    def error_line(self) -> Widget:
        return RequestError(retry="ctrl+r runs again", id="session-error")

    def on_mount(self) -> None:
        self.session = ModelSession(self.link, [self.sae_dir])
        self.state.session_event.subscribe(self, self._on_event)
        self.state.connection_changed.subscribe(self, self._on_connection)
        self._draw_status()
        self._prepare()

    def on_unmount(self) -> None:
        self.app.run_worker(self.session.close(), name="close session", group="sessions",
                            exit_on_error=False)

    # ----- the session -------------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.query_one("#model", Input).value.strip()

    @work(group="session", exclusive=True)
    async def _prepare(self) -> None:
        """The SAE's model in the model field (when empty), then a session on it."""
        if not self.model:
            try:
                saes = (await self.link.request("feature.sources"))["saes"]
            except MistudioError:
                saes = []  # the field says to type it
            model = next((sae["model"] for sae in saes
                          if same_directory(sae["path"], self.sae_dir) and sae.get("model")), "")
            if model and not self.model:
                self.query_one("#model", Input).value = model
        await self.open()

    async def open(self) -> dict | None:
        """The open session's `session.open` reply, opening it first if the model changed;
        None when it cannot be opened (the error line says why)."""
        model = self.model
        if not model:
            self._draw_status()
            return None
        session = self.session
        fresh = session.opened is None or session.model != model
        if fresh:
            self._draw_status(loading=model)
        try:
            opened = await session.open(model)
        except MistudioError as error:
            self.show_error("cannot open a session", error)
            self._draw_status()
            return None
        self._draw_status()
        if fresh:
            self.clear_error()
            self.session_opened(opened)
        return opened

    def session_opened(self, opened: dict) -> None:
        """A session is open (again): the subclass learns its SAEs."""

    def _on_connection(self, connection: Connection) -> None:
        if connection.connected and self.session.opened is None:
            self._prepare()  # the daemon is back, or was not there when the screen opened

    @on(Input.Submitted, "#model")
    def _model_submitted(self) -> None:
        self._prepare()

    @on(Input.Changed, "#model")
    def _model_changed(self) -> None:
        self._draw_status()  # whether the session is on the model typed

    def _draw_status(self, loading: str | None = None) -> None:
        """`tiny-gpt2 on cpu · sae: 64 features, cards`, or what the session waits for."""
        opened = self.session.opened if self.session else None
        if loading:
            text = Text(f"opening a session: loading {loading}…", style="yellow")
        elif not self.model:
            text = Text("type the model the SAE reads (a hub id or a directory), then Enter",
                        style="yellow")
        elif opened is None or self.session.model != self.model:
            text = Text("no session yet: Enter or ctrl+r opens one", style="dim")
        else:
            saes = " · ".join(sae_summary(sae) for sae in opened["saes"])
            text = Text.assemble((format.last_part(opened["model"]["model_id"]), "bold"),
                                 f" on {opened['device']} · {saes}")
        self.query_one("#session-status", Static).update(text)

    # ----- runs --------------------------------------------------------------------------------

    def run_request(self) -> tuple[str, dict] | None:
        """The run's request type and content from the form; None (having said why) while a
        field is invalid."""
        raise NotImplementedError

    def begin_run(self) -> None:
        """A run starts: clear what the last one showed."""

    def stream(self, content: dict) -> None:
        """One token event of the running run: kept, and drawn while the screen is current
        (`redraw` draws what came meanwhile)."""

    def show_reply(self, reply: dict) -> None:
        """The run's whole result."""

    def action_run(self) -> None:
        request = self.run_request()
        if request is not None:
            self._run(*request)

    @work(group="run", exclusive=True)
    async def _run(self, msg_type: str, content: dict) -> None:
        """The run, in a session opened anew if the daemon no longer has the one we had (closed
        for idling, or gone with a restarted daemon or model host)."""
        for attempt in range(2):
            if await self.open() is None:
                return
            self.clear_error()
            self.running = True
            self.begin_run()
            try:
                reply = await self.session.run(msg_type, content)
            except MistudioError as error:
                self.running = False
                if error.field == "session" and not attempt:
                    continue
                self.show_error(f"{self.WHAT} refused", error)
                return
            self.running = False
            self.show_reply(reply)
            return

    def action_cancel(self) -> None:
        if self.session.running:
            self._cancel()
        else:
            self.notify("nothing is running", severity="warning")

    @work(group="cancel")
    async def _cancel(self) -> None:
        try:
            await self.session.cancel()
        except MistudioError as error:
            self.notify(error.message, title=f"{self.WHAT} not cancelled", severity="error")

    def _on_event(self, event: SessionEvent) -> None:
        content = event.content
        if (event.session == self.session.id and self.running and content.get("kind") == "token"
                and content.get("run", 0) > self.session.last_run):
            self.stream(content)

    # ----- errors ------------------------------------------------------------------------------

    def show_error(self, what: str, error: MistudioError) -> None:
        self.query_one(RequestError).show(what, error)
        for widget in self.fields_at_fault(error):
            widget.add_class(INVALID)

    def fields_at_fault(self, error: MistudioError) -> list[Widget]:
        """The widgets of the field the daemon refused."""
        selector = self.FIELDS.get(error.field or "")
        return [self.query_one(selector)] if selector else []

    def clear_error(self) -> None:
        self.query_one(RequestError).clear()
        for widget in self.query(f".{INVALID}"):
            widget.remove_class(INVALID)

    @on(Input.Changed)
    def _unmark_input(self, event: Input.Changed) -> None:
        """A field the daemon refused is unmarked once it changes."""
        event.input.remove_class(INVALID)

    @on(TextArea.Changed)
    def _unmark_text(self, event: TextArea.Changed) -> None:
        event.text_area.remove_class(INVALID)


def same_directory(path: str, sae_dir: str) -> bool:
    """Does `path` (absolute, from `feature.sources`) name `sae_dir` (absolute, or relative to
    the daemon's runs directory)?"""
    path, sae_dir = path.rstrip("/"), sae_dir.rstrip("/")
    return path == sae_dir or path.endswith(f"/{sae_dir}")


def sae_summary(sae: dict) -> str:
    """`sae: 64 features, cards` (cards: `find` has run, so each feature has a card)."""
    cards = "cards" if sae.get("features") else "no cards yet"
    return f"{sae['name']}: {sae['d_sae']} features, {cards}"
