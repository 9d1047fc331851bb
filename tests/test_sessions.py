"""Monitor and steer sessions through a real daemon and its model host (tiny 3-layer GPT-2, a
random TopK SAE): the streamed events against the reply and against the same run in this process,
cancel, busy, bad input that leaves the session usable, close, and the CLI without --local."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

from mistudio_core.errors import MistudioError
from mistudio_core.models import ModelSpec, load_model
from mistudio_core.monitor import Monitor
from mistudio_core.sae import SAEConfig, SAEMetadata, SparseAutoencoder, load_sae, save_sae
from mistudiod.cli import main
from mistudiod.modelhost import ModelCache
from mistudiod.sessions import IDLE_SECONDS, Sessions, run_monitor, run_steer

D_SAE = 64
TEXT = "The cat watched the blue window"
CONTEXT = 128


def _save_sae(directory, d_in: int = 32, hook: str = "layers.1.resid_post") -> str:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig("topk", d_in, D_SAE, k=8))
    metadata = SAEMetadata(model_name="tiny", hook_name=hook, context_size=CONTEXT)
    return str(save_sae(sae, directory, metadata, {}))


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> str:
    return _save_sae(tmp_path_factory.mktemp("sae") / "sae")


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


def _open(daemon, model_dir, *sae_dirs) -> dict:
    return daemon.request("session.open", {"model": model_dir, "sae_dirs": list(sae_dirs),
                                           "device": "cpu"}, timeout=120)


async def _run(client, msg_type: str, request: dict, cancel_after: int | None = None):
    """Send one run request; return its reply and the token events it published."""
    topic = f"session.{request['session']}"
    events: list[dict] = []

    async def follow() -> None:
        while True:
            event = await client.next_event(timeout=60)
            assert event is not None, "no event for 60 s"
            if event.topic != topic:
                continue
            if event.content["kind"] == "end":
                events.append(event.content)
                return
            events.append(event.content)
            if cancel_after is not None and len(events) == cancel_after:
                await client.request("session.cancel", {"session": request["session"]})

    reader = asyncio.create_task(follow())
    try:
        reply = await client.request(msg_type, request, timeout=120)
    except MistudioError:
        reader.cancel()
        raise
    await asyncio.wait_for(reader, 30)
    return reply, events


def _in_session(daemon, msg_type: str, request: dict, cancel_after: int | None = None):
    async def go():
        async with daemon.client() as client:
            client.subscribe(f"session.{request['session']}")
            await asyncio.sleep(0.2)  # let the subscription reach the daemon
            return await _run(client, msg_type, request, cancel_after)

    return asyncio.run(go())


def test_monitor_and_steer_stream_what_an_in_process_run_returns(daemon, model_dir, sae_dir):
    opened = _open(daemon, model_dir, sae_dir)
    session = opened["session"]
    assert opened["device"] == "cpu" and opened["max_tokens"] == CONTEXT
    assert opened["saes"][0]["name"] == "sae" and opened["saes"][0]["d_sae"] == D_SAE

    reply, events = _in_session(daemon, "session.monitor",
                                {"session": session, "text": TEXT, "top": 3,
                                 "watch": {"sae": [7]}})
    assert events[-1] == {"run": reply["run"], "kind": "end", "ok": True}
    assert [e["token"] for e in events[:-1]] == reply["tokens"]
    model = load_model(ModelSpec(model_dir, device="cpu"), with_lm_head=True)
    local = run_monitor(Monitor(model, {"sae": load_sae(sae_dir)}), TEXT, top=3,
                        watch={"sae": [7]})
    assert _rounded(reply["tokens"]) == _rounded(local["tokens"])
    watched = [token["watched"]["sae"] for token in reply["tokens"]]
    assert all([hit["id"] for hit in hits] == [7] for hits in watched)
    assert watched == [token["watched"]["sae"] for token in local["tokens"]]

    generate = {"session": session, "text": TEXT, "max_new_tokens": 6, "seed": 3}
    reply, events = _in_session(daemon, "session.monitor", generate)
    assert [e["token"] for e in events[:-1]] == reply["tokens"]
    assert sum(token["generated"] for token in reply["tokens"]) == 6 or reply["stopped"] == "eos"
    local = run_monitor(Monitor(model, {"sae": load_sae(sae_dir)}), TEXT, max_new_tokens=6,
                        seed=3)
    assert reply["text"] == local["text"]

    steering = [{"feature": 5, "strength": 4.0}, {"feature": 9, "strength": 0.0,
                                                  "mode": "clamp"}]
    request = {"session": session, "prompt": TEXT, "steerings": steering,
               "max_new_tokens": 8, "seed": 1}
    reply, events = _in_session(daemon, "session.steer", request)
    for side in ("baseline", "steered"):
        streamed = [e["token"] for e in events[:-1] if e["side"] == side]
        assert streamed == reply[side]["tokens"]
    local = run_steer(model, {"sae": load_sae(sae_dir)}, TEXT, steering, max_new_tokens=8,
                      seed=1)
    assert reply["baseline"]["text"] == local["baseline"]["text"]
    assert reply["steered"]["text"] == local["steered"]["text"]
    assert all(row[1] == 0.0 for row in reply["steered"]["activations"])  # clamped to 0
    assert [s["a_max_source"] for s in reply["steerings"]] == ["prompt_norm", None]


def _rounded(tokens: list[dict]) -> list:
    return [(t["position"], t["token"], {name: [(h["id"], round(h["activation"], 4))
                                                for h in hits]
                                         for name, hits in t["features"].items()})
            for t in tokens]


def test_bad_input_is_refused_and_the_session_stays_usable(daemon, model_dir, sae_dir, tmp_path):
    session = _open(daemon, model_dir, sae_dir)["session"]
    before = daemon.request("session.monitor", {"session": session, "text": TEXT})

    def refused(msg_type, **content) -> MistudioError:
        with pytest.raises(MistudioError) as caught:
            daemon.request(msg_type, {"session": session, **content})
        return caught.value

    steer = {"prompt": TEXT, "max_new_tokens": 4}
    unknown = refused("session.steer", **steer, steerings=[{"feature": D_SAE, "strength": 1}])
    assert (unknown.code, unknown.field) == ("not_found", "feature")
    not_a_number = refused("session.steer", **steer,
                           steerings=[{"feature": 1, "strength": "strong"}])
    assert (not_a_number.code, not_a_number.field) == ("bad_request", "strength")
    too_long = refused("session.monitor", text=" blue" * (CONTEXT + 10))
    assert too_long.field == "text" and str(CONTEXT) in too_long.message
    over = refused("session.steer", prompt=TEXT, max_new_tokens=CONTEXT,
                   steerings=[{"feature": 1, "strength": 1}])
    assert over.field in ("prompt", "max_new_tokens")
    assert refused("session.steer", **steer, steerings=[]).field == "steerings"
    assert refused("session.monitor", text=TEXT, watch={"other": [1]}).field == "watch"
    bad_mode = refused("session.steer", **steer,
                       steerings=[{"feature": 1, "strength": 1, "mode": "scale"}])
    assert bad_mode.field == "mode"

    wide = _save_sae(tmp_path / "wide", d_in=48)
    deep = _save_sae(tmp_path / "deep", hook="layers.7.resid_post")
    for other, message in ((wide, "48-wide"), (deep, "layers.7")):
        with pytest.raises(MistudioError) as caught:
            _open(daemon, model_dir, other)
        assert caught.value.code == "bad_sae" and message in caught.value.message
    with pytest.raises(MistudioError) as caught:
        _open(daemon, model_dir, str(tmp_path / "nothing-here"))
    assert caught.value.field == "sae_dirs"

    after = daemon.request("session.monitor", {"session": session, "text": TEXT})
    assert after["tokens"] == before["tokens"]  # still usable, and no hook left behind
    assert daemon.request("daemon.health")["ok"]


def test_cancel_busy_close_and_hooks_removed(daemon, model_dir, sae_dir):
    session = _open(daemon, model_dir, sae_dir)["session"]
    plain = daemon.request("session.monitor", {"session": session, "text": TEXT})["tokens"]
    long_run = {"session": session, "prompt": TEXT, "max_new_tokens": CONTEXT - 32,
                "steerings": [{"feature": 5, "strength": 8.0}], "stop_at_eos": False}

    async def busy_then_cancel():
        async with daemon.client() as client, daemon.client() as other:
            client.subscribe(f"session.{session}")
            await asyncio.sleep(0.2)
            run = asyncio.create_task(_run(client, "session.steer", long_run, cancel_after=2))
            while not (await other.request("session.list"))["sessions"][0]["running"]:
                await asyncio.sleep(0.005)
            with pytest.raises(MistudioError) as caught:
                await other.request("session.monitor", {"session": session, "text": TEXT})
            return caught.value, await run

    busy, (reply, events) = asyncio.run(busy_then_cancel())
    assert busy.code == "busy"
    assert reply["cancelled"] is True
    assert len(reply["steered"]["tokens"]) < CONTEXT - 32
    assert events[-1]["kind"] == "end" and events[-1]["ok"] is True
    # The steering hook is gone: the model reads as it did before the steered run.
    assert daemon.request("session.monitor", {"session": session, "text": TEXT})[
        "tokens"] == plain

    listed = daemon.request("session.list")["sessions"]
    assert [(s["session"], s["running"], s["device"]) for s in listed] == [
        (session, False, "cpu")]
    assert daemon.request("session.close", {"session": session})["closed"] is True
    with pytest.raises(MistudioError) as caught:
        daemon.request("session.monitor", {"session": session, "text": TEXT})
    assert (caught.value.code, caught.value.field) == ("not_found", "session")
    assert daemon.request("session.list")["sessions"] == []


def test_cli_monitor_and_steer_through_the_daemon_match_local(daemon, model_dir, sae_dir,
                                                             capsys, monkeypatch):
    monkeypatch.setenv("MISTUDIO_RUNTIME_DIR", str(daemon.runtime_dir))

    def run(*argv: str) -> dict:
        status = main([*argv, "--json"])
        document = json.loads(capsys.readouterr().out)
        assert status == 0, document
        return document

    monitor = ("monitor", sae_dir, "--model", model_dir, "--text", TEXT, "--generate", "5",
               "--seed", "2", "--device", "cpu")
    remote, local = run(*monitor), run(*monitor, "--local")
    assert remote["text"] == local["text"] and remote["saes"] == local["saes"] == ["sae"]
    assert _rounded(remote["tokens"]) == _rounded(local["tokens"])

    steer = ("steer", sae_dir, "--model", model_dir, "--prompt", TEXT, "--feature", "5",
             "--strength", "6", "--max-new-tokens", "6", "--device", "cpu")
    remote, local = run(*steer), run(*steer, "--local")
    for side in ("baseline", "steered"):
        assert remote[side]["text"] == local[side]["text"]
    assert remote["mean_activation"]["steered"][0] == pytest.approx(
        local["mean_activation"]["steered"][0], rel=1e-4)

    status = main(["steer", sae_dir, "--model", model_dir, "--prompt", TEXT, "--feature",
                   str(D_SAE), "--strength", "1", "--device", "cpu"])
    assert status == 2 and "does not exist" in capsys.readouterr().err
    assert daemon.request("session.list")["sessions"] == []  # the CLI closed its sessions


def test_a_4bit_model_is_steered_through_its_hooks(daemon, make_tiny_model, tmp_path):
    """NF4 weights (bitsandbytes runs on the CPU): the hooks sit on the blocks, not the
    weights, so steering works the same, and leaves the model's own outputs as they were."""
    pytest.importorskip("bitsandbytes")
    llama = str(make_tiny_model("llama", n_layers=2))
    sae = _save_sae(tmp_path / "sae", hook="layers.0.resid_post")
    opened = daemon.request("session.open", {"model": llama, "sae_dirs": [sae],
                                             "device": "cpu", "quantization": "4bit"},
                            timeout=120)
    assert opened["model"]["quantization"] == "4bit"
    session = opened["session"]
    plain = daemon.request("session.monitor", {"session": session, "text": TEXT})["tokens"]
    steered = daemon.request("session.steer", {
        "session": session, "prompt": TEXT, "max_new_tokens": 5, "temperature": 0,
        "steerings": [{"feature": 5, "strength": 6.0}, {"feature": 9, "strength": 0.0,
                                                        "mode": "clamp"}]})
    means = steered["mean_activation"]
    assert means["steered"][0] > means["baseline"][0]
    assert means["steered"][1] == 0.0
    assert daemon.request("session.monitor", {"session": session, "text": TEXT})[
        "tokens"] == plain


def test_sessions_share_saes_and_idle_ones_close(model_dir, sae_dir, tmp_path):
    sessions = Sessions(ModelCache("cpu", 1 << 40))
    other = _save_sae(tmp_path / "other")
    first = sessions.open(ModelSpec(model_dir), [sae_dir, other])
    second = sessions.open(ModelSpec(model_dir), [sae_dir])
    assert [sae["name"] for sae in first["saes"]] == ["sae", "other"]
    one, two = sessions.get(first["session"]), sessions.get(second["session"])
    assert one.saes["sae"] is two.saes["sae"]  # loaded once for both
    assert sessions.close(first["session"]) and not sessions.close(first["session"])
    assert sorted(Path(p).name for p in sessions._saes) == ["sae"]  # "other" went with it

    session, _ = sessions.start_run(second["session"])
    later = time.time() + IDLE_SECONDS + 1
    assert sessions.close_idle(later) == []  # never while it runs
    sessions.end_run(session)
    assert sessions.close_idle(later + IDLE_SECONDS + 1) == [second["session"]]
    assert sessions.list() == [] and sessions._saes == {}
    with pytest.raises(MistudioError, match="48-wide"):
        sessions.open(ModelSpec(model_dir), [_save_sae(tmp_path / "wide", d_in=48)])
    assert sessions._saes == {}  # a refused SAE is not kept


def test_an_unsubscribed_session_topic_is_quiet(daemon, model_dir, sae_dir):
    session = _open(daemon, model_dir, sae_dir)["session"]

    async def topics_seen() -> set[str]:
        async with daemon.client() as client:
            client.subscribe(f"session.{session}", "daemon.status")
            client.unsubscribe(f"session.{session}")
            await asyncio.sleep(0.2)
            await client.request("session.monitor", {"session": session, "text": TEXT})
            seen, deadline = set(), time.monotonic() + 1.5
            while time.monotonic() < deadline:
                if (event := await client.next_event(timeout=0.3)) is not None:
                    seen.add(event.topic)
            return seen

    assert asyncio.run(topics_seen()) == {"daemon.status"}
