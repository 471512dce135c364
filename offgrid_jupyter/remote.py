"""A chat turn served by a Jupyter server's shared model instead of an in-kernel engine.

``RemoteTurn`` has the interface of :class:`~offgrid_jupyter.turns.ChatTurn`
(``generation.batches()``, ``cancel()``, ``finish()``, ``abort()``), so the magic
does not care where the model runs. The server stores the turn (user message,
then reply) in the database the kernel shares with it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

from .client import Client
from .engine import GenerationResult, Listeners, take_batch
from .errors import OffgridError
from .store import Message
from .turns import TurnResult


class RemoteGeneration:
    """A streamed server turn seen like an engine :class:`~offgrid_jupyter.engine.Generation`."""

    def __init__(self, client: Client, session: str | None, content: str, body: dict[str, Any]):
        self.client = client
        self.request_id: str | None = None
        self.state = "queued"
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._complete: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._stream: Iterator | None = None
        self._listeners = Listeners()
        if session is not None:
            stream = client.sessions.stream(session, content, **body)
        else:
            stream = client.stream_completion([{"role": "user", "content": content}], **body)
        self._first = next(stream)  # the request reached the server (errors surface here)
        self._stream = stream
        threading.Thread(target=self._read, name="offgrid-remote", daemon=True).start()

    def _read(self) -> None:
        try:
            self._take(*self._first)
            for kind, data in self._stream:
                self._take(kind, data)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._error = exc
            self._events.put(("error", exc))
        finally:
            self._done.set()

    def _take(self, kind: str, data: dict[str, Any]) -> None:
        if "request_id" in data and self.request_id is None:
            self.request_id = data["request_id"]
            if self._cancel.is_set():
                self._send_cancel()
        if kind == "start":
            self.state = "running"
        if kind == "complete":
            self._complete = data
            self.state = "done"
        event = (kind, data.get("position") if kind == "queued" else data.get("delta") if kind == "token" else data)
        self._events.put(event)
        self._listeners(*event)

    def listen(self, callback: Callable[[str, Any], None]) -> Callable[[], None]:
        """As :meth:`Generation.listen <offgrid_jupyter.engine.Generation.listen>`."""
        return self._listeners.add(callback)

    def batches(self, interval: float = 0.1, *, heartbeat: bool = False) -> Iterator[list[tuple[str, Any]]]:
        finished = False
        try:
            while True:
                self._done.wait(interval)
                try:
                    batch = take_batch(self._events)
                except BaseException:
                    finished = True
                    raise
                if batch:
                    finished = batch[-1][0] == "complete"
                    yield batch
                elif heartbeat:
                    yield []
                if finished:
                    return
        finally:
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        """Ask the server to stop; the stream still ends with the turn it kept."""
        if not self._cancel.is_set():
            self._cancel.set()
            if self.request_id is not None:
                self._send_cancel()

    def _send_cancel(self) -> None:
        try:
            self.client.request("POST", "generation/cancel", body={"request_id": self.request_id})
        except OffgridError:
            pass  # already over

    def wait(self) -> dict[str, Any]:
        try:
            self._done.wait()
        except KeyboardInterrupt:
            self.cancel()
            self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._complete is not None
        return self._complete


class RemoteTurn:
    def __init__(self, client: Client, session: str | None, content: str, *, params: dict[str, Any],
                 metadata: dict | None = None, replace: str | None = None, system_prompt: str | None = None):
        body = {k: v for k, v in params.items() if v is not None}
        if session is not None:
            body.update({k: v for k, v in (("metadata", metadata), ("replace_message_id", replace)) if v})
        elif system_prompt:
            body["system_prompt"] = system_prompt
        self.generation = RemoteGeneration(client, session, content, body)

    def cancel(self) -> None:
        self.generation.cancel()

    def abort(self) -> None:
        self.generation.cancel()

    def finish(self) -> TurnResult:
        data = self.generation.wait()
        result = GenerationResult(
            request_id=data["request_id"], session_id=data.get("session_id"), model=data["model"],
            text=data["text"], finish_reason=data["finish_reason"], usage=data["usage"], timings=data["timings"],
            queue_stats=data["queue_stats"], params=data["params"], started_at=data.get("started_at", 0.0),
            source="server")
        message = Message(**data["message"]) if data.get("message") else None
        reply = Message(**data["response"]) if data.get("response") else None
        return TurnResult(data.get("session_id"), data.get("session_name"), message, reply, result,
                          data["model_sha256"])
