"""The daemon's client, shared by the CLI and the TUI: a DEALER for requests, a SUB for events.

Requests carry a `msg_id`; one reader task matches replies to waiting requests by `parent_id`,
so many can be in flight. Each request has a timeout. A timed-out request resets the DEALER
(dropping anything queued for a daemon that is gone), re-reads the connection file (a restarted
daemon may have moved), and, for requests marked `retries`, tries again with exponential
back-off. Events carry a per-topic `seq`; a gap, or a new daemon session, marks the event
`resync` so the consumer re-fetches its state instead of trusting a stream with holes.

This module imports neither torch nor any server code: the TUI uses it on a laptop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio

from mistudio_core.errors import MistudioError
from mistudiod.paths import DaemonPaths
from mistudiod.protocol import ConnectionInfo, ProtocolError, Session, raise_for_error

DEFAULT_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 5.0


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
        self.dealer: zmq.asyncio.Socket | None = None
        self.sub: zmq.asyncio.Socket | None = None
        self.topics: set[str] = set()
        self._pending: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._last_seq: dict[str, int] = {}
        self._daemon_session: str | None = None
        self._connect()

    # ----- connection --------------------------------------------------------------------------

    def _connect(self) -> None:
        """Read the connection file (keeping what we knew while a restarting daemon has none)
        and connect the DEALER to its control endpoint."""
        try:
            self.info = ConnectionInfo.read(self.connection_file)
        except MistudioError:
            if not hasattr(self, "info"):
                raise
        self.session = Session(self.info.key_bytes)
        self.dealer = self._socket(zmq.DEALER, self.info.tcp_control if self.tcp
                                   else self.info.control)

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
        events calls it when the daemon has gone quiet."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self.dealer.close()
        self._connect()
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
        safe to repeat)."""
        delay = 0.2
        for attempt in range(retries + 1):
            try:
                return raise_for_error(await self._request_once(
                    msg_type, content or {}, buffers, timeout or self.timeout))
            except TimeoutError:
                self.reconnect()
                if attempt == retries:
                    raise MistudioError(
                        f"the daemon did not answer {msg_type} within "
                        f"{timeout or self.timeout:g} s",
                        hint="is mistudiod running? (`systemctl status mistudiod`, or "
                             "`mistudiod --background`)", code="no_daemon") from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)
        raise AssertionError("unreachable")

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
            except ProtocolError:
                continue  # not from our daemon: ignore it
            future = self._pending.get(reply.parent_id)
            if future is not None and not future.done():
                future.set_result(reply.content)

    async def upload_corpus(self, path: str | Path, name: str | None = None, *,
                            on_progress: Callable[[int, int], None] | None = None) -> dict:
        """Upload a local file as a corpus in checksummed chunks (the daemon makes it visible
        only once complete and verified); `on_progress(bytes_sent, size)` follows it."""
        path = Path(path).expanduser()
        try:
            size = path.stat().st_size
            digest = await asyncio.to_thread(_sha256, path)
        except OSError as exc:
            raise MistudioError(f"cannot read {path}: {exc.strerror or exc}",
                                hint="give a readable .txt, .jsonl or .parquet file",
                                field="corpus") from exc
        begun = await self.request("corpus.upload.begin",
                                   {"name": name or path.name, "size": size, "sha256": digest})
        report = on_progress or (lambda sent, total: None)
        report(0, size)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
