"""The model host: one subprocess per device that keeps models loaded (DESIGN.md section 4).

Loading a model takes seconds to minutes; the interactive services (monitor and steer sessions)
must answer in well under a second, so they run in a process that keeps models resident. Each
device (cpu, cuda:0, ...) gets its own host, so a crash or an out-of-memory on one GPU costs only
that GPU's models, never the daemon.

Three parts live here:

- `ModelCache`: the models one host holds, least recently used first, within a byte budget.
- The host process (`python -m mistudiod.modelhost`): reads its settings as one JSON document on
  stdin (the key never shows in `ps`), binds a ROUTER socket and answers signed requests through
  the handlers in `HANDLERS`: loads, and the monitor and steer sessions of `sessions.py`, whose
  per-token events it sends to the daemon as they happen.
- `ModelHostClient`: the daemon's asyncio handle on one host, which starts, talks to and stops it.

The daemon side imports neither torch nor transformers (5 s and hundreds of MB): the host imports
them lazily, in its torch thread, so it answers pings at once and warms up in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from mistudio_core.errors import MistudioError
from mistudiod.protocol import (
    MAX_FRAME_BYTES,
    ProtocolError,
    Session,
    error_content,
    ok,
    raise_for_error,
)
from mistudiod.schema import Field, Schema
from mistudiod.sessions import (
    MODEL_FIELDS,
    MONITOR_FIELDS,
    OPEN_FIELDS,
    SESSION_ID,
    STEER_FIELDS,
    Emit,
    Sessions,
)
from mistudiod.worker import die_with_parent

if TYPE_CHECKING:
    from mistudio_core.models import HookedModel, ModelSpec

log = logging.getLogger("mistudiod.modelhost")

# The host answers its first ping before importing torch, but a loaded machine can be slow to
# start any Python process at all.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0

CacheKey = tuple[str, str | None, str, str]  # model_id, revision, dtype, quantization


# ----- the cache --------------------------------------------------------------------------------


@dataclass
class _Entry:
    model: HookedModel
    info: dict


class ModelCache:
    """The models loaded on one device, evicted least recently used first to stay in budget.

    A model is keyed by (model_id, revision, dtype, quantization) as requested, with the dtype
    resolved for the device (`auto` on a CPU is float32), so the same request always finds the
    same model. Its size is measured after loading (parameters and buffers), but room is made
    before loading from an estimate of its weights: on a GPU, holding the old models while the
    new one loads is what would run out of memory.

    Loads are serialised; `get`, `held` and `unload` may run in other threads meanwhile.
    """

    def __init__(self, device: str, budget_bytes: int) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # guards _entries; never held while loading
        self._loading = threading.Lock()  # one load at a time

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used_locked()

    def load(self, spec: ModelSpec) -> dict:
        """Load `spec` on this device (or touch it if held) and return its info.

        The config is read once and `auto` quantization resolved once: the key, the estimate
        and the load all use the resolved spec."""
        from mistudio_core.models import is_causal_lm, load_config, load_model

        spec = replace(spec, device=self.device)
        dtype = _resolved_dtype(spec)  # a bad dtype is refused before any read
        config = load_config(spec)
        spec, key = _resolved(spec, dtype, config)
        with self._loading:
            if (info := self._touch(key)) is not None:
                return info
            with_lm_head = is_causal_lm(config)  # encoders have no LM head to steer with
            estimate = _estimated_bytes(spec, config)
            if estimate > self.budget_bytes:
                raise self._too_big(spec, estimate, "would take")
            self._make_room(estimate)
            loaded_at, started = time.time(), time.perf_counter()
            model = load_model(spec, with_lm_head=with_lm_head, config=config)
            size = _model_bytes(model)
            if size > self.budget_bytes:
                del model
                self._free()
                raise self._too_big(spec, size, "takes")
            self._make_room(size)
            info = {
                "key": _key_text(key), "model_id": spec.model_id, "revision": spec.revision,
                "dtype": _dtype_name(model.dtype), "quantization": model.quantization,
                "device": str(model.device), "bytes": size,
                "load_seconds": round(time.perf_counter() - started, 3),
                "loaded_at": loaded_at, "last_used": time.time(),
            }
            with self._lock:
                self._entries[key] = _Entry(model, info)
            log.info("loaded %s (%d bytes) in %.1f s", info["key"], size, info["load_seconds"])
            return dict(info)

    def get(self, spec: ModelSpec) -> HookedModel:
        """The loaded model for `spec`, now the most recently used."""
        from mistudio_core.models import load_config

        spec = replace(spec, device=self.device)
        dtype = _resolved_dtype(spec)
        config = load_config(spec) if spec.quantization == "auto" else None
        _, key = _resolved(spec, dtype, config)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise MistudioError(
                    f"{_key_text(key)} is not loaded on {self.device}",
                    hint="load it first", code="not_loaded",
                )
            self._touch_locked(key)
            return entry.model

    def unload(self, model_id_or_key: str) -> bool:
        """Drop every model whose key or model id is `model_id_or_key`; say whether any was."""
        with self._lock:
            keys = [key for key, entry in self._entries.items()
                    if model_id_or_key in (entry.info["key"], entry.info["model_id"])]
            dropped = [self._entries.pop(key) for key in keys]
        if not dropped:
            return False
        log.info("unloaded %s", ", ".join(entry.info["key"] for entry in dropped))
        del dropped
        self._free()
        return True

    def held(self) -> list[dict]:
        """The info of every model held, least recently used first."""
        with self._lock:
            return [dict(entry.info) for entry in self._entries.values()]

    def _touch(self, key: CacheKey) -> dict | None:
        with self._lock:
            if key not in self._entries:
                return None
            self._touch_locked(key)
            return dict(self._entries[key].info)

    def _touch_locked(self, key: CacheKey) -> None:
        self._entries.move_to_end(key)
        self._entries[key].info["last_used"] = time.time()

    def _used_locked(self) -> int:
        return sum(entry.info["bytes"] for entry in self._entries.values())

    def _make_room(self, needed: int) -> None:
        """Evict least recently used models until `needed` more bytes fit in the budget."""
        with self._lock:
            used = self._used_locked()
            evicted = []
            while self._entries and used + needed > self.budget_bytes:
                _, entry = self._entries.popitem(last=False)
                used -= entry.info["bytes"]
                evicted.append(entry.info["key"])
        if evicted:
            log.info("evicted %s to make room", ", ".join(evicted))
            self._free()

    def _free(self) -> None:
        """Return dropped models' memory now, not at the next collection: a GPU needs it back."""
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _too_big(self, spec: ModelSpec, size: int, verb: str) -> MistudioError:
        return MistudioError(
            f"{spec.model_id} {verb} {size / 2**20:.1f} MiB, more than the model host's budget "
            f"of {self.budget_bytes / 2**20:.1f} MiB on {self.device}",
            hint="load it quantized (quantization 8bit or 4bit) or in a smaller dtype, "
            "or give the daemon a larger model memory budget",
            code="out_of_memory",
        )


def _resolved_dtype(spec: ModelSpec) -> str:
    """The dtype `spec` loads in on its device (`auto` resolved)."""
    from mistudio_core.models import resolve_device, resolve_dtype

    return _dtype_name(resolve_dtype(spec.dtype, resolve_device(spec.device)))


def _resolved(spec: ModelSpec, dtype: str, config) -> tuple[ModelSpec, CacheKey]:
    """`spec` with its quantization resolved (from `config`, needed only for `auto`), and the key
    of what it loads: `auto` and the choice it stands for name the same copy."""
    from mistudio_core.models import resolve_quantization

    spec = replace(spec, quantization=resolve_quantization(spec, config))
    return spec, (spec.model_id, spec.revision, dtype, spec.quantization)


def _estimated_bytes(spec: ModelSpec, config) -> int:
    """The weights' size from the config alone, as `mistudio check-memory` prices them (`spec`'s
    quantization is resolved already: no second count of the parameters for `auto`)."""
    from mistudio_core.memory import count_parameters, weight_bytes
    from mistudio_core.models import resolve_device, resolve_dtype, resolve_quantization

    dtype = resolve_dtype(spec.dtype, resolve_device(spec.device))
    return weight_bytes(count_parameters(config), None, resolve_quantization(spec, config), dtype)


def _model_bytes(model: HookedModel) -> int:
    module = model.model
    return sum(tensor.nbytes for tensor in chain(module.parameters(), module.buffers()))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _key_text(key: CacheKey) -> str:
    model_id, revision, dtype, quantization = key
    at = f"@{revision}" if revision else ""
    return f"{model_id}{at}:{dtype}:{quantization}"


# ----- the host process -------------------------------------------------------------------------


class ModelHost:
    """What the request handlers share: the cache, the loads under way, the sessions, and the
    one thread that runs torch.

    Loads and session runs (monitor, steer) run in that thread, one at a time, so that the event
    loop keeps answering (`host.list`, `host.ping`, a cancel) meanwhile. One thread, not one for
    loads and one for runs: once two threads have run torch's CPU ops, OpenMP gives each its own
    team of spinning threads, and they slow each other down. Measured on 2 cores, a bare forward
    pass of the demo model over 64 tokens took 15-16 ms in the host with a loader thread and a
    run thread, against 10.5 ms in a process whose torch ran on one thread; a session's first
    token came 2.2-2.5x after a bare pass instead of ~1.2x. A run waits for a load under way.
    """

    def __init__(self, device: str, budget_bytes: int) -> None:
        self.device = device
        self.cache = ModelCache(device, budget_bytes)
        self.sessions = Sessions(self.cache)
        self.loading: list[str] = []
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self._idle_closer: asyncio.Task | None = None

    def warm_up(self) -> None:
        """Import torch and the model code (in the torch thread) before the first load needs
        them."""
        self._torch.submit(__import__, "mistudio_core.models")

    async def in_torch_thread(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._torch, work)

    def close_idle_sessions(self, every: float = 60.0) -> None:
        """From now on, close the sessions left idle (their SAEs hold device memory)."""

        async def close_idle() -> None:
            while True:
                await asyncio.sleep(every)
                for session_id in self.sessions.close_idle():
                    log.info("closed idle session %s", session_id)

        self._idle_closer = asyncio.create_task(close_idle())


def _spec(request: dict) -> ModelSpec:
    from mistudio_core.models import ModelSpec

    return ModelSpec(request["model"], revision=request["revision"], dtype=request["dtype"],
                     quantization=request["quantization"])


async def _load(host: ModelHost, request: dict, _emit: Emit) -> dict:
    return ok(model=await _loading(host, request, lambda: host.cache.load(_spec(request))))


async def _loading(host: ModelHost, request: dict, work: Callable[[], Any]) -> Any:
    """Run `work` (which loads `request["model"]`) in the torch thread, listed as loading."""
    host.loading.append(request["model"])
    try:
        return await host.in_torch_thread(work)
    finally:
        host.loading.remove(request["model"])


async def _unload(host: ModelHost, request: dict, _emit: Emit) -> dict:
    return ok(unloaded=await host.in_torch_thread(lambda: host.cache.unload(request["model"])))


async def _list(host: ModelHost, request: dict, _emit: Emit) -> dict:
    return ok(device=host.device, budget_bytes=host.cache.budget_bytes,
              used_bytes=host.cache.used_bytes, models=host.cache.held(),
              loading=list(host.loading))


async def _ping(host: ModelHost, request: dict, _emit: Emit) -> dict:
    return ok(pid=os.getpid())


async def _session_open(host: ModelHost, request: dict, _emit: Emit) -> dict:
    opened = await _loading(host, request,
                            lambda: host.sessions.open(_spec(request), request["sae_dirs"]))
    return ok(**opened)


async def _session_monitor(host: ModelHost, request: dict, emit: Emit) -> dict:
    return await _session_run(host, request, emit, host.sessions.monitor)


async def _session_steer(host: ModelHost, request: dict, emit: Emit) -> dict:
    return await _session_run(host, request, emit, host.sessions.steer)


async def _session_run(host: ModelHost, request: dict, emit: Emit,
                       work: Callable[..., dict]) -> dict:
    """Run a monitor or steer request in the compute thread; its last event says how it ended
    (a client following the topic learns of an error there, too)."""
    session, run = host.sessions.start_run(request["session"])
    try:
        result = await host.in_torch_thread(lambda: work(session, run, request, emit))
    except Exception as exc:
        error = exc if isinstance(exc, MistudioError) else MistudioError(
            f"{type(exc).__name__}: {exc}", code="host_error")
        emit(session.topic, {"run": run, "kind": "end", "ok": False, "error": error.to_dict()})
        raise
    finally:
        host.sessions.end_run(session)
    emit(session.topic, {"run": run, "kind": "end", "ok": True})
    return ok(run=run, **result)


async def _session_cancel(host: ModelHost, request: dict, _emit: Emit) -> dict:
    session = host.sessions.get(request["session"])
    running = session.running
    if running:
        session.cancel.set()
    return ok(cancelled=running)


async def _session_close(host: ModelHost, request: dict, _emit: Emit) -> dict:
    return ok(closed=host.sessions.close(request["session"]))


async def _session_list(host: ModelHost, request: dict, _emit: Emit) -> dict:
    return ok(device=host.device, sessions=host.sessions.list())


@dataclass(frozen=True)
class Handler:
    """A request type: the fields it takes and the coroutine that answers it."""

    schema: Schema
    run: Callable[[ModelHost, dict, Emit], Awaitable[dict]]


HANDLERS: dict[str, Handler] = {
    "host.load": Handler(Schema(**{**MODEL_FIELDS, "quantization": Field(
        str, default="none", max_length=16)}), _load),  # checked with the config
    "host.unload": Handler(Schema(model=MODEL_FIELDS["model"]), _unload),
    "host.list": Handler(Schema(), _list),
    "host.ping": Handler(Schema(), _ping),
    "session.open": Handler(Schema(**OPEN_FIELDS), _session_open),
    "session.monitor": Handler(Schema(**MONITOR_FIELDS), _session_monitor),
    "session.steer": Handler(Schema(**STEER_FIELDS), _session_steer),
    "session.cancel": Handler(Schema(session=SESSION_ID), _session_cancel),
    "session.close": Handler(Schema(session=SESSION_ID), _session_close),
    "session.list": Handler(Schema(), _session_list),
}


async def _answer(host: ModelHost, request_type: str, content: dict, emit: Emit) -> dict:
    """The reply content for one request: a handler's answer, or the error it ran into."""
    handler = HANDLERS.get(request_type)
    try:
        if handler is None:
            raise MistudioError(f"the model host has no request {request_type!r}",
                                hint="known: " + ", ".join(sorted(HANDLERS)),
                                code="unknown_request")
        return await handler.run(host, handler.schema.validate(content), emit)
    except MistudioError as exc:
        return error_content(exc)
    except Exception as exc:  # a bug or a library failure: report it, keep serving
        log.exception("%s failed", request_type)
        return error_content(MistudioError(
            f"{type(exc).__name__}: {exc}",
            hint="see the daemon's log for the traceback", code="host_error",
        ))


async def serve(config: dict) -> None:
    """Answer requests on `config["endpoint"]` until the process is stopped."""
    device = config["device"]
    host = ModelHost(device, int(config["budget_bytes"]))
    session = Session(config["key"].encode(), session=f"host-{device}")
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    socket.bind(config["endpoint"])
    host.warm_up()
    log.info("serving %s on %s (budget %d bytes)", device, config["endpoint"],
             host.cache.budget_bytes)
    replies: set[asyncio.Task] = set()
    loop = asyncio.get_running_loop()
    host.close_idle_sessions()

    def send_event(idents: list[bytes], topic: str, content: dict) -> None:
        socket.send_multipart(session.event(topic, content, idents=idents))

    async def reply(request) -> None:
        def emit(topic: str, content: dict) -> None:  # from any thread, in order
            loop.call_soon_threadsafe(send_event, request.idents, topic, content)

        content = await _answer(host, request.type, request.content, emit)
        await socket.send_multipart(session.reply(request, content))

    while True:
        frames = await socket.recv_multipart()
        try:
            request = session.deserialize(frames)
        except ProtocolError as exc:
            log.warning("dropped a message: %s", exc)
            continue
        task = asyncio.create_task(reply(request))
        replies.add(task)
        task.add_done_callback(replies.discard)


class _JournalFormatter(logging.Formatter):
    """Prefixes lines with their syslog priority, which journald reads off stderr."""

    def format(self, record: logging.LogRecord) -> str:
        priority = 3 if record.levelno >= logging.ERROR else (
            4 if record.levelno >= logging.WARNING else 6)
        return f"<{priority}>{super().format(record)}"


def main() -> None:
    config = json.loads(sys.stdin.read())
    die_with_parent(config.get("parent_pid"))
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(_JournalFormatter(f"model host {config['device']}: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[stream])
    asyncio.run(serve(config))


# ----- the daemon's handle ----------------------------------------------------------------------


class ModelHostClient:
    """The daemon's handle on the model host of one device: start, request, stop.

    Requests are signed like every message (DESIGN.md section 4) and matched to their replies by
    `parent_id`, so many can be in flight on the one DEALER socket. The events a session's runs
    send go to `on_event(topic, content)` (the daemon publishes them). If the host dies, every
    request waiting on it fails at once with `host_died`; `start()` brings up a new one.
    """

    def __init__(self, device: str, runtime_dir: Path, key: bytes, budget_bytes: int,
                 on_event: Callable[[str, dict], None] | None = None) -> None:
        self.device = device
        self.on_event = on_event
        self.endpoint = f"ipc://{runtime_dir}/host-{device.replace(':', '-')}.sock"
        self.budget_bytes = budget_bytes
        self._key = key
        self._session = Session(key, session=f"daemon-to-host-{device}")
        self._process: asyncio.subprocess.Process | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._pending: dict[str, asyncio.Future] = {}

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start the host (unless it runs) and wait until it answers a ping."""
        if self.alive:
            return
        await self.stop()  # the remains of a host that died
        # A session of its own: a Ctrl-C on a foreground daemon is for the daemon, which then
        # stops its hosts itself.
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mistudiod.modelhost",
            stdin=asyncio.subprocess.PIPE, start_new_session=True,
        )
        settings = {"key": self._key.decode(), "endpoint": self.endpoint, "device": self.device,
                    "budget_bytes": self.budget_bytes, "parent_pid": os.getpid()}
        try:
            self._process.stdin.write(json.dumps(settings).encode())
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # ping says why
                await self._process.stdin.drain()
                self._process.stdin.close()
            self._socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
            self._socket.connect(self.endpoint)
            self._reader = asyncio.create_task(self._read(self._socket))
            self._watcher = asyncio.create_task(self._watch(self._process))
            raise_for_error(await self.request("host.ping", {}, timeout=START_TIMEOUT))
        except BaseException:
            await self.stop()
            raise

    async def request(self, msg_type: str, content: dict, timeout: float = 30.0) -> dict:
        """Send one request and return the content of its reply (check it with raise_for_error)."""
        if not self.alive or self._socket is None:
            raise self._died()
        header = self._session.header(msg_type)
        future = asyncio.get_running_loop().create_future()
        self._pending[header["msg_id"]] = future
        try:
            await self._socket.send_multipart(
                self._session.serialize(msg_type, content, header=header))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise MistudioError(
                f"the model host for {self.device} did not answer {msg_type} in {timeout:g} s",
                hint="it may be busy loading a model; try again, or restart the daemon",
                code="host_timeout",
            ) from None
        finally:
            self._pending.pop(header["msg_id"], None)

    async def stop(self) -> None:
        """SIGTERM the host, SIGKILL it if it lingers, and close the socket."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._watcher is not None:
            await self._watcher  # fails what still waits on the host
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._reader = self._watcher = None

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            frames = await socket.recv_multipart()
            try:
                reply = self._session.deserialize(frames)
            except ProtocolError as exc:
                log.warning("dropped a message from the %s model host: %s", self.device, exc)
                continue
            if reply.type == "event":
                if self.on_event is not None:
                    self.on_event(reply.header.get("topic", ""), reply.content)
                continue
            future = self._pending.get(reply.parent_id or "")
            if future is not None and not future.done():
                future.set_result(reply.content)

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        await process.wait()
        if process.returncode != -signal.SIGTERM:
            log.error("%s", self._died())
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._died())

    def _died(self) -> MistudioError:
        status = None if self._process is None else self._process.returncode
        if status is None:
            what = "is not running"
        elif status < 0:
            what = f"was killed by {_signal_name(-status)}"
        else:
            what = f"exited with status {status}"
        return MistudioError(
            f"the model host for {self.device} {what}",
            hint="its models are gone; load them again (the daemon's log says why it stopped)",
            code="host_died",
        )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return f"signal {number}"


if __name__ == "__main__":
    main()
