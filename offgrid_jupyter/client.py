"""``offgrid_jupyter.Client``: the Python SDK for a server's ``/offgrid/v1`` routes.

httpx does the HTTP, httpx-sse reads the Server-Sent Events, tenacity does the
retries: exponential backoff of 1 s, 2 s, 4 s (with jitter, or the server's
``Retry-After``), only when the connection failed or the server answered 502,
503 or 504. A chat carries an ``Idempotency-Key`` the server honours, so a
retried chat is never stored twice.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import quote

import httpx
from httpx_sse import EventSource, connect_sse
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from .chat.attachments import inline
from .chat.frames import to_epoch, typed_frame
from .errors import InvalidRequestError, OffgridError, ServerError, from_response
from .retrieval.rag import Hit, LearnReport

RETRY_STATUSES = (502, 503, 504)
MAX_RETRY_AFTER_S = 60.0


class _Retryable(Exception):
    def __init__(self, response: httpx.Response):
        self.response = response


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, _Retryable):
        after = exc.response.headers.get("Retry-After", "")
        if after.replace(".", "", 1).isdigit():
            return min(float(after), MAX_RETRY_AFTER_S)
    base = 2.0 ** (state.attempt_number - 1)  # 1, 2, 4 s
    return base + random.uniform(0, base / 4)


def _ref(session: str) -> str:
    return quote(session, safe="")


class Client:
    """A client for one offgrid server (defaults: ``OFFGRID_URL``, ``OFFGRID_API_KEY``)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 600.0,
                 max_retries: int = 3, transport: httpx.BaseTransport | None = None):
        base_url = base_url or os.environ.get("OFFGRID_URL")
        if not base_url:
            raise OffgridError("No server URL: pass base_url (e.g. http://localhost:8888/offgrid/v1/) "
                               "or set OFFGRID_URL.")
        self.base_url = base_url.rstrip("/") + "/"
        api_key = api_key if api_key is not None else os.environ.get("OFFGRID_API_KEY")
        self.api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_retries = max_retries
        self.http = httpx.Client(base_url=self.base_url, headers=headers, transport=transport,
                                 timeout=httpx.Timeout(timeout, connect=10.0))
        self.sessions = Sessions(self)
        self.collections = Collections(self)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------
    def _retrying(self, idempotent: bool) -> Retrying:
        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, _Retryable):
                return True
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):  # it never arrived
                return True
            return idempotent and isinstance(exc, httpx.TransportError)

        return Retrying(retry=retry_if_exception(retryable), stop=stop_after_attempt(self.max_retries + 1),
                        wait=_wait, reraise=True)

    def request(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                headers: dict | None = None, idempotent: bool | None = None) -> Any:
        """One call, retried as the module says; returns the decoded JSON (None for 204)."""
        if idempotent is None:
            idempotent = method in ("GET", "DELETE") or bool(headers and "Idempotency-Key" in headers)

        def attempt() -> httpx.Response:
            response = self.http.request(method, path, json=body, params=params, headers=headers)
            if response.status_code in RETRY_STATUSES:
                raise _Retryable(response)
            return response

        try:
            response = self._retrying(idempotent)(attempt)
        except _Retryable as exc:
            response = exc.response
        except httpx.TransportError as exc:
            raise ServerError(f"Could not reach the offgrid server at {self.base_url}: {exc}.") from exc
        if response.is_error:
            raise self._error(response)
        return None if response.status_code == 204 else response.json()

    @staticmethod
    def _error(response: httpx.Response) -> OffgridError:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        return from_response(response.status_code, payload)

    # -- the API ------------------------------------------------------------------------------
    def chat(self, message: str, session: str | None = None, *, context: list[dict] | None = None,
             **params: Any) -> dict[str, Any]:
        """A turn in *session*; without one, a one-shot answer (nothing stored). *context*:
        attachments ``[{kind, name, text, type?}]`` (``offgrid_jupyter.describe`` writes a
        variable's text), stored with the message and shown to the model before it."""
        if session is not None:
            return self.sessions.chat(session, message, **({"context": context} if context else {}), **params)
        if context:  # nothing is stored, so the prompt carries them (fitted to half a 4,096 context)
            message = inline(message, context)
        body = {"messages": [{"role": "user", "content": message}], **params}
        out = self.request("POST", "chat/completions", body=body)
        choice = out["choices"][0]
        return {"text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                "model": out["model"], "usage": out["usage"]}

    def stream_completion(self, messages: list[dict], **params: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """A one-shot streamed answer (the OpenAI-compatible route, nothing stored), as the
        same ``(event, data)`` pairs as ``sessions.stream``."""
        with self._sse("chat/completions", {"messages": messages, **params, "stream": True}) as source:
            for sse in source.iter_sse():
                if sse.data == "[DONE]":
                    return
                chunk = json.loads(sse.data)
                if "error" in chunk:
                    raise from_response(500, chunk)
                if "offgrid" in chunk:
                    yield "complete", chunk["offgrid"]
                    continue
                delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                if "role" in delta:
                    yield "start", {"request_id": "req-" + chunk["id"].removeprefix("chatcmpl-")}
                if delta.get("content"):
                    yield "token", {"delta": delta["content"]}

    @contextmanager
    def _sse(self, path: str, body: dict[str, Any]) -> Iterator[EventSource]:
        """POST and open a Server-Sent Events stream, retried until it opens; an error
        answer is raised as the server's error."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}

        def open_stream():
            cm = connect_sse(self.http, "POST", path, json=body, headers=headers)
            source = cm.__enter__()
            if source.response.status_code in RETRY_STATUSES:
                source.response.read()
                cm.__exit__(None, None, None)
                raise _Retryable(source.response)
            return cm, source

        try:
            cm, source = self._retrying(idempotent=True)(open_stream)
        except _Retryable as exc:
            raise self._error(exc.response) from None
        except httpx.TransportError as exc:
            raise ServerError(f"Could not reach the offgrid server at {self.base_url}: {exc}.") from exc
        try:
            if source.response.is_error:
                source.response.read()
                raise self._error(source.response)
            yield source
        finally:
            cm.__exit__(None, None, None)

    def complete_inline(self, prefix: str, suffix: str = "", *, language: str = "python", path: str | None = None,
                        context: list[str] | None = None, max_tokens: int | None = None) -> dict[str, Any]:
        """The code that may follow the cursor (what JupyterLab shows as ghost text):
        ``{"items": [{"insertText"}], "model", "finish_reason", "latency_ms", "usage"}``. *context*:
        the sources of the cells above; *path* shares the KV cache between calls for one file."""
        body = {"prefix": prefix, "suffix": suffix, "language": language, "path": path, "context": context,
                "max_tokens": max_tokens}
        return self.request("POST", "completions/inline", body={k: v for k, v in body.items() if v is not None})

    def stats(self) -> dict[str, Any]:
        return self.request("GET", "stats")

    def stats_frame(self, since: Any = None, until: Any = None, session: str | None = None,
                    model: str | None = None):
        """The server's per-request DataFrame (the same columns and types as ``stats_frame()``)."""
        times = {k: repr(to_epoch(v)) for k, v in dict(since=since, until=until).items() if v is not None}
        params = {**times, **{k: v for k, v in dict(session=session, model=model).items() if v is not None}}
        out = self.request("GET", "stats/requests", params=params)
        return typed_frame(out["columns"], out["data"])

    def generation_status(self) -> dict[str, Any]:
        return self.request("GET", "generation/status")

    def models(self) -> dict[str, Any]:
        return self.request("GET", "models")

    def health(self) -> dict[str, Any]:
        return self.request("GET", "health")


class Sessions:
    def __init__(self, client: Client):
        self.client = client

    def create(self, name: str | None = None, *, system_prompt: str | None = None, profile: str | None = None,
               metadata: dict | None = None) -> dict[str, Any]:
        body = {k: v for k, v in dict(name=name, system_prompt=system_prompt, profile=profile,
                                      metadata=metadata).items() if v is not None}
        return self.client.request("POST", "sessions", body=body)

    def list(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        return self.client.request("GET", "sessions", params={"limit": limit, "offset": offset})["sessions"]

    def get(self, session: str) -> dict[str, Any]:
        return self.client.request("GET", f"sessions/{_ref(session)}")

    def delete(self, session: str) -> None:
        self.client.request("DELETE", f"sessions/{_ref(session)}")

    def update(self, session: str, *, name: str | None = None, system_prompt: str | None = None,
               ended: bool | None = None) -> dict[str, Any]:
        """Rename, change the system prompt, or end (``ended=True``); returns the summary."""
        body = {k: v for k, v in dict(name=name, system_prompt=system_prompt, ended=ended or None).items()
                if v is not None}
        return self.client.request("PATCH", f"sessions/{_ref(session)}", body=body, idempotent=True)

    def fork(self, session: str, *, name: str | None = None, upto_message_id: str | None = None) -> dict[str, Any]:
        body = {k: v for k, v in dict(name=name, upto_message_id=upto_message_id).items() if v is not None}
        return self.client.request("POST", f"sessions/{_ref(session)}/fork", body=body)

    def export(self, session: str) -> dict[str, Any]:
        """The session as an export document (what :meth:`import_` reads back)."""
        return self.client.request("GET", f"sessions/{_ref(session)}/export")

    def import_(self, document: dict[str, Any]) -> dict[str, Any]:
        """Import an export document (idempotent, so retried); returns the session's summary."""
        return self.client.request("POST", "import", body=document, idempotent=True)

    def for_notebook(self, path: str) -> dict[str, Any] | None:
        """The session the notebook at *path* used last, or None."""
        return self.client.request("GET", "notebooks/session", params={"path": path})["session"]

    def bind_notebook(self, path: str, session: str) -> None:
        self.client.request("PUT", "notebooks/session", body={"path": path, "session": session}, idempotent=True)

    def add_message(self, session: str, role: str, content: str) -> dict[str, Any]:
        return self.client.request("POST", f"sessions/{_ref(session)}/messages",
                                   body={"role": role, "content": content})

    def chat(self, session: str, message: str, **params: Any) -> dict[str, Any]:
        """One stored turn; ``{session_id, message, response, text, usage, timings, queue_stats, …}``."""
        return self.client.request("POST", f"sessions/{_ref(session)}/chat", body={"message": message, **params},
                                   headers={"Idempotency-Key": uuid.uuid4().hex})

    def chat_with_session(self, session: str, message: str, **params: Any) -> dict[str, Any]:
        """Chat in the session named *session*, creating it on first use."""
        try:
            return self.chat(session, message, **params)
        except OffgridError as exc:
            if exc.code != "session_not_found":
                raise
        try:
            self.create(session)
        except OffgridError as exc:
            if exc.code != "duplicate_name":  # created meanwhile by someone else: fine
                raise
        return self.chat(session, message, **params)

    def stream(self, session: str, message: str, **params: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(event, data)``: ``queued``, ``start``, ``loading``, ``token``, ``complete``.
        An ``error`` event is raised as its error. Closing the iterator early cancels the
        generation on the server. Retried (same idempotency key) only until the stream opens."""
        with self.client._sse(f"sessions/{_ref(session)}/chat", {"message": message, **params, "stream": True}) \
                as source:
            for sse in source.iter_sse():
                data = json.loads(sse.data) if sse.data else {}
                if sse.event == "error":
                    raise from_response(500, {"error": data})
                yield sse.event, data
                if sse.event == "complete":
                    return


class Collections:
    """A server's learned files (``client.collections``): the same calls as ``store.library``,
    over the ``collections`` routes (paths are the server's, under its root directory)."""

    def __init__(self, client: Client):
        self.client = client

    def collections(self) -> list[dict[str, Any]]:
        return self.client.request("GET", "collections")["collections"]

    list = collections

    def learn(self, paths: list[str], collection: str = "default", progress: Any = None,
              embedding_model: str | None = None) -> Any:
        """Learn *paths* on the server; returns a :class:`~offgrid_jupyter.retrieval.rag.LearnReport`. The
        server embeds with its own ``c.OffgridApp.embedding_model``: a client names no file there."""
        if embedding_model:
            raise InvalidRequestError("This kernel's collections are the server's, which embeds with its own model "
                                      "(c.OffgridApp.embedding_model); learn without --embedding-model.")

        out = self.client.request("POST", "collections", body={"name": collection, "paths": list(paths)},
                                  idempotent=True)  # learning again changes nothing: safe to retry
        return LearnReport(**out)

    def get(self, name: str) -> dict[str, Any]:
        return self.client.request("GET", f"collections/{_ref(name)}")

    def delete(self, name: str) -> None:
        self.client.request("DELETE", f"collections/{_ref(name)}")

    def search(self, query: str, collection: str | None = None, k: int = 5) -> list[Any]:
        """The best chunks for *query* in *collection* (or in every collection), as ``rag.Hit``."""
        names = [collection] if collection else [c["name"] for c in self.collections()]
        hits = []
        for name in names:
            out = self.client.request("GET", f"collections/{_ref(name)}/search", params={"q": query, "k": k})
            hits += [Hit(**h) for h in out["hits"]]
        return sorted(hits, key=lambda h: -h.score)[:k]
