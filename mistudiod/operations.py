"""The daemon's operations: one handler per request type, each with the schema of its fields.

Handlers run in the event loop and must not block it: anything that reads a model config or
imports torch goes to a thread (`asyncio.to_thread`), and anything longer becomes a job. A
handler returns the reply content, or raises `MistudioError`, which the server turns into
`{ok: false, error: {code, message, hint}}`.
"""

from __future__ import annotations

import asyncio
import platform
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
from mistudiod.gpus import devices_of
from mistudiod.jobs import PARAMS, validate_params
from mistudiod.protocol import JOB_STATES, PROTOCOL_VERSION, Message, ok
from mistudiod.schema import Field, Schema
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
                                 "job.<id>.metrics", "job.<id>.log"],
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
    """Corpus names become paths under `corpora/`; relative outputs go under `runs/`."""
    params = dict(params)
    params["corpus"] = _corpus_path(daemon, params["corpus"])
    if kind == "train" and params["out"] and not Path(params["out"]).is_absolute():
        params["out"] = str(daemon.paths.runs / _relative_name(params["out"], "out"))
    for name in ("cache", "sae_dir"):
        value = params.get(name)
        if value and not Path(value).is_absolute():
            params[name] = str(daemon.paths.runs / _relative_name(value, name))
    if kind == "eval" and not Path(params["sae_dir"]).is_dir():
        raise MistudioError(f"no SAE directory {params['sae_dir']} on the daemon's machine",
                            hint="give the path of a trained SAE (a train job's `out`)",
                            code="bad_sae", field="sae_dir")
    try:  # the rule the worker loads it by: a directory here, a hub id, or the demo model
        check_model_id(params["model"])
    except MistudioError as error:
        error.message += " on the daemon's machine"
        error.field = "model"
        raise
    return params


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
