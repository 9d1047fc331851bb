"""The wire format between the daemon and its clients, workers and model hosts (DESIGN.md 4).

Every message is one multipart ZeroMQ message:

    [ident..., b"MSTD1", signature, header, content, *buffers]

`ident...` are the routing frames a ROUTER socket adds (or the topic, for events). `header` and
`content` are msgpack maps; `signature` is the hex HMAC-SHA256 of header and content under the
key from the connection file, so only processes that can read that 0600 file can talk to the
daemon. The header is `{msg_id, type, session, version, seq, date}`, and a reply adds
`parent_id`, the `msg_id` of the request it answers. Bulk data travels as raw buffers after the
content (corpus uploads send their chunks so); nothing is ever pickled. `pack_array` and
`unpack_array` are the format for numpy arrays in those buffers, described in the content by
dtype and shape: no operation sends arrays yet, so only the tests use them today, and they are
kept as the checked format that activation and feature requests are to use.

A signed message that is refused (too large, unreadable content, another protocol version) is
answered: the refusal carries the request it refuses, so the error reply names it as its parent
and reaches the waiting caller instead of looking like a daemon that is gone.

`Session` is the one place that builds and checks these frames, as in jupyter_client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from mistudio_core.errors import MistudioError

MAGIC = b"MSTD1"
PROTOCOL_VERSION = 1
# A job's states, as job documents carry them (a contract with every client).
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATES = ("succeeded", "failed", "cancelled")
# A request larger than this is answered with an error rather than read; the socket's own hard
# limit (MAX_FRAME_BYTES, enforced by libzmq) sits above it and drops the connection instead.
MAX_MESSAGE_BYTES = 8 << 20
MAX_FRAME_BYTES = 64 << 20
CONNECTION_FILE = "connection.json"
# dtypes an array buffer may declare: plain numbers only, never objects.
_ARRAY_DTYPES = {"bool", "int8", "uint8", "int16", "int32", "int64", "float16", "float32",
                 "float64", "bfloat16"}


class ProtocolError(MistudioError):
    """A message that is not a well-formed, correctly signed miStudio message.

    `not_envelope` and `bad_signature` mean the sender cannot be trusted with an answer;
    other codes (a signed message with a bad header, a wrong version, too large) can be answered.
    """

    UNANSWERABLE = ("not_envelope", "bad_signature")
    request: Message | None = None  # the refused request, when its header could be read

    def __init__(self, message: str, hint: str = "", code: str = "bad_message") -> None:
        super().__init__(message, hint, code)


@dataclass
class Message:
    """One decoded message: who sent it (`idents`), what it is, and its payload."""

    header: dict
    content: dict
    buffers: list[bytes] = field(default_factory=list)
    idents: list[bytes] = field(default_factory=list)

    @property
    def type(self) -> str:
        return self.header["type"]

    @property
    def msg_id(self) -> str:
        return self.header["msg_id"]

    @property
    def parent_id(self) -> str | None:
        return self.header.get("parent_id")


def ok(**content: Any) -> dict:
    """The content of a successful reply."""
    return {"ok": True, **content}


def error_content(error: MistudioError) -> dict:
    """The content of a reply that reports `error`."""
    return {"ok": False, "error": error.to_dict()}


def raise_for_error(content: dict) -> dict:
    """Return a reply's content, or raise the MistudioError it reports."""
    if content.get("ok") is False:
        error = content.get("error") or {}
        raise MistudioError(
            str(error.get("message", "the daemon reported an error")),
            hint=str(error.get("hint", "")),
            code=str(error.get("code", "daemon_error")),
            field=error.get("field"),
        )
    return content


class Session:
    """Builds and checks signed messages with one key.

    `session` names this end of the conversation (a client, the daemon, a worker) in every header
    it sends; `seq` counts its messages, or, for events, counts per topic so that a subscriber
    can see a gap in the topics it follows.
    """

    def __init__(self, key: bytes, session: str | None = None,
                 max_bytes: int = MAX_MESSAGE_BYTES, version: int = PROTOCOL_VERSION) -> None:
        if not key:
            raise ProtocolError("an empty key signs nothing", hint="read the connection file")
        self.key = key
        self.session = session or uuid.uuid4().hex
        self.max_bytes = max_bytes
        self.version = version  # the protocol version this end speaks (tests fake another)
        self._seq = 0
        self._topic_seq: dict[str, int] = {}

    def sign(self, header: bytes, content: bytes) -> bytes:
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        mac.update(header)
        mac.update(content)
        return mac.hexdigest().encode()

    def header(self, msg_type: str, parent: Message | None = None, seq: int | None = None,
               **extra: Any) -> dict:
        if seq is None:
            self._seq += 1
            seq = self._seq
        header = {"msg_id": uuid.uuid4().hex, "type": msg_type, "session": self.session,
                  "version": self.version, "seq": seq, "date": time.time(), **extra}
        if parent is not None:
            header["parent_id"] = parent.msg_id
        return header

    def serialize(self, msg_type: str, content: dict, parent: Message | None = None,
                  buffers: list = (), idents: list[bytes] = (), header: dict | None = None,
                  ) -> list:
        """The frames of a message, ready for `send_multipart`."""
        header_bytes = _pack(header or self.header(msg_type, parent))
        content_bytes = _pack(content)
        signature = self.sign(header_bytes, content_bytes)
        return [*idents, MAGIC, signature, header_bytes, content_bytes, *buffers]

    def reply(self, request: Message, content: dict, buffers: list = ()) -> list:
        """The frames answering `request`, routed back to its sender."""
        return self.serialize(f"{request.type}.reply", content, request, buffers,
                              request.idents)

    def event(self, topic: str, content: dict, buffers: list = (),
              idents: list[bytes] | None = None) -> list:
        """The frames of an event on `topic`, numbered per topic. They go out on a PUB socket
        (the topic is the routing frame), or to `idents` on a ROUTER (a model host's events go
        to the daemon, which publishes them)."""
        seq = self._topic_seq.get(topic, 0) + 1
        self._topic_seq[topic] = seq
        header = self.header("event", seq=seq, topic=topic)
        return self.serialize("event", content, header=header, buffers=buffers,
                              idents=[topic.encode()] if idents is None else idents)

    def deserialize(self, frames: list) -> Message:
        """Check and decode received frames (bytes or zmq.Frame); raise ProtocolError if bad."""
        parts = [_as_bytes(frame) for frame in frames]
        size = sum(len(part) for part in parts)
        try:
            split = parts.index(MAGIC)
        except ValueError:
            raise ProtocolError(f"not a miStudio message: no {MAGIC.decode()} delimiter",
                                hint="use mistudiod.client (mistudiod/protocol.py describes "
                                     "the format)",
                                code="not_envelope") from None
        idents, body = parts[:split], parts[split + 1:]
        if len(body) < 3:
            raise ProtocolError("a message needs a signature, a header and a content frame",
                                code="not_envelope")
        signature, header_bytes, content_bytes, *buffers = body
        if not hmac.compare_digest(signature, self.sign(header_bytes, content_bytes)):
            raise ProtocolError("bad signature", hint="use the key in the connection file",
                                code="bad_signature")
        header = _unpack(header_bytes, "header")
        if not isinstance(header.get("type"), str) or not isinstance(header.get("msg_id"), str):
            raise ProtocolError("the header needs string `type` and `msg_id` fields")
        # From here on the sender is known and its message identifiable: a refusal carries the
        # message (and its content, once read) so that it can be answered and matched.
        refused = Message(header, {}, idents=idents)
        try:
            if size > self.max_bytes:
                raise ProtocolError(
                    f"message of {size} bytes is over the limit of {self.max_bytes}",
                    hint="send large data in chunks (corpus uploads do this for you)",
                    code="too_large",
                )
            refused.content = _unpack(content_bytes, "content")
            version = header.get("version")
            if version != self.version:
                raise ProtocolError(
                    f"protocol version {version!r} is not {self.version}, the version spoken "
                    "here",
                    hint="use a client from the same miStudio release as the daemon",
                    code="bad_version",
                )
        except ProtocolError as error:
            error.request = refused
            raise
        return Message(header, refused.content, buffers, idents)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes, what: str) -> dict:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a family of unrelated types for bad input
        raise ProtocolError(f"the {what} is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"the {what} must be a msgpack map, not {type(obj).__name__}")
    return obj


def _as_bytes(frame: Any) -> bytes:
    return frame if isinstance(frame, bytes) else frame.bytes


# ----- arrays ----------------------------------------------------------------------------------


def pack_array(array, buffers: list) -> dict:
    """Describe a numpy array in the content and append its bytes to `buffers`."""
    import numpy as np

    array = np.ascontiguousarray(array)
    buffers.append(array.data)
    return {"dtype": str(array.dtype), "shape": list(array.shape), "buffer": len(buffers) - 1}


def unpack_array(description: dict, buffers: list[bytes]):
    """The numpy array a `pack_array` description names (read-only, no copy)."""
    import numpy as np

    try:
        dtype = str(description["dtype"])
        shape = tuple(int(n) for n in description["shape"])
        data = buffers[int(description["buffer"])]
    except (KeyError, TypeError, ValueError, IndexError):
        raise ProtocolError("an array needs dtype, shape and a buffer index in range") from None
    if dtype not in _ARRAY_DTYPES or any(n < 0 for n in shape):
        raise ProtocolError(f"unsupported array dtype {dtype!r} or negative shape")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if expected != len(data):
        raise ProtocolError(f"array of shape {shape} {dtype} needs {expected} bytes, "
                            f"got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# ----- the connection file ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionInfo:
    """What a client needs to reach the daemon: endpoints and the signing key.

    The file is written with mode 0600 in the runtime directory (itself 0700), or 0640 in a
    0750 one for a group, so reading it is the permission to talk to the daemon. For TCP,
    `curve_server_key` is the daemon's CurveZMQ public key. `pid` and `host` say which process
    wrote it, so a client can tell a file left by a killed daemon from a live one (a copy on
    another machine, next to forwarded sockets, names another host and is not checked).
    """

    key: str
    control: str
    events: str
    tcp_control: str | None = None
    tcp_events: str | None = None
    curve_server_key: str | None = None
    pid: int = 0
    version: str = ""
    host: str = field(default_factory=socket.gethostname)

    def write(self, path: Path, group_readable: bool = False) -> None:
        """Write the file 0600, or 0640 when the daemon's group may use it too."""
        mode = 0o640 if group_readable else 0o600
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(descriptor, "w") as handle:
            os.fchmod(handle.fileno(), mode)
            json.dump(self.__dict__, handle, indent=1)
        os.replace(temporary, path)

    @classmethod
    def read(cls, path: Path) -> ConnectionInfo:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise MistudioError(
                f"no daemon connection file at {path}",
                hint="start the daemon (`mistudiod --background` or `systemctl start "
                "mistudiod`), set --runtime-dir / MISTUDIO_RUNTIME_DIR to its runtime directory, "
                "or add --local to run in this process",
                code="no_daemon",
            ) from None
        except PermissionError:
            raise MistudioError(
                f"cannot read {path}: access to the daemon is limited to its owner"
                " (and its group)",
                hint="run as the daemon's user, or ask for membership in its group",
                code="no_access",
            ) from None
        except (OSError, ValueError) as exc:
            raise MistudioError(f"unreadable connection file {path}: {exc}",
                                hint="restart the daemon to rewrite it", code="no_daemon") from None
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)

    @property
    def key_bytes(self) -> bytes:
        return self.key.encode()


def new_key() -> str:
    return secrets.token_hex(32)
