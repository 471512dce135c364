"""Real Jupyter servers and server-started kernels, for the tests and the benchmarks."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

TOKEN = "jupyter-token-for-tests"
AUTH = {"Authorization": f"token {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without offgrid's or a notebook's settings, plus OFFGRID_HOME, and a fixed
    decode thread count (greedy tokens can differ with it; the tests compare replies across runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_") and k != "JPY_SESSION_NAME"}
    return {**env, "OFFGRID_HOME": str(home), "OFFGRID_TUNE_THREADS": "0", **extra}


def started(argv: list[str], ready: str, **popen) -> subprocess.Popen:
    """Start *argv* and return once its stderr prints a line containing *ready* (the rest of
    its stderr is drained in the background); a RuntimeError with its last lines if it exits first."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, **popen)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if ready in line:
            break
    else:
        raise RuntimeError(f"{argv[2]} did not start:\n" + "".join(lines[-30:]))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
    return proc


@contextmanager
def serving(module: str, port: int, root: Path, env: dict[str, str], *args: str, token: str = TOKEN):
    """``python -m MODULE`` (a Jupyter server application) on a loopback port; yields its process
    once it says it is listening, and stops it afterwards."""
    proc = started([sys.executable, "-m", module, "--allow-root", "--no-browser", f"--port={port}",
                    "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                    "--ServerApp.port_retries=0", *args], "is running at", env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def jupyter_server(root: Path, *args: str):
    """`jupyter server` on a loopback port, with the extension enabled by its installed
    jupyter-config file; yields {url, home, proc} once the server says it is listening."""
    port = free_port()
    with serving("jupyter_server", port, root, clean_env(root / "home"), *args) as proc:
        yield {"url": f"http://127.0.0.1:{port}/", "home": root / "home", "proc": proc}


class ServerKernel:
    """A kernel started through a server's REST API, driven over its websocket."""

    def __init__(self, base: str, token: str = TOKEN):
        self.base = base
        self.headers = {"Authorization": f"token {token}"}

    async def __aenter__(self) -> "ServerKernel":
        import httpx

        self.http = httpx.AsyncClient(base_url=self.base, headers=self.headers, timeout=60)
        self.id = (await self.http.post("api/kernels", json={"name": "python3"})).json()["id"]
        url = self.base.replace("http", "ws") + f"api/kernels/{self.id}/channels"
        self.ws = await websocket_connect(HTTPRequest(url, headers=self.headers))
        return self

    async def __aexit__(self, *exc) -> None:
        self.ws.close()
        await self.http.delete(f"api/kernels/{self.id}")
        await self.http.aclose()

    async def interrupt(self) -> None:
        await self.http.post(f"api/kernels/{self.id}/interrupt")

    async def run(self, code: str, on_message=None) -> list[dict]:
        """Execute one cell; its iopub messages, then its execute_reply. *on_message(msg)*
        sees each iopub message as it arrives (and may return a coroutine to await)."""
        msg_id = uuid.uuid4().hex
        self.ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "t", "session": "s",
                       "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        cell, reply, idle = [], None, False
        while reply is None or not idle:  # iopub output may come after the shell reply
            msg = json.loads(await asyncio.wait_for(self.ws.read_message(), 120))
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["channel"] == "shell":
                reply = msg
            else:
                cell.append(msg)
                if on_message is not None and (pending := on_message(msg)) is not None:
                    await pending
                idle |= msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
        return cell + [reply]

    @classmethod
    def run_cells(cls, base: str, cells: list[str], token: str = TOKEN) -> list[list[dict]]:
        """Run *cells* one after another in a new kernel of the server at *base*: each cell's messages.
        (In a thread of its own, so a caller with a running loop, such as Playwright's, can use it.)"""
        async def run_all() -> list[list[dict]]:
            async with cls(base, token) as kernel:
                return [await kernel.run(code) for code in cells]

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, run_all()).result()

    async def printed(self, code: str) -> str:
        """Run a cell and return what it printed."""
        out = await self.run(code)
        return "".join(m["content"]["text"] for m in out if m.get("msg_type") == "stream")


def unanswered(messages):
    """User questions that a later prompt would see without their answer."""
    out = []
    for i, m in enumerate(messages):
        answered = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        if m["role"] == "user" and not answered and not m["metadata"].get("interrupted"):
            out.append(m["content"])
    return out


class Load:
    """Chats (streamed and not) and appends against a server, remembering what it acknowledged."""

    def __init__(self, base):
        self.base, self.acked, self.tokens = base, [], threading.Event()
        self.appended = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._stream), threading.Thread(target=self._chat),
                        threading.Thread(target=self._append)]
        for t in self.threads:
            t.start()

    def _client(self):
        return httpx.Client(base_url=self.base, headers=AUTH, timeout=60)

    def _stream(self):
        body = {"message": "Write a long story about a storm.", "max_tokens": 300, "stream": True}
        try:
            with self._client() as c, c.stream("POST", "sessions/turns/chat", json=body) as r:
                for line in r.iter_lines():
                    if line == "event: token":
                        self.tokens.set()
        except httpx.TransportError:
            pass  # killed mid-stream: nothing was acknowledged

    def _chat(self):
        try:
            with self._client() as c:
                while True:
                    r = c.post("sessions/turns-2/chat", json={"message": "Name a colour.", "max_tokens": 8})
                    self.acked += [r.json()["message"]["id"], r.json()["response"]["id"]]
        except httpx.TransportError:
            pass

    def _append(self):
        try:
            with self._client() as c:
                for i in range(10_000):
                    r = c.post("sessions/appends/messages", json={"role": "user", "content": f"note {i}"})
                    self.acked.append(r.json()["id"])
                    self.appended.release()
        except httpx.TransportError:
            pass

    def join(self):
        for t in self.threads:
            t.join(60)
        return not any(t.is_alive() for t in self.threads)


ENGINE_KEY = "engine-key-for-tests"


@contextmanager
def llama_engine(port: int | None = None, *, n_ctx: int = 2048):
    """llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``) on the
    embedded default GGUF, on loopback with an API key; yields {url, key, port, proc}."""
    from offgrid_jupyter.inference.models import resolve_model

    port = port or free_port()
    proc = started([sys.executable, "-m", "llama_cpp.server", "--model", str(resolve_model(None).path),
                    "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--model_alias", "smollm2",
                    "--api_key", ENGINE_KEY,
                    "--interrupt_requests", "False"],  # its default cuts a running stream when another request comes
                   "Uvicorn running on", stdout=subprocess.DEVNULL)
    try:
        yield {"url": f"http://127.0.0.1:{port}/v1", "key": ENGINE_KEY, "port": port, "proc": proc}
    finally:
        proc.kill()
        proc.wait(timeout=30)


@contextmanager
def slots_taken(base: str, n: int, headers: dict | None = None, max_tokens: int = 600):
    """*n* long streamed chats on fresh sessions of the server at *base* (its ``offgrid/v1/``),
    each holding one of the engine's slots until the block ends (closing a stream cancels its
    turn). With every slot taken, the next request queues: how the tests see the queue now that
    several requests decode together. (Each reserves its prompt and *max_tokens* of the context's
    KV cells: they must fit beside what already runs, or they wait instead of generating.)"""
    import httpx

    headers = headers or AUTH
    generating = threading.Semaphore(0)
    stop = threading.Event()

    def hold(i: int) -> None:
        name = f"filler-{uuid.uuid4().hex[:8]}"
        with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
            c.post("sessions", json={"name": name})
            body = {"message": "Write a very long essay about the history of maps.", "max_tokens": max_tokens,
                    "temperature": 0, "repeat_penalty": 1.0, "stream": True}
            with c.stream("POST", f"sessions/{name}/chat", json=body) as r:
                told = False
                for line in r.iter_lines():
                    if line == "event: token" and not told:
                        generating.release()
                        told = True
                    if stop.is_set():
                        return

    threads = [threading.Thread(target=hold, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        assert generating.acquire(timeout=120), "a filler chat never started generating"
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(120)


def parallel_slots(base: str, headers: dict | None = None) -> int:
    """How many requests the server's model decodes at once (1 for a backend without batching)."""
    import httpx

    current = httpx.get(base + "models", headers=headers or AUTH, timeout=30).json()["current"]
    return int(current.get("n_parallel") or current.get("max_concurrent") or 1)
