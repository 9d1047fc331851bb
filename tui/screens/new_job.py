"""The new-job form: a training job's settings, checked as they are typed, with the memory
preflight's verdict before anything is submitted.

Three levels of checking, each as early as it can be: every field's own syntax and range on
each keystroke (Textual validators); the model's identity (`model.validate`: does it resolve,
how many layers, the hook's layer in range) and the whole job as the daemon would take it
(`job.validate`, which names the field at fault) a moment after typing stops; and the memory
preflight (`model.check_memory` with the form's layer, width and quantization). The daemon's
checks run in exclusive workers, so a new keystroke cancels the previous check instead of
queueing behind it, and the form never waits on the network.

The fields' ranges, defaults and choices come from the daemon's own schema,
`mistudiod.jobs.PARAMS["train"]` (torch-free), and the hook is read by the core's
`HookPoint.parse`: one definition of a training job shared by the daemon, the CLI and this form,
so the form can never accept what the daemon refuses or refuse what it accepts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.validation import Function, Integer, Length, Regex, Validator
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Select, Static

from mistudio_core import units
from mistudio_core.errors import MistudioError
from mistudio_core.hooks import SITES, HookPoint
from mistudiod.jobs import PARAMS
from tui.screens.base import DaemonScreen

DEBOUNCE_S = 0.4
DEMO_CORPUS = "demo"
FIELDS = PARAMS["train"].fields  # the daemon's schema of a training job


def integer(name: str) -> Integer:
    """An integer within the schema's range for the field."""
    field = FIELDS[name]
    return Integer(int(field.min), int(field.max))


def is_hook(text: str) -> bool:
    try:
        HookPoint.parse(text)
    except MistudioError:
        return False
    return len(text.strip()) <= FIELDS["hook"].max_length


def is_token_count(text: str) -> bool:
    """A whole count in the schema's range, as people type it (`2M`); never raises (`inf`,
    `nan` and `1e400` are simply not counts)."""
    count, field = units.parse_count(text), FIELDS["tokens"]
    return count is not None and field.min <= count <= field.max


# The form's inputs: field name -> (label, placeholder, initial value, validators).
INPUTS: dict[str, tuple[str, str, str, list[Validator]]] = {
    "model": ("model", "demo, a hub id, or a directory on the daemon's machine", "demo",
              [Length(1, FIELDS["model"].max_length, "the model is required (at most "
                      f"{FIELDS['model'].max_length} characters)")]),
    "hook": ("hook", "layers.L.resid_post", "layers.2.resid_post",
             [Function(is_hook, "write it as layers.L.SITE, SITE one of " + ", ".join(SITES))]),
    "k": ("k (active)", "32", str(FIELDS["k"].default), [integer("k")]),
    "expansion": ("expansion", "16 (d_sae = expansion x d_model)",
                  str(FIELDS["expansion"].default), [integer("expansion")]),
    "tokens": ("tokens", "2M, 500k, 1e8", units.count(FIELDS["tokens"].default),
               [Function(is_token_count, "a positive count up to "
                         f"{FIELDS['tokens'].max:.0e}, like 2M or 500k")]),
    "context_size": ("context size", "tokens per sequence", str(FIELDS["context_size"].default),
                     [integer("context_size")]),
    "batch_tokens": ("batch tokens", "tokens per training step",
                     str(FIELDS["batch_tokens"].default), [integer("batch_tokens")]),
    "out": ("output", "a name under the daemon's runs/ (optional)", "",
            [Regex(r"|[\w.-]+(/[\w.-]+)*|/.+", failure_description="a plain relative name "
                   "or an absolute path"), Length(maximum=FIELDS["out"].max_length)]),
}
# The form's choices: field name -> (label, choices, initial value).
SELECTS = {name: (label, FIELDS[name].choices, FIELDS[name].default)
           for name, label in (("arch", "architecture"), ("quantization", "quantization"))}


class NewJobScreen(DaemonScreen):
    CSS_PATH = "new_job.tcss"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+s", "submit", "Submit", priority=True),
        Binding("ctrl+o", "upload", "Upload corpus"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.model_info: dict | None = None  # model.validate's answer for the current model
        self.model_error: MistudioError | None = None  # or its refusal of it
        self.model_checked: str | None = None  # the model that answer is about
        self.daemon_error: MistudioError | None = None
        self.uploading = False
        self._devices: list[tuple[str, str]] = []  # the device choices offered

    # ----- layout ------------------------------------------------------------------------------

    def body(self) -> Iterable[Widget]:
        with VerticalScroll(id="form"):
            yield from self._input_row("model")
            yield Static(id="model-info", classes="note")
            yield from self._input_row("hook")
            with Horizontal(classes="row"):
                yield Label("corpus", classes="label")
                yield Select([(f"{DEMO_CORPUS} (built in)", DEMO_CORPUS)], value=DEMO_CORPUS,
                             allow_blank=False, compact=True, id="corpus")
            with Horizontal(classes="row"):
                yield Label("upload", classes="label")
                yield Input(placeholder="a local .txt/.jsonl/.parquet file, then ctrl+o",
                            compact=True, id="upload-path")
            yield Static(id="upload-note", classes="note")
            yield from self._select_row("arch")
            yield from self._input_row("k")
            yield from self._input_row("expansion")
            yield from self._input_row("tokens")
            yield from self._input_row("context_size")
            yield from self._input_row("batch_tokens")
            yield from self._select_row("quantization")
            with Horizontal(classes="row"):
                yield Label("device", classes="label")
                self._devices = self._device_options()
                yield Select(self._devices, value=FIELDS["device"].default, allow_blank=False,
                             compact=True, id="device")
            yield from self._input_row("out")
        yield Static(id="preflight")
        yield Static(id="form-error")
        with Horizontal(id="form-buttons"):
            yield Button("Submit (ctrl+s)", variant="primary", id="submit", compact=True)
            yield Button("Back (esc)", id="back", compact=True)

    def _input_row(self, name: str) -> Iterable[Widget]:
        label, placeholder, value, validators = INPUTS[name]
        with Horizontal(classes="row"):
            yield Label(label, classes="label")
            yield Input(value, placeholder=placeholder, validators=validators,
                        valid_empty=name == "out", compact=True, id=name)

    def _select_row(self, name: str) -> Iterable[Widget]:
        label, choices, value = SELECTS[name]
        with Horizontal(classes="row"):
            yield Label(label, classes="label")
            yield Select([(choice, choice) for choice in choices], value=value,
                         allow_blank=False, compact=True, id=name)

    def _device_options(self) -> list[tuple[str, str]]:
        options = [("auto (the preflight places it)", "auto"), ("cpu", "cpu")]
        for history in sorted(self.state.gpus.values(), key=lambda h: h.reading["index"]):
            gpu = history.reading
            options.append((f"cuda:{gpu['index']} {gpu.get('name') or ''}".strip(),
                            f"cuda:{gpu['index']}"))
        return options

    def _gpus_changed(self, uuid: str | None) -> None:
        """Offer the GPUs there are now, keeping the choice while it is still one of them (a
        reading of a GPU already offered changes nothing)."""
        if uuid is not None or not self.is_current:
            return
        options = self._device_options()
        if options != self._devices:
            self._devices = options
            select = self.query_one("#device", Select)
            chosen = select.value
            select.set_options(options)
            select.value = chosen if chosen in {value for _, value in options} else "auto"

    def on_mount(self) -> None:
        self.sub_title = "new training job"
        self.query_one("#model", Input).focus()
        self.state.connection_changed.subscribe(self, lambda _: self._check_all())
        self.state.gpus_changed.subscribe(self, self._gpus_changed)
        self._check_all()

    def redraw(self) -> None:
        self._gpus_changed(None)

    def _check_all(self) -> None:
        self._load_corpora()
        self._check_model()

    # ----- the form's values -------------------------------------------------------------------

    def value(self, name: str) -> str:
        widget = self.query_one(f"#{name}")
        return widget.value.strip() if isinstance(widget, Input) else str(widget.value)

    def params(self) -> dict:
        """The job's parameters as the form stands (fields that do not parse are left out, so
        the daemon's check reports them as missing rather than as something else)."""
        params = {"model": self.value("model"), "hook": self.value("hook"),
                  "corpus": self.value("corpus"), "arch": self.value("arch"),
                  "quantization": self.value("quantization"), "device": self.value("device")}
        for name in ("k", "expansion", "context_size", "batch_tokens"):
            if self.valid(name):
                params[name] = int(self.value(name))
        if self.valid("tokens"):
            params["tokens"] = units.parse_count(self.value("tokens"))
        if self.value("out"):
            params["out"] = self.value("out")
        return params

    def valid(self, name: str) -> bool:
        """Does the input pass its own validators? (An input with nothing to check, empty
        and allowed to be, validates to None.)"""
        result = self.query_one(f"#{name}", Input).validate(self.value(name))
        return result is None or result.is_valid

    def layer(self) -> int | None:
        try:
            return HookPoint.parse(self.value("hook")).layer
        except MistudioError:
            return None

    def invalid_fields(self) -> list[str]:
        """Fields that fail their own validators, the model if the daemon cannot load it, or
        the field the daemon's last check named."""
        bad = [name for name in INPUTS if not self.valid(name)]
        if self.model_error is not None and "model" not in bad:
            bad.append("model")
        if self.daemon_error is not None:
            bad.append(self.daemon_error.field or "form")
        return bad

    # ----- checking as the user types ----------------------------------------------------------

    @on(Input.Changed)
    @on(Select.Changed)
    def _changed(self, event: Input.Changed | Select.Changed) -> None:
        if event.control.id == "upload-path":
            return
        if event.control.id == "model":
            self.model_info = self.model_error = None
            self.workers.cancel_group(self, "memory")  # a verdict on the previous model
            preflight = self.query_one("#preflight", Static)
            preflight.update("memory preflight: waiting for a valid model")
            preflight.remove_class("-error")
            self._check_model()
        else:
            self._check_job()
        if event.control.id in ("hook", "expansion", "quantization", "context_size"):
            self._check_memory()

    @work(group="model", exclusive=True)
    async def _check_model(self) -> None:
        await asyncio.sleep(DEBOUNCE_S)
        note, model = self.query_one("#model-info", Static), self.value("model")
        try:
            info = await self.link.request("model.validate", {"model": model})
        except MistudioError as error:
            self.model_info = None
            # offline the model is not known to be wrong: the daemon checks it once back
            self.model_error = error if error.code != "no_daemon" else None
            self.model_checked = model
            note.update(f"[b]{error.message}[/b]" + (f" ({error.hint})" if error.hint else ""))
            note.set_class(True, "-error")
            return
        self.model_info, self.model_error, self.model_checked = info, None, model
        note.set_class(False, "-error")
        note.update(f"{info['model_type']} · {info['n_layers']} layers · d_model "
                    f"{info['hidden_size']} · {units.count(info['parameters'])} parameters"
                    + ("" if info.get("causal_lm") else " · not a causal LM: no CE eval"))
        self._check_job()
        self._check_memory()

    @work(group="job", exclusive=True)
    async def _check_job(self) -> None:
        await asyncio.sleep(DEBOUNCE_S)
        for name in INPUTS:  # the daemon's mark goes when the field changes
            self.query_one(f"#{name}", Input).remove_class("-daemon-invalid")
        self.daemon_error = self._layer_problem()
        if self.daemon_error is None:
            try:
                await self.link.request("job.validate", {"kind": "train",
                                                         "params": self.params()})
            except MistudioError as error:
                self.daemon_error = error if error.code != "no_daemon" else None
        self._show_error()

    def _layer_problem(self) -> MistudioError | None:
        layer, info = self.layer(), self.model_info
        if layer is not None and info is not None and layer >= info["n_layers"]:
            return MistudioError(f"the model has {info['n_layers']} layers (0 to "
                                 f"{info['n_layers'] - 1}); layer {layer} does not exist",
                                 hint="pick a layer in range", field="hook")
        return None

    def _show_error(self) -> None:
        error, box = self.daemon_error, self.query_one("#form-error", Static)
        if error is None:
            box.update("")
            return
        if error.field in INPUTS:
            self.query_one(f"#{error.field}", Input).add_class("-daemon-invalid")
        box.update(f"{error.message}" + (f" — {error.hint}" if error.hint else ""))

    @work(group="memory", exclusive=True)
    async def _check_memory(self) -> None:
        await asyncio.sleep(DEBOUNCE_S)
        info, box = self.model_info, self.query_one("#preflight", Static)
        if info is None:
            box.update("memory preflight: waiting for a valid model")
            return
        request = {"model": self.value("model"), "quantization": self.value("quantization"),
                   "layer": self.layer()}
        if self.valid("context_size"):
            request["context_size"] = int(self.value("context_size"))
        if self.valid("expansion"):
            request["d_sae"] = int(self.value("expansion")) * info["hidden_size"]
        box.update("memory preflight: checking...")
        try:
            report = await self.link.request("model.check_memory",
                                             {k: v for k, v in request.items() if v is not None},
                                             timeout=60)
        except MistudioError as error:
            box.update(f"memory preflight: {error.message}")
            return
        verdict, fits = preflight_verdict(report, self.value("quantization"))
        box.update(f"memory preflight: {verdict}")
        box.set_class(not fits, "-error")

    @work(group="corpora", exclusive=True)
    async def _load_corpora(self, select: str | None = None) -> None:
        try:
            corpora = (await self.link.request("corpus.list"))["corpora"]
        except MistudioError:
            return  # offline: the built-in corpus stays available; a reconnect reloads
        widget = self.query_one("#corpus", Select)
        current = select or widget.value
        options = [(f"{DEMO_CORPUS} (built in)", DEMO_CORPUS)] + [
            (f"{c['name']} ({units.size(c.get('size'))})", c["name"]) for c in corpora]
        widget.set_options(options)
        if current in {value for _, value in options}:
            widget.value = current

    # ----- actions -----------------------------------------------------------------------------

    @on(Button.Pressed, "#submit")
    def _submit_pressed(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#back")
    def _back_pressed(self) -> None:
        self.app.pop_screen()

    def action_submit(self) -> None:
        if self.model_checked != self.value("model") and self.link.connected:
            self.notify("the model is still being checked", severity="warning")
            return
        bad = self.invalid_fields()
        if bad:
            self.notify(f"fix {', '.join(bad)} first", title="the job is not valid",
                        severity="error")
            if bad[0] in INPUTS:
                self.query_one(f"#{bad[0]}", Input).focus()
            return
        self._submit()

    @work(group="submit", exclusive=True)
    async def _submit(self) -> None:
        try:
            reply = await self.link.request("job.submit", {"kind": "train",
                                                           "params": self.params()})
        except MistudioError as error:
            self.daemon_error = error
            self._show_error()
            self.notify(error.message, title="not submitted", severity="error")
            return
        job = reply["job"]
        self.state.apply_job(job)
        self.notify(f"job {job['id']} queued")
        self.app.open_job(job["id"], replace=True)

    def action_upload(self) -> None:
        if self.uploading:  # a second press would cancel the first upload
            self.notify("an upload is already running", severity="warning")
            return
        path = self.value("upload-path")
        if not path:
            self.query_one("#upload-path", Input).focus()
            self.notify("type the path of a local file to upload", severity="warning")
            return
        self.uploading = True
        self._upload(path)

    @work(group="upload")
    async def _upload(self, path: str) -> None:
        note = self.query_one("#upload-note", Static)
        note.display = True
        note.remove_class("-error")
        note.update(f"hashing {path}...")

        def progress(sent: int, size: int) -> None:
            note.update(f"uploading {path}: {units.size(sent)} of {units.size(size)}")

        try:
            reply = await self.link.upload_corpus(path, on_progress=progress)
        except MistudioError as error:
            note.update(f"upload failed: {error.message}")
            note.add_class("-error")
            self.notify(error.message, title="upload failed", severity="error")
            return
        finally:
            self.uploading = False
        name = reply["corpus"]["name"]
        note.update(f"uploaded {name}")
        self._load_corpora(select=name)


def preflight_verdict(report: dict, quantization: str) -> tuple[str, bool]:
    """`fits on GPU 0 with 4bit: needs 7.9 GiB of 70.1 GiB free`, and whether it fits."""
    device = report["device"]
    where = (f"GPU {device['name'].split(':')[-1]}" if device["name"].startswith("cuda")
             else "the CPU")
    chosen = quantization if quantization != "auto" else (
        report.get("recommended_quantization") or report.get("recommended_split"))
    said = {"none": "no quantization", "8bit": "8-bit", "4bit": "4-bit"}
    estimate = next((e for e in report["estimates"] if e["quantization"] == chosen), None)
    if estimate is None:
        return (f"does not fit on {where} ({units.size(device['free_bytes'])} free) in any "
                "quantization: pick an earlier layer or a smaller width"), False
    needs = (f"needs {units.size(estimate['total_bytes'])} of "
             f"{units.size(device['free_bytes'])} free")
    if estimate["fits"]:
        return (f"fits on {where} with {said[chosen]}: {needs}, batch up to "
                f"{estimate['recommended_batch_tokens']} tokens"), True
    if estimate.get("split"):  # too big for one GPU: the loader spreads it over several
        shares = estimate["split"]["shares"]
        return (f"fits split over {len(shares)} GPUs with {said[chosen]}: needs "
                f"{units.size(estimate['total_bytes'])}, batch up to "
                f"{estimate['split']['recommended_batch_tokens']} tokens"), True
    better = report.get("recommended_quantization")
    advice = f"; {said[better]} fits" if better else ""
    return f"does not fit on {where} with {said[chosen]}: {needs}{advice}", False

