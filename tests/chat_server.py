"""A scripted OpenAI-compatible chat server on 127.0.0.1, for tests of the LLM backends.

`with ScriptedChatServer(["answer 1", (500, {"error": {"message": "boom"}}), ...]) as server:`
serves `GET /v1/models` (one model, `scripted`) and `POST /v1/chat/completions`, answering the
scripted replies in order (the last one repeats): a string is the assistant's message, a
`(status, json)` pair an HTTP error. `server.url` is the base URL, `server.requests` the JSON
bodies received, `server.headers` their headers.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_ID = "scripted"


class ScriptedChatServer:
    def __init__(self, replies: list[str | tuple[int, dict]]) -> None:
        self.replies = list(replies)
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.model_queries = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/v1/models":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                server.model_queries += 1
                self._send(200, {"object": "list", "data": [{"id": MODEL_ID,
                                                             "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                index = min(len(server.requests), len(server.replies)) - 1
                reply = server.replies[index]
                if isinstance(reply, tuple):
                    self._send(*reply)
                    return
                self._send(200, {"object": "chat.completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant",
                                                          "content": reply}}]})

            def _send(self, status: int, document: dict) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args) -> None:  # keep pytest's output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> ScriptedChatServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def user_messages(self, request: int) -> list[str]:
        return [m["content"] for m in self.requests[request]["messages"] if m["role"] == "user"]
