"""The model host: its LRU cache in-process, then the real subprocess through ModelHostClient.

One host process serves the whole module (it imports torch, which takes seconds), driven from one
event loop (`asyncio.Runner`) that outlives the tests; the crash test starts a host of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import zmq

from mistudio_core.errors import MistudioError
from mistudio_core.models import ModelSpec
from mistudiod import modelhost
from mistudiod.modelhost import ModelCache, ModelHostClient
from mistudiod.protocol import Session, new_key, raise_for_error

KEY = new_key().encode()
BIG = 1 << 40


@pytest.fixture(scope="module")
def runner():
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def host(runner, tmp_path_factory):
    client = ModelHostClient("cpu", tmp_path_factory.mktemp("run"), KEY, 1 << 30)
    runner.run(client.start())
    yield client
    runner.run(client.stop())


@pytest.fixture(scope="module")
def models(make_tiny_model) -> list[str]:
    """Three tiny GPT-2s of 1, 2 and 3 layers: three sizes, smallest first."""
    return [str(make_tiny_model("gpt2", n_layers)) for n_layers in (1, 2, 3)]


@pytest.fixture(scope="module")
def sizes(models) -> list[int]:
    cache = ModelCache("cpu", BIG)
    sizes = [cache.load(ModelSpec(model))["bytes"] for model in models]
    assert 0 < sizes[0] < sizes[1] < sizes[2]
    return sizes


def held_ids(cache: ModelCache) -> list[str]:
    return [info["model_id"] for info in cache.held()]


def error_code(content: dict) -> str:
    assert content["ok"] is False
    return content["error"]["code"]


# ----- ModelCache -------------------------------------------------------------------------------


def test_loading_past_the_budget_evicts_the_least_recently_used(models, sizes):
    a, b, c = models
    cache = ModelCache("cpu", sum(sizes) - sizes[0] // 2)  # any two fit, never all three
    info = cache.load(ModelSpec(a))
    assert info["key"] == f"{a}:float32:none"
    assert (info["dtype"], info["quantization"], info["device"]) == ("float32", "none", "cpu")
    assert info["bytes"] == sizes[0] and info["load_seconds"] > 0
    cache.load(ModelSpec(b))
    assert cache.load(ModelSpec(a))["loaded_at"] == info["loaded_at"]  # held: only touched
    cache.load(ModelSpec(c))
    assert held_ids(cache) == [a, c]
    assert cache.used_bytes == sizes[0] + sizes[2]
    with pytest.raises(MistudioError) as missing:
        cache.get(ModelSpec(b))
    assert missing.value.code == "not_loaded"
    assert cache.get(ModelSpec(a)).has_lm_head
    cache.load(ModelSpec(b))  # a was used last: c goes
    assert held_ids(cache) == [a, b]


def test_a_budget_for_one_model_holds_one(models, sizes):
    cache = ModelCache("cpu", sizes[1] + sizes[0] // 2)
    cache.load(ModelSpec(models[0]))
    cache.load(ModelSpec(models[1]))
    assert held_ids(cache) == [models[1]]
    assert cache.used_bytes == sizes[1]


def test_unload_by_model_id_or_key(models):
    cache = ModelCache("cpu", BIG)
    cache.load(ModelSpec(models[0]))
    key = cache.load(ModelSpec(models[1]))["key"]
    assert cache.unload(models[0])
    assert not cache.unload(models[0])
    assert cache.unload(key)
    assert cache.held() == [] and cache.used_bytes == 0


def test_auto_and_the_choice_it_stands_for_are_one_copy(models):
    cache = ModelCache("cpu", BIG)
    auto = cache.load(ModelSpec(models[0], quantization="auto"))
    plain = cache.load(ModelSpec(models[0], quantization="none"))
    assert auto["key"] == plain["key"] and len(cache.held()) == 1


def test_a_load_reads_the_config_once_and_resolves_auto_once(models, monkeypatch):
    from mistudio_core import memory
    from mistudio_core import models as core_models

    reads, counts = [], []
    read, count = core_models.load_config, memory.count_parameters
    monkeypatch.setattr(core_models, "load_config", lambda spec: reads.append(spec) or read(spec))
    monkeypatch.setattr(memory, "count_parameters",
                        lambda config: counts.append(config) or count(config))
    info = ModelCache("cpu", BIG).load(ModelSpec(models[0], quantization="auto"))
    assert info["quantization"] == "none"
    assert len(reads) == 1  # not again for the key, the estimate or the load
    assert len(counts) == 2  # auto's size rule, then the estimate of the weights


@pytest.mark.parametrize("estimate", ["from the config", "too low"])
def test_a_model_bigger_than_the_budget_is_refused(models, sizes, estimate, monkeypatch):
    if estimate == "too low":  # only the measured size can tell: refused after loading
        monkeypatch.setattr(modelhost, "_estimated_bytes", lambda spec, config: 0)
    cache = ModelCache("cpu", (sizes[0] + sizes[2]) // 2)
    cache.load(ModelSpec(models[0]))
    with pytest.raises(MistudioError) as refused:
        cache.load(ModelSpec(models[2]))
    assert refused.value.code == "out_of_memory" and refused.value.hint
    assert held_ids(cache) == [models[0]] and cache.used_bytes == sizes[0]


def test_an_unknown_model_leaves_the_cache_as_it_was(models, tmp_path):
    cache = ModelCache("cpu", BIG)
    cache.load(ModelSpec(models[0]))
    with pytest.raises(MistudioError) as unknown:
        cache.load(ModelSpec(str(tmp_path / "no-such-model")))
    assert unknown.value.code == "model_not_found"
    assert held_ids(cache) == [models[0]]


def test_an_encoder_is_loaded_without_a_head(make_tiny_model):
    cache = ModelCache("cpu", BIG)
    spec = ModelSpec(str(make_tiny_model("bert")))
    cache.load(spec)
    assert not cache.get(spec).has_lm_head


# ----- the host process -------------------------------------------------------------------------


def test_host_answers_while_it_loads(runner, host, models):
    async def scenario():
        load = asyncio.create_task(host.request("host.load", {"model": models[0]}))
        assert raise_for_error(await host.request("host.ping", {}))["pid"] == host.pid
        listing = raise_for_error(await host.request("host.list", {}))
        assert not load.done()  # the first load imports torch and transformers: seconds
        assert listing["loading"] == [models[0]]
        with pytest.raises(MistudioError) as late:  # queued behind the first load
            await host.request("host.load", {"model": models[0]}, timeout=0.01)
        assert late.value.code == "host_timeout"
        return raise_for_error(await load)["model"], raise_for_error(
            await host.request("host.list", {}))

    info, listing = runner.run(scenario())
    assert info["model_id"] == models[0] and info["bytes"] > 0
    assert (listing["device"], listing["budget_bytes"]) == ("cpu", 1 << 30)
    assert listing["models"] == [info | {"last_used": listing["models"][0]["last_used"]}]
    assert listing["used_bytes"] == info["bytes"]


def test_host_reports_bad_requests_and_keeps_serving(runner, host, tmp_path):
    async def scenario():
        return [
            await host.request("host.load", {"model": str(tmp_path / "no-such-model")}),
            await host.request("host.load", {"model": 12}),
            await host.request("host.load", {"model": ""}),
            await host.request("host.load", {"model": str(tmp_path), "dtype": "float8"}),
            await host.request("host.explode", {}),
            await host.request("host.ping", {}),
        ]

    *errors, ping = runner.run(scenario())
    assert [error_code(reply) for reply in errors] == [
        "model_not_found", "bad_request", "bad_request", "bad_request", "unknown_request"]
    assert ping["ok"]


def test_host_drops_messages_it_cannot_trust(runner, host):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(host.endpoint)
    try:
        socket.send_multipart(Session(new_key().encode()).serialize("host.ping", {}))
        socket.send_multipart([b"not", b"a", b"message"])
        assert socket.poll(500) == 0
    finally:
        socket.close()
    assert runner.run(host.request("host.ping", {}))["ok"]


def test_host_unloads(runner, host, models):
    async def scenario():
        raise_for_error(await host.request("host.load", {"model": models[0]}))
        return [raise_for_error(await host.request(msg_type, {"model": models[0]}))
                for msg_type in ("host.unload", "host.unload", "host.list")]

    first, second, listing = runner.run(scenario())
    assert first["unloaded"] and not second["unloaded"]
    assert listing["models"] == [] and listing["used_bytes"] == 0


def test_a_dead_host_fails_requests_and_can_be_restarted(runner, models, tmp_path_factory):
    client = ModelHostClient("cpu", tmp_path_factory.mktemp("run"), KEY, 1 << 30)

    async def scenario():
        await client.start()
        pending = asyncio.create_task(client.request("host.load", {"model": models[0]}))
        await asyncio.sleep(0.05)
        os.kill(client.pid, signal.SIGKILL)
        for request in (pending, client.request("host.ping", {})):
            with pytest.raises(MistudioError) as died:
                await asyncio.wait_for(request, 10)
            assert died.value.code == "host_died" and "SIGKILL" in died.value.message
        assert not client.alive
        dead_pid = client.pid
        await client.start()
        assert client.pid != dead_pid
        return await client.request("host.ping", {})

    try:
        assert runner.run(scenario())["pid"] == client.pid
    finally:
        runner.run(client.stop())
    assert not client.alive
