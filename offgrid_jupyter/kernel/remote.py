"""What a kernel connected to a Jupyter server uses instead of its own engine and store.

``RemoteTurn`` has the interface of :class:`~offgrid_jupyter.turns.ChatTurn`
(``generation.batches()``, ``cancel()``, ``finish()``, ``abort()``), so the magic
does not care where the model runs; the server stores the turn (user message,
then reply).

``RemoteStore`` is the part of :class:`~offgrid_jupyter.store.Store` that the
magics and the panel use (get, list, create, rename, fork, end, delete, export,
import, the notebook's session, statistics), over the server's REST routes. A
kernel uses it when it was connected (``%offgrid connect URL``) to a server that
may be on another machine; a kernel the server started shares its database
file and keeps reading it directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..client import Client
from ..inference.generation import GenerationResult, Handle, drain
from ..errors import OffgridError, ServerError
from ..errors import InvalidRequestError
from ..chat.store import SESSION_ID_RE, Message, Session
from ..chat import attachments
from ..chat.turns import TurnResult


class RemoteGeneration(Handle):
    """A streamed server turn as a generation handle: a reader thread turns the server's
    Server-Sent Events into events; the consumer's side is :class:`Handle`'s."""

    def __init__(self, client: Client, session: str | None, content: str, body: dict[str, Any]):
        super().__init__()
        self.client = client
        self.request_id: str | None = None
        self._state = "queued"
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._stream: Iterator | None = None
        self._complete: dict[str, Any] | None = None
        self._error: BaseException | None = None
        if session is not None:
            stream = client.sessions.stream(session, content, **body)
        else:
            stream = client.stream_completion([{"role": "user", "content": content}], **body)
        self._first = next(stream)  # the request reached the server (errors surface here)
        self._stream = stream
        threading.Thread(target=self._read, name="offgrid-remote", daemon=True).start()

    @property
    def state(self) -> str:
        return self._state

    def _read(self) -> None:
        try:
            self._take(*self._first)
            for kind, data in self._stream:
                self._take(kind, data)
            if self._state != "done":
                raise ServerError("The server's stream ended before the turn did; see the server's log.")
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._error = exc
            self._events.put(("error", exc))
            self._state = "done"
        finally:
            self._done.set()

    def _take(self, kind: str, data: dict[str, Any]) -> None:
        if "request_id" in data and self.request_id is None:
            self.request_id = data["request_id"]
            if self._cancel.is_set():
                self._send_cancel()
        if kind == "start":
            self._state = "running"
        if kind == "complete":
            self._complete = data
            self._state = "done"
        event = (kind, data.get("position") if kind == "queued" else data.get("delta") if kind == "token" else data)
        self._events.put(event)
        self._listeners(*event)

    def _outcome(self) -> dict[str, Any]:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._complete

    def _pull(self, timeout: float | None, *, gather: bool, repeat_queued: bool = False) -> list:
        batch = drain(self._events)
        if gather:
            self._done.wait(timeout)
        elif not batch:
            try:
                batch.append(self._events.get(timeout=timeout))
            except queue.Empty:
                pass
        return batch + drain(self._events)

    async def _apull(self, timeout: float | None, *, gather: bool, repeat_queued: bool = False) -> list:
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._pull(timeout, gather=gather, repeat_queued=repeat_queued))

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

    def _give_up(self) -> None:  # an interrupt: the server keeps the partial turn, which the stream still brings
        self.cancel()


class RemoteTurn:
    def __init__(self, client: Client, session: str | None, content: str, *, params: dict[str, Any],
                 metadata: dict | None = None, replace: str | None = None, system_prompt: str | None = None,
                 rag: dict | None = None, context: list[dict] | None = None):
        body = {k: v for k, v in params.items() if v is not None}
        if rag is not None:  # the server retrieves from its own collections
            body.update({"rag": True, "rag_k": rag.get("k")}, **({"collection": rag["collection"]}
                                                               if rag.get("collection") else {}))
            body = {k: v for k, v in body.items() if v is not None}
        if session is not None:  # the server fits and stores the attachments
            body.update({k: v for k, v in (("metadata", metadata), ("replace_message_id", replace)) if v})
            if context:
                body["context"] = [{k: i[k] for k in ("kind", "name", "type", "text")}
                                   for i in attachments.check(context)]
        else:
            if context:  # one-shot: nothing is stored, so the prompt carries them
                content = attachments.inline(content, context)
            if system_prompt:
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
            source="server", tool_calls=data.get("tool_calls") or [], tool_results=data.get("tool_results") or [],
            rounds=data.get("rounds") or 1, note=data.get("note"))
        message = Message(**data["message"]) if data.get("message") else None
        reply = Message(**data["response"]) if data.get("response") else None
        return TurnResult(data.get("session_id"), data.get("session_name"), message, reply, result,
                          data["model_sha256"], data.get("sources") or [])


def _message(d: dict[str, Any]) -> Message:
    return Message(**{k: d[k] for k in Message.__dataclass_fields__ if k in d})


def _session(d: dict[str, Any]) -> Session:
    fields = {k: d[k] for k in Session.__dataclass_fields__ if k in d and k != "messages"}
    messages = d.get("messages")
    return Session(**fields, messages=[_message(m) for m in messages] if messages is not None else None)


class RemoteStore:
    """The sessions of a Jupyter server, through its routes (see the module docstring)."""

    def __init__(self, client: Client):
        self.client = client
        self.sessions = client.sessions
        self.path = client.base_url  # where the sessions are, for %offgrid status

    def get(self, ref: str, *, messages: bool = True) -> Session:
        return _session(self.sessions.get(ref))

    def exists(self, ref: str) -> bool:
        try:
            self.sessions.get(ref)
            return True
        except OffgridError as exc:
            if exc.code != "session_not_found":
                raise
            return False

    def list(self, limit: int = 50, offset: int = 0) -> list[Session]:
        return [_session(d) for d in self.sessions.list(limit=limit, offset=offset)]

    def count(self) -> int:
        return self.client.request("GET", "sessions", params={"limit": 1})["total"]

    def create(self, name: str | None = None, *, system_prompt: str | None = None, metadata: dict | None = None,
               profile: str | None = None, **_: Any) -> Session:
        return _session(self.sessions.create(name, system_prompt=system_prompt, profile=profile, metadata=metadata))

    def rename(self, ref: str, new_name: str) -> Session:
        return _session(self.sessions.update(ref, name=new_name))

    def update(self, ref: str, *, system_prompt: str | None = None) -> Session:
        return _session(self.sessions.update(ref, system_prompt=system_prompt))

    def end(self, ref: str) -> Session:
        return _session(self.sessions.update(ref, ended=True))

    def fork(self, ref: str, upto_message_id: str | None = None, *, name: str | None = None) -> Session:
        return _session(self.sessions.fork(ref, name=name, upto_message_id=upto_message_id))

    def delete(self, ref: str) -> None:
        self.sessions.delete(ref)

    def cell_turn(self, ref: str, cell_id: str) -> str | None:
        mine = [m for m in self.get(ref).messages or [] if m.role == "user" and m.metadata.get("cell_id") == cell_id]
        return mine[-1].id if mine else None

    def notebook_session(self, notebook: str) -> Session | None:
        found = self.sessions.for_notebook(notebook)
        return _session(found) if found else None

    def bind_notebook(self, notebook: str, ref: str) -> None:
        self.sessions.bind_notebook(notebook, ref)

    def export(self, directory: str | os.PathLike, refs: Iterable[str] | None = None) -> list[Path]:
        """Write the server's sessions as ``<session id>.json`` files here (the format Store.export writes)."""
        target = Path(directory).expanduser().resolve()
        target.mkdir(parents=True, exist_ok=True)
        if refs is None:
            refs = [s.id for s in self._all()]
        paths = []
        for ref in refs:
            doc = self.sessions.export(ref)
            if not SESSION_ID_RE.fullmatch(str(doc.get("id"))):  # ids, never names, become file names
                raise InvalidRequestError(f"The server exported {ref!r} with an invalid id.")
            path = target / f"{doc['id']}.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=1))
            os.replace(tmp, path)
            paths.append(path)
        return paths

    def import_(self, path: str | os.PathLike) -> list[Session]:
        src = Path(path).expanduser()
        if not src.exists():
            raise InvalidRequestError(f"Nothing to import at {src}: no such file or directory.")
        out = []
        for file in sorted(src.glob("*.json")) if src.is_dir() else [src]:
            try:
                doc = json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise InvalidRequestError(f"Cannot import {file}: not readable JSON ({exc}).") from exc
            out.append(self.get(self.sessions.import_(doc)["id"], messages=False))
        return out

    def sessions_frame(self):
        import pandas as pd

        columns = ["id", "name", "title", "profile", "model", "created_at", "updated_at", "last_access_at", "ended",
                   "message_count"]
        sessions = sorted(self._all(), key=lambda s: s.updated_at, reverse=True)
        frame = pd.DataFrame([{c: getattr(s, c) for c in columns} for s in sessions], columns=columns)
        for col in ("created_at", "updated_at", "last_access_at"):
            frame[col] = pd.to_datetime(frame[col], unit="s", utc=True)
        frame["ended"] = frame["ended"].astype(bool)
        frame["message_count"] = frame["message_count"].astype("int64")
        return frame

    def stats_frame(self, **filters: Any):
        return self.client.stats_frame(**filters)

    def _all(self) -> list[Session]:
        out: list[Session] = []
        while True:
            page = self.list(limit=1000, offset=len(out))
            out += page
            if len(page) < 1000:
                return out
