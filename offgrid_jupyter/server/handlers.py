"""The ``{base_url}offgrid/v1/`` routes (and ``{base_url}offgrid/metrics``).

Every route is a jupyter-server ``APIHandler`` behind ``@web.authenticated`` and
``@authorized`` (resource ``offgrid``); a request may instead carry
``Authorization: Bearer <key>`` with the configured API key or the key this server
start gave its kernels. Errors are ``{"error": {"message", "type", "code"}}``.

Generation never runs on the event loop: the engine has its own thread, and
waiting for it happens in the loop's executor.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib.resources import files
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler
from prometheus_client import CONTENT_TYPE_LATEST
from tornado import web
from tornado.iostream import StreamClosedError

from .. import __version__
from ..errors import (
    ContentTooLargeError,
    EngineBusyError,
    InvalidRequestError,
    OffgridError,
    QueueTimeoutError,
)
from ..models import resolve_model
from ..stats import stats_document
from ..turns import ChatTurn, TurnResult
from .state import ServerState

AUTH_RESOURCE = "offgrid"
PARAMS = {"max_tokens": int, "temperature": (int, float), "seed": int, "top_p": (int, float), "top_k": int,
          "repeat_penalty": (int, float)}


async def _off_loop(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class OffgridHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def state(self) -> ServerState:
        return self.settings["offgrid_state"]

    async def prepare(self) -> None:
        auth = self.request.headers.get("Authorization", "")
        scheme, _, presented = auth.partition(" ")
        if scheme.lower() == "bearer" and presented and self.state.key_matches(presented.strip()):
            if not self.check_host():
                raise web.HTTPError(403)
            self.current_user = self._jupyter_current_user = User(username="offgrid-api-key")
            self._key_authenticated = True
            return
        self._key_authenticated = False
        await super().prepare()

    def check_xsrf_cookie(self) -> None:
        if getattr(self, "_key_authenticated", False):  # a bearer key is not a cookie: no XSRF risk
            return None
        return super().check_xsrf_cookie()

    # -- responses -------------------------------------------------------------------
    def send(self, status: int, payload: Any = None) -> None:
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
        else:
            message, kind, code = "Internal server error (see the server log).", "InternalError", "internal"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"message": message, "type": kind, "code": code}}))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, OffgridError):  # a client's mistake or a busy engine: its own status, no traceback
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    # -- request bodies -----------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        raw = self.request.body or b""
        if len(raw) > self.state.max_body_bytes:
            raise ContentTooLargeError(f"The request body is {len(raw)} bytes; the limit is "
                                       f"{self.state.max_body_bytes} bytes.")
        try:
            data = json.loads(raw or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequestError(f"The request body is not valid JSON: {exc}.") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        return data

    @staticmethod
    def field(data: dict, name: str, kind, *, required: bool = False, default: Any = None) -> Any:
        value = data.get(name)
        if value is None:
            if required:
                raise InvalidRequestError(f"{name!r} is required.")
            return default
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "number"
            raise InvalidRequestError(f"{name!r} must be a {expected}, got {type(value).__name__}.")
        return value

    def params(self, data: dict) -> dict[str, Any]:
        return {name: self.field(data, name, kind) for name, kind in PARAMS.items() if name in data}

    def query_int(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise InvalidRequestError(f"{name} must be an integer, got {raw!r}.") from None
        if not low <= value <= high:
            raise InvalidRequestError(f"{name} must be between {low} and {high}, got {value}.")
        return value

    # -- server-sent events -----------------------------------------------------------------
    def start_events(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self._gone = False

    async def event(self, kind: str | None, data: Any) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        self.write((f"event: {kind}\n" if kind else "") + f"data: {text}\n\n")
        try:
            await self.flush()
        except StreamClosedError:
            self._gone = True

    def on_connection_close(self) -> None:
        self._gone = True
        turn = getattr(self, "_turn", None)
        if turn is not None:
            turn.cancel()  # a client that went away frees the engine (or its place in the queue)


def result_payload(r, model_sha256: str) -> dict[str, Any]:
    return {"text": r.text, "finish_reason": r.finish_reason, "model": r.model, "model_sha256": model_sha256,
            "request_id": r.request_id, "params": r.params, "usage": r.usage, "timings": r.timings,
            "queue_stats": r.queue_stats, "started_at": r.started_at}


def turn_payload(outcome: TurnResult) -> dict[str, Any]:
    return {"session_id": outcome.session_id, "session_name": outcome.session_name,
            "message": outcome.user_message.to_dict() if outcome.user_message else None,
            "response": outcome.reply.to_dict() if outcome.reply else None,
            **result_payload(outcome.result, outcome.model_sha256)}


class SessionsHandler(OffgridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        limit = self.query_int("limit", 50, 1, 1000)
        offset = self.query_int("offset", 0, 0, 10**9)
        sessions = self.state.store.list(limit=limit, offset=offset)
        self.send(200, {"sessions": [s.to_dict(messages=False) for s in sessions], "total": self.state.store.count(),
                        "limit": limit, "offset": offset})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        data = self.body()
        session = self.state.store.create(
            self.field(data, "name", str), system_prompt=self.field(data, "system_prompt", str),
            profile=self.field(data, "profile", str), metadata=self.field(data, "metadata", dict))
        self.send(201, session.to_dict())


class SessionHandler(OffgridHandler):
    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        self.send(200, self.state.store.get(ref).to_dict())

    @web.authenticated
    @authorized
    async def delete(self, ref: str) -> None:
        self.state.store.delete(ref)
        self.send(204)


class MessagesHandler(OffgridHandler):
    @web.authenticated
    @authorized
    async def post(self, ref: str) -> None:
        data = self.body()
        message = self.state.store.add_message(
            ref, self.field(data, "role", str, required=True), self.field(data, "content", str, required=True),
            metadata=self.field(data, "metadata", dict))
        self.send(201, message.to_dict())


class ChatHandler(OffgridHandler):
    """One atomic turn: the user message is stored, the reply generated, then stored."""

    @web.authenticated
    @authorized
    async def post(self, ref: str) -> None:
        data = self.body()
        content = self.field(data, "message", str, required=True)
        stream = self.field(data, "stream", bool, default=False)
        key = self.request.headers.get("Idempotency-Key")

        def start() -> ChatTurn:
            return ChatTurn(self.state.engine, self.state.store, ref, content, source="server",
                            params=self.params(data), metadata=self.field(data, "metadata", dict),
                            replace=self.field(data, "replace_message_id", str))

        # starting a turn may wait for the session's previous turn: off the event loop
        if stream:
            await self.state.once(key, lambda: self._stream(_off_loop(start)))
        else:
            self.send(200, await self.state.once(key, lambda: self._complete(_off_loop(start),
                                                                             cancel_on_close=not key)))

    async def _complete(self, starting, *, cancel_on_close: bool) -> dict[str, Any]:
        # with an idempotency key the turn finishes even if the client went away, so
        # that its retry gets the answer instead of a second turn
        turn = await starting
        self._turn = turn if cancel_on_close else None
        return turn_payload(await _off_loop(turn.finish))

    async def _stream(self, starting) -> None:
        turn = await starting
        self._turn = turn
        self.start_events()
        gen = turn.generation
        self.state.running[gen.request_id] = gen
        events = gen.events(poll_interval=2.0, repeat_queued=True)
        ident = {"request_id": gen.request_id, "session_id": turn.session_id}
        try:
            while not self._gone:
                item = await _off_loop(next, events, None)
                if item is None or item[0] == "complete":
                    break
                kind, payload = item
                await self.event(kind, {"position": payload, **ident} if kind == "queued" else
                                 {"delta": payload} if kind == "token" else {**(payload or {}), **ident})
            if self._gone:
                events.close()
            outcome = await _off_loop(turn.finish)
            await self.event("complete", turn_payload(outcome))
        except OffgridError as exc:
            turn.abort()
            await self.event("error", {"message": str(exc), "code": exc.code, "type": type(exc).__name__})
        finally:
            self.state.running.pop(gen.request_id, None)
        self.finish(set_content_type="text/event-stream")


class StatusHandler(OffgridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.send(200, self.state.engine.status())


class CancelHandler(OffgridHandler):
    """Stop a streamed generation by request id; its stream still ends with the kept turn."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        request_id = self.field(self.body(), "request_id", str, required=True)
        gen = self.state.running.get(request_id)
        if gen is None:
            raise InvalidRequestError(f"No streamed generation {request_id!r} is running.")
        gen.cancel()
        self.send(200, {"request_id": request_id, "cancelled": True})


class StatsHandler(OffgridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.send(200, await _off_loop(stats_document, self.state.engine, self.state.store))


class RequestsHandler(OffgridHandler):
    """The per-request rows behind ``client.stats_frame()`` (JSON columns)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        from ..stats import stats_frame

        args = {k: self.get_query_argument(k, None) for k in ("since", "until", "session", "model")}
        try:
            frame = await _off_loop(lambda: stats_frame(**args, store=self.state.store))
        except ValueError as exc:
            raise InvalidRequestError(f"Bad filter: {exc}.") from None
        data = json.loads(frame.to_json(orient="values", date_format="iso", date_unit="us"))
        self.send(200, {"columns": list(frame.columns), "data": data})


class ModelsHandler(OffgridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        engine = self.state.engine
        try:
            default = resolve_model(None)
            default_info = {"name": default.name, "path": str(default.path), "source": default.source,
                            "size_bytes": default.size_bytes}
        except OffgridError as exc:
            default_info = {"error": str(exc)}
        current = engine.describe()
        data = [{"id": current["name"], "object": "model", "owned_by": "offgrid"}] if "name" in current else []
        self.send(200, {"current": current, "default": default_info, "object": "list", "data": data})


class HealthHandler(OffgridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.send(200, {"status": "ok", "version": __version__, "model_loaded": self.state.engine.loaded})


class OpenAPIHandler(OffgridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        doc = json.loads(files(__package__).joinpath("openapi.json").read_text())
        doc["servers"] = [{"url": self.base_url.rstrip("/") + "/offgrid/v1"}]
        self.send(200, doc)


class MetricsHandler(OffgridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.finish(self.state.request_log.metrics(), set_content_type=CONTENT_TYPE_LATEST)


class OpenAIChatHandler(OffgridHandler):
    """``POST chat/completions`` in OpenAI's shape, on the same shared model (stateless)."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        data = self.body()
        messages = self.field(data, "messages", list, required=True)
        stream = self.field(data, "stream", bool, default=False)
        params = self.params(data)
        if "max_completion_tokens" in data:
            params["max_tokens"] = self.field(data, "max_completion_tokens", int)
        system = self.field(data, "system_prompt", str)  # offgrid extension: a one-shot cell's --system
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        gen = self.state.engine.generate(messages, source="openai", **params)
        self._turn = gen
        self.state.running[gen.request_id] = gen
        created = int(time.time())
        ident = "chatcmpl-" + gen.request_id.removeprefix("req-")
        model = gen.model.name
        if not stream:
            try:
                result = await _off_loop(gen.wait)
            finally:
                self.state.running.pop(gen.request_id, None)
            self.send(200, {"id": ident, "object": "chat.completion", "created": created, "model": model,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                         "finish_reason": _openai_finish(result.finish_reason)}],
                            "usage": _openai_usage(result.usage)})
            return
        self.start_events()

        def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

        await self.event(None, chunk({"role": "assistant", "content": ""}))
        events = gen.events(poll_interval=2.0)
        try:
            while not self._gone:
                item = await _off_loop(next, events, None)
                if item is None:
                    break
                kind, payload = item
                if kind == "token":
                    await self.event(None, chunk({"content": payload}))
                elif kind == "complete":
                    await self.event(None, chunk({}, _openai_finish(payload.finish_reason)))
                    # OpenAI's usage chunk, plus our full result under a key OpenAI clients ignore
                    await self.event(None, {**chunk({}), "choices": [], "usage": _openai_usage(payload.usage),
                                            "offgrid": result_payload(payload, gen.model.sha256())})
                    break
            if self._gone:
                events.close()
        except OffgridError as exc:
            await self.event(None, {"error": {"message": str(exc), "type": type(exc).__name__, "code": exc.code}})
        finally:
            self.state.running.pop(gen.request_id, None)
        await self.event(None, "[DONE]")
        self.finish(set_content_type="text/event-stream")

    def on_connection_close(self) -> None:
        self._gone = True
        gen = getattr(self, "_turn", None)
        if gen is not None:
            gen.cancel()


def _openai_finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _openai_usage(usage: dict) -> dict:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}


SESSION = r"(?P<ref>[^/]+)"


def handlers() -> list[tuple[str, type]]:
    v1 = "/offgrid/v1"
    return [
        (f"{v1}/sessions", SessionsHandler),
        (f"{v1}/sessions/{SESSION}", SessionHandler),
        (f"{v1}/sessions/{SESSION}/messages", MessagesHandler),
        (f"{v1}/sessions/{SESSION}/chat", ChatHandler),
        (f"{v1}/generation/status", StatusHandler),
        (f"{v1}/generation/cancel", CancelHandler),
        (f"{v1}/stats", StatsHandler),
        (f"{v1}/stats/requests", RequestsHandler),
        (f"{v1}/models", ModelsHandler),
        (f"{v1}/health", HealthHandler),
        (f"{v1}/chat/completions", OpenAIChatHandler),
        (f"{v1}/openapi.json", OpenAPIHandler),
        ("/offgrid/metrics", MetricsHandler),
    ]

