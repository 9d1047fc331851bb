"""A job's worker process: runs one attempt of one job and reports over a PUSH socket.

The daemon starts `python -m mistudiod.worker` and writes the assignment to its stdin as one
JSON document: `{key, endpoint, job_id, attempt, kind, params, resume, heartbeat_s, threads,
parent_pid}`. The worker runs `mistudiod.jobs.run_job` (the code `--local` runs) and sends every
progress event, a heartbeat every `heartbeat_s` seconds, and finally a `done` event with the
result or the error. Each report names the job and the attempt, which the daemon checks against
its fencing token. A crash, an OOM kill or a SIGKILL leaves no `done`: the daemon sees the exit
status and fails or retries the job. The worker dies with the daemon (PR_SET_PDEATHSIG), so a
restarted daemon never finds an orphan still writing the run directory it resumes.

A training job that asks for several processes (`gpus`, one GPU each, or CPU processes on a
machine without GPUs) becomes `torchrun --standalone --nproc-per-node N -m mistudiod.worker` in
place (exec: the same pid, still dying with the daemon), its GPUs made the visible ones, the
assignment passed to the ranks in `MISTUDIO_WORKER_SPEC`. Rank 0 reports; the others only work.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import traceback

import zmq

from mistudio_core.errors import MistudioError
from mistudiod.jobs import run_job
from mistudiod.protocol import Session

PR_SET_PDEATHSIG = 1
# Jobs run at a lower CPU priority than the daemon, so that a training job that saturates the
# cores never makes the control plane (status, cancel, the TUI's refreshes) wait for a core.
WORKER_NICENESS = 10


def die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this process when the daemon (`parent_pid`) dies, so that no worker
    or model host outlives it.

    The signal follows the thread that forked us: the daemon spawns its children from its event
    loop, in its main thread. If the daemon died before the request took effect, we have been
    reparented (to init or to a subreaper, whatever its pid): leave at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux: leases and the daemon's stop() cover it
        return
    if parent_pid and os.getppid() != parent_pid:
        sys.exit("mistudiod: the daemon that started this process is gone")


class Reporter:
    """Signed reports to the daemon; a lock because the heartbeat thread sends too."""

    def __init__(self, spec: dict) -> None:
        self.job_id, self.attempt = spec["job_id"], spec["attempt"]
        self.session = Session(spec["key"].encode(), session=f"worker-{self.job_id}")
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.connect(spec["endpoint"])
        self.lock = threading.Lock()

    def __call__(self, kind: str, payload: dict) -> None:
        content = {"job_id": self.job_id, "attempt": self.attempt, "kind": kind,
                   "payload": payload}
        frames = self.session.serialize("worker.report", _plain(content))
        with self.lock:
            self.socket.send_multipart(frames)

    def close(self) -> None:
        self.socket.close(linger=10_000)


def _plain(value):
    """JSON-safe copy (numpy scalars, paths): what msgpack can carry."""
    return json.loads(json.dumps(value, default=_default))


def _default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _heartbeats(report: Reporter, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        report("heartbeat", {})


def main() -> int:
    rank = os.environ.get("RANK")
    spec = json.loads(os.environ.pop(SPEC_VARIABLE) if rank is not None else sys.stdin.read())
    die_with_parent(spec.get("parent_pid") if rank is None else None)  # a rank's is torchrun
    if rank is None:
        os.nice(WORKER_NICENESS)  # torchrun's ranks inherit it
    processes = spec["params"].get("gpus", 1) if spec["kind"] == "train" else 1
    if processes > 1 and rank is None:
        _become_torchrun(spec, processes)
    if "," in spec["params"].get("device", "") and rank is None:  # a model split over GPUs
        spec = _on_visible_gpus(spec, os.environ)
    # SIGTERM (a cancel) ends the job like Ctrl-C ends a local run.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if spec.get("threads"):
        # Torch reads this when a job first imports it; setting it, rather than calling
        # torch.set_num_threads, spares the jobs that need no torch (explain, score) loading it.
        os.environ["OMP_NUM_THREADS"] = str(spec["threads"])
    report = Reporter(spec) if rank in (None, "0") else _Silent()
    stop = threading.Event()
    threading.Thread(target=_heartbeats, args=(report, spec["heartbeat_s"], stop),
                     daemon=True).start()
    status = 0
    try:
        result = run_job(spec["kind"], spec["params"], report, resume=spec["resume"])
        report("done", {"ok": True, "result": result})
    except MistudioError as error:
        report("done", {"ok": False, "error": error.to_dict()})
        status = 2
    except KeyboardInterrupt:
        report("done", {"ok": False, "error": {"code": "cancelled", "message": "cancelled",
                                               "hint": ""}})
        status = 130
    except BaseException as error:  # a bug, or the machine (OOM): the job fails, not the daemon
        report("log", {"message": traceback.format_exc(), "level": "error"})
        report("done", {"ok": False, "error": _failure(error)})
        status = 1
    finally:
        stop.set()
        report.close()
    return status


SPEC_VARIABLE = "MISTUDIO_WORKER_SPEC"


class _Silent:
    """The reporter of torchrun's ranks but 0: rank 0 speaks for the job."""

    def __call__(self, kind: str, payload: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _become_torchrun(spec: dict, processes: int) -> None:
    """Replace this process by torchrun running `processes` workers of the job (never returns).

    The placed GPUs (`cuda:1,cuda:3`) become the visible ones, each rank taking its own
    (LOCAL_RANK); the assignment goes to the ranks in the environment, which only this user (and
    root) can read, as the daemon's connection file."""
    env = dict(os.environ)
    if spec["params"]["device"].startswith("cuda"):
        spec = _on_visible_gpus(spec, env, device="cuda")
    if spec.get("threads"):  # the job's CPU threads, shared by its processes
        spec = {**spec, "threads": max(1, spec["threads"] // processes)}
    env[SPEC_VARIABLE] = json.dumps(spec)
    os.execve(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={processes}", "-m", "mistudiod.worker"], env)


def _on_visible_gpus(spec: dict, env, device: str = "auto") -> dict:
    """Make the placed GPUs (`cuda:1,cuda:3`) the visible ones, in that order, and give the job
    `device` instead: "auto" lets the loader split a model over them as the preflight planned
    (its first GPU first), "cuda" gives each of torchrun's ranks its own (LOCAL_RANK)."""
    env["CUDA_VISIBLE_DEVICES"] = ",".join(
        name.removeprefix("cuda:") for name in spec["params"]["device"].split(","))
    return {**spec, "params": {**spec["params"], "device": device}}


def _failure(error: BaseException) -> dict:
    if type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        return {"code": "out_of_memory", "message": f"out of GPU memory: {error}",
                "hint": "use --quantization 4bit, a smaller --batch-tokens or --d-sae, "
                        "or wait for other jobs on that GPU to finish"}
    return {"code": "job_failed", "message": f"{type(error).__name__}: {error}",
            "hint": "the job's log has the traceback; report it if it looks like a bug"}


if __name__ == "__main__":
    sys.exit(main())
