"""What every ``/offgrid`` route shares: authentication, bodies, errors, events, the executor.

- Authentication: jupyter-server's own (``@web.authenticated`` + ``@authorized``,
  resource ``offgrid``: a token or the browser's cookie with XSRF), or
  ``Authorization: Bearer <key>`` with the configured API key or the key this
  server start gave its kernels. Refused before the body is read.
- Bodies are streamed in (``@stream_request_body``), so an oversized one is a 413
  as soon as its Content-Length is known, never buffered; then parsed strictly
  (:mod:`..validation`) and checked against ``openapi.json`` (:mod:`.spec`).
- Errors are ``{"error": {"message", "type", "code"}}`` with the status the error
  class carries; a 405 says what is allowed (``Allow``).
- The event loop never waits: store calls run in the extension's own small thread
  pool (:meth:`OffgridHandler.run`), and waiting for a session, the queue or the
  engine is done with futures on the loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler
from tornado import web
from tornado.iostream import StreamClosedError

from ..errors import ContentTooLargeError, EngineBusyError, InvalidRequestError, OffgridError, QueueTimeoutError
from ..validation import parse_json
from . import spec
from .state import ServerState

AUTH_RESOURCE = "offgrid"
INLINE_BODY_BYTES = 64 * 1024  # a body up to this is parsed on the event loop (well under a millisecond)
JUPYTER_QUERY = frozenset({"token", "_xsrf"})  # Jupyter's own: a token may come in the URL


def _cache_buster(name: str, values: list[bytes]) -> bool:
    """JupyterLab's ServerConnection appends ``?<milliseconds>`` to a GET it must not cache."""
    return name.isascii() and name.isdigit() and values == [b""]


@web.stream_request_body
class OffgridHandler(APIHandler):
    auth_resource = AUTH_RESOURCE
    spec_path: str | None = None  # the route's path in openapi.json

    @property
    def state(self) -> ServerState:
        return self.settings["offgrid_state"]

    async def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._gone = False
        auth = self.request.headers.get("Authorization", "")
        scheme, _, presented = auth.partition(" ")
        if scheme.lower() == "bearer" and presented and self.state.key_matches(presented.strip()):
            if not self.check_host():
                raise web.HTTPError(403)
            self.current_user = self._jupyter_current_user = User(username="offgrid-api-key")
            self._key_authenticated = True
        else:
            self._key_authenticated = False
            await super().prepare()
            if self.current_user is None:  # refuse before reading a body
                raise web.HTTPError(403)
        self._check_query()
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self.state.max_body_bytes:
            raise self._too_large(int(declared))

    def _check_query(self) -> None:
        """A query argument the route does not take is a 400 naming it, not silently ignored
        (a misspelt ``limt=5`` would otherwise answer as if it had not been sent)."""
        method = self.request.method.lower()
        if self.spec_path is None or method.upper() not in spec.methods(self.spec_path):
            return  # (a method the route has not: 405, not this)
        known = spec.query_names(self.spec_path, method)
        unknown = sorted(name for name, values in self.request.query_arguments.items()
                         if name not in known and name not in JUPYTER_QUERY and not _cache_buster(name, values))
        if unknown:
            takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
            raise InvalidRequestError(f"{self.request.method} {self.request.path} has no query argument "
                                      f"{unknown[0][:40]!r}: {takes}.")

    def check_xsrf_cookie(self) -> None:
        if getattr(self, "_key_authenticated", False):  # a bearer key is not a cookie: no XSRF risk
            return None
        return super().check_xsrf_cookie()

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.state.max_body_bytes:  # past the limit, nothing more is kept
            self._chunks.append(chunk)

    def _too_large(self, size: int) -> ContentTooLargeError:
        return ContentTooLargeError(f"The request body is {size} bytes; the limit is {self.state.max_body_bytes} "
                                    "bytes (c.OffgridApp.max_body_bytes).")

    # -- off the loop ----------------------------------------------------------------------
    def run(self, fn: Callable, *args: Any) -> asyncio.Future:
        """Run a short blocking call (the store) in the extension's thread pool."""
        return asyncio.get_running_loop().run_in_executor(self.state.executor, fn, *args)

    def slow(self, fn: Callable, *args: Any) -> asyncio.Future:
        """Run what may take long or wait on the network (checking a request's grammars, handing it
        to the backend, retrieval) in the pool kept for that (see ServerState.prepare_pool)."""
        return asyncio.get_running_loop().run_in_executor(self.state.prepare_pool, fn, *args)

    # -- responses -------------------------------------------------------------------------
    def send(self, status: int, payload: Any = None) -> None:
        if self._gone:
            return
        self.set_status(status)
        if payload is None:
            self.finish()
        else:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(payload))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, OffgridError):
            message, kind, code = str(exc), type(exc).__name__, exc.code
            if isinstance(exc, (QueueTimeoutError, EngineBusyError)):
                self.set_header("Retry-After", "5")
        elif isinstance(exc, web.HTTPError):
            message = exc.log_message or exc.reason or self._reason
            kind, code = "HTTPError", {401: "unauthorized", 403: "forbidden", 404: "not_found",
                                       405: "method_not_allowed"}.get(status_code, "http_error")
            if status_code == 403 and not exc.log_message:
                message = "Not authenticated: send Jupyter's token (Authorization: token …) or the API key."
        else:
            message, kind, code = "Internal server error (see the server log).", "InternalError", "internal"
        if status_code == 405 and self.spec_path:
            allowed = spec.methods(self.spec_path)
            self.set_header("Allow", ", ".join(allowed))
            message = f"{self.request.method} is not allowed here; use {' or '.join(allowed)}."
        if self._body_unread():  # tornado will close the connection: say so, or a client reuses it and gets a reset
            self.set_header("Connection", "close")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"message": message, "type": kind, "code": code}}))

    def _body_unread(self) -> bool:
        """Whether the request's body has not been read to its end (an error before it was,
        such as a 413 on Content-Length or a refused login)."""
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit():
            return getattr(self, "_size", 0) < int(declared)
        return "Transfer-Encoding" in self.request.headers

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, OffgridError):  # a client's mistake or a busy engine: its own status, no traceback
            if self._finished:
                return
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    # -- request bodies ----------------------------------------------------------------------
    async def body(self) -> dict[str, Any]:
        """The JSON body, checked against the route's schema; ``null`` fields dropped. A body larger
        than INLINE_BODY_BYTES is parsed and checked off the event loop: a 1.7 MB body of tool
        schemas kept it from answering anything else for tens of milliseconds."""
        if self._size > INLINE_BODY_BYTES:
            return await self.slow(self._parse_body)
        return self._parse_body()

    def _parse_body(self) -> dict[str, Any]:
        if self._size > self.state.max_body_bytes:
            raise self._too_large(self._size)
        raw = b"".join(self._chunks)
        if not raw and spec.body_required(self.spec_path, self.request.method.lower()):
            raise InvalidRequestError(f"{self.request.method} {self.request.path} needs a JSON object as its body "
                                      "(see openapi.json for its fields).")
        data = parse_json(raw or b"{}")
        if not isinstance(data, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        return spec.check_body(self.spec_path, self.request.method.lower(), data)

    def query(self, name: str) -> str | None:
        """A query argument exactly as sent (tornado's own accessor strips spaces and
        replaces control characters, which would accept what openapi.json refuses)."""
        values = self.request.query_arguments.get(name)
        if not values:
            return None
        try:
            return values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(f"The query argument {name} is not UTF-8.") from None

    def query_int(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.query(name)
        if raw is None:
            return default
        if not raw.lstrip("-").isdigit() or not raw.isascii():
            raise InvalidRequestError(f"{name} must be an integer, got {raw[:40]!r}.")
        try:
            value = int(raw)
        except ValueError:
            raise InvalidRequestError(f"{name} must be an integer, got {raw[:40]!r}.") from None
        if not low <= value <= high:
            raise InvalidRequestError(f"{name} must be between {low} and {high}, got {value}.")
        return value

    # -- server-sent events -----------------------------------------------------------------
    def start_events(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")

    async def event(self, kind: str | None, data: Any) -> None:
        if self._gone:
            return
        text = data if isinstance(data, str) else json.dumps(data)
        self.write((f"event: {kind}\n" if kind else "") + f"data: {text}\n\n")
        try:
            await self.flush()
        except StreamClosedError:
            self._gone = True

    def end_events(self) -> None:
        if not self._gone:
            self.finish()

    def on_connection_close(self) -> None:
        self._gone = True
        self.gone()

    def gone(self) -> None:
        """The client went away (subclasses cancel what it was waiting for)."""
