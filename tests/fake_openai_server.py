"""A scripted OpenAI-compatible chat-completions server for tests: 127.0.0.1, an ephemeral port, a thread.

Each request is sorted into a scenario by a `case=NAME` marker in its user text (no marker:
"default"). A scenario's script is a list of actions, one per request of that scenario, the
last one repeating:

    "ok"             200, content "answer for NAME", usage.completion_tokens 7
    "reasoning"      200, a `reasoning_content` field and content "... \\boxed{42}"
    "slow"           like "ok" after 0.2 s (to see requests overlap)
    "429" / "429:S"  HTTP 429, with "Retry-After: S" when given
    "500"            HTTP 500
    "hang"           sleeps `hang_s` before answering (past the client's timeout)
    "badjson"        200 with a cut-off JSON body
    "401"            HTTP 401 whose message echoes the Authorization header (as some servers
                     do), so a test can check the client redacts the key
    "404"            HTTP 404
    "422"            HTTP 422 with a FastAPI-style body {"detail": [{"loc": [...], "msg": ...}]}
    "serial"         like "ok", but one such request at a time, each taking `serial_s`: a server
                     that queues requests and generates one at a time (transformers serve)

"default" requests get `default(body) -> dict(content=..., reasoning=..., tokens=...)`.
The server records every request (headers and parsed body), counts per scenario, and the most
requests it ever had in flight at once.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_CASE = re.compile(r"case=(\w+)")


def user_text(body: dict) -> str:
    """The text of the last user message (a string, or the text parts of a content list)."""
    content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)


def completion(body: dict, content: str, reasoning: str | None = None, tokens: int | None = 7) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    reply = {"id": "cmpl-1", "object": "chat.completion", "model": body.get("model"),
             "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    if tokens is not None:
        reply["usage"] = {"prompt_tokens": 11, "completion_tokens": tokens, "total_tokens": 11 + tokens}
    return reply


class FakeOpenAIServer:
    def __init__(self, scripts: dict[str, list[str]] | None = None, default=None, hang_s: float = 1.0,
                 serial_s: float = 0.1, port: int = 0):
        self.scripts = scripts or {}
        self.default = default or (lambda body: {"content": "ok"})
        self.hang_s, self.serial_s, self.port = hang_s, serial_s, port
        self._one_at_a_time = threading.Lock()
        self.counts: Counter = Counter()
        self.requests: list[dict] = []            # {"headers": {...}, "body": {...}, "case": str}
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def __enter__(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):          # quiet: tests read stderr
                pass

            def do_POST(self):
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server._handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass                            # the client gave up waiting (timeout test)
                finally:
                    with server._lock:
                        server.in_flight -= 1

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        body = json.loads(raw)
        m = _CASE.search(user_text(body))
        case = m.group(1) if m else "default"
        with self._lock:
            n = self.counts[case]
            self.counts[case] += 1
            self.requests.append({"headers": dict(h.headers), "body": body, "case": case, "path": h.path})
        script = self.scripts.get(case, ["ok"])
        action = script[min(n, len(script) - 1)]
        kind, _, arg = action.partition(":")

        if kind == "hang":
            time.sleep(self.hang_s)
            kind = "ok"
        if kind == "slow":
            time.sleep(0.2)
            kind = "ok"
        if kind == "serial":
            with self._one_at_a_time:
                time.sleep(self.serial_s)
            kind = "ok"
        if kind == "ok":
            reply = completion(body, f"answer for {case}") if case != "default" else \
                completion(body, **self.default(body))
            return self._send(h, 200, json.dumps(reply).encode())
        if kind == "reasoning":
            return self._send(h, 200, json.dumps(completion(
                body, "So the total is 42.\n\n**Final Answer**\n\\boxed{42}",
                reasoning="Let me count. 40 plus 2.\nWait, is that right? Yes, 42.")).encode())
        if kind == "badjson":
            return self._send(h, 200, b'{"id": "cmpl-1", "choices": [{"message": {"content": "cut')
        if kind == "401":
            echo = h.headers.get("Authorization", "")
            message = {"error": {"message": f"Incorrect API key provided: {echo}", "type": "invalid_request_error"}}
            return self._send(h, 401, json.dumps(message).encode())
        if kind == "422":
            detail = {"detail": [{"type": "extra_forbidden", "loc": ["body", "top_k"], "msg": "Extra inputs are not permitted"}]}
            return self._send(h, 422, json.dumps(detail).encode())
        if kind == "404":
            return self._send(h, 404, json.dumps({"error": {"message": "The model does not exist"}}).encode())
        headers = {"Retry-After": arg} if arg else {}
        return self._send(h, int(kind), json.dumps({"error": {"message": f"scripted {kind}"}}).encode(), headers)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)
