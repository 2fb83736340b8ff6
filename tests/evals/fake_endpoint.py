"""A stand-in OpenAI-compatible endpoint for eval tests, in a thread of the test process.

It answers every chat request with ``reply`` after ``delay_s`` (the 1-token start-up
check at once), and can instead hang (accept, never answer), refuse a question whose
message contains a given text with a given status, or reply with no choices. Every
request body it received is kept in ``requests``, in arrival order.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeEndpoint:
    url: str = ""
    reply: str = "14"
    delay_s: float = 0.0  # per question; the 1-token check is answered at once
    hang: bool = False  # accept every request and never answer it, the check too
    hang_questions: bool = False  # answer the check, never a question
    refuse: dict[str, tuple[int, str]] = field(default_factory=dict)  # text in the message -> (status, code)
    no_choices: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def fake_endpoint(**behaviour: Any) -> Iterator[FakeEndpoint]:
    fake = FakeEndpoint(**behaviour)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            fake.requests.append(body)
            check = body.get("max_tokens") == 1
            if fake.hang or (fake.hang_questions and not check):
                fake.stop.wait()
                return
            text = json.dumps(body.get("messages"))
            for needle, (status, code) in fake.refuse.items():
                if needle in text:
                    error = {"message": f"refused: {code}", "type": "invalid_request_error", "code": code}
                    self._send(status, {"error": {**error, "param": None}})
                    return
            if not check:
                time.sleep(fake.delay_s)
            message = {"role": "assistant", "content": fake.reply}
            choices = [] if fake.no_choices else [{"index": 0, "message": message, "finish_reason": "stop"}]
            usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
            self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                             "choices": choices, "usage": usage})  # fmt: skip

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # the default 5 drops connections of a burst: a 1 s SYN retry each

    server = Server(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.stop.set()
        server.shutdown()
        server.server_close()
