"""A real `mistudiod` on temporary directories, for the integration tests.

It is started as systemd would start it: a subprocess with `NOTIFY_SOCKET` pointing at a
datagram socket we read, so `start` returns when the daemon says READY=1 and every sd_notify
message it sends (READY, WATCHDOG, STATUS, STOPPING) is kept in `notifications`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mistudiod.client import Client


class DaemonProcess:
    def __init__(self, root: Path, *extra: str, env: dict | None = None) -> None:
        self.state_dir = root / "state"
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="msd-")) / "run"  # AF_UNIX length
        self.extra = list(extra)
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.notifications: list[str] = []
        self.log_path = root / "mistudiod.log"

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        self.notifications = []  # a restart waits for its own READY=1
        notify_path = self.runtime_dir.parent / f"notify-{time.monotonic_ns()}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._listener.bind(str(notify_path))
        self._listener.settimeout(0.2)
        self._stop_listening = threading.Event()
        self._listening = threading.Thread(target=self._listen, daemon=True)
        self._listening.start()
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "HF_HUB_OFFLINE": "1",
               **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mistudiod", "--state-dir", str(self.state_dir),
                 "--runtime-dir", str(self.runtime_dir), *self.extra],
                stdout=log, stderr=log, env=env,
            )
        deadline = time.time() + timeout
        while "READY=1" not in self.notifications:
            time.sleep(0.05)
            if self.process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mistudiod did not start:\n{self.log()}")
        return self

    def _listen(self) -> None:
        """Drain the notify socket as systemd does, so the daemon's queue never fills."""
        while not self._stop_listening.is_set():
            try:
                self.notifications.extend(self._listener.recv(4096).decode().splitlines())
            except TimeoutError:
                continue

    def _close_listener(self) -> None:
        time.sleep(0.3)  # the last datagrams
        self._stop_listening.set()
        self._listening.join()
        self._listener.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout)
        self._close_listener()
        return status

    def kill(self) -> None:
        """kill -9: no cleanup at all, as after a power cut of the process."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._close_listener()

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
