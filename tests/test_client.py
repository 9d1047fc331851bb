"""The client against fake daemons: stale connection files, protocol versions, slow answers.

No real daemon here: a connection file and, where a test needs one, a ROUTER socket in the test's
own event loop that answers as it is told.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from mistudio_core.errors import MistudioError
from mistudiod.client import Client
from mistudiod.protocol import ConnectionInfo, ProtocolError, Session, error_content, new_key


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _write_connection(runtime: Path, key: str, pid: int, **extra) -> None:
    runtime.mkdir(mode=0o700, exist_ok=True)
    ConnectionInfo(key=key, control=f"ipc://{runtime / 'ctl.sock'}",
                   events=f"ipc://{runtime / 'events.sock'}", pid=pid, **extra,
                   ).write(runtime / "connection.json")


class FakeDaemon:
    """A ROUTER on `ctl.sock` that answers `daemon.health`, ignores `slow.*`, and speaks the
    protocol version it is given."""

    def __init__(self, runtime: Path, key: str, version: int | None = None) -> None:
        runtime.mkdir(mode=0o700, exist_ok=True)
        self.session = Session(key.encode(), **({} if version is None else
                                                {"version": version}))
        self.context = zmq.asyncio.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(f"ipc://{runtime / 'ctl.sock'}")
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            frames = await self.router.recv_multipart()
            try:
                request = self.session.deserialize(frames)
            except ProtocolError as error:  # refused as the real daemon refuses
                if error.request is not None:
                    await self.router.send_multipart(
                        self.session.reply(error.request, error_content(error)))
                continue
            if not request.type.startswith("slow."):
                await self.router.send_multipart(self.session.reply(request, {"ok": True}))

    async def close(self) -> None:
        self.task.cancel()
        self.context.destroy(linger=0)


def test_a_stale_connection_file_is_refused_at_once(tmp_path):
    pid = _dead_pid()
    _write_connection(tmp_path / "run", new_key(), pid)
    (tmp_path / "run" / "ctl.sock").touch()  # a killed daemon leaves its socket file too
    started = time.monotonic()
    with pytest.raises(MistudioError) as caught:
        Client(tmp_path / "run")
    assert time.monotonic() - started < 1
    assert caught.value.code == "no_daemon"
    assert "stale connection file" in caught.value.message and f"pid {pid}" in caught.value.message
    assert "mistudiod --background" in caught.value.hint


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_daemon_not_yet_reaped_counts_as_dead(tmp_path):
    process = subprocess.Popen(["sleep", "60"])
    process.kill()  # a zombie until waited for: its pid still answers kill(pid, 0)
    stat = Path(f"/proc/{process.pid}/stat")
    deadline = time.monotonic() + 5
    while stat.read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        _write_connection(tmp_path / "run", new_key(), process.pid)
        (tmp_path / "run" / "ctl.sock").touch()
        with pytest.raises(MistudioError, match="stale connection file"):
            Client(tmp_path / "run")
    finally:
        process.wait()


def test_a_connection_file_without_its_socket_is_refused(tmp_path):
    _write_connection(tmp_path / "run", new_key(), os.getpid())
    with pytest.raises(MistudioError, match="no mistudiod running") as caught:
        Client(tmp_path / "run")
    assert caught.value.code == "no_daemon"


def test_a_copied_connection_file_uses_the_sockets_next_to_it(tmp_path):
    """A file from another host (its pid means nothing here) beside forwarded sockets."""
    key = new_key()
    remote = ConnectionInfo(key=key, control="ipc:///run/elsewhere/mistudiod/ctl.sock",
                            events="ipc:///run/elsewhere/mistudiod/events.sock",
                            pid=_dead_pid(), host=f"not-{socket.gethostname()}")
    (tmp_path / "fwd").mkdir(mode=0o700)
    remote.write(tmp_path / "fwd" / "connection.json")

    async def through_the_forwarded_socket():
        daemon = FakeDaemon(tmp_path / "fwd", key)
        try:
            async with Client(tmp_path / "fwd", timeout=5) as client:
                assert client.info.control == f"ipc://{tmp_path / 'fwd' / 'ctl.sock'}"
                assert client.info.events == f"ipc://{tmp_path / 'fwd' / 'events.sock'}"
                return await client.request("daemon.health")
        finally:
            await daemon.close()

    assert asyncio.run(through_the_forwarded_socket())["ok"]


def test_requests_with_retries_reread_a_file_that_names_a_dead_daemon(tmp_path):
    """A killed daemon's file fails the request plainly, and the same client reaches the
    daemon that replaces it: nothing is refused for good."""
    key = new_key()
    runtime = tmp_path / "run"

    async def across_a_crash():
        _write_connection(runtime, key, os.getpid())
        daemon = FakeDaemon(runtime, key)
        async with Client(runtime, timeout=0.3) as client:
            assert (await client.request("daemon.health"))["ok"]
            await daemon.close()
            _write_connection(runtime, key, _dead_pid())  # killed -9: its file stays
            started = time.monotonic()
            with pytest.raises(MistudioError, match="stale connection file") as caught:
                await client.request("daemon.health", retries=2)
            assert caught.value.code == "no_daemon" and time.monotonic() - started < 3
            daemon = FakeDaemon(runtime, key)  # the restarted daemon rewrites the file
            _write_connection(runtime, key, os.getpid())
            try:
                return await client.request("daemon.health", retries=3)
            finally:
                await daemon.close()

    assert asyncio.run(across_a_crash())["ok"]


def test_another_protocol_version_is_reported_not_taken_for_a_dead_daemon(tmp_path):
    key = new_key()
    _write_connection(tmp_path / "run", key, os.getpid())

    async def ask_a_newer_daemon():
        daemon = FakeDaemon(tmp_path / "run", key, version=99)
        try:
            async with Client(tmp_path / "run", timeout=5) as client:
                started = time.monotonic()
                with pytest.raises(MistudioError) as caught:
                    await client.request("daemon.status", retries=3)
                return caught.value, time.monotonic() - started
        finally:
            await daemon.close()

    error, took = asyncio.run(ask_a_newer_daemon())
    assert took < 2  # answered, not timed out
    assert error.code == "bad_version"
    assert "the daemon refused the request" in error.message and "99" in error.message
    assert "same miStudio release" in error.hint


def test_a_timeout_says_whether_the_daemon_is_up(tmp_path):
    key = new_key()
    _write_connection(tmp_path / "run", key, os.getpid())

    async def ask():
        daemon = FakeDaemon(tmp_path / "run", key)
        async with Client(tmp_path / "run", timeout=0.3) as client:
            with pytest.raises(MistudioError) as slow:
                await client.request("slow.thing")
            await daemon.close()
            with pytest.raises(MistudioError) as gone:
                await client.request("slow.thing")
        return slow.value, gone.value

    slow, gone = asyncio.run(ask())
    assert slow.code == "timeout"
    assert "the daemon is up but slow.thing took longer than 0.3 s" in slow.message
    assert gone.code == "no_daemon" and "is mistudiod running" in gone.hint


def test_an_upload_checks_the_name_before_reading_the_file(tmp_path):
    key = new_key()
    _write_connection(tmp_path / "run", key, os.getpid())
    (tmp_path / "run" / "ctl.sock").touch()
    (tmp_path / "notes.md").write_text("x")
    sent: list = []

    async def upload():
        async with Client(tmp_path / "run", timeout=0.3) as client:
            await client.upload_corpus(tmp_path / "notes.md",
                                       on_progress=lambda *progress: sent.append(progress))

    with pytest.raises(MistudioError, match="not an allowed corpus name"):
        asyncio.run(upload())
    assert sent == []
