"""An OpenAI-compatible engine that misbehaves on purpose, on a loopback port.

Each POST to ``chat/completions`` takes the next step of ``script`` (the last one repeats):
``("reply", text)`` streams *text* and finishes; ``("hang_after", text)`` streams *text* then
sends nothing; ``("keepalive_after", text)`` streams *text* then only SSE comments;
``("echo_error", status)`` answers *status* with an error that quotes the request's headers;
``("error_event", None)`` streams an error event quoting them. ``GET models`` answers a list, or
hangs while ``hang_models`` is set. Everything runs in daemon threads; ``close()`` stops them.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _chunk(text: str | None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text else {}
    body = {"id": "x", "object": "chat.completion.chunk", "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()


class FakeEngine:
    def __init__(self, script: list | None = None, *, hang_models: bool = False):
        self.script = list(script or [("reply", "Hello there.")])
        self.hang_models = hang_models
        self.posts = 0
        self.released = threading.Event()  # set by close(): hanging handlers return
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if engine.hang_models:
                    engine.released.wait(600)
                    return
                body = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode()
                self._send(200, body, "application/json")

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                engine.posts += 1
                step = engine.script.pop(0) if len(engine.script) > 1 else engine.script[0]
                kind, arg = step
                headers = "; ".join(f"{k}: {v}" for k, v in self.headers.items())
                if kind == "echo_error":
                    body = json.dumps({"error": {"message": f"bad request, you sent {headers}"}}).encode()
                    self._send(arg, body, "application/json")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    if kind == "error_event":
                        self.wfile.write(f"data: {json.dumps({'error': {'message': 'boom ' + headers}})}\n\n".encode())
                        self.wfile.flush()
                        return
                    for word in arg.split(" "):
                        self.wfile.write(_chunk(word + " "))
                        self.wfile.flush()
                    if kind == "reply":
                        self.wfile.write(_chunk(None, "stop") + b"data: [DONE]\n\n")
                        self.wfile.flush()
                        return
                    while not engine.released.is_set():  # hang: nothing, or only comments
                        if kind == "keepalive_after":
                            self.wfile.write(b": keep-alive\n\n")
                            self.wfile.flush()
                        engine.released.wait(0.2)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status, body, kind):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll *predicate* until it is true (for a state another process reaches), or *timeout* passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
