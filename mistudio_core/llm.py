"""Chat with a language model, local or remote, for the LLM explainer and the LLM scorers.

Two backends answer the same `chat(messages) -> str` call (OpenAI-style messages):
- `hf:MODEL`: a Hugging Face causal LM loaded in this process through `models.load_model` (so a
  large one is loaded in 4-bit by `--quantization auto`), prompted through its chat template;
- `openai:URL[#MODEL]`: any OpenAI-compatible chat-completions endpoint (vLLM, Ollama,
  llama.cpp's server, OpenAI itself), called with the standard library only.

LLMs do not always answer in the format asked for, so `ask` parses an answer and, when the parser
refuses it, asks again with the bad answer and a reminder in the conversation. A caller that still
gets nothing usable receives `UnparseableAnswer` and records a failure for that one feature: one
confused answer must not end a job over thousands of features.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from mistudio_core.errors import MistudioError

if TYPE_CHECKING:
    from mistudio_core.models import HookedModel

T = TypeVar("T")
Message = dict[str, str]

BACKEND_FORMS = ("hf:MODEL (a local Hugging Face causal LM, hub id or directory) or "
                 "openai:URL[#MODEL] (an OpenAI-compatible endpoint, e.g. "
                 "openai:http://127.0.0.1:8000/v1#llama3)")
_CHAT_PATH = "/chat/completions"
_ERROR_BODY_CHARS = 500  # how much of a server's error message is worth quoting


class ChatBackend(Protocol):
    """Anything that answers a conversation with the next assistant message."""

    name: str

    def chat(self, messages: list[Message], max_tokens: int = 256,
             temperature: float = 0.0) -> str: ...


class UnparseableAnswer(ValueError):
    """The LLM's answers stayed out of the required format after every retry."""

    def __init__(self, text: str, reason: str = "") -> None:
        super().__init__(f"unparseable answer ({reason}): {text[:200]!r}")
        self.text = text
        self.reason = reason


class OpenAIChat:
    """An OpenAI-compatible chat-completions endpoint (`url` like http://127.0.0.1:8000/v1).

    When no model is named, the server's first model (`GET /models`) is used: vLLM, Ollama and
    llama.cpp usually serve exactly one. The API key comes from `api_key` or `OPENAI_API_KEY`."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 120) -> None:
        base = url.strip().rstrip("/")
        if base.endswith(_CHAT_PATH):
            base = base[: -len(_CHAT_PATH)]
        if not base.startswith(("http://", "https://")):
            raise MistudioError(f"{url!r} is not an http(s) URL",
                                hint="give the endpoint's base URL, e.g. http://127.0.0.1:8000/v1",
                                code="bad_request")
        self.base_url = base
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.name = f"openai:{url.strip()}" + (f"#{model}" if model else "")

    def chat(self, messages: list[Message], max_tokens: int = 256,
             temperature: float = 0.0) -> str:
        body = {"model": self._model_name(), "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature}
        answer = self._request(_CHAT_PATH, body)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise MistudioError(
                f"the LLM endpoint {self.base_url} answered without choices[0].message.content: "
                f"{json.dumps(answer)[:_ERROR_BODY_CHARS]}",
                hint="check that the URL is an OpenAI-compatible API (it usually ends in /v1)",
                code="llm_error") from exc
        return content or ""

    def _model_name(self) -> str:
        """The model to ask for: the one named, else the server's first, else "default"."""
        if self.model is None:
            try:
                served = self._request("/models", None).get("data") or []
                self.model = str(served[0]["id"]) if served else "default"
            except (MistudioError, KeyError, TypeError, AttributeError):
                self.model = "default"  # the chat request itself will say what is wrong
        return self.model

    def _request(self, path: str, body: dict | None) -> dict:
        url = self.base_url + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=headers,
                                         method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise _http_error(url, exc) from exc
        except urllib.error.URLError as exc:
            raise MistudioError(
                f"cannot reach the LLM endpoint {url}: {exc.reason}",
                hint="start the server (e.g. `vllm serve MODEL` or `ollama serve`) and check "
                "the URL, e.g. openai:http://127.0.0.1:8000/v1",
                code="llm_unreachable") from exc
        except TimeoutError as exc:
            raise MistudioError(
                f"the LLM endpoint {url} did not answer within {self.timeout:g} s",
                hint="check that the server is not overloaded, or use a smaller model",
                code="llm_unreachable") from exc
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise MistudioError(
                f"the LLM endpoint {url} answered with something other than JSON: "
                f"{raw[:_ERROR_BODY_CHARS].decode(errors='replace')!r}",
                hint="check that the URL is an OpenAI-compatible API (it usually ends in /v1)",
                code="llm_error") from exc


def _http_error(url: str, exc: urllib.error.HTTPError) -> MistudioError:
    """An HTTP error with the server's own message and a hint for the usual causes."""
    body = exc.read().decode(errors="replace")
    try:
        parsed = json.loads(body)
        error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        detail = error.get("message", body) if isinstance(error, dict) else str(error)
    except ValueError:
        detail = body
    detail = (str(detail).strip() or exc.reason or "")[:_ERROR_BODY_CHARS]
    if exc.code in (401, 403):
        hint = "set OPENAI_API_KEY to a key the server accepts"
    elif exc.code == 404:
        hint = ("check the URL (an OpenAI-compatible base URL usually ends in /v1) and the "
                "model name after #")
    elif exc.code >= 500:
        hint = "the server failed: look at its log"
    else:
        hint = "check the model name after # and the server's limits (context length)"
    return MistudioError(f"the LLM endpoint {url} answered HTTP {exc.code}: {detail}", hint=hint,
                         code="llm_error")


class HFChat:
    """A local Hugging Face causal LM as a chat backend (greedy or sampled generation).

    A prompt longer than the model's context keeps its last tokens (where the question and the
    required answer format are), so a small model degrades instead of failing."""

    def __init__(self, model_id: str, device: str = "auto", quantization: str = "auto",
                 dtype: str = "auto") -> None:
        from mistudio_core.models import ModelSpec, load_model

        self.name = f"hf:{model_id}"
        self.hooked: HookedModel = load_model(
            ModelSpec(model_id, dtype=dtype, quantization=quantization, device=device),
            with_lm_head=True)
        self.tokenizer = self.hooked.tokenizer
        config = self.hooked.config
        self.context = int(getattr(config, "max_position_embeddings", None)
                           or getattr(config, "n_positions", None) or 2048)

    def prompt(self, messages: list[Message]) -> str:
        """The conversation as the model was trained to read it, ending where it answers."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        lines = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
        return "\n\n".join([*lines, "Assistant:"])

    def chat(self, messages: list[Message], max_tokens: int = 256,
             temperature: float = 0.0) -> str:
        import torch

        encoded = self.tokenizer(self.prompt(messages), return_tensors="pt",
                                 add_special_tokens=False)
        keep = max(self.context - max_tokens, 1)
        input_ids = encoded["input_ids"][:, -keep:].to(self.hooked.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
            "do_sample": False}
        with torch.no_grad():
            output = self.hooked.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id,
                **sampling)
        return self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def chat_backend(spec: str, device: str = "auto", quantization: str = "auto") -> ChatBackend:
    """The backend a spec names: `hf:MODEL` or `openai:URL` with an optional `#MODEL`. Its
    `name` is the spec without surrounding spaces (what explanations are stored under)."""
    kind, _, target = spec.strip().partition(":")
    target = target.strip()
    if kind == "hf" and target:
        return HFChat(target, device=device, quantization=quantization)
    if kind == "openai" and target:
        url, _, model = target.rpartition("#") if "#" in target else (target, "", "")
        backend = OpenAIChat(url, model=model.strip() or None)
        backend.name = f"openai:{target}"
        return backend
    raise MistudioError(f"unknown LLM backend {spec!r}", hint=f"use {BACKEND_FORMS}",
                        code="bad_request")


def ask(backend: ChatBackend, messages: list[Message], parse: Callable[[str], T],
        retries: int = 2, max_tokens: int = 256, temperature: float = 0.0) -> T:
    """The parsed answer to `messages`. When `parse` raises ValueError the model is shown its
    answer and the parser's complaint and asked again, up to `retries` times; then
    UnparseableAnswer carries the last answer."""
    conversation = list(messages)
    text, reason = "", ""
    for _attempt in range(retries + 1):
        text = backend.chat(conversation, max_tokens=max_tokens, temperature=temperature)
        try:
            return parse(text)
        except ValueError as exc:
            reason = str(exc)
        conversation += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": f"Your answer could not be used: {reason}. "
                                        "Answer again in the required format."},
        ]
    raise UnparseableAnswer(text, reason)
