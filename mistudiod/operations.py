"""The daemon's operations: one handler per request type, each with the schema of its fields.

Handlers run in the event loop and must not block it: anything that reads a model config or
imports torch goes to a thread (`asyncio.to_thread`), and anything longer becomes a job. A
handler returns the reply content, or raises `MistudioError`, which the server turns into
`{ok: false, error: {code, message, hint}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import zmq

from mistudio_core import __version__
from mistudio_core.errors import MistudioError
from mistudio_core.model_ids import DEMO_MODEL_ALIAS, check_model_id
from mistudiod.gpus import devices_of, roomiest_gpu
from mistudiod.jobs import FEATURE_READERS, PARAMS, validate_params
from mistudiod.protocol import JOB_STATES, PROTOCOL_VERSION, Message, ok
from mistudiod.schema import Field, Schema
from mistudiod.sessions import MONITOR_FIELDS, OPEN_FIELDS, SESSION_ID, STEER_FIELDS
from mistudiod.uploads import CHUNK_BYTES, check_corpus_name

if TYPE_CHECKING:
    from mistudiod.server import Daemon

Handler = Callable[["Daemon", dict, Message, str], Awaitable[dict]]


@dataclass(frozen=True)
class Operation:
    schema: Schema
    handler: Handler
    audited: bool = False  # changes state: recorded in the audit table
    slow: bool = False  # waits on a thread or a model host: answered in a task of its own


OPERATIONS: dict[str, Operation] = {}


def operation(msg_type: str, /, audited: bool = False, slow: bool = False, **fields: Field):
    def register(handler: Handler) -> Handler:
        OPERATIONS[msg_type] = Operation(Schema(**fields), handler, audited, slow)
        return handler
    return register


_JOB_ID = Field(int, required=True, min=1, max=2**62)
SAE_CONFIG_FILE = "cfg.json"  # what makes a directory an SAE (SAELens's format)
_MODEL = Field(str, required=True, max_length=512)


# ----- the daemon ------------------------------------------------------------------------------


@operation("daemon.info")
async def daemon_info(daemon: Daemon, _: dict, __: Message, ___: str) -> dict:
    return ok(
        versions={"mistudio": __version__, "protocol": PROTOCOL_VERSION,
                  "python": platform.python_version(), "zmq": zmq.zmq_version(),
                  "pyzmq": zmq.__version__, "msgpack": ".".join(map(str, msgpack.version))},
        capabilities={"operations": sorted(OPERATIONS), "job_kinds": sorted(PARAMS),
                      "topics": ["daemon.status", "gpu.<uuid>", "job.<id>.state",
                                 "job.<id>.metrics", "job.<id>.log", "session.<id>"],
                      "tcp": daemon.tcp is not None, "metrics_port": daemon.metrics_port,
                      "max_message_bytes": daemon.session.max_bytes,
                      "upload_chunk_bytes": CHUNK_BYTES},
        pid=daemon.pid, started_at=daemon.started_at,
    )


@operation("daemon.health")
async def health(daemon: Daemon, _: dict, __: Message, ___: str) -> dict:
    return ok(healthy=True, uptime_s=time.time() - daemon.started_at)


@operation("daemon.status")
async def status(daemon: Daemon, _: dict, __: Message, ___: str) -> dict:
    return ok(**daemon.status())


@operation("audit.list", limit=Field(int, default=100, min=1, max=10_000))
async def audit_list(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    return ok(entries=daemon.queue.audit_log(request["limit"]))


# ----- GPUs and models -------------------------------------------------------------------------


@operation("gpu.status")
async def gpu_status(daemon: Daemon, _: dict, __: Message, ___: str) -> dict:
    return ok(**daemon.gpu_snapshot())


@operation("model.check_memory", slow=True, model=_MODEL, revision=Field(str, max_length=256),
           quantization=Field(str, default="auto", choices=("auto", "none", "8bit", "4bit")),
           layer=Field(int, min=0, max=10_000), context_size=Field(int, default=128, min=1,
                                                                  max=1 << 17),
           d_sae=Field(int, min=1, max=1 << 24))
async def check_memory(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    return ok(**await asyncio.to_thread(_check_memory, request, daemon.gpu_snapshot()))


def _check_memory(request: dict, snapshot: dict) -> dict:
    """The preflight against the daemon's latest GPU reading (no new one per keystroke)."""
    from mistudio_core.memory import check_memory
    from mistudio_core.models import ModelSpec

    return check_memory(
        ModelSpec(request["model"], revision=request["revision"]),
        quantization=request["quantization"], layer=request["layer"],
        context_size=request["context_size"], d_sae=request["d_sae"],
        devices=devices_of(snapshot),
    )


@operation("model.validate", slow=True, model=_MODEL, revision=Field(str, max_length=256))
async def validate_model(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    return ok(**await asyncio.to_thread(_validate_model, request))


def _validate_model(request: dict) -> dict:
    """Does the id resolve, and can miStudio find its blocks? (config only, no weights)"""
    from mistudio_core.memory import count_parameters
    from mistudio_core.models import ModelSpec, is_causal_lm, load_config, n_layers_of

    config = load_config(ModelSpec(request["model"], revision=request["revision"]))
    parameters = count_parameters(config)  # raises when no block stack can be found
    return {"model": request["model"], "model_type": config.model_type,
            "architectures": list(getattr(config, "architectures", None) or []),
            "n_layers": n_layers_of(config), "hidden_size": config.get_text_config().hidden_size,
            "parameters": parameters.total, "causal_lm": is_causal_lm(config),
            "supported": True,
            "hooks": [f"layers.L.{site}" for site in
                      ("resid_pre", "resid_post", "attn_out", "mlp_out")]}


@operation("model.list", slow=True, device=Field(str, default="cpu", pattern=r"cpu|cuda:\d{1,2}"))
async def model_list(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    return await daemon.host_request(request["device"], "host.list", {})


@operation("model.load", slow=True, audited=True, model=_MODEL, revision=Field(str, max_length=256),
           dtype=Field(str, default="auto", choices=("auto", "float32", "bfloat16", "float16")),
           quantization=Field(str, default="auto", choices=("auto", "none", "8bit", "4bit")),
           device=Field(str, default="cpu", pattern=r"cpu|cuda:\d{1,2}"))
async def model_load(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    content = {key: request[key] for key in ("model", "revision", "dtype", "quantization")}
    reply = await daemon.host_request(request["device"], "host.load", content, timeout=3600)
    if reply.get("ok") and reply.get("model"):
        daemon.observe_model_load(reply["model"].get("load_seconds", 0.0))
    return reply


@operation("model.unload", slow=True, audited=True, model=_MODEL,
           device=Field(str, default="cpu", pattern=r"cpu|cuda:\d{1,2}"))
async def model_unload(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    return await daemon.host_request(request["device"], "host.unload",
                                     {"model": request["model"]})


# ----- corpora ---------------------------------------------------------------------------------


@operation("corpus.list")
async def corpus_list(daemon: Daemon, _: dict, __: Message, ___: str) -> dict:
    return ok(corpora=daemon.queue.corpora())


@operation("corpus.upload.begin", audited=True, name=Field(str, required=True, max_length=160),
           size=Field(int, required=True, min=0, max=2**50),
           sha256=Field(str, required=True, max_length=64))
async def upload_begin(daemon: Daemon, request: dict, _: Message, who: str) -> dict:
    upload_id = daemon.uploads.begin(request["name"], request["size"], request["sha256"], who)
    return ok(upload_id=upload_id, chunk_bytes=CHUNK_BYTES)


@operation("corpus.upload.chunk", upload_id=Field(str, required=True, max_length=64),
           offset=Field(int, required=True, min=0, max=2**50))
async def upload_chunk(daemon: Daemon, request: dict, message: Message, _: str) -> dict:
    if len(message.buffers) != 1 or len(message.buffers[0]) > CHUNK_BYTES:
        raise MistudioError(f"a chunk is one buffer of at most {CHUNK_BYTES} bytes",
                            hint="split the file into chunks of chunk_bytes", code="bad_request")
    received = daemon.uploads.chunk(request["upload_id"], request["offset"], message.buffers[0])
    return ok(received=received)


@operation("corpus.upload.end", audited=True, upload_id=Field(str, required=True, max_length=64))
async def upload_end(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    upload, path = daemon.uploads.finish(request["upload_id"])
    record = daemon.queue.add_corpus(upload.name, upload.size, upload.sha256, upload.who)
    return ok(corpus={**record, "path": str(path)})


# ----- jobs ------------------------------------------------------------------------------------


@operation("job.submit", audited=True, kind=Field(str, required=True, choices=tuple(PARAMS)),
           params=Field(dict, required=True), priority=Field(int, default=0, min=-100, max=100),
           max_retries=Field(int, default=0, min=0, max=10))
async def job_submit(daemon: Daemon, request: dict, _: Message, who: str) -> dict:
    params = validate_params(request["kind"], request["params"])
    params = _resolve_paths(daemon, request["kind"], params)
    job = daemon.queue.submit(request["kind"], params, who, request["priority"],
                              request["max_retries"])
    daemon.publish(f"job.{job.id}.state", {"job": job.to_dict()})
    daemon.wake_scheduler()
    return ok(job=job.to_dict())


@operation("job.validate", kind=Field(str, required=True, choices=tuple(PARAMS)),
           params=Field(dict, required=True))
async def job_validate(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    """What `job.submit` would check, without queueing anything: forms call it as the user
    types. The reply holds the parameters as the job would get them (defaults, resolved paths);
    an error names the `field` at fault."""
    params = validate_params(request["kind"], request["params"])
    return ok(params=_resolve_paths(daemon, request["kind"], params))


def _resolve_paths(daemon: Daemon, kind: str, params: dict) -> dict:
    """Corpus names become paths under `corpora/`; relative outputs and SAE directories go
    under `runs/`. The SAE a job reads must be there now, and so must its features unless a
    queued or running find job is about to write them (a queued pipeline)."""
    params = dict(params)
    if "corpus" in params:
        params["corpus"] = _corpus_path(daemon, params["corpus"])
    if kind == "train" and params["out"] and not Path(params["out"]).is_absolute():
        params["out"] = str(daemon.paths.runs / _relative_name(params["out"], "out"))
    for name in ("cache", "sae_dir"):
        value = params.get(name)
        if value and not Path(value).is_absolute():
            params[name] = str(daemon.paths.runs / _relative_name(value, name))
    if "sae_dir" in params:
        _check_sae_dir(daemon, kind, params)
    if params.get("model") is not None:
        _check_model(params["model"])
    return params


def _check_model(model: str) -> None:
    """The rule a worker or model host loads a model by: a directory here, a hub id, or the
    demo model."""
    try:
        check_model_id(model)
    except MistudioError as error:
        error.message += " on the daemon's machine"
        error.field = "model"
        raise


def _check_sae_dir(daemon: Daemon, kind: str, params: dict) -> None:
    from mistudio_core.feature_store import has_features, parse_features

    sae_dir = params["sae_dir"]
    d_sae = sae_width(sae_dir)
    if d_sae is None:
        raise MistudioError(f"no SAE directory {sae_dir} on the daemon's machine",
                            hint="give the path of a trained SAE (a train job's `out`, with "
                                 "its cfg.json)", code="bad_sae", field="sae_dir")
    if kind == "find" and (finding := _finding(daemon, sae_dir)) is not None:
        raise MistudioError(f"find job {finding} is already finding this SAE's features",
                            hint=f"wait for it, or cancel it (`mistudio job cancel {finding}`)",
                            code="busy", field="sae_dir")
    # the queue is read only when the features are missing (not per keystroke of a form)
    if kind in FEATURE_READERS and not has_features(sae_dir) \
            and _finding(daemon, sae_dir) is None:
        raise MistudioError(f"no features found for the SAE in {sae_dir}",
                            hint=f"run `mistudio find {sae_dir} --model M --corpus C` first",
                            code="not_found", field="sae_dir")
    if params.get("features") is not None:
        parse_features(params["features"], d_sae)


def _finding(daemon: Daemon, sae_dir: str) -> int | None:
    """The newest queued or running find job on the SAE in `sae_dir`, if any."""
    return next((job.id for job in daemon.queue.list(("queued", "running"), 10_000)
                 if job.kind == "find" and job.params.get("sae_dir") == sae_dir), None)


def sae_width(sae_dir: str | Path) -> int | None:
    """The number of features of the SAE in `sae_dir` (its cfg.json's `d_sae`), or None when
    the directory holds no readable SAE config."""
    try:
        cfg = json.loads((Path(sae_dir) / SAE_CONFIG_FILE).read_text())
        return int(cfg["d_sae"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _corpus_path(daemon: Daemon, corpus: str) -> str:
    if corpus == DEMO_MODEL_ALIAS:  # the demo model's held-out corpus
        return corpus
    if Path(corpus).is_absolute():
        if not Path(corpus).is_file():
            raise MistudioError(
                f"no corpus file {corpus} on the daemon's machine",
                hint="upload it with `mistudio corpus add FILE` and use its name",
                code="bad_corpus", field="corpus")
        return corpus
    check_corpus_name(corpus, field="corpus")
    path = daemon.paths.corpora / corpus
    if not path.is_file():
        raise MistudioError(f"no corpus named {corpus!r}",
                            hint="`mistudio corpus list` shows the uploaded corpora; "
                                 "`mistudio corpus add FILE` uploads one", code="bad_corpus",
                            field="corpus")
    return str(path)


def _relative_name(value: str, field_name: str) -> str:
    parts = Path(value).parts
    if not parts or any(part in ("..", ".") or part.startswith(".") for part in parts):
        raise MistudioError(f"`{field_name}` {value!r} must stay inside the daemon's runs "
                            "directory", hint="use a plain relative name or an absolute path",
                            code="bad_request", field=field_name)
    return value


def _job(daemon: Daemon, job_id: int):
    job = daemon.queue.get(job_id)
    if job is None:
        raise MistudioError(f"no job {job_id}", hint="`mistudio jobs` lists the jobs",
                            code="not_found")
    return job


@operation("job.list", states=Field(list, item=str, max_length=5),
           limit=Field(int, default=100, min=1, max=10_000))
async def job_list(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    states = tuple(request["states"] or JOB_STATES)
    if not set(states) <= set(JOB_STATES):
        raise MistudioError(f"states must be among {', '.join(JOB_STATES)}", code="bad_request")
    return ok(jobs=[job.to_dict() for job in daemon.queue.list(states, request["limit"])])


@operation("job.show", id=_JOB_ID)
async def job_show(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    return ok(job=_job(daemon, request["id"]).to_dict())


@operation("job.logs", id=_JOB_ID, since=Field(int, default=0, min=0),
           limit=Field(int, default=1000, min=1, max=100_000))
async def job_logs(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    _job(daemon, request["id"])
    return ok(logs=daemon.queue.logs(request["id"], request["since"], request["limit"]))


@operation("job.metrics", id=_JOB_ID, since_step=Field(int, default=-1, min=-1),
           limit=Field(int, default=10_000, min=1, max=1_000_000))
async def job_metrics(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    _job(daemon, request["id"])
    points = daemon.queue.metrics(request["id"], request["since_step"], request["limit"])
    return ok(points=points)


@operation("job.cancel", audited=True, id=_JOB_ID)
async def job_cancel(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    job = _job(daemon, request["id"])
    if job.state in ("succeeded", "failed", "cancelled"):
        raise MistudioError(f"job {job.id} has already {job.state}", code="bad_request",
                            hint="only queued and running jobs can be cancelled")
    job = daemon.queue.request_cancel(job.id)
    if job.state == "running":
        daemon.pool.stop_job(job.id)
    daemon.publish(f"job.{job.id}.state", {"job": job.to_dict()})
    return ok(job=job.to_dict())


@operation("job.result", id=_JOB_ID)
async def job_result(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    job = _job(daemon, request["id"])
    if job.state not in ("succeeded", "failed", "cancelled"):
        raise MistudioError(f"job {job.id} is {job.state}; it has no result yet",
                            hint="wait for it (`mistudio job show ID`)", code="not_ready")
    return ok(state=job.state, result=job.result, error=job.error)


# ----- features (what find, explain, score and correlate stored beside an SAE) -----------------
# Quick reads of `SAE_DIR/features/`: each request opens the store in a thread and closes it,
# so a find that rewrites the store between two requests is seen whole by the next one.

_SAE_DIR = Field(str, required=True, max_length=4096)
_SORTS = ("id", "density", "max", "mean", "score")  # mistudio_core.feature_store.SORTS


@operation("feature.sources", slow=True)
async def feature_sources(daemon: Daemon, _: dict, __: Message, ___: str) -> dict:
    trained = [job.result["path"] for job in daemon.queue.list(("succeeded",), 10_000)
               if job.kind == "train" and (job.result or {}).get("path")]
    return ok(saes=await asyncio.to_thread(sae_sources, daemon.paths.runs, trained))


@operation("feature.list", slow=True, sae_dir=_SAE_DIR,
           sort=Field(str, default="id", choices=_SORTS), descending=Field(bool),
           search=Field(str, max_length=1000), limit=Field(int, default=100, min=1, max=10_000),
           offset=Field(int, default=0, min=0, max=2**40),
           scorer=Field(str, default="rule", max_length=1024))
async def feature_list(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    request = {**request, "sae_dir": _sae_path(daemon, request["sae_dir"])}
    return ok(**await asyncio.to_thread(list_features, request))


@operation("feature.show", slow=True, sae_dir=_SAE_DIR,
           id=Field(int, required=True, min=0, max=2**31))
async def feature_show(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    sae_dir = _sae_path(daemon, request["sae_dir"])
    return ok(**await asyncio.to_thread(show_feature, sae_dir, request["id"]))


@operation("feature.search", slow=True, sae_dir=_SAE_DIR,
           query=Field(str, required=True, max_length=1000),
           limit=Field(int, default=10, min=1, max=1000))
async def feature_search(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    sae_dir = _sae_path(daemon, request["sae_dir"])
    return ok(**await asyncio.to_thread(search_features, sae_dir, request["query"],
                                        request["limit"]))


def _sae_path(daemon: Daemon, value: str) -> str:
    """An SAE directory as jobs name it: absolute, or relative to the daemon's runs/."""
    if Path(value).is_absolute():
        return value
    return str(daemon.paths.runs / _relative_name(value, "sae_dir"))


def list_features(request: dict) -> dict:
    """A page of an SAE's features (`feature.list`, and `mistudio features`)."""
    with _opened_store(request["sae_dir"]) as store:
        features, total = store.list(request["sort"], request["descending"], request["search"],
                                     request["limit"], request["offset"], request["scorer"])
        return {"features": features, "total": total, "d_sae": store.d_sae,
                "meta": store.meta}


def show_feature(sae_dir: str, feature: int) -> dict:
    """One feature's card (`feature.show`, and `mistudio feature`)."""
    with _opened_store(sae_dir) as store:
        try:
            return {"feature": store.card(feature)}
        except MistudioError as error:
            if error.field == "feature":  # the request names it `id`
                error.field = "id"
            raise


def search_features(sae_dir: str, query: str, limit: int) -> dict:
    """Features whose explanations mean something close to `query` (`feature.search`, and
    `mistudio features --semantic`)."""
    from mistudio_core.explanation_index import search_explanations

    with _naming_sae_dir():
        return {"results": search_explanations(sae_dir, query, limit)}


@contextlib.contextmanager
def _opened_store(sae_dir: str):
    from mistudio_core.feature_store import FeatureStore

    with _naming_sae_dir():
        store = FeatureStore(sae_dir)
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def _naming_sae_dir():
    """An SAE without features is the `sae_dir` field's fault (forms mark it)."""
    try:
        yield
    except MistudioError as error:
        if error.code == "not_found" and error.field is None:
            error.field = "sae_dir"
        raise


def sae_sources(runs: Path, trained: list[str]) -> list[dict]:
    """The SAE directories under `runs` (two levels deep) and those `trained` elsewhere,
    newest first, each with what its cfg.json says and how far its features have got."""
    candidates = [*runs.glob(f"*/{SAE_CONFIG_FILE}"), *runs.glob(f"*/*/{SAE_CONFIG_FILE}"),
                  *(Path(path) / SAE_CONFIG_FILE for path in trained)]
    found, seen = [], set()
    for cfg_path in candidates:
        directory = cfg_path.parent
        key = directory.resolve()
        if key in seen or not cfg_path.is_file():
            continue
        seen.add(key)
        source = _sae_source(directory)
        if source is not None:
            found.append(source)
    return sorted(found, key=lambda source: source["created_at"], reverse=True)


def _sae_source(directory: Path) -> dict | None:
    from mistudio_core.feature_store import FeatureStore, has_features

    try:
        cfg_path = directory / SAE_CONFIG_FILE
        cfg = json.loads(cfg_path.read_text())
        metadata = cfg.get("metadata") or {}
        source = {"path": str(directory), "d_sae": int(cfg["d_sae"]),
                  "model": metadata.get("model_name"), "hook": metadata.get("hook_name"),
                  "has_features": has_features(directory), "n_explained": 0,
                  "created_at": cfg_path.stat().st_mtime}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # not an SAE we can read: left out of the list
    if source["has_features"]:
        with contextlib.suppress(MistudioError, sqlite3.Error), \
                contextlib.closing(FeatureStore(directory)) as store:
            count = "SELECT count(DISTINCT feature) FROM explanations"
            source["n_explained"] = store.db.execute(count).fetchone()[0]
    return source


# ----- interactive sessions: monitor and steer in a model host (mistudiod/sessions.py) ---------
# The daemon checks the fields, resolves paths and the device, and forwards to the model host of
# the session's device; the host's per-token events come back through `ModelHostClient` and go
# out on `session.<id>`. The daemon remembers each session's device to route its requests.

RUN_TIMEOUT = 3600.0  # a long generation on a big model; a client cancels sooner if it wants


@operation("session.open", slow=True, audited=True, **OPEN_FIELDS,
           device=Field(str, default="auto", pattern=r"auto|cpu|cuda:\d{1,2}"))
async def session_open(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    _check_model(request["model"])
    if not request["sae_dirs"]:
        raise MistudioError("no SAE given", hint="name at least one SAE directory",
                            code="bad_request", field="sae_dirs")
    sae_dirs = [_sae_path(daemon, directory) for directory in request["sae_dirs"]]
    for directory in sae_dirs:
        if not (Path(directory) / SAE_CONFIG_FILE).is_file():
            raise MistudioError(f"{directory} is not an SAE directory (no {SAE_CONFIG_FILE})",
                                hint="give a directory `mistudio train` wrote",
                                code="not_found", field="sae_dirs")
    device = request["device"]
    if device == "auto":
        device = roomiest_gpu(daemon.gpu_snapshot()) or "cpu"
    content = {**{name: request[name] for name in OPEN_FIELDS}, "sae_dirs": sae_dirs}
    reply = await daemon.host_request(device, "session.open", content, timeout=RUN_TIMEOUT)
    if reply.get("ok"):
        daemon.sessions[reply["session"]] = device
    return reply


@operation("session.monitor", slow=True, **MONITOR_FIELDS)
async def session_monitor(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    return await _in_session(daemon, "session.monitor", request, RUN_TIMEOUT)


@operation("session.steer", slow=True, **STEER_FIELDS)
async def session_steer(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    return await _in_session(daemon, "session.steer", request, RUN_TIMEOUT)


@operation("session.cancel", slow=True, session=SESSION_ID)
async def session_cancel(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    return await _in_session(daemon, "session.cancel", request)


@operation("session.close", slow=True, audited=True, session=SESSION_ID)
async def session_close(daemon: Daemon, request: dict, _: Message, __: str) -> dict:
    reply = await _in_session(daemon, "session.close", request)
    daemon.sessions.pop(request["session"], None)
    return reply


@operation("session.list", slow=True)
async def session_list(daemon: Daemon, _: dict, __: Message, ___: str) -> dict:
    sessions = []
    for device in sorted(set(daemon.sessions.values())):
        host = daemon.hosts.get(device)
        if host is None or not host.alive:
            continue  # its sessions went with it
        reply = await host.request("session.list", {})
        sessions += [{**session, "device": device} for session in reply.get("sessions", ())]
    return ok(sessions=sessions)


async def _in_session(daemon: Daemon, msg_type: str, request: dict,
                      timeout: float = 30.0) -> dict:
    """Forward a request on an open session to its device's model host."""
    device = daemon.sessions.get(request["session"])
    if device is None:
        raise MistudioError(f"no session {request['session']!r}",
                            hint="open one first (`session.open`); sessions end when closed, "
                                 "idle for 30 minutes, or when the daemon restarts",
                            code="not_found", field="session")
    reply = await daemon.host_request(device, msg_type, request, timeout=timeout)
    if (reply.get("error") or {}).get("code") == "not_found" and (
            reply["error"].get("field") == "session"):
        daemon.sessions.pop(request["session"], None)  # closed by the host (idle, restarted)
    return reply
