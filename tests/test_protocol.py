"""The wire format: signing, framing, limits, arrays, the connection file, request schemas."""

from __future__ import annotations

import socket
import stat

import msgpack
import numpy as np
import pytest

from mistudio_core.errors import MistudioError
from mistudiod.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    ConnectionInfo,
    ProtocolError,
    Session,
    new_key,
    pack_array,
    raise_for_error,
    unpack_array,
)
from mistudiod.schema import Field, Schema


@pytest.fixture
def session() -> Session:
    return Session(b"k" * 32, session="test")


def test_a_message_round_trips_with_its_routing_and_buffers(session):
    frames = session.serialize("job.show", {"id": 3}, buffers=[b"raw"], idents=[b"peer"])
    assert frames[1] == MAGIC
    message = session.deserialize(frames)
    assert message.idents == [b"peer"] and message.buffers == [b"raw"]
    assert message.type == "job.show" and message.content == {"id": 3}
    assert message.header["version"] == PROTOCOL_VERSION and message.header["session"] == "test"
    reply = session.deserialize(session.reply(message, {"ok": True}))
    assert reply.parent_id == message.msg_id and reply.idents == [b"peer"]
    assert reply.type == "job.show.reply"


def test_events_are_numbered_per_topic(session):
    seqs = [session.deserialize(session.event(topic, {})).header["seq"]
            for topic in ("a", "b", "a", "a")]
    assert seqs == [1, 1, 2, 3]


@pytest.mark.parametrize("tamper", ["signature", "header", "content"])
def test_any_change_breaks_the_signature(session, tamper):
    frames = session.serialize("daemon.status", {"x": 1})
    index = {"signature": 1, "header": 2, "content": 3}[tamper]
    frames[index] = frames[index][:-1] + bytes([frames[index][-1] ^ 1])
    with pytest.raises(ProtocolError) as caught:
        session.deserialize(frames)
    assert caught.value.code == "bad_signature"


def test_another_key_cannot_talk(session):
    stranger = Session(b"x" * 32)
    with pytest.raises(ProtocolError, match="bad signature"):
        session.deserialize(stranger.serialize("daemon.status", {}))


@pytest.mark.parametrize("frames", [[b"hello"], [MAGIC, b"sig"], [b"a", b"b", b"c", b"d"]])
def test_frames_that_are_not_an_envelope(session, frames):
    with pytest.raises(ProtocolError) as caught:
        session.deserialize(frames)
    assert caught.value.code == "not_envelope"


def _signed(session, header: bytes, content: bytes) -> list[bytes]:
    return [MAGIC, session.sign(header, content), header, content]


@pytest.mark.parametrize(
    ("header", "content", "words"),
    [
        (b"\xc1", msgpack.packb({}), "not valid msgpack"),
        (msgpack.packb([1, 2]), msgpack.packb({}), "must be a msgpack map"),
        (msgpack.packb({"type": 1, "msg_id": "a"}), msgpack.packb({}), "string `type`"),
        (msgpack.packb({"type": "t", "msg_id": "a", "version": 99}), msgpack.packb({}),
         "protocol version"),
        (msgpack.packb({"type": "t", "msg_id": "a", "version": 1}), msgpack.packb("x"),
         "content must be a msgpack map"),
    ],
)
def test_signed_but_malformed_messages_are_refused_with_a_reason(session, header, content,
                                                                 words):
    with pytest.raises(ProtocolError, match=words):
        session.deserialize(_signed(session, header, content))


@pytest.mark.parametrize(
    ("header", "content", "code"),
    [
        ({"type": "t", "msg_id": "a", "version": 99}, msgpack.packb({"ok": False}),
         "bad_version"),
        ({"type": "t", "msg_id": "a", "version": 1}, b"\xc1", "bad_message"),
    ],
)
def test_a_signed_refusal_names_the_message_it_refuses(session, header, content, code):
    """So that the refusal can be answered, and the answer matched to the waiting request."""
    frames = [b"peer", *_signed(session, msgpack.packb({**header, "parent_id": "p"}), content)]
    with pytest.raises(ProtocolError) as caught:
        session.deserialize(frames)
    refused = caught.value.request
    assert caught.value.code == code
    assert refused.msg_id == "a" and refused.parent_id == "p" and refused.idents == [b"peer"]
    answer = session.deserialize(session.reply(refused, {"ok": False}))
    assert answer.parent_id == "a" and answer.idents == [b"peer"]
    if code == "bad_version":
        assert refused.content == {"ok": False}  # a refused reply's own error, for the client


def test_a_session_speaks_its_own_version():
    newer = Session(b"k" * 32, version=PROTOCOL_VERSION + 1)
    with pytest.raises(ProtocolError) as caught:
        Session(b"k" * 32).deserialize(newer.serialize("daemon.status", {}))
    assert caught.value.code == "bad_version"
    assert newer.deserialize(newer.serialize("daemon.status", {})).header["version"] == (
        PROTOCOL_VERSION + 1)


def test_oversized_messages_are_refused():
    small = Session(b"k" * 32, max_bytes=1000)
    with pytest.raises(ProtocolError) as caught:
        small.deserialize(small.serialize("corpus.upload.chunk", {}, buffers=[b"x" * 2000]))
    assert caught.value.code == "too_large"
    assert caught.value.request.type == "corpus.upload.chunk"  # answerable


def test_arrays_travel_as_raw_buffers():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    buffers: list = []
    description = pack_array(array, buffers)
    assert description == {"dtype": "float32", "shape": [3, 4], "buffer": 0}
    assert np.array_equal(unpack_array(description, [bytes(buffers[0])]), array)


@pytest.mark.parametrize(
    "description",
    [{"dtype": "object", "shape": [1], "buffer": 0}, {"dtype": "float32", "shape": [5],
                                                      "buffer": 0},
     {"dtype": "float32", "shape": [1], "buffer": 3}, {"shape": [1]}],
)
def test_bad_array_descriptions_are_refused(description):
    with pytest.raises(ProtocolError):
        unpack_array(description, [b"\0" * 8])


def test_error_replies_become_exceptions():
    with pytest.raises(MistudioError) as caught:
        raise_for_error({"ok": False, "error": {"code": "bad_corpus", "message": "m",
                                                "hint": "h"}})
    assert (caught.value.code, caught.value.hint) == ("bad_corpus", "h")
    assert raise_for_error({"ok": True, "a": 1}) == {"ok": True, "a": 1}


def test_the_connection_file_is_private(tmp_path):
    info = ConnectionInfo(key=new_key(), control="ipc://c", events="ipc://e", pid=7)
    info.write(tmp_path / "connection.json")
    assert stat.S_IMODE((tmp_path / "connection.json").stat().st_mode) == 0o600
    assert ConnectionInfo.read(tmp_path / "connection.json") == info
    assert info.host == socket.gethostname()  # whose pid it is
    info.write(tmp_path / "group.json", group_readable=True)
    assert stat.S_IMODE((tmp_path / "group.json").stat().st_mode) == 0o640
    with pytest.raises(MistudioError) as caught:
        ConnectionInfo.read(tmp_path / "missing.json")
    assert caught.value.code == "no_daemon" and "--local" in caught.value.hint


def test_schemas_check_types_ranges_choices_and_patterns():
    schema = Schema(n=Field(int, required=True, min=1, max=10),
                    x=Field(float, default=0.5), mode=Field(str, choices=("a", "b")),
                    hook=Field(str, pattern=r"layers\.\d+"), tags=Field(list, item=str,
                                                                       max_length=2))
    assert schema.validate({"n": 3, "x": 2, "extra": "ignored"}) == {
        "n": 3, "x": 2.0, "mode": None, "hook": None, "tags": None}
    for bad, words in [({}, "is required"), ({"n": True}, "must be an integer"),
                       ({"n": 0}, "at least 1"), ({"n": 11}, "at most 10"),
                       ({"n": 1, "x": float("nan")}, "finite"),
                       ({"n": 1, "mode": "c"}, "one of a, b"),
                       ({"n": 1, "hook": "layers.x"}, "not allowed"),
                       ({"n": 1, "tags": ["a", 1]}, "only a string"),
                       ({"n": 1, "tags": ["a", "b", "c"]}, "limit is 2")]:
        with pytest.raises(MistudioError, match=words) as caught:
            schema.validate(bad)
        assert caught.value.code == "bad_request"
