"""Chat backends: an OpenAI-compatible endpoint (a scripted local server), a local HF model,
the spec parser, and `ask`'s retries on answers out of format."""

from __future__ import annotations

import socket

import pytest
from chat_server import MODEL_ID, ScriptedChatServer

from mistudio_core.errors import MistudioError
from mistudio_core.llm import HFChat, OpenAIChat, UnparseableAnswer, ask, chat_backend

MESSAGES = [{"role": "system", "content": "Answer with a number."},
            {"role": "user", "content": "How many legs has a cat?"}]


def parse_number(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError("the answer must be a number")
    return int(text)


def test_openai_chat_asks_the_served_model_with_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with ScriptedChatServer(["four"]) as server:
        backend = OpenAIChat(server.url)
        assert backend.chat(MESSAGES, max_tokens=7) == "four"
        assert backend.chat(MESSAGES) == "four"
    assert server.model_queries == 1  # asked once, then remembered
    assert server.requests[0] == {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 7,
                                  "temperature": 0.0}
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_openai_spec_names_the_model_and_accepts_a_full_endpoint_url():
    with ScriptedChatServer(["4"]) as server:
        spec = f"openai:{server.url}/chat/completions#llama3"
        backend = chat_backend(spec)
        assert backend.name == spec
        assert backend.chat(MESSAGES) == "4"
    assert server.model_queries == 0
    assert server.requests[0]["model"] == "llama3"


def test_ask_retries_with_the_bad_answer_and_a_reminder():
    with ScriptedChatServer(["Four legs, of course.", "4"]) as server:
        assert ask(chat_backend(f"openai:{server.url}"), MESSAGES, parse_number) == 4
    assert len(server.requests) == 2
    retry = server.requests[1]["messages"]
    assert retry[:2] == MESSAGES
    assert retry[2] == {"role": "assistant", "content": "Four legs, of course."}
    assert retry[3]["role"] == "user"
    assert "the answer must be a number" in retry[3]["content"]
    assert "required format" in retry[3]["content"]


def test_ask_gives_up_after_the_retries():
    with ScriptedChatServer(["many"]) as server, pytest.raises(UnparseableAnswer) as raised:
        ask(chat_backend(f"openai:{server.url}"), MESSAGES, parse_number, retries=2)
    assert len(server.requests) == 3
    assert raised.value.text == "many"
    assert raised.value.reason == "the answer must be a number"
    assert isinstance(raised.value, ValueError)


def test_an_http_error_carries_the_servers_message():
    reply = (500, {"error": {"message": "CUDA out of memory", "type": "server_error"}})
    with ScriptedChatServer([reply]) as server, pytest.raises(MistudioError) as raised:
        OpenAIChat(server.url, model="m").chat(MESSAGES)
    assert raised.value.code == "llm_error"
    assert "HTTP 500" in raised.value.message
    assert "CUDA out of memory" in raised.value.message
    assert "log" in raised.value.hint


def test_a_wrong_path_says_how_the_url_should_look():
    with ScriptedChatServer(["4"]) as server, pytest.raises(MistudioError) as raised:
        OpenAIChat(server.url.removesuffix("/v1"), model="m").chat(MESSAGES)
    assert raised.value.code == "llm_error"
    assert "HTTP 404" in raised.value.message
    assert "/v1" in raised.value.hint


def test_a_refused_port_is_unreachable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = chat_backend(f"openai:http://127.0.0.1:{port}/v1")
    with pytest.raises(MistudioError) as raised:
        backend.chat(MESSAGES)
    assert raised.value.code == "llm_unreachable"
    assert f"127.0.0.1:{port}" in raised.value.message
    assert "vllm serve" in raised.value.hint


@pytest.mark.parametrize("spec", ["gpt4", "anthropic:claude", "hf:", "openai:", "stats"])
def test_unknown_specs_name_the_accepted_forms(spec):
    with pytest.raises(MistudioError) as raised:
        chat_backend(spec)
    assert "hf:MODEL" in raised.value.hint
    assert "openai:URL" in raised.value.hint


def test_a_url_without_http_is_refused():
    with pytest.raises(MistudioError, match="not an http"):
        chat_backend("openai:127.0.0.1:8000/v1")


@pytest.fixture(scope="module")
def tiny_chat(make_tiny_model) -> HFChat:
    backend = chat_backend("hf:" + str(make_tiny_model("gpt2")), device="cpu")
    assert isinstance(backend, HFChat)
    return backend


def test_hf_chat_generates_new_text_only(tiny_chat):
    assert tiny_chat.name.startswith("hf:")
    answer = tiny_chat.chat(MESSAGES, max_tokens=5)
    assert isinstance(answer, str)
    assert "How many legs" not in answer and "Assistant:" not in answer  # no echoed prompt
    assert tiny_chat.chat(MESSAGES, max_tokens=5) == answer  # greedy: deterministic


def test_hf_chat_without_a_template_writes_a_transcript(tiny_chat):
    assert not getattr(tiny_chat.tokenizer, "chat_template", None)
    assert tiny_chat.prompt(MESSAGES) == (
        "System: Answer with a number.\n\nUser: How many legs has a cat?\n\nAssistant:")


def test_hf_chat_keeps_the_end_of_a_prompt_longer_than_its_context(tiny_chat):
    long = [{"role": "user", "content": "the cat watched the long road " * 100}]
    assert len(tiny_chat.tokenizer(tiny_chat.prompt(long))["input_ids"]) > tiny_chat.context
    assert isinstance(tiny_chat.chat(long, max_tokens=3), str)


def test_hf_chat_uses_the_chat_template_when_there_is_one(tiny_chat, monkeypatch):
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    monkeypatch.setattr(tiny_chat.tokenizer, "chat_template", template, raising=False)
    assert tiny_chat.prompt(MESSAGES) == (
        "<system>Answer with a number.<user>How many legs has a cat?<assistant>")
    assert isinstance(tiny_chat.chat(MESSAGES, max_tokens=2), str)
