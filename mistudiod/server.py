"""`mistudiod`: the daemon. One asyncio process that owns the job queue, the workers, the GPUs'
telemetry and the model hosts, and answers clients over ZeroMQ (DESIGN.md section 4).

Sockets, in the runtime directory (0700, or 0750 for a group):
- `ctl.sock`, ROUTER: requests from clients (DEALER), answered by `mistudiod.operations`;
- `events.sock`, XPUB: `daemon.status` and `gpu.<uuid>` every second, `job.<id>.state|metrics|
  log` as they happen;
- `workers.sock`, PULL: reports from the worker processes.
With `--tcp tcp://HOST:PORT` the control socket is also bound there and the events on PORT+1,
both with CurveZMQ encryption; the daemon's public key goes in the connection file.

Every message is signed (mistudiod.protocol). A message that is not an envelope or whose
signature is wrong is dropped and logged, never answered: without the key there is nothing to
talk to. Everything else gets a reply, an error reply at worst, and the daemon goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import fcntl
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq
import zmq.asyncio

from mistudio_core import __version__
from mistudio_core.errors import MistudioError
from mistudiod import systemd
from mistudiod.gpus import GpuMonitor, cpu_load, gpu_devices
from mistudiod.operations import OPERATIONS
from mistudiod.paths import DaemonPaths
from mistudiod.protocol import (
    MAGIC,
    MAX_FRAME_BYTES,
    ConnectionInfo,
    Message,
    ProtocolError,
    Session,
    error_content,
    new_key,
)
from mistudiod.queue import Job, JobQueue
from mistudiod.uploads import Uploads
from mistudiod.workers import Settings, WorkerPool, cpu_threads_per_job, spawn

log = logging.getLogger("mistudiod")

# Share of a device's memory a model host may fill with loaded models.
HOST_BUDGET_FRACTION = 0.5
DEFAULT_MAX_CORPUS_BYTES = 10 << 30


class Daemon:
    def __init__(self, paths: DaemonPaths, settings: Settings | None = None,
                 tcp: str | None = None, metrics_port: int | None = None,
                 metrics_address: str = "127.0.0.1",
                 max_corpus_bytes: int = DEFAULT_MAX_CORPUS_BYTES) -> None:
        self.paths = paths
        self.settings = settings or Settings()
        self.tcp = tcp
        self.metrics_port = metrics_port
        self.metrics_address = metrics_address
        self.max_corpus_bytes = max_corpus_bytes
        self.pid = os.getpid()
        self.started_at = time.time()
        self.context = zmq.asyncio.Context()
        self.event_sockets: list[zmq.asyncio.Socket] = []
        self.hosts: dict = {}
        self.sessions: dict[str, str] = {}  # open interactive session -> its model host's device
        self._host_locks: dict[str, asyncio.Lock] = {}
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._gpu_snapshot: dict = {"available": False, "reason": "not read yet", "gpus": []}
        self._cpu_load: dict = {}
        self.metrics = None

    # ----- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Bind, recover the queue, write the connection file: everything READY=1 promises."""
        self.paths.prepare()
        self._lock = _lock(self.paths.state_dir / "daemon.lock")
        key = _load_or_make_key(self.paths.key_file)
        self.session = Session(key.encode(), session=f"mistudiod-{self.pid}")
        self.queue = JobQueue(self.paths.database)
        for job in self.queue.recover():
            self.queue.add_log(job.id, job.attempt, f"the daemon restarted; job {job.state}"
                               + (", to resume from its last checkpoint"
                                  if job.state == "queued" else ""), "warning")
            log.warning("job %d was running when the daemon stopped: %s", job.id, job.state)
        for stale in self.paths.uploads.glob("*.part"):
            stale.unlink()
        self.uploads = Uploads(self.paths.uploads, self.paths.corpora, self.max_corpus_bytes)
        self.gpus = GpuMonitor()
        self._gpu_snapshot = self.gpus.snapshot()
        self._cpu_load = cpu_load()  # starts psutil's measurement window
        self.pool = WorkerPool(
            self.queue, self.publish, self.gpu_snapshot, key,
            self.paths.workers_endpoint, self.paths.runs, self.settings,
            on_finished=self._job_finished, wake=self.wake_scheduler,
            threads_per_job=cpu_threads_per_job(self.settings.max_jobs),
        )
        self.control = self._socket(zmq.ROUTER, self.paths.control_endpoint)
        self.event_sockets.append(self._socket(zmq.XPUB, self.paths.events_endpoint))
        self.reports = self._socket(zmq.PULL, self.paths.workers_endpoint)
        for endpoint in (self.paths.control_endpoint, self.paths.events_endpoint,
                         self.paths.workers_endpoint):
            os.chmod(endpoint.removeprefix("ipc://"), 0o660)
        tcp_endpoints = self._bind_tcp() if self.tcp else (None, None, None)
        if self.metrics_port is not None:
            from mistudiod.metrics import DaemonMetrics

            self.metrics = DaemonMetrics()
            self.metrics.serve(self.metrics_port, self.metrics_address)
        ConnectionInfo(
            key=key, control=self.paths.control_endpoint, events=self.paths.events_endpoint,
            tcp_control=tcp_endpoints[0], tcp_events=tcp_endpoints[1],
            curve_server_key=tcp_endpoints[2], pid=self.pid, version=__version__,
        ).write(self.paths.connection_file, group_readable=self.paths.group_access)

    def _socket(self, kind: int, endpoint: str) -> zmq.asyncio.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise MistudioError(f"cannot bind {endpoint}: {exc}",
                                hint="is another daemon using it? pick another --runtime-dir "
                                     "or --tcp port", code="bad_usage") from exc
        return sock

    def _bind_tcp(self) -> tuple[str, str, str]:
        """Control and events over TCP, encrypted with CurveZMQ (the daemon's keypair)."""
        public, secret = _curve_keypair(self.paths.curve_dir)
        host, _, port = self.tcp.removeprefix("tcp://").rpartition(":")
        if not host or not port.isdigit():
            raise MistudioError(f"--tcp {self.tcp} is not tcp://HOST:PORT",
                                hint="for example --tcp tcp://0.0.0.0:7711", code="bad_usage")
        endpoints = (f"tcp://{host}:{port}", f"tcp://{host}:{int(port) + 1}")
        for kind, endpoint in zip((zmq.ROUTER, zmq.XPUB), endpoints, strict=True):
            sock = self.context.socket(kind)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
            sock.bind(endpoint)
            if kind == zmq.ROUTER:
                self.tcp_control = sock
            else:
                self.event_sockets.append(sock)
        return (*endpoints, public.decode())

    async def run(self) -> None:
        self.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        serving = [self._serve(self.control), self._collect_reports(), self._tick(),
                   self._schedule(), self._watchdog()]
        serving += [self._drain_subscriptions(s) for s in self.event_sockets]
        if self.tcp:
            serving.append(self._serve(self.tcp_control))
        for coroutine in serving:
            self._spawn(coroutine)
        log.info("mistudiod %s ready: %s (state in %s)", __version__, self.paths.runtime_dir,
                 self.paths.state_dir)
        systemd.notify("READY=1")
        systemd.notify(f"STATUS={_status_line(self.status())}")
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        systemd.notify("STOPPING=1")
        log.info("stopping: running jobs will resume from their checkpoints at the next start")
        await self.pool.stop()
        for host in self.hosts.values():
            await host.stop()
        for task in list(self._tasks):
            task.cancel()
        if _owner_pid(self.paths.connection_file) == self.pid:  # not a successor's file
            self.paths.connection_file.unlink()
        if self.metrics is not None:
            self.metrics.close()
        self.gpus.close()
        self.queue.close()
        self.context.destroy(linger=0)
        self._lock.close()

    def _spawn(self, coroutine) -> None:
        spawn(self._tasks, coroutine)

    # ----- requests ----------------------------------------------------------------------------

    async def _serve(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                message = self.session.deserialize(frames)
            except ProtocolError as error:
                self._refuse(sock, frames, error)
                continue
            answer = self._answer(sock, message, _peer(frames[-1], message))
            operation = OPERATIONS.get(message.type)
            if operation is not None and operation.slow:
                self._spawn(answer)
            else:  # quick: answered before the next request is read, no task to schedule
                await answer

    def _refuse(self, sock: zmq.asyncio.Socket, frames: list, error: ProtocolError) -> None:
        """Unsigned or unframed messages are dropped; signed but bad ones get an error."""
        if error.code in ProtocolError.UNANSWERABLE:
            log.warning("dropped a message: %s", error.message)
            return
        request = error.request
        if request is None:
            parts = [f.bytes for f in frames]
            request = Message({"type": "error", "msg_id": ""}, {},
                              idents=parts[:parts.index(MAGIC)])
        sock.send_multipart(self.session.reply(request, error_content(error)))

    async def _answer(self, sock: zmq.asyncio.Socket, message: Message, who: str) -> None:
        try:
            operation = OPERATIONS.get(message.type)
            if operation is None:
                raise MistudioError(f"unknown request type {message.type!r}",
                                    hint="`daemon.info` lists the operations",
                                    code="unknown_type")
            request = operation.schema.validate(message.content)
            content = await operation.handler(self, request, message, who)
            if operation.audited:
                self.queue.audit(who, message.type, _target(request, content),
                                 {k: v for k, v in request.items() if k != "params"})
        except MistudioError as error:
            content = error_content(error)
        except Exception as error:  # a bug in a handler: report it, keep serving
            log.exception("request %s failed", message.type)
            content = error_content(MistudioError(
                f"internal error: {type(error).__name__}: {error}",
                hint="see the daemon's log (journalctl -u mistudiod)", code="internal"))
        await sock.send_multipart(self.session.reply(message, content))

    # ----- events ------------------------------------------------------------------------------

    def publish(self, topic: str, content: dict) -> None:
        frames = self.session.event(topic, content)
        for sock in self.event_sockets:
            sock.send_multipart(frames)

    async def _drain_subscriptions(self, sock: zmq.asyncio.Socket) -> None:
        """Read XPUB's subscription messages; a new `daemon.status` subscriber gets one now."""
        while True:
            frame = await sock.recv()
            if frame[:1] == b"\x01" and b"daemon.status".startswith(frame[1:]):
                self.publish("daemon.status", self.status())

    async def _collect_reports(self) -> None:
        while True:
            frames = await self.reports.recv_multipart(copy=False)
            try:
                message = self.session.deserialize(frames)
            except ProtocolError as error:
                log.warning("dropped a worker report: %s", error.message)
                continue
            try:
                self.pool.on_report(message.content)
            except Exception:
                log.exception("a worker report could not be handled")

    async def _tick(self) -> None:
        """Once a second: leases, GPU telemetry, the status event, metrics, systemd STATUS."""
        while True:
            await asyncio.sleep(1.0)
            self.pool.check_leases()
            self._gpu_snapshot = await asyncio.to_thread(self.gpus.snapshot, self.pool.owners())
            self._cpu_load = cpu_load()  # once a tick: each call restarts the CPU share's window
            for gpu in self._gpu_snapshot.get("gpus", []):
                self.publish(f"gpu.{gpu['uuid']}", gpu)
            status = self.status()
            self.publish("daemon.status", status)
            systemd.notify(f"STATUS={_status_line(status)}")
            if self.metrics is not None:
                self.metrics.observe_gpus(self._gpu_snapshot)
                self.metrics.observe_queue(status["jobs"], self.pool.running_by_kind())
                for job_id, tokens_per_s in self.pool.throughputs().items():
                    self.metrics.extraction_throughput(job_id, tokens_per_s)

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        while interval:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _schedule(self) -> None:
        """The one caller of `pool.fill`: at once when woken (a job submitted, ended or
        retried), else every 2 s (GPU memory freed by others)."""
        while True:
            self._wake.clear()  # a wake during the fill is for the next one
            await self.pool.fill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=2.0)

    def wake_scheduler(self) -> None:
        self._wake.set()

    def _job_finished(self, job: Job, state: str) -> None:
        if self.metrics is not None:
            self.metrics.job_finished(job.kind, state)
            self.metrics.forget_job(job.id)
        self.wake_scheduler()

    def observe_model_load(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.model_loaded(seconds)

    # ----- state for clients -------------------------------------------------------------------

    def status(self) -> dict:
        counts = self.queue.counts()
        snapshot = self._gpu_snapshot
        return {
            "pid": self.pid, "version": __version__, "started_at": self.started_at,
            "uptime_s": time.time() - self.started_at, "jobs": counts,
            "running": sorted(self.pool.running), "max_jobs": self.settings.max_jobs,
            "gpus": {"available": snapshot.get("available", False),
                     "reason": snapshot.get("reason"), "count": len(snapshot.get("gpus", []))},
            "cpu": self._cpu_load,
            "hosts": sorted(self.hosts), "state_dir": str(self.paths.state_dir),
            "runtime_dir": str(self.paths.runtime_dir),
        }

    def gpu_snapshot(self) -> dict:
        return self._gpu_snapshot

    async def host_request(self, device: str, msg_type: str, content: dict,
                           timeout: float = 30.0) -> dict:
        """Forward a request to the model host of `device`, starting it on first use."""
        from mistudiod.modelhost import ModelHostClient

        lock = self._host_locks.setdefault(device, asyncio.Lock())
        async with lock:
            host = self.hosts.get(device)
            if host is None:
                budget = await asyncio.to_thread(_host_budget, self._gpu_snapshot, device)
                host = ModelHostClient(device, self.paths.runtime_dir, self.session.key, budget,
                                       on_event=self.publish)
                self.hosts[device] = host
            await host.start()  # a no-op while it runs; restarts a host that died
        return await host.request(msg_type, content, timeout=timeout)


def _host_budget(snapshot: dict, device: str) -> int:
    """A model host's byte budget: a share of its GPU's memory (from the latest GPU snapshot),
    or of the RAM free now for the CPU's host (there is one on a GPU machine too)."""
    if device == "cpu":
        from mistudio_core.memory import _cpu_memory

        return int(_cpu_memory().free_bytes * HOST_BUDGET_FRACTION)
    for candidate in gpu_devices(snapshot):
        if candidate.name == device:
            return int(candidate.total_bytes * HOST_BUDGET_FRACTION)
    raise MistudioError(f"no device {device} on the daemon's machine",
                        hint="see `mistudio gpu`", code="bad_request")


def _status_line(status: dict) -> str:
    """systemd's one-line STATUS= summary of a `status()` document."""
    jobs, gpus = status["jobs"], status["gpus"]["count"] or "no"
    return f"{jobs['running']} running, {jobs['queued']} queued; {gpus} GPUs"


def _owner_pid(connection_file: Path) -> int | None:
    try:
        return ConnectionInfo.read(connection_file).pid
    except MistudioError:
        return None


def _target(request: dict, content: dict) -> str:
    for key in ("id", "name", "model", "session", "upload_id"):
        if request.get(key):
            return str(request[key])
    job = content.get("job") if isinstance(content, dict) else None
    return f"job {job['id']}" if isinstance(job, dict) else ""


def _peer(frame: zmq.Frame, message: Message) -> str:
    """Who sent a request: the OS user of a Unix-socket peer (SO_PEERCRED, which libzmq
    exposes as `localhost:UID:GID:PID`), the address of a TCP peer, else the client session."""
    try:
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        address = ""
    fields = address.split(":")
    if len(fields) >= 4 and all(f.isdigit() for f in fields[-3:]):
        uid, _, pid = (int(f) for f in fields[-3:])
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid {uid}"
        return f"{name} (pid {pid})"
    session = message.header.get("session", "?")
    return f"{address} session {session}" if address else f"session {session}"


def _lock(path: Path):
    handle = open(path, "a")  # noqa: SIM115 - held open for the daemon's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise MistudioError(f"another mistudiod is already using {path.parent}",
                            hint="stop it first, or give this one its own --state-dir",
                            code="bad_usage") from None
    return handle


def _load_or_make_key(path: Path) -> str:
    """The signing key, kept across restarts so that clients reconnect without rereading."""
    if path.exists():
        return path.read_text().strip()
    key = new_key()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key)
    return key


def _curve_keypair(directory: Path) -> tuple[bytes, bytes]:
    directory.mkdir(mode=0o700, exist_ok=True)
    public_file, secret_file = directory / "server.public", directory / "server.secret"
    if not secret_file.exists():
        public, secret = zmq.curve_keypair()
        public_file.write_bytes(public)
        descriptor = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secret)
    return public_file.read_bytes(), secret_file.read_bytes()


# ----- the command ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistudiod", description="the miStudio daemon")
    parser.add_argument("--state-dir", type=Path, help="DB, corpora, runs (MISTUDIO_HOME)")
    parser.add_argument("--runtime-dir", type=Path,
                        help="sockets and the connection file (MISTUDIO_RUNTIME_DIR)")
    parser.add_argument("--max-jobs", type=int, default=4, help="jobs running at once")
    parser.add_argument("--tcp", help="also listen on tcp://HOST:PORT (CurveZMQ encrypted)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument("--metrics-address", default="127.0.0.1")
    parser.add_argument("--max-corpus-bytes", type=int, default=DEFAULT_MAX_CORPUS_BYTES)
    parser.add_argument("--lease", type=float, default=60.0,
                        help="seconds without a worker heartbeat before its job is presumed dead")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="worker heartbeat seconds")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--background", action="store_true",
                        help="start in the background and return once it is ready")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.max_jobs < 1:
        print("mistudiod: error: --max-jobs must be at least 1", file=sys.stderr)
        return 2
    paths = DaemonPaths.resolve(args.state_dir, args.runtime_dir)
    if args.background:
        return _start_in_background(paths, [a for a in argv if a != "--background"])
    systemd.configure_logging(args.log_level)
    faulthandler.enable()  # a watchdog SIGABRT leaves the stuck loop's traceback in the log
    daemon = Daemon(
        paths, Settings(max_jobs=args.max_jobs, lease_s=args.lease, heartbeat_s=args.heartbeat),
        tcp=args.tcp, metrics_port=args.metrics_port, metrics_address=args.metrics_address,
        max_corpus_bytes=args.max_corpus_bytes,
    )
    try:
        asyncio.run(daemon.run())
    except MistudioError as error:
        log.error("%s", error.message)
        if error.hint:
            log.error("hint: %s", error.hint)
        return 2
    return 0


def _start_in_background(paths: DaemonPaths, argv: list[str]) -> int:
    """Start a daemon detached from this terminal; return when it says READY=1 (sd_notify over
    a private socket, exactly as systemd would hear it), or report why it did not start."""
    from mistudiod.client import daemon_answers

    if daemon_answers(paths.runtime_dir):
        print(f"mistudiod is already running ({paths.runtime_dir})", file=sys.stderr)
        return 0
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = paths.state_dir / "mistudiod.log"
    notify_path = Path(tempfile.mkdtemp(prefix="mistudiod-")) / "notify"  # short: AF_UNIX limit
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(0.5)
    environment = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    with open(log_path, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mistudiod", "--state-dir", str(paths.state_dir),
             "--runtime-dir", str(paths.runtime_dir), *argv],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=environment,
            start_new_session=True,
        )
    try:
        if not _wait_ready(listener, process, deadline=time.time() + 120):
            print(f"mistudiod did not start; its log is {log_path}", file=sys.stderr)
            return 1
    finally:
        listener.close()
        notify_path.unlink(missing_ok=True)
        notify_path.parent.rmdir()
    print(f"mistudiod started (pid {process.pid}); log: {log_path}", file=sys.stderr)
    return 0


def _wait_ready(listener: socket.socket, process, deadline: float) -> bool:
    while time.time() < deadline:
        try:
            if b"READY=1" in listener.recv(4096):
                return True
        except TimeoutError:
            if process.poll() is not None:
                return False
    return False
