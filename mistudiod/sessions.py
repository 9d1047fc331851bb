"""Interactive sessions in the model host: a loaded model and its SAEs, ready to monitor or steer.

A session is opened on one model (held in the host's `ModelCache`, so it stays loaded between
requests) and one or more SAEs. Each `monitor` or `steer` request on it is a *run*: the run
streams an event per token through `emit` (the host sends them to the daemon, which publishes
them on `session.<id>`), and its reply holds the whole result, so a client that only wants the
end result need not subscribe.

Runs execute one at a time per host, in its one torch thread: the forward hooks that capture
and edit activations sit on the shared model's modules, so two runs on one model must not
overlap, and a device has no spare compute for a second run anyway. A session runs one request
at a time (a second is refused as `busy`); `cancel` stops the running one at its next token, and
the run returns what it has with `cancelled: true`. Bad input raises a MistudioError before the
model runs; the session is left as it was and stays usable.

SAEs are shared between the sessions that open the same directory (an SAE can take gigabytes on
the device) and dropped with the last session that uses them. A session idle for
`IDLE_SECONDS` is closed.

Nothing here imports torch at module level: the host answers pings before torch is imported.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistudio_core.errors import MistudioError
from mistudiod.schema import Field, Schema

if TYPE_CHECKING:
    from mistudio_core.models import HookedModel, ModelSpec
    from mistudio_core.monitor import Monitor
    from mistudio_core.sae import LoadedSAE
    from mistudiod.modelhost import ModelCache

IDLE_SECONDS = 30 * 60
MAX_SESSIONS = 32
MAX_SAES = 8

# emit(topic, content): send one event (called from the torch thread).
Emit = Callable[[str, dict], None]

# The requests' fields, checked by the daemon before it forwards them and by the host.
SESSION_ID = Field(str, required=True, max_length=64, pattern=r"[0-9a-f]+")
MODEL_FIELDS = {
    # A hub id or a directory: not empty (that would be the current directory), no NUL or newline.
    "model": Field(str, required=True, max_length=1024, pattern=r"[^\x00\n]+"),
    "revision": Field(str, max_length=256),
    "dtype": Field(str, default="auto", choices=("auto", "float32", "bfloat16", "float16")),
    "quantization": Field(str, default="auto", choices=("auto", "none", "8bit", "4bit")),
}
OPEN_FIELDS = {**MODEL_FIELDS,
               "sae_dirs": Field(list, required=True, item=str, max_length=MAX_SAES)}
_GENERATION_FIELDS = {
    "seed": Field(int, default=0, min=0, max=2**63 - 1),
    "temperature": Field(float, default=1.0, min=0, max=100),
    "stop_at_eos": Field(bool, default=True),
}
MONITOR_FIELDS = {
    "session": SESSION_ID,
    "text": Field(str, required=True, max_length=200_000),
    "max_new_tokens": Field(int, default=0, min=0, max=8192),  # 0: read the text only
    "top": Field(int, default=5, min=1, max=100),
    "watch": Field(dict, max_length=MAX_SAES),  # SAE name -> feature ids reported on every token
    **_GENERATION_FIELDS,
}
STEER_FIELDS = {
    "session": SESSION_ID,
    "prompt": Field(str, required=True, max_length=200_000),
    "steerings": Field(list, required=True, item=dict, max_length=64),
    "max_new_tokens": Field(int, default=40, min=1, max=8192),
    "top_k": Field(int, min=1, max=2**31),
    **_GENERATION_FIELDS,
}
# One steering (an item of `steerings`): what `mistudio_core.steer.Steering` takes.
STEERING = Schema(
    feature=Field(int, required=True, min=0, max=2**31),
    strength=Field(float, required=True),
    mode=Field(str, default="add", choices=("add", "clamp")),
    sae=Field(str, max_length=256),
    from_prompt_end=Field(bool, default=False),
    a_max=Field(float, min=0),
)


@dataclass
class InteractiveSession:
    """One open session: what it reads with, and the run now going on it."""

    id: str
    spec: ModelSpec  # dtype and quantization resolved: the cache finds it without a config read
    saes: dict[str, LoadedSAE]  # name (the directory's) -> SAE on the host's device
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    runs: int = 0  # the number of the latest run (events carry it)
    running: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    monitor: Monitor | None = None  # built on the first monitor run, for the model then loaded
    explanations_stamp: tuple = ()

    @property
    def topic(self) -> str:
        return f"session.{self.id}"

    def describe(self) -> dict:
        return {"session": self.id, "model": self.spec.model_id, "saes": list(self.saes),
                "created": self.created, "last_used": self.last_used, "running": self.running}


class Sessions:
    """The host's open sessions and the SAEs they share."""

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache
        self._sessions: dict[str, InteractiveSession] = {}
        self._saes: dict[str, LoadedSAE] = {}  # resolved directory -> SAE, shared
        self._lock = threading.Lock()

    # ----- open and close ----------------------------------------------------------------------

    def open(self, spec: ModelSpec, sae_dirs: list[str]) -> dict:
        """Load the model (or find it loaded) and the SAEs, check they fit, and open a session.

        Runs in the host's torch thread: loading may take minutes."""
        from mistudio_core.monitor import Monitor

        if not sae_dirs:
            raise MistudioError("no SAE given", hint="name at least one SAE directory",
                                field="sae_dirs")
        if len(sae_dirs) > MAX_SAES:
            raise MistudioError(f"{len(sae_dirs)} SAEs in one session; at most {MAX_SAES}",
                                hint="open several sessions", field="sae_dirs")
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                raise MistudioError(
                    f"the model host of {self.cache.device} has {MAX_SESSIONS} sessions open",
                    hint="close sessions you no longer use (`session.close`)", code="busy")
        info = self.cache.load(spec)
        spec = replace(spec, dtype=info["dtype"], quantization=info["quantization"])
        model = self.cache.get(spec)
        try:
            named = self._named_saes(sae_dirs)
            monitor = Monitor(model, named)  # checks each SAE's width and hook against the model
        except BaseException:
            with self._lock:
                self._drop_unused_saes()
            raise
        session = InteractiveSession(uuid.uuid4().hex[:12], spec, named, monitor=monitor)
        session.explanations_stamp = _explanations_stamp(named)
        with self._lock:
            self._sessions[session.id] = session
        saes = [_describe_sae(name, loaded) for name, loaded in named.items()]
        return {"session": session.id, "device": self.cache.device, "model": info, "saes": saes,
                "max_tokens": monitor.max_tokens}

    def close(self, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return False
            session.cancel.set()  # a run still going stops at its next token
            self._drop_unused_saes()
        return True

    def _drop_unused_saes(self) -> None:
        """Forget the SAEs no open session uses (call with the lock held)."""
        in_use = {id(sae) for session in self._sessions.values() for sae in session.saes.values()}
        for path in [path for path, sae in self._saes.items() if id(sae) not in in_use]:
            del self._saes[path]

    def close_idle(self, now: float | None = None) -> list[str]:
        """Close the sessions unused for IDLE_SECONDS (none while it runs)."""
        now = time.time() if now is None else now
        with self._lock:
            idle = [s.id for s in self._sessions.values()
                    if not s.running and now - s.last_used > IDLE_SECONDS]
        return [session_id for session_id in idle if self.close(session_id)]

    def get(self, session_id: str) -> InteractiveSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise MistudioError(
                f"no session {session_id!r} on the model host of {self.cache.device}",
                hint="it was closed, idle too long, or its model host restarted: open a new one",
                code="not_found", field="session")
        return session

    def list(self) -> list[dict]:
        with self._lock:
            return [session.describe() for session in self._sessions.values()]

    def _named_saes(self, sae_dirs: list[str]) -> dict[str, LoadedSAE]:
        """The SAEs by directory name (made unique), loaded once per directory across sessions."""
        from mistudio_core.sae import load_sae

        named: dict[str, LoadedSAE] = {}
        for directory in sae_dirs:
            path = str(Path(directory).resolve())
            with self._lock:
                loaded = self._saes.get(path)
            if loaded is None:
                loaded = load_sae(path)
                with self._lock:
                    loaded = self._saes.setdefault(path, loaded)
            name, n = Path(path).name, 2
            while name in named:
                name, n = f"{Path(path).name}-{n}", n + 1
            named[name] = loaded
        return named

    # ----- runs --------------------------------------------------------------------------------

    def start_run(self, session_id: str) -> tuple[InteractiveSession, int]:
        """Mark a run started on the session (refused while one runs); its number."""
        session = self.get(session_id)
        with self._lock:
            if session.running:
                raise MistudioError(f"session {session_id} is already running a request",
                                    hint="wait for it to end, or cancel it", code="busy")
            session.running = True
            session.runs += 1
            session.cancel.clear()
            session.last_used = time.time()
            return session, session.runs

    def end_run(self, session: InteractiveSession) -> None:
        with self._lock:
            session.running = False
            session.last_used = time.time()

    def model(self, session: InteractiveSession) -> HookedModel:
        """The session's model: held in the cache, or loaded again if it was evicted."""
        try:
            return self.cache.get(session.spec)
        except MistudioError as exc:
            if exc.code != "not_loaded":
                raise
            self.cache.load(session.spec)
            return self.cache.get(session.spec)

    def monitor(self, session: InteractiveSession, run: int, request: dict,
                emit: Emit) -> dict:
        """Read `request["text"]` (or generate after it) and report every token's features."""

        def on_token(report: dict) -> None:
            emit(session.topic, {"run": run, "kind": "token", "token": report})

        return run_monitor(self._monitor(session), on_token=on_token,
                           cancelled=session.cancel.is_set, **_fields(request, MONITOR_FIELDS))

    def steer(self, session: InteractiveSession, run: int, request: dict, emit: Emit) -> dict:
        """Generate the baseline and the steered continuation side by side."""

        def on_token(side: str, token: str, activations: list[float]) -> None:
            emit(session.topic, {"run": run, "kind": "token", "side": side, "token": token,
                                 "activations": activations})

        return run_steer(self.model(session), session.saes, on_token=on_token,
                         cancelled=session.cancel.is_set, **_fields(request, STEER_FIELDS))

    def _monitor(self, session: InteractiveSession) -> Monitor:
        """The session's Monitor for the model loaded now, with the latest explanations."""
        from mistudio_core.monitor import Monitor

        model = self.model(session)
        if session.monitor is None or session.monitor.model is not model:
            session.monitor = Monitor(model, session.saes)
        stamp = _explanations_stamp(session.saes)
        if stamp != session.explanations_stamp:  # `mistudio explain` ran since
            session.monitor.reload_explanations()
            session.explanations_stamp = stamp
        return session.monitor


def run_monitor(monitor: Monitor, text: str, *, max_new_tokens: int = 0, top: int = 5,
                watch: dict[str, list[int]] | None = None, seed: int = 0,
                temperature: float = 1.0, stop_at_eos: bool = True,
                on_token: Callable[[dict], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> dict:
    """A monitor request's answer, in a session or in the CLI's own process: every token's report
    (`TokenFeatures.to_dict()`, the prompt's then the generated ones), and with
    `max_new_tokens` > 0 the generated text and why it stopped."""
    stream = None if on_token is None else (lambda report: on_token(report.to_dict()))
    if max_new_tokens == 0:
        tokens = monitor.read(text, top=top, on_token=stream, watch=watch)
        return {"mode": "read", "tokens": [t.to_dict() for t in tokens], "text": None,
                "stopped": None, "cancelled": False}
    generation = monitor.generate(text, max_new_tokens=max_new_tokens, seed=seed,
                                  temperature=temperature, top=top, on_token=stream,
                                  stop_at_eos=stop_at_eos, cancelled=cancelled, watch=watch)
    tokens = [*generation.prompt_tokens, *generation.tokens]
    return {"mode": "generate", "tokens": [t.to_dict() for t in tokens],
            "text": generation.text, "stopped": generation.stopped,
            "cancelled": generation.stopped == "cancelled", "seed": seed,
            "temperature": temperature}


def run_steer(model: HookedModel, saes: dict[str, LoadedSAE], prompt: str,
              steerings: list[dict], *, max_new_tokens: int = 40, seed: int = 0,
              temperature: float = 1.0, top_k: int | None = None, stop_at_eos: bool = True,
              on_token: Callable[[str, str, list[float]], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> dict:
    """A steer request's answer (`SteerResult.to_dict()`), plus each steered feature's mean
    activation over either side's generated tokens. `steerings` are checked against STEERING."""
    from mistudio_core.steer import Steering, steer

    if not steerings:
        raise MistudioError("no feature to steer", hint="give at least one steering",
                            field="steerings")
    checked = [Steering(**STEERING.validate(item)) for item in steerings]
    result = steer(model, saes, prompt, checked, max_new_tokens=max_new_tokens, seed=seed,
                   temperature=temperature, top_k=top_k, stop_at_eos=stop_at_eos,
                   on_token=on_token, cancelled=cancelled).to_dict()
    result["mean_activation"] = {side: _column_means(result[side]["activations"], len(checked))
                                 for side in ("baseline", "steered")}
    return result


def _column_means(rows: list[list[float]], width: int) -> list[float | None]:
    if not rows:
        return [None] * width
    return [sum(row[i] for row in rows) / len(rows) for i in range(width)]


def _fields(request: dict, fields: dict) -> dict:
    """The request's fields that the run functions take (not the session id)."""
    return {name: request[name] for name in fields if name != "session"}


def _describe_sae(name: str, loaded: LoadedSAE) -> dict[str, Any]:
    from mistudio_core.feature_store import has_features

    config = loaded.sae.config
    return {"name": name, "sae_dir": str(loaded.path), "hook": loaded.metadata.hook_name,
            "architecture": config.architecture, "d_in": config.d_in, "d_sae": config.d_sae,
            "context_size": loaded.metadata.context_size,
            "features": has_features(loaded.path)}


def _explanations_stamp(saes: dict[str, LoadedSAE]) -> tuple:
    """When each SAE's feature store last changed: explanations are read again after a change."""
    from mistudio_core.feature_store import DB_FILE, FEATURES_DIR

    return tuple(_mtime(loaded.path / FEATURES_DIR / f"{DB_FILE}{suffix}")
                 for loaded in saes.values() for suffix in ("", "-wal"))


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
