"""A real `mistudiod` on temporary directories, for the integration tests.

It is started as systemd would start it: a subprocess with `NOTIFY_SOCKET` pointing at a
datagram socket we read, so `start` returns when the daemon says READY=1 and every sd_notify
message it sends (READY, WATCHDOG, STATUS, STOPPING) is kept in `notifications`.

`stop` then `start` restarts the daemon on the same directories (tests of restarts rely on it);
`close` stops it for good and removes its runtime directory. The `start_daemon` fixture in
conftest.py closes every daemon it started.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

from mistudiod.client import Client


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_params(model_dir, corpus, out, **changes) -> dict:
    """A small `train` job's parameters (16 steps of 256 tokens on a 3-layer model)."""
    params = {"model": model_dir, "hook": "layers.1.resid_post", "corpus": str(corpus),
              "out": str(out), "tokens": 4096, "batch_tokens": 256, "context_size": 32,
              "expansion": 2, "k": 4, "checkpoint_every": 4}
    return {**params, **changes}


class DaemonProcess:
    def __init__(self, root: Path, *extra: str, env: dict | None = None) -> None:
        self.root = Path(root)
        self.state_dir = self.root / "state"
        # A short path of its own (AF_UNIX socket paths are limited to ~100 bytes), removed by
        # `close`, or at the latest when this object is collected or the interpreter exits.
        self._scratch = Path(tempfile.mkdtemp(prefix="msd-"))
        self._remove_scratch = weakref.finalize(self, shutil.rmtree, self._scratch,
                                                ignore_errors=True)
        self.runtime_dir = self._scratch / "run"
        self.extra = list(extra)
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.notifications: list[str] = []
        self.log_path = self.root / "mistudiod.log"
        self._listener: socket.socket | None = None
        self._notify_path: Path | None = None

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("mistudiod is already running")
        self.notifications = []  # a restart waits for its own READY=1
        self._notify_path = self._scratch / f"notify-{time.monotonic_ns()}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._listener.bind(str(self._notify_path))
        self._listener.settimeout(0.05)  # how long `_close_listener` may wait for the thread
        self._stop_listening = threading.Event()
        self._listening = threading.Thread(target=self._listen, daemon=True)
        self._listening.start()
        # The demo model's cache lies under a plain file: a test that would build the demo
        # model (minutes of training, into the user's ~/.cache) fails at once instead. Reading
        # the demo model's config still works without a build.
        no_demo = self.root / "no-demo-here"
        no_demo.touch()
        env = {**os.environ, "NOTIFY_SOCKET": str(self._notify_path), "HF_HUB_OFFLINE": "1",
               "MISTUDIO_DEMO_DIR": str(no_demo / "demo"), **self.env}
        try:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "mistudiod", "--state-dir", str(self.state_dir),
                     "--runtime-dir", str(self.runtime_dir), *self.extra],
                    stdout=log, stderr=log, env=env,
                )
            deadline = time.monotonic() + timeout
            while "READY=1" not in self.notifications:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mistudiod did not start:\n{self.log()}")
                time.sleep(0.05)
        except BaseException:
            self.kill()  # neither the process nor the listener outlives a failed start
            raise
        return self

    def _listen(self) -> None:
        """Drain the notify socket as systemd does, so the daemon's queue never fills."""
        while not self._stop_listening.is_set():
            try:
                self.notifications.extend(self._listener.recv(4096).decode().splitlines())
            except TimeoutError:
                continue

    def _close_listener(self) -> None:
        """Stop listening; call it once the daemon has exited, so that everything it sent is
        already queued on the socket, and drain that."""
        if self._listener is None:
            return
        self._stop_listening.set()
        self._listening.join()
        self._listener.setblocking(False)
        while True:
            try:
                self.notifications.extend(self._listener.recv(4096).decode().splitlines())
            except BlockingIOError:
                break
        self._listener.close()
        self._listener = None
        self._notify_path.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the daemon's exit status (0 for a clean shutdown). A daemon that
        does not stop in time is killed, and the timeout raised."""
        if self.process is None:
            self._close_listener()
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self._close_listener()
        return self.process.returncode

    def kill(self) -> None:
        """kill -9: no cleanup at all, as after a power cut of the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._close_listener()

    def close(self) -> None:
        """Stop the daemon (if it runs) for good and remove its runtime directory."""
        try:
            self.stop()
        finally:
            self._remove_scratch()

    def client(self, **options) -> Client:
        return Client(self.runtime_dir, **options)

    def request(self, msg_type: str, content: dict | None = None, **options) -> dict:
        """One request from a fresh client (synchronous, for tests)."""

        async def ask():
            async with self.client() as client:
                return await client.request(msg_type, content, **options)

        return asyncio.run(ask())

    def wait_for_job(self, job_id: int, states=("succeeded", "failed", "cancelled"),
                     timeout: float = 300.0, condition=None) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.request("job.show", {"id": job_id}, retries=3)["job"]
            if job["state"] in states and (condition is None or condition(job)):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not reach {states}: {job}\n{self.log()}")
