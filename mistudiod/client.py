"""The daemon's client, shared by the CLI and the TUI: a DEALER for requests, a SUB for events.

Requests carry a `msg_id`; one reader task matches replies to waiting requests by `parent_id`,
so many can be in flight. Each request has a timeout. A timed-out request resets the DEALER
(dropping anything queued for a daemon that is gone), re-reads the connection file (a restarted
daemon may have moved), and, for requests marked `retries`, tries again with exponential
back-off. Events carry a per-topic `seq`; a gap, or a new daemon session, marks the event
`resync` so the consumer re-fetches its state instead of trusting a stream with holes.

A connection file left by a daemon that was killed (its pid is gone, or its socket) is refused
at once with `no_daemon`, at construction and at every reconnect, so nobody waits out a timeout
for a process that does not exist; a caller that retries (the TUI's link, `retries=`) simply
reads the file again next time. Unix-socket endpoints are taken relative to the directory the
connection file was read from, so a copy of the file next to forwarded sockets reaches them.

This module imports neither torch nor the server: the TUI uses it on a laptop. (It takes the
daemon's rule for corpus names from `mistudiod.uploads`, a small torch-free module, so that an
upload with a bad name is refused before a large file is read.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio

from mistudio_core.errors import MistudioError
from mistudio_core.files import file_sha256
from mistudiod.paths import DaemonPaths
from mistudiod.protocol import (
    ConnectionInfo,
    Message,
    ProtocolError,
    Session,
    raise_for_error,
)
from mistudiod.uploads import check_corpus_name

DEFAULT_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 5.0
HEALTH_PROBE_S = 1.0  # after a timeout: does the daemon answer at all?
_START_HINT = ("start it (`mistudiod --background` or `systemctl start mistudiod`), set "
               "--runtime-dir / MISTUDIO_RUNTIME_DIR to its runtime directory, or add --local "
               "to run in this process")


@dataclass
class Event:
    topic: str
    content: dict
    seq: int
    daemon: str
    resync: bool  # a gap before this event, or a daemon we had not heard from before


class Client:
    def __init__(self, runtime_dir: str | Path | None = None, *, tcp: bool = False,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.connection_file = DaemonPaths.resolve(runtime_dir=runtime_dir).connection_file
        self.tcp = tcp
        self.timeout = timeout
        self.context = zmq.asyncio.Context()
        self.info: ConnectionInfo | None = None
        self.dealer: zmq.asyncio.Socket | None = None
        self.sub: zmq.asyncio.Socket | None = None
        self.topics: set[str] = set()
        self._pending: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._last_seq: dict[str, int] = {}
        self._daemon_session: str | None = None
        try:
            self._connect(self._read_info())
        except BaseException:
            self.context.destroy(linger=0)
            raise

    # ----- connection --------------------------------------------------------------------------

    def _read_info(self) -> ConnectionInfo:
        """The connection file, checked: MistudioError (`no_daemon`) when it names a daemon
        that is certainly gone. While a restarting daemon has removed its file, what we knew
        stands (its successor binds the same sockets)."""
        try:
            info = ConnectionInfo.read(self.connection_file)
        except MistudioError:
            if self.info is None:
                raise
            return self.info
        if not self.tcp:
            info = dataclasses.replace(info, control=self._local(info.control),
                                       events=self._local(info.events))
        self._check_alive(info)
        return info

    def _local(self, endpoint: str) -> str:
        """A Unix-socket endpoint moved into the directory of the connection file: the same
        path for the daemon's own file, the forwarded sockets for a copy next to them."""
        if not endpoint.startswith("ipc://"):
            return endpoint
        return f"ipc://{self.connection_file.parent / Path(endpoint[len('ipc://'):]).name}"

    def _check_alive(self, info: ConnectionInfo) -> None:
        if info.pid and info.host == socket.gethostname() and not _pid_alive(info.pid):
            raise MistudioError(
                f"no mistudiod running (stale connection file {self.connection_file}, "
                f"pid {info.pid})", hint=f"the daemon was killed: {_START_HINT}",
                code="no_daemon")
        if not self.tcp and info.control.startswith("ipc://"):
            path = Path(info.control[len("ipc://"):])
            if not path.exists():
                raise MistudioError(f"no mistudiod running (no socket {path})",
                                    hint=_START_HINT, code="no_daemon")

    def _connect(self, info: ConnectionInfo) -> None:
        self.info = info
        self.session = Session(info.key_bytes)
        self.dealer = self._socket(zmq.DEALER, info.tcp_control if self.tcp else info.control)

    def _socket(self, kind: int, endpoint: str | None) -> zmq.asyncio.Socket:
        if endpoint is None:
            raise MistudioError("the daemon does not listen on TCP",
                                hint="start it with --tcp tcp://HOST:PORT", code="no_daemon")
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.tcp:
            public, secret = zmq.curve_keypair()
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.info.curve_server_key.encode())
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.connect(endpoint)
        return sock

    def reconnect(self) -> None:
        """Drop both sockets (and what they queued) and connect again, rereading the connection
        file: a restarted daemon may have a new key or endpoint. Pending requests are failed by
        their own timeouts. Requests do this by themselves when one times out; a follower of
        events calls it when the daemon has gone quiet. When the file names a daemon that is
        gone, this raises MistudioError (`no_daemon`) and leaves the client as it was, ready to
        be reconnected again."""
        info = self._read_info()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self.dealer.close()
        self._connect(info)
        if self.sub is not None:
            self.sub.close()
            self.sub = None
            self._subscribe_all()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.context.destroy(linger=0)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_) -> None:
        await self.close()

    # ----- requests ----------------------------------------------------------------------------

    async def request(self, msg_type: str, content: dict | None = None, *,
                      buffers: list = (), timeout: float | None = None,
                      retries: int = 0) -> dict:
        """Send a request and return the reply's content; raise MistudioError for an error
        reply or when no reply came in time (after `retries` more tries, for requests that are
        safe to repeat). A try that finds the connection file naming a dead daemon is not sent:
        the next one reads the file again (a restart rewrites it)."""
        timeout = timeout or self.timeout
        delay, gone = 0.2, None
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)
            if gone is not None:
                try:
                    self.reconnect()
                    gone = None
                except MistudioError as error:
                    gone = error
                    continue
            try:
                reply = await self._request_once(msg_type, content or {}, buffers, timeout)
            except TimeoutError:
                try:
                    self.reconnect()
                except MistudioError as error:
                    gone = error
                continue
            return raise_for_error(reply)
        if gone is not None:
            raise gone
        raise await self._timed_out(msg_type, timeout)

    async def _timed_out(self, msg_type: str, timeout: float) -> MistudioError:
        """The error for a request that got no answer: a slow daemon, or none at all."""
        if msg_type != "daemon.health":
            with contextlib.suppress(TimeoutError):
                await self._request_once("daemon.health", {}, (), min(timeout, HEALTH_PROBE_S))
                return MistudioError(
                    f"the daemon is up but {msg_type} took longer than {timeout:g} s",
                    hint="it may be busy (loading a model, reading a large file): try again in "
                         "a moment, or allow the request more time", code="timeout")
            with contextlib.suppress(MistudioError):
                self.reconnect()  # drop the probe, as any timed-out request is dropped
        return MistudioError(
            f"the daemon did not answer {msg_type} within {timeout:g} s",
            hint="is mistudiod running? (`systemctl status mistudiod`, or "
                 "`mistudiod --background`)", code="no_daemon")

    async def _request_once(self, msg_type: str, content: dict, buffers: list,
                            timeout: float) -> dict:
        header = self.session.header(msg_type)
        frames = self.session.serialize(msg_type, content, buffers=buffers, header=header)
        msg_id = header["msg_id"]
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
        try:
            await self.dealer.send_multipart(frames)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(msg_id, None)

    async def _read_replies(self) -> None:
        while True:
            frames = await self.dealer.recv_multipart()
            try:
                reply = self.session.deserialize(frames)
            except ProtocolError as error:
                # Signed with our key but refused (another protocol version): fail the request
                # it answers with the reason. Anything else is not from our daemon: ignore it.
                if error.request is not None:
                    self._fail(error.request, error)
                continue
            future = self._pending.get(reply.parent_id)
            if future is not None and not future.done():
                future.set_result(reply.content)

    def _fail(self, reply: Message, error: ProtocolError) -> None:
        future = self._pending.get(reply.parent_id or "")
        if future is None or future.done():
            return
        if reply.content.get("ok") is False:  # the daemon refused the request: its reason
            try:
                raise_for_error(reply.content)
            except MistudioError as refusal:
                refusal.message = f"the daemon refused the request: {refusal.message}"
                error = refusal
        future.set_exception(error)

    async def upload_corpus(self, path: str | Path, name: str | None = None, *,
                            on_progress: Callable[[int, int], None] | None = None) -> dict:
        """Upload a local file as a corpus in checksummed chunks (the daemon makes it visible
        only once complete and verified); `on_progress(bytes_sent, size)` follows it, starting
        with `(0, size)` before the file is checksummed."""
        path = Path(path).expanduser()
        name = check_corpus_name(name or path.name)  # before reading a byte of it
        report = on_progress or (lambda sent, total: None)
        try:
            size = path.stat().st_size
            report(0, size)
            digest = await asyncio.to_thread(file_sha256, path)
        except OSError as exc:
            raise MistudioError(f"cannot read {path}: {exc.strerror or exc}",
                                hint="give a readable .txt, .jsonl or .parquet file",
                                field="corpus") from exc
        begun = await self.request("corpus.upload.begin",
                                   {"name": name, "size": size, "sha256": digest})
        with open(path, "rb") as handle:
            offset = 0
            while chunk := await asyncio.to_thread(handle.read, begun["chunk_bytes"]):
                await self.request("corpus.upload.chunk",
                                   {"upload_id": begun["upload_id"], "offset": offset},
                                   buffers=[chunk], timeout=60)
                offset += len(chunk)
                report(offset, size)
        return await self.request("corpus.upload.end", {"upload_id": begun["upload_id"]})

    # ----- events ------------------------------------------------------------------------------

    def subscribe(self, *topics: str) -> None:
        """Follow topics (prefixes: `job.7.` follows every event of job 7)."""
        self.topics.update(topics)
        if self.sub is None:
            self._subscribe_all()
        else:
            for topic in topics:
                self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())

    def unsubscribe(self, *topics: str) -> None:
        """Stop following topics given to `subscribe` (a closed session's, say)."""
        for topic in topics:
            if topic in self.topics:
                self.topics.discard(topic)
                if self.sub is not None:
                    self.sub.setsockopt(zmq.UNSUBSCRIBE, topic.encode())

    def _subscribe_all(self) -> None:
        self.sub = self._socket(zmq.SUB, self.info.tcp_events if self.tcp else self.info.events)
        for topic in self.topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event on the followed topics, or None after `timeout` seconds."""
        if self.sub is None:
            raise MistudioError("subscribe to a topic first", code="bad_usage")
        while True:
            sub = self.sub
            try:
                frames = await asyncio.wait_for(sub.recv_multipart(), timeout)
            except TimeoutError:
                return None
            except asyncio.CancelledError:
                # A concurrent request's reset closed the socket under us: read the new one.
                if sub is self.sub or asyncio.current_task().cancelling():
                    raise
                continue
            try:
                message = self.session.deserialize(frames)
            except ProtocolError:
                continue
            return self._event(message)

    def _event(self, message) -> Event:
        topic = message.header.get("topic", "")
        seq = int(message.header.get("seq", 0))
        daemon = message.header.get("session", "")
        resync = daemon != self._daemon_session or (
            topic in self._last_seq and seq != self._last_seq[topic] + 1)
        if daemon != self._daemon_session:
            self._last_seq.clear()
            self._daemon_session = daemon
        self._last_seq[topic] = seq
        return Event(topic, message.content, seq, daemon, resync)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user (the system unit's)
        return True
    try:  # a killed daemon stays a zombie until it is reaped: dead all the same (Linux)
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def daemon_answers(runtime_dir: str | Path | None = None, timeout: float = 2.0) -> bool:
    """Is a daemon up and answering on this runtime directory?"""

    async def ask() -> bool:
        try:
            async with Client(runtime_dir, timeout=timeout) as client:
                await client.request("daemon.health")
            return True
        except MistudioError:
            return False

    return asyncio.run(ask())
