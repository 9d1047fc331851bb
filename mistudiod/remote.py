"""The CLI's commands that go through the daemon (DESIGN.md section 7).

Each takes the parsed arguments and a progress reporter and returns the JSON document the CLI
prints. Job commands submit, then follow the job's events with a progress bar until it ends
(`--detach` returns the id at once); they poll `job.show` as well, so a daemon restart or a
missed event never leaves them waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from mistudio_core.errors import MistudioError
from mistudiod.client import Client
from mistudiod.jobs import UNITS
from mistudiod.protocol import FINISHED_STATES

# Job errors that are the user's to fix (exit 2); anything else is a failed job (exit 1).
USER_ERRORS = {"bad_input", "bad_usage", "bad_request", "model_not_found", "bad_corpus",
               "bad_sae", "out_of_memory", "not_found"}
_POLL_S = 2.0


class JobFailed(Exception):
    """A job that ended without success; carries its error document and its exit status."""

    def __init__(self, job: dict) -> None:
        super().__init__(job["error"]["message"] if job.get("error") else job["state"])
        self.job = job
        self.error = job.get("error") or {"code": job["state"], "message": job["state"],
                                          "hint": ""}
        self.status = 2 if self.error.get("code") in USER_ERRORS else 1


class Detached(MistudioError):
    """Ctrl-C while following a job: the CLI stopped waiting, the job runs on in the daemon."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"stopped following job {job_id}; it keeps running in the daemon",
                         hint=f"`mistudio job show {job_id}` shows how it is doing, "
                              f"`mistudio job cancel {job_id}` stops it", code="detached")
        self.job_id = job_id


# A value that does not exist here but has the shape of a path was meant as one (a typo, a
# wrong directory): refused here, where it can be named, rather than resolved by the daemon as
# a name. A hub id is `org/name`; an uploaded corpus has a plain name; a plain relative SAE
# directory is one under the daemon's runs/.
_LOOKS_LIKE_A_PATH = {
    "model": lambda v: v.startswith(("/", ".", "~")) or v.count("/") > 1,
    "corpus": lambda v: v.startswith((".", "~")) or "/" in v,
    "sae_dir": lambda v: v.startswith(("/", ".", "~")),
    None: lambda v: v.startswith(("/", ".", "~")),
}
_MISSING = {  # field: (what it is, error code, hint)
    "model": ("model directory", "model_not_found",
              "give an existing directory, a hub id (org/name) or `demo`"),
    "corpus": ("corpus", "bad_corpus",
               "check the path; a corpus uploaded with `mistudio corpus add` is named by its "
               "plain name (`mistudio corpus list`)"),
    "sae_dir": ("SAE directory", "bad_sae", "give the directory of a trained SAE (a train "
                                            "job's --out)"),
    None: ("path", "bad_input", "check the path"),
}


def input_path(value: str | None, field: str | None = None) -> str | None:
    """A model, corpus or SAE given as a path that exists here, made absolute for the daemon;
    anything else (a hub id like `EleutherAI/pythia-160m`, an uploaded corpus's name, `demo`)
    passes as it is, for the daemon to resolve. A `field` value shaped like a path that does
    not exist is a MistudioError."""
    if value is None:
        return value
    path = Path(value).expanduser()
    if path.exists():
        return str(path.absolute())
    if _LOOKS_LIKE_A_PATH[field](value):
        what, code, hint = _MISSING[field]
        raise MistudioError(f"{what} {value} does not exist", hint=hint, code=code, field=field)
    return value


def output_path(value: str | None) -> str | None:
    """A directory to write, relative to where the command is run."""
    return None if value is None else str(Path(value).expanduser().absolute())


def call(args, coroutine_function, *extra):
    """Run one async client command to completion."""

    async def run():
        async with Client(args.runtime_dir) as client:
            return await coroutine_function(client, args, *extra)

    return asyncio.run(run())


async def submit_and_wait(client: Client, args, kind: str, params: dict, progress) -> dict:
    reply = await client.request("job.submit", {"kind": kind, "params": params,
                                                "priority": args.priority,
                                                "max_retries": args.retries})
    job = reply["job"]
    if args.detach:
        progress.line(f"job {job['id']} queued; `mistudio job show {job['id']}` shows it")
        return {"job": job}
    try:
        job = await follow(client, job["id"], progress)
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C (asyncio.run cancels us)
        raise Detached(job["id"]) from None
    if job["state"] != "succeeded":
        raise JobFailed(job)
    return {"job_id": job["id"], **(job["result"] or {})}


async def follow(client: Client, job_id: int, progress) -> dict:
    """Show a job's logs and metrics as they come; return the job once it has ended."""
    client.subscribe(f"job.{job_id}.")
    shown_log, job = 0, None
    while True:
        event = await client.next_event(timeout=_POLL_S)
        if event is not None and event.topic.endswith(".log"):
            if event.content["id"] > shown_log:
                progress.line(event.content["message"])
                shown_log = event.content["id"]
            continue
        if event is not None and event.topic.endswith(".metrics"):
            progress.event("metrics", event.content["point"])
            continue
        job = event.content["job"] if event is not None else (
            await client.request("job.show", {"id": job_id}, retries=5))["job"]
        if event is None or event.resync:  # catch up on log lines we may have missed
            logs = await client.request("job.logs", {"id": job_id, "since": shown_log},
                                        retries=5)
            for entry in logs["logs"]:
                progress.line(entry["message"])
                shown_log = entry["id"]
        if job["total_steps"]:  # steps of training, tokens read, features done
            if progress.bar is None:
                unit = UNITS.get(job["kind"], "it")
                progress.start(job["kind"], job["total_steps"], unit=unit)
            progress.update(job["step"], total=job["total_steps"])
        if job["state"] in FINISHED_STATES:
            return job


# ----- interactive sessions ------------------------------------------------------------------

SESSION_TIMEOUT_S = 3600.0  # loading a large model, or a long generation


async def in_session(client: Client, args, opened: dict, msg_type: str, request: dict,
                     on_token) -> tuple[dict, dict]:
    """Open a session, run one monitor or steer request in it, close it. Each token event goes
    to `on_token` as it arrives; the reply holds the whole answer. Ctrl-C cancels the run.

    The events are followed from before the session opens (all sessions' topics, filtered
    here), so that the subscription is in place before the first token is published."""
    client.subscribe("session.")
    session = await client.request("session.open", opened, timeout=SESSION_TIMEOUT_S)
    session_id = session["session"]
    reader = asyncio.create_task(_session_tokens(client, f"session.{session_id}", on_token))
    try:
        reply = await client.request(msg_type, {**request, "session": session_id},
                                     timeout=SESSION_TIMEOUT_S)
        with contextlib.suppress(TimeoutError):  # the events may trail the reply a little
            await asyncio.wait_for(reader, _POLL_S)
    except (KeyboardInterrupt, asyncio.CancelledError):
        with contextlib.suppress(MistudioError):
            await client.request("session.cancel", {"session": session_id})
        raise
    finally:
        reader.cancel()
        with contextlib.suppress(MistudioError):
            await client.request("session.close", {"session": session_id})
    return session, {key: value for key, value in reply.items() if key not in ("ok", "run")}


async def _session_tokens(client: Client, topic: str, on_token) -> None:
    """Pass the session's token events to `on_token` until its run ends."""
    while True:
        event = await client.next_event()
        if event is None or event.topic != topic:
            continue
        if event.content.get("kind") == "end":
            return
        on_token(event.content)


# ----- control-plane commands ------------------------------------------------------------------


async def status(client: Client, args) -> dict:
    return await client.request("daemon.status", retries=2)


async def gpu(client: Client, args) -> dict:
    return await client.request("gpu.status", retries=2)


async def jobs(client: Client, args) -> dict:
    return await client.request("job.list", {"limit": args.limit}, retries=2)


# `mistudio job ACTION ID`: the request and whether it is safe to repeat after a timeout.
JOB_ACTIONS = {"show": ("job.show", 2), "cancel": ("job.cancel", 0), "logs": ("job.logs", 2),
                "metrics": ("job.metrics", 2), "result": ("job.result", 2)}


async def job_command(client: Client, args) -> dict:
    msg_type, retries = JOB_ACTIONS[args.action]
    return await client.request(msg_type, {"id": args.id}, retries=retries)


async def check_memory(client: Client, args) -> dict:
    """The memory preflight on the daemon's devices (`args.model` already `input_path`ed)."""
    return await client.request("model.check_memory", {
        "model": args.model, "revision": args.revision,
        "quantization": args.quantization, "layer": args.layer,
        "context_size": args.context_size, "d_sae": args.d_sae,
    }, timeout=120)


async def corpus_list(client: Client, args) -> dict:
    return await client.request("corpus.list", retries=2)


async def corpus_add(client: Client, args, progress) -> dict:
    path = Path(args.file)
    name = args.name or path.name

    def uploaded(offset: int, size: int) -> None:
        if offset == 0:
            progress.start(f"uploading {name}", size, unit="B")
        else:
            progress.update(offset)

    return await client.upload_corpus(path, name, on_progress=uploaded)
