"""The daemon for real: a `mistudiod` process on temporary directories, driven over ZeroMQ.

Covers the operations, jobs end to end, kill -9 of the daemon (the job resumes from its
checkpoint) and of a worker (the job fails or retries, the others go on), bad and hostile
input (including a fuzz of random and mutated messages), access without the key, TCP with
CurveZMQ, Prometheus, the model host, systemd's notify protocol and the CLI against the daemon.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import sqlite3
import stat
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio
from daemon_process import DaemonProcess, free_port, train_params

from mistudio_core.errors import MistudioError
from mistudiod.cli import main as cli
from mistudiod.gpus import GpuMonitor
from mistudiod.protocol import MAGIC, Session

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon shared by the tests of this module that need no daemon of their own."""
    process = DaemonProcess(tmp_path_factory.mktemp("daemon"))
    try:
        yield process.start()
        assert process.stop() == 0
    finally:
        process.close()


def submit(daemon, params, kind="train", **options) -> dict:
    return daemon.request("job.submit", {"kind": kind, "params": params, **options})["job"]


def error_of(daemon, msg_type, content) -> MistudioError:
    with pytest.raises(MistudioError) as caught:
        daemon.request(msg_type, content)
    return caught.value


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail with `what` if it still does not after `timeout`
    (a generous bound for a loaded machine, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not the case after {timeout} s")
        time.sleep(0.05)


def has_gpu() -> bool:
    """Whether this machine has a GPU the daemon can see, as the daemon's own monitor says."""
    monitor = GpuMonitor()
    try:
        return monitor.snapshot()["available"]
    finally:
        monitor.close()


# ----- the basics ------------------------------------------------------------------------------


def test_info_status_and_private_files(daemon):
    info = daemon.request("daemon.info")
    assert info["versions"]["protocol"] == 1 and "train" in info["capabilities"]["job_kinds"]
    assert "job.submit" in info["capabilities"]["operations"]
    status = daemon.request("daemon.status")
    gpu = has_gpu()
    assert status["max_jobs"] == 4 and status["gpus"]["available"] is gpu
    assert stat.S_IMODE(daemon.runtime_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((daemon.runtime_dir / "connection.json").stat().st_mode) == 0o600
    gpus = daemon.request("gpu.status")
    assert gpus["available"] is gpu
    if not gpu:
        assert gpus["reason"]  # says why there is no GPU


def _reply_or_none(endpoint: str, *messages: list[bytes]) -> list | None:
    """Send raw messages from a bare DEALER; the first reply within a second, or None."""

    async def send():
        context = zmq.asyncio.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.connect(endpoint)
        for frames in messages:
            await dealer.send_multipart(frames)
        try:
            return await asyncio.wait_for(dealer.recv_multipart(), 1.0)
        except TimeoutError:
            return None
        finally:
            context.destroy(linger=0)

    return asyncio.run(send())


def test_a_client_without_the_key_gets_nothing(daemon):
    endpoint = f"ipc://{daemon.runtime_dir / 'ctl.sock'}"
    wrong_key = Session(b"wrong" * 8).serialize("daemon.status", {})
    assert _reply_or_none(endpoint, wrong_key, [b"not", b"an", b"envelope"]) is None
    assert daemon.request("daemon.health")["healthy"]
    assert "bad signature" in daemon.log()  # dropped, and logged


def test_bad_requests_get_clear_errors_and_the_daemon_goes_on(daemon, model_dir, tiny_corpus,
                                                              tmp_path):
    assert error_of(daemon, "no.such.thing", {}).code == "unknown_type"
    assert "must be an integer" in error_of(daemon, "job.show", {"id": "seven"}).message
    assert error_of(daemon, "job.show", {"id": 0}).code == "bad_request"
    assert error_of(daemon, "job.show", {"id": 999}).code == "not_found"
    bad_k = train_params(model_dir, tiny_corpus, tmp_path / "x", k=0)
    assert "`k`" in error_of(daemon, "job.submit", {"kind": "train", "params": bad_k}).message
    missing = train_params(model_dir, "no-such-corpus.txt", tmp_path / "x")
    assert error_of(daemon, "job.submit", {"kind": "train", "params": missing}).code \
        == "bad_corpus"
    unknown = train_params("./no-such-model", tiny_corpus, tmp_path / "x")
    assert error_of(daemon, "job.submit", {"kind": "train", "params": unknown}).code \
        == "model_not_found"
    assert error_of(daemon, "model.validate", {"model": "./nope"}).code == "model_not_found"
    escape = train_params(model_dir, tiny_corpus, "../../etc")
    assert "inside" in error_of(daemon, "job.submit", {"kind": "train", "params": escape}).message
    assert daemon.request("daemon.health")["healthy"]


def test_an_oversized_message_is_refused(daemon):
    big = b"x" * (9 << 20)
    error = None
    try:
        daemon.request("corpus.upload.chunk", {"upload_id": "a", "offset": 0}, buffers=[big])
    except MistudioError as caught:
        error = caught
    assert error is not None and error.code == "too_large"
    assert daemon.request("daemon.health")["healthy"]


def test_fuzz_of_random_and_mutated_messages(daemon):
    """1200 hostile messages: random frames, mutated valid ones, signed garbage. The daemon
    answers only what it can trust, and then answers a normal request."""
    key = (daemon.runtime_dir / "connection.json").read_text()
    session = Session(json.loads(key)["key"].encode())
    rng = random.Random(7)
    types = ["daemon.status", "job.show", "job.submit", "corpus.upload.begin", "model.validate",
             "job.logs", "x" * 300, ""]
    values = [None, 1, -1, 2**63 - 1, 1.5, float("nan"), "", "a" * 5000, [], {}, [1, {"a": 2}],
              {"kind": "train", "params": {"model": 7}}, b"\0\1", True]
    well_formed: set[str] = set()  # msg_ids of the signed, well-formed messages
    mutated: set[str] = set()  # msg_ids of the valid messages that had a bit flipped
    garbage = 0  # signed messages whose header or content cannot be read
    # what the error reply to one of those can name as its parent: no request (""), or the
    # msg_id of a header that could be read
    garbage_parents = {"", "x", "m"}

    def messages():
        nonlocal garbage
        for i in range(1200):
            kind = i % 4
            content = {rng.choice(["id", "kind", "params", "name", "size", "model", "sha256"]):
                       rng.choice(values) for _ in range(rng.randrange(4))}
            if kind == 0:  # random frames
                yield [rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(1, 6))]
            elif kind == 1:  # a valid message with one byte flipped
                header = session.header(rng.choice(types))
                mutated.add(header["msg_id"])
                frames = session.serialize(header["type"], content, header=header)
                index = rng.randrange(1, len(frames))
                frame = bytearray(frames[index] or b"\0")
                frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
                frames[index] = bytes(frame)
                yield frames
            elif kind == 2:  # signed, well-formed, wrong fields
                header = session.header(rng.choice(types))
                well_formed.add(header["msg_id"])
                yield session.serialize(header["type"], content, header=header)
            else:  # signed garbage header/content
                header = rng.choice([rng.randbytes(20), msgpack.packb([1]),
                                     msgpack.packb({"type": 5, "msg_id": "x"}),
                                     msgpack.packb({"type": "daemon.status", "msg_id": "m",
                                                    "version": 2})])
                body = rng.choice([rng.randbytes(10), msgpack.packb(content)])
                garbage += 1
                yield [MAGIC, session.sign(header, body), header, body]

    outgoing = list(messages())
    # Last, a normal request: quick requests are answered in the order they were read, so once
    # its reply is here every message before it has been read and dropped or answered (a slow
    # operation's reply may come later, and is waited for by its msg_id).
    last = session.header("daemon.status")
    outgoing.append(session.serialize("daemon.status", {}, header=last))
    expected = well_formed | {last["msg_id"]}

    async def fuzz():
        context = zmq.asyncio.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.connect(f"ipc://{daemon.runtime_dir / 'ctl.sock'}")
        replies: list = []

        async def send():
            for frames in outgoing:
                await dealer.send_multipart(frames)

        async def receive():  # while sending, so that no queue between us and the daemon fills
            answered: set[str] = set()
            while not expected <= answered:
                reply = session.deserialize(await dealer.recv_multipart())  # well formed, signed
                assert "ok" in reply.content
                replies.append(reply)
                answered.add(reply.parent_id)

        try:
            await asyncio.wait_for(asyncio.gather(send(), receive()), 120)
        finally:
            context.destroy(linger=0)
        return replies

    replies = asyncio.run(fuzz())
    parents = [reply.parent_id for reply in replies]
    # each signed, well-formed message got exactly one reply, and so did the final request
    assert sorted(p for p in parents if p in well_formed) == sorted(well_formed)
    assert parents.count(last["msg_id"]) == 1
    # signed garbage is answered with an error, once per message; nothing else is answered
    garbled = [reply for reply in replies if reply.parent_id in garbage_parents]
    assert len(garbled) == garbage and all(not r.content["ok"] for r in garbled)
    assert not mutated & set(parents)
    assert len(replies) == len(well_formed) + garbage + 1
    assert len(well_formed) == len(mutated) == garbage == 300
    replies = len(replies) - 1  # the fuzz's own, without the final request
    assert 300 <= replies < 1200  # signed messages are answered, unsigned ones are not
    assert daemon.request("daemon.health")["healthy"]
    assert daemon.process.poll() is None


# ----- corpora ---------------------------------------------------------------------------------


def _upload(daemon, name: str, data: bytes, sha256: str | None = None) -> dict:
    async def run():
        async with daemon.client() as client:
            begun = await client.request("corpus.upload.begin", {
                "name": name, "size": len(data),
                "sha256": sha256 or hashlib.sha256(data).hexdigest()})
            step = 7
            for offset in range(0, len(data), step):
                await client.request("corpus.upload.chunk",
                                     {"upload_id": begun["upload_id"], "offset": offset},
                                     buffers=[data[offset:offset + step]])
            return await client.request("corpus.upload.end", {"upload_id": begun["upload_id"]})

    return asyncio.run(run())


def _corpus_names(daemon) -> list[str]:
    return sorted(c["name"] for c in daemon.request("corpus.list")["corpora"])


def test_corpus_upload_is_chunked_checksummed_and_safely_named(daemon):
    before = _corpus_names(daemon)  # the module's daemon: other tests may add corpora too
    assert "notes.txt" not in before
    data = b"one document.\n\nanother document.\n"
    corpus = _upload(daemon, "notes.txt", data)["corpus"]
    assert corpus["size"] == len(data) and "pid" in corpus["added_by"]
    assert (daemon.state_dir / "corpora" / "notes.txt").read_bytes() == data
    uploaded = _corpus_names(daemon)
    assert uploaded == sorted([*before, "notes.txt"])  # this upload added exactly notes.txt
    with pytest.raises(MistudioError, match="corrupted"):
        _upload(daemon, "bad.txt", data, sha256="0" * 64)
    assert not (daemon.state_dir / "corpora" / "bad.txt").exists()
    for name in ("../escape.txt", "/etc/passwd.txt", ".hidden.txt", "a/b.txt", "x.exe"):
        error = error_of(daemon, "corpus.upload.begin",
                         {"name": name, "size": 1, "sha256": "0" * 64})
        assert error.code == "bad_request" and "corpus name" in error.message
    too_big = error_of(daemon, "corpus.upload.begin",
                       {"name": "huge.txt", "size": 1 << 45, "sha256": "0" * 64})
    assert too_big.code == "too_large"
    assert _corpus_names(daemon) == uploaded  # the refused and failed uploads added nothing
    audit = daemon.request("audit.list")["entries"]
    assert any(e["action"] == "corpus.upload.end" for e in audit)
    assert all("pid" in e["who"] for e in audit)  # the peer's OS user, from SO_PEERCRED


# ----- jobs ------------------------------------------------------------------------------------


def test_a_training_job_then_an_eval_job(daemon, model_dir, tiny_corpus, tmp_path):
    async def follow(job_id):
        async with daemon.client() as client:
            client.subscribe(f"job.{job_id}.")
            topics = set()
            while True:
                event = await client.next_event(timeout=120)
                topics.add(event.topic.rsplit(".", 1)[1])
                if event.topic.endswith(".state") and event.content["job"]["state"] in (
                        "succeeded", "failed"):
                    return event.content["job"], topics

    job = submit(daemon, train_params(model_dir, tiny_corpus, tmp_path / "sae"))
    finished, topics = asyncio.run(follow(job["id"]))
    assert finished["state"] == "succeeded", finished["error"]
    assert topics == {"state", "log", "metrics"}
    assert finished["result"]["path"] == str(tmp_path / "sae")
    assert (tmp_path / "sae" / "sae_weights.safetensors").exists()
    points = daemon.request("job.metrics", {"id": job["id"]})["points"]
    assert points and points[-1]["step"] == 16
    assert daemon.request("job.metrics", {"id": job["id"], "since_step": 15})["points"][0][
        "step"] == 16
    logs = [e["message"] for e in daemon.request("job.logs", {"id": job["id"]})["logs"]]
    assert any("training a topk SAE" in m for m in logs) and logs[-1] == "job succeeded"
    evaluation = submit(daemon, {"model": model_dir, "sae_dir": str(tmp_path / "sae"),
                                 "corpus": str(tiny_corpus), "tokens": 300}, kind="eval")
    done = daemon.wait_for_job(evaluation["id"])
    assert done["state"] == "succeeded", done["error"]
    result = daemon.request("job.result", {"id": evaluation["id"]})["result"]
    assert result["evaluation"]["n_tokens"] >= 300


def test_cancel_a_queued_and_a_running_job(start_daemon, tmp_path, model_dir, tiny_corpus):
    daemon = start_daemon("--max-jobs", "1")
    long = train_params(model_dir, tiny_corpus, tmp_path / "a", tokens=10**8)
    running = submit(daemon, long)
    queued = submit(daemon, train_params(model_dir, tiny_corpus, tmp_path / "b"))
    daemon.wait_for_job(running["id"], ("running",), condition=lambda j: j["step"] > 0)
    assert daemon.request("job.cancel", {"id": queued["id"]})["job"]["state"] == "cancelled"
    daemon.request("job.cancel", {"id": running["id"]})
    cancelled = daemon.wait_for_job(running["id"])
    assert cancelled["state"] == "cancelled"
    assert error_of(daemon, "job.cancel", {"id": running["id"]}).code == "bad_request"


def test_kill_9_of_a_worker_fails_its_job_and_spares_the_others(start_daemon, tmp_path,
                                                                 model_dir, tiny_corpus):
    daemon = start_daemon()
    retried = submit(daemon, train_params(model_dir, tiny_corpus, tmp_path / "r",
                                          tokens=256 * 400, checkpoint_every=20),
                     max_retries=1)
    victim = submit(daemon, train_params(model_dir, tiny_corpus, tmp_path / "v", tokens=10**8))
    other = submit(daemon, train_params(model_dir, tiny_corpus, tmp_path / "o"))
    for job in (retried, victim):
        running = daemon.wait_for_job(job["id"], ("running",),
                                      condition=lambda j: j["step"] >= 25)
        os.kill(running["worker_pid"], signal.SIGKILL)
    failed = daemon.wait_for_job(victim["id"])
    assert failed["state"] == "failed"
    assert "killed by SIGKILL" in failed["error"]["message"]
    assert failed["error"]["code"] == "worker_crashed"
    resumed = daemon.wait_for_job(retried["id"])
    assert resumed["state"] == "succeeded" and resumed["attempt"] == 2
    assert resumed["failures"] == 1 and resumed["result"]["steps"] == 400
    assert daemon.wait_for_job(other["id"])["state"] == "succeeded"
    assert daemon.process.poll() is None


def test_kill_9_of_the_daemon_resumes_the_job_from_its_checkpoint(start_daemon, tmp_path,
                                                                  model_dir, tiny_corpus):
    daemon = start_daemon()
    params = train_params(model_dir, tiny_corpus, tmp_path / "sae", tokens=256 * 200,
                          checkpoint_every=40)
    job = submit(daemon, params)
    first = daemon.wait_for_job(job["id"], ("running",), condition=lambda j: j["step"] >= 50)
    daemon.kill()
    wait_until(lambda: not _running(first["worker_pid"]), "the worker outlived its daemon")
    assert not _running(first["worker_pid"])  # the worker died with the daemon
    daemon.start()
    done = daemon.wait_for_job(job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["attempt"] == 2 and done["result"]["steps"] == 200
    logs = [e["message"] for e in daemon.request("job.logs", {"id": job["id"]})["logs"]]
    assert any("resuming from its last checkpoint" in m for m in logs)
    assert any(m.startswith("resumed at step") for m in logs)
    stored = [p["step"] for p in daemon.request("job.metrics", {"id": job["id"]})["points"]]
    on_disk = [json.loads(line)["step"] for line in
               (tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert stored == on_disk and stored[-1] == 200
    assert stored == sorted(set(stored)) and 25 in stored and 50 in stored
    daemon.stop()
    check = sqlite3.connect(daemon.state_dir / "mistudio.db")
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait for a reaper that never comes here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


# ----- systemd, TCP, Prometheus, the model host, the CLI ---------------------------------------


def test_sd_notify_ready_watchdog_status_and_stopping(start_daemon):
    daemon = start_daemon(env={"WATCHDOG_USEC": "200000"})  # a WATCHDOG=1 every 0.1 s or so
    wait_until(lambda: daemon.notifications.count("WATCHDOG=1") >= 5, "five WATCHDOG=1")
    assert daemon.stop() == 0
    notes = daemon.notifications
    assert notes[0] == "READY=1" and notes[-1] == "STOPPING=1"
    assert notes.count("WATCHDOG=1") >= 5
    assert any(n.startswith("STATUS=0 running, 0 queued") for n in notes)


def test_tcp_is_curve_encrypted_and_prometheus_serves_metrics(start_daemon, model_dir,
                                                              tiny_corpus, tmp_path):
    port, metrics_port = free_port(), free_port()
    daemon = start_daemon("--tcp", f"tcp://127.0.0.1:{port}", "--metrics-port", str(metrics_port))

    async def over_tcp():
        async with daemon.client(tcp=True) as client:
            return await client.request("daemon.status")

    assert asyncio.run(over_tcp())["ok"]

    info = json.loads((daemon.runtime_dir / "connection.json").read_text())
    signed = Session(info["key"].encode()).serialize("daemon.status", {})
    # without CurveZMQ the handshake fails: even a correctly signed request gets nothing
    assert _reply_or_none(f"tcp://127.0.0.1:{port}", signed) is None

    def exposition() -> str:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    text = exposition().encode()
    for name in (b"mistudio_training_jobs_active", b"mistudio_queue_depth",
                 b"mistudio_model_loading_duration_seconds"):
        assert name in text
    # the daemon feeds them: a finished job is counted (the counter follows the job's state)
    job = submit(daemon, train_params(model_dir, tiny_corpus, tmp_path / "sae"))
    assert daemon.wait_for_job(job["id"])["state"] == "succeeded"
    succeeded = 'mistudio_job_outcomes_total{kind="train",state="succeeded"} 1.0'
    wait_until(lambda: succeeded in exposition(), "the succeeded job is not counted")
    assert succeeded in exposition()


def test_the_model_host_loads_lists_and_unloads(daemon, model_dir):
    loaded = daemon.request("model.load", {"model": model_dir, "quantization": "none"},
                            timeout=120)
    assert loaded["model"]["bytes"] > 0
    held = daemon.request("model.list", {})["models"]
    assert [m["model_id"] for m in held] == [model_dir]
    assert daemon.request("daemon.status")["hosts"] == ["cpu"]
    assert daemon.request("model.unload", {"model": model_dir})["unloaded"]
    assert daemon.request("model.list", {})["models"] == []


def _cli(capsys, daemon, *argv) -> tuple[int, dict]:
    status = cli([*argv, "--runtime-dir", str(daemon.runtime_dir), "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_the_cli_goes_through_the_daemon(capsys, daemon, model_dir, tiny_corpus, tmp_path):
    args = ["train", "--model", model_dir, "--hook", "layers.1.resid_post", "--corpus",
            str(tiny_corpus), "--out", str(tmp_path / "cli-sae"), "--tokens", "2048",
            "--batch-tokens", "256", "--context-size", "32", "--expansion", "2", "--k", "4"]
    status, document = _cli(capsys, daemon, *args)
    assert status == 0 and document["steps"] == 8 and document["job_id"] >= 1
    status, document = _cli(capsys, daemon, *args, "--detach")
    assert status == 0 and document["job"]["state"] == "queued"
    job_id = document["job"]["id"]
    daemon.wait_for_job(job_id)
    for action in ("show", "logs", "metrics", "result"):
        status, document = _cli(capsys, daemon, "job", action, str(job_id))
        assert status == 0 and document["ok"]
    status, document = _cli(capsys, daemon, "jobs")
    assert status == 0 and any(j["id"] == job_id for j in document["jobs"])
    for command in ("status", "gpu"):
        assert _cli(capsys, daemon, command)[0] == 0
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    status, document = _cli(capsys, daemon, "corpus", "add", str(corpus))
    assert status == 0 and document["corpus"]["name"] == "c.jsonl"
    wrong_layer = [a.replace("layers.1.", "layers.9.") for a in args]
    status, document = _cli(capsys, daemon, *wrong_layer)
    assert status == 2 and "layer 9 does not exist" in document["error"]["message"]
    status, document = _cli(capsys, daemon, "check-memory", model_dir, "--layer", "1")
    assert status == 0 and document["recommended_quantization"] == "none"


def test_a_client_reconnects_and_resyncs_after_a_daemon_restart(start_daemon):
    daemon = start_daemon()

    async def across_a_restart():
        async with daemon.client(timeout=2.0) as client:
            client.subscribe("daemon.status")
            first = await client.next_event(timeout=5)
            second = await client.next_event(timeout=5)
            before = await client.request("daemon.status")
            await asyncio.to_thread(daemon.stop)
            await asyncio.to_thread(daemon.start)
            after = await client.request("daemon.status", retries=5)
            event = await client.next_event(timeout=5)
            while event.daemon == first.daemon:  # drain what the old daemon sent
                event = await client.next_event(timeout=5)
            return first, second, before, after, event

    first, second, before, after, event = asyncio.run(across_a_restart())
    daemon.stop()
    assert first.resync and not second.resync and second.seq == first.seq + 1
    assert before["pid"] != after["pid"]  # the same client object reached the new daemon
    assert event.resync and event.daemon != first.daemon


def test_job_validate_names_the_field_at_fault_and_queues_nothing(daemon, model_dir, tmp_path):
    params = train_params(model_dir, "demo", "checked")
    before = len(daemon.request("job.list")["jobs"])
    reply = daemon.request("job.validate", {"kind": "train", "params": params})
    assert reply["params"]["arch"] == "topk"  # defaults filled in, as a job would get them
    assert reply["params"]["out"].endswith("runs/checked")
    for changes, field in (({"k": 0}, "k"), ({"hook": "layers.x"}, "hook"),
                           ({"corpus": "missing.txt"}, "corpus"),
                           ({"model": str(tmp_path / "nowhere")}, "model"),
                           ({"out": "../escape"}, "out")):
        error = error_of(daemon, "job.validate", {"kind": "train",
                                                  "params": {**params, **changes}})
        assert error.field == field, (changes, error)
    assert len(daemon.request("job.list")["jobs"]) == before
