"""Generation on an OpenAI-compatible inference server instead of in this process.

When a team outgrows one CPU it already runs an inference server (llama.cpp's
server, vLLM, Ollama, LM Studio, a LiteLLM proxy). :class:`OpenAIEngine` keeps the
:class:`~offgrid_jupyter.backend.Backend` contract on top of one, so sessions,
the queue's statistics, the usage log, the magics, the panel and the server's
routes work unchanged; the scaling is the engine's. ``llama_cpp`` is never
imported on this path and no GGUF is read.

- Streaming ``/chat/completions`` (Server-Sent Events read with ``httpx-sse``).
  A cancel closes the stream, which is how these servers learn to stop.
- The engine batches by itself, so ``slots`` (``max_concurrent``, default 4)
  requests run at once and the rest wait in the same FIFO queue as local ones,
  with the same bound, timeout and statistics.
- Usage comes from the engine when it reports it (``stream_options.include_usage``);
  otherwise completion tokens are the stream's content chunks and prompt tokens
  are 0. Time to first token and decode speed are measured here.
- Failures name the URL (never the key): unreachable, refused key, a malformed
  or truncated stream are :class:`~offgrid_jupyter.errors.EngineUnavailableError`
  (502); a request the engine refuses is a 400 (or 413 when it says the context
  is too long). Only what is safe to repeat is retried (tenacity): listing models,
  a connection that was never made, and a 429/503 (after its ``Retry-After``).
- Nothing a caller does waits on the engine's network for long: :meth:`describe` answers from
  what is known (the model list is asked for in the background), a cancel shuts the stream's
  socket at once (a blocked read would otherwise wait for its timeout), and a stream that sends
  nothing (keep-alive comments included) for ``read_timeout`` seconds ends its turn with an
  error naming the engine.
- The engine's own words are relayed (a refused request says why), with the configured API
  key and the URL's credentials taken out: an engine, or a proxy before it, that echoes request
  headers would otherwise put the key in our errors.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
from httpx_sse import EventSource
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .backend import QueueBackend
from .completion import CompletionRequest, cache_key
from .generation import Generation, GenerationParams
from ..errors import (
    ContextOverflowError,
    EngineBusyError,
    EngineUnavailableError,
    InvalidRequestError,
    OffgridError,
)
from .structured import openai_form
from .toolcalls import new_call_id

log = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENT = 4
DEFAULT_READ_TIMEOUT = 300.0  # seconds a stream may stay silent (a long prompt on a CPU engine sends nothing)
LIST_TIMEOUT = httpx.Timeout(10.0, connect=5.0)  # /models: a list, never a long computation
DESCRIBE_WAIT = 0.5  # seconds describe() gives an unknown engine to answer (a refused connection takes ms)
ABANDON_AFTER = 0.5  # a cancelled request whose read cannot be interrupted is let go after this (seconds)
MAX_RETRY_AFTER_S = 30.0  # a longer Retry-After is answered with an error, not a wait
BUSY_RETRIES = 3
MAX_COMPLETIONS = 8  # inline completions running at once (one per file: a keystroke replaces its file's)
FINISH_REASONS = {"stop", "length"}  # ("tool_calls": a stop whose reply is a call)


@dataclass(frozen=True)
class EngineModel:
    """A model the engine serves, known by its name only (the weights are the engine's)."""

    name: str
    url: str
    size_bytes: int = 0

    def sha256(self) -> str:
        return ""  # unknown: the file is on the engine's side


def public_url(url: str) -> str:
    """*url* without credentials (what messages and statistics may show)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def api_base(url: str) -> str:
    """The OpenAI base URL: as given, with ``/v1`` added when the URL has no path."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(f"The engine URL {public_url(url)!r} is not an http(s) URL "
                                  "(e.g. http://127.0.0.1:8000/v1).")
    return url if parts.path not in ("", "/") else url + "/v1"


class _Busy(Exception):
    """A 429/503 from the engine: nothing was done, try again after *delay* seconds."""

    def __init__(self, status: int, delay: float, message: str):
        super().__init__(message)
        self.status, self.delay = status, delay


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return 1.0


def _engine_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:300]
    if isinstance(data, dict) and data.get("detail"):
        return str(data["detail"])[:300]
    return json.dumps(data)[:300]


class _Open:
    """A request's open stream: its response (whose socket a cancel shuts) and when data last came."""

    __slots__ = ("response", "last", "silent")

    def __init__(self, response: httpx.Response):
        self.response, self.last, self.silent = response, time.monotonic(), False

    def shut(self) -> None:
        """Wake the thread blocked reading this stream: shut its socket (closing the response from
        another thread would not interrupt the read)."""
        stream = self.response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
            else:
                self.response.close()
        except (OSError, RuntimeError):  # already closed
            pass


class OpenAIEngine(QueueBackend):
    """The :class:`~offgrid_jupyter.backend.Backend` of an OpenAI-compatible server."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 queue_timeout: float = 1800.0, max_queue: int = 64, defaults: GenerationParams | None = None,
                 send_session: bool = False, completion_model: str | None = None):
        super().__init__(queue_timeout=queue_timeout, max_queue=max_queue, defaults=defaults)
        if not isinstance(max_concurrent, int) or not 1 <= max_concurrent <= 256:
            raise InvalidRequestError(f"max_concurrent must be an integer from 1 to 256, got {max_concurrent!r}.")
        if isinstance(read_timeout, bool) or not isinstance(read_timeout, (int, float)) or not 0 < read_timeout <= 86400:
            raise InvalidRequestError(f"read_timeout must be a number of seconds from 0 to 86400, got {read_timeout!r}.")
        self.url = api_base(url)
        self.public_url = public_url(self.url)
        self.read_timeout = float(read_timeout)
        parts = urlsplit(self.url)
        self._secrets = sorted({s for value in (api_key, parts.username, parts.password) if value
                                for s in (value, unquote(value), quote(value, safe="")) if len(s) >= 3},
                               key=len, reverse=True)
        self.schema_style = "json_schema"  # how structured output is asked for (see _other_schema_style)
        self.slots = max_concurrent
        self.model_name = model or None
        self.send_session = send_session  # offgrid's own route takes "session_id" (its KV cache and statistics)
        self.completion_model = completion_model or None  # inline completions' model (default: the chat model's)
        self._suffix = True  # send inline completions' "suffix" (dropped once if the engine refuses it)
        self._completing: dict[str, Generation] = {}  # cache key -> the inline completion running for that file
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.url + "/", headers=headers,
            timeout=httpx.Timeout(self.read_timeout, connect=5.0),
            limits=httpx.Limits(max_connections=max_concurrent + 4, max_keepalive_connections=max_concurrent + 4),
            trust_env=False)  # a proxy from the environment must not reroute a local engine
        self._streams: dict[str, _Open] = {}  # request id -> its open stream (shut to cancel)
        self._streams_lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._reached = False
        self._listing: threading.Thread | None = None  # describe()'s background look at /models
        self._list_error: str | None = None

    # -- the backend contract -------------------------------------------------------------
    @property
    def model(self) -> EngineModel:
        """The model requests go to: the configured one, else the first the engine lists (asked for
        once, on the caller's thread: a server asks from its prepare pool, never its event loop)."""
        if self.model_name is None:
            listed = self.models()
            if not listed:
                raise EngineUnavailableError(f"The engine at {self.public_url} lists no models; "
                                             "set the model name (OFFGRID_ENGINE_MODEL or c.OffgridApp.engine_model).")
            self.model_name = listed[0]["id"]
        return EngineModel(self.model_name, self.public_url)

    def redact(self, text: str) -> str:
        """*text* without the API key or the URL's credentials (before anything is relayed or logged)."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    @property
    def loaded(self) -> bool:
        """True once the engine has answered (it holds the model, not us)."""
        return self._reached

    def _resolve(self, model: str) -> EngineModel:
        names = [m["id"] for m in self.models()]
        if str(model) not in names:
            raise InvalidRequestError(f"The engine at {self.public_url} has no model {str(model)[:80]!r}; "
                                      f"it serves: {', '.join(names) or 'nothing'}.")
        return EngineModel(str(model), self.public_url)

    def models(self, retries: int = 3) -> list[dict[str, Any]]:
        """The engine's ``/models`` (retried: listing is safe to repeat; each try at most 10 s)."""
        response = self._call(lambda: self._http.get("models", timeout=LIST_TIMEOUT), retries=retries)
        data = response.json().get("data") if response.headers.get("content-type", "").startswith(
            "application/json") else None
        if not isinstance(data, list):
            raise EngineUnavailableError(f"The engine at {self.public_url} answered /models with something that is "
                                         "not an OpenAI model list. Is the URL the API's base (…/v1)?")
        return [{"id": str(m.get("id")), "owned_by": m.get("owned_by", "engine")} for m in data if isinstance(m, dict)]

    def describe(self) -> dict[str, Any]:
        """What is known of the engine, at once: status routes and the stats document call this, and
        must not wait on an engine that hangs. An unknown model name is asked for in the background."""
        base = {"kind": "openai", "url": self.public_url, "max_concurrent": self.slots,
                "read_timeout": self.read_timeout}
        if self.model_name is None:
            self._list_soon().join(DESCRIBE_WAIT)  # a refused connection is known at once; a hang is not waited for
        if self.model_name is None:
            reason = self._list_error or (f"The engine at {self.public_url} has not answered yet (its model list "
                                          "is being asked for).")
            return {**base, "loaded": False, "error": reason}
        return {**base, "name": self.model_name, "path": self.public_url, "source": "engine", "size_bytes": 0,
                "loaded": self._reached}

    def _list_soon(self) -> threading.Thread:
        """A background look at ``/models`` (one at a time) that sets the model name, or the reason."""
        if self._listing is not None and self._listing.is_alive():
            return self._listing

        def look() -> None:
            try:
                listed = self.models(retries=1)
                if not listed:
                    raise EngineUnavailableError(f"The engine at {self.public_url} lists no models; set the model "
                                                 "name (OFFGRID_ENGINE_MODEL or c.OffgridApp.engine_model).")
                self.model_name = self.model_name or listed[0]["id"]
                self._list_error = None
            except OffgridError as exc:
                self._list_error = str(exc)

        self._listing = threading.Thread(target=look, name="offgrid-engine-models", daemon=True)
        self._listing.start()
        return self._listing

    def switch_model(self, name: str | None) -> EngineModel:
        """Use the engine's model *name* from the next request on (None: the engine's first)."""
        info = self._resolve(name) if name else None
        self.model_name = info.name if info else None
        return info or self.model

    def close(self) -> None:
        super().close()
        self._http.close()

    # -- inline completions ------------------------------------------------------------------
    def complete_inline(self, request: CompletionRequest) -> Generation:
        """An inline completion on the engine's ``/completions`` (with ``suffix``, which code models
        behind vLLM or llama.cpp use for fill-in-the-middle), started at once on a thread of its
        own: it never waits in the chats' queue (the engine batches it with them). A newer request
        for the same file cancels the previous one."""
        request.check()
        name = self.completion_model or self.model.name
        params = self.params(max_tokens=request.max_tokens, temperature=0.0, seed=0)
        gen = Generation(self, [], None, params, "completion", EngineModel(name, self.public_url))
        gen.completion, gen.cache_key = request, cache_key(request.path)
        with self._cv:
            if self._closed:
                raise OffgridError("The engine has been closed.")
            previous = self._completing.get(gen.cache_key)
            if len(self._completing) >= MAX_COMPLETIONS and previous is None:
                raise EngineBusyError(f"{MAX_COMPLETIONS} inline completions are running already; try again shortly.")
            self._completing[gen.cache_key] = gen
            gen.started_mono, gen.state = time.monotonic(), "running"
            self._running.append(gen)
        if previous is not None:
            previous.cancel()
        threading.Thread(target=self._complete_now, args=(gen,), name="offgrid-completion", daemon=True).start()
        return gen

    def _complete_now(self, gen: Generation) -> None:
        try:
            self._execute(gen)
        except BaseException:  # never let it die silently
            log.exception("offgrid engine: an inline completion failed unexpectedly")
        finally:
            with self._cv:
                if gen in self._running:
                    self._running.remove(gen)
                if self._completing.get(gen.cache_key) is gen:
                    del self._completing[gen.cache_key]

    def _body(self, gen: Generation) -> tuple[str, dict[str, Any]]:
        """The route and body a request is sent with: a chat, or an inline completion."""
        p = gen.params
        if gen.completion is not None:
            request = gen.completion
            body = {"model": gen.model.name, "prompt": request.text_before(), "stream": True,
                    "stream_options": {"include_usage": True}, "max_tokens": p.max_tokens, "temperature": 0.0, "stop": request.stops()}
            if self._suffix and request.suffix.strip():
                body["suffix"] = request.suffix
            return "completions", body
        body = {"model": gen.model.name, "messages": gen.messages, "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": p.max_tokens,
                "temperature": p.temperature, "top_p": p.top_p}
        if p.seed is not None:
            body["seed"] = p.seed
        if self.send_session and gen.session_id:
            body["session_id"] = gen.session_id
        if p.response_format is not None:
            body["response_format"] = openai_form(p.response_format, self.schema_style)
        if p.tools:  # the engine's own tool calling (its chat template and its constraint)
            body["tools"], body["tool_choice"] = p.tools, p.tool_choice
        return "chat/completions", body

    # -- one request -----------------------------------------------------------------
    def _interrupt(self, gen: Generation) -> None:
        """A cancel: shut the stream's socket, so the worker's read returns now and the engine sees
        the disconnect (and stops). Before the engine has answered there is no stream to shut: if
        the worker has not ended the request shortly, it is ended here and the worker let go (it
        ends at its read timeout, and what it then finds is dropped)."""
        with self._streams_lock:
            stream = self._streams.get(gen.request_id)
        if stream is not None:
            stream.shut()
            return
        timer = threading.Timer(ABANDON_AFTER, self._abandon, args=(gen,))
        timer.daemon = True
        timer.start()

    def _abandon(self, gen: Generation) -> None:
        if gen.state == "done":
            return
        start = gen.started_mono or time.monotonic()
        result = self._result(gen, "", "cancelled", (start - gen.submitted_mono) * 1000, prompt=0, cached=0,
                              completion=0, ttft=None, total_ms=(time.monotonic() - start) * 1000, error=None)
        self._finish_once(gen, result, None)

    def _finish_once(self, gen: Generation, result: Any, error: BaseException | None) -> None:
        """Resolve *gen* unless a cancel already did (see :meth:`_interrupt`)."""
        with self._streams_lock:
            if gen.state == "done":
                return
            gen.state = "done"
        self._finish(gen, result, error)

    def _watch(self) -> None:
        """Shut the streams that sent no data for ``read_timeout`` seconds (an engine that sends only
        keep-alive comments resets the HTTP client's own read timeout, never this one)."""
        tick = min(1.0, self.read_timeout / 4)
        while True:
            time.sleep(tick)
            now = time.monotonic()
            with self._streams_lock:
                if not self._streams:
                    self._watchdog = None
                    return
                silent = [s for s in self._streams.values() if not s.silent and now - s.last > self.read_timeout]
                for s in silent:
                    s.silent = True
            for s in silent:
                s.shut()

    def _execute(self, gen: Generation) -> None:
        start = gen.started_mono
        wait_ms = (start - gen.submitted_mono) * 1000
        gen._emit("start")
        route, body = self._body(gen)
        calls: dict[int, dict[str, Any]] = {}  # a streamed tool call arrives in pieces, by index
        parts: list[str] = []
        usage: dict[str, Any] = {}
        finish: str | None = None
        ttft: float | None = None
        error: BaseException | None = None
        opened: _Open | None = None
        try:
            dropped = False  # an inline completion's suffix was dropped and it was asked again
            while True:  # (once more for an inline completion, without its suffix: see below)
                with closing(self._open(gen, body, route)) as response:
                    with self._streams_lock:
                        opened = self._streams.get(gen.request_id)
                    for event in EventSource(response).iter_sse():
                        if opened is not None:
                            opened.last = time.monotonic()
                        if gen.cancelled:
                            break
                        if event.data.strip() == "[DONE]":
                            break
                        chunk = self._parse(event.data)
                        usage = chunk.get("usage") or usage
                        for choice in chunk.get("choices") or ():
                            delta = (((choice.get("delta") or {}).get("content") if gen.completion is None
                                      else choice.get("text")) if isinstance(choice, dict) else None)
                            pieces = (choice.get("delta") or {}).get("tool_calls") if isinstance(choice, dict) else None
                            if pieces:
                                if ttft is None:
                                    ttft = time.monotonic()
                                self._take_calls(calls, pieces)
                            if isinstance(delta, str) and delta:
                                if ttft is None:
                                    ttft = time.monotonic()
                                parts.append(delta)
                                gen._emit("token", delta)
                            if isinstance(choice, dict) and choice.get("finish_reason"):
                                finish = str(choice["finish_reason"])
                if (gen.completion is not None and "suffix" in body and not parts and finish == "stop"
                        and not gen.cancelled):  # nothing at all with a suffix: was it the suffix?
                    self._suffix = False  # (llama-cpp-python's server answers nothing for a model without FIM)
                    body = {k: v for k, v in body.items() if k != "suffix"}
                    finish, usage, dropped = None, {}, True
                    continue
                if dropped and not parts:
                    self._suffix = True  # nothing without it either: the suffix was not the reason
                break
            if gen.cancelled:
                finish = "cancelled"
            elif opened is not None and opened.silent:
                raise self._silence()
            elif finish is None:
                raise EngineUnavailableError(
                    f"The stream from the engine at {self.public_url} ended before the reply did (no finish_reason): "
                    "the engine stopped, the connection broke, or the engine cut it for another request "
                    "(llama-cpp-python's server does unless started with --interrupt_requests False; or set "
                    "engine_max_concurrent to 1). Nothing was stored; try again.")
        except Exception as exc:  # noqa: BLE001 - reported to the caller; the backend survives
            if gen.cancelled:
                finish = "cancelled"
            elif opened is not None and opened.silent:
                error, finish = self._silence(), "error"
            else:
                error, finish = self._explain(exc), "error"
        finally:
            with self._streams_lock:
                self._streams.pop(gen.request_id, None)
        if gen.state == "done":  # a cancel ended it while the engine had not answered (see _interrupt)
            return
        tool_calls = []
        if calls and error is None and finish != "cancelled":
            try:
                tool_calls = self._finish_calls(calls)
            except EngineUnavailableError as exc:
                error, finish = exc, "error"
        now = time.monotonic()
        completion = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else len(parts)
        prompt = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        result = self._result(gen, "".join(parts), finish if finish in FINISH_REASONS | {"cancelled", "error"}
                              else "stop", wait_ms, prompt=prompt, cached=cached if isinstance(cached, int) else 0,
                              completion=completion, ttft=None if ttft is None else (ttft - start) * 1000,
                              total_ms=(now - start) * 1000, error=type(error).__name__ if error else None,
                              decode_s=(now - ttft) if ttft else 0.0)
        result.tool_calls = tool_calls
        self._finish_once(gen, result, error)

    def _silence(self) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"The engine at {self.public_url} sent nothing for {self.read_timeout:g} s (the read timeout, "
            "c.OffgridApp.engine_read_timeout / OFFGRID_ENGINE_READ_TIMEOUT), so the reply was abandoned. "
            "Nothing was stored; check the engine.")

    @staticmethod
    def _take_calls(calls: dict[int, dict[str, Any]], pieces: Any) -> None:
        for n, piece in enumerate(pieces if isinstance(pieces, list) else ()):
            if not isinstance(piece, dict):
                continue
            index = piece.get("index") if isinstance(piece.get("index"), int) else n
            call = calls.setdefault(index, {"id": None, "name": "", "arguments": ""})
            call["id"] = piece.get("id") or call["id"]
            fn = piece.get("function") if isinstance(piece.get("function"), dict) else {}
            if isinstance(fn.get("name"), str) and fn["name"]:  # sent once (OpenAI), or whole in every piece
                call["name"] = fn["name"]
            args = fn.get("arguments")
            call["arguments"] += args if isinstance(args, str) else json.dumps(args) if args is not None else ""

    def _finish_calls(self, calls: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """The streamed calls as ``{id, name, arguments}``; a call that is not JSON ends the turn."""
        out = []
        for index in sorted(calls):
            call = calls[index]
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                raise EngineUnavailableError(f"The engine at {self.public_url} sent a tool call whose arguments are "
                                             f"not JSON ({call['arguments'][:80]!r}). Nothing was stored.") from None
            if not call["name"] or not isinstance(arguments, dict):
                raise EngineUnavailableError(f"The engine at {self.public_url} sent a malformed tool call.")
            out.append({"id": call["id"] or new_call_id(), "name": call["name"], "arguments": arguments})
        return out

    def _open(self, gen: Generation, body: dict[str, Any], route: str = "chat/completions"):
        """The open response of a streamed chat: a connection never made is retried, a
        429/503 is retried after its Retry-After (the engine did nothing), anything
        else that is not a 200 is an error."""
        def send() -> httpx.Response:
            nonlocal body
            request = self._http.build_request("POST", route, json=body)
            response = self._http.send(request, stream=True)
            if response.status_code == 200:
                return response
            try:
                response.read()
            finally:
                response.close()
            if self._other_schema_style(body, response):  # refused, not run: safe to send again
                body = {**body, "response_format": openai_form(gen.params.response_format, self.schema_style)}
                return send()
            if "suffix" in body and response.status_code in (400, 422) \
                    and "suffix" in _engine_message(response).lower():  # an engine without fill-in-the-middle
                self._suffix = False
                body = {k: v for k, v in body.items() if k != "suffix"}
                return send()
            self._raise_for(response)
            raise AssertionError("unreachable")  # pragma: no cover

        response = self._call(send, retries=BUSY_RETRIES, cancel=gen._cancel)
        opened = _Open(response)
        with self._streams_lock:
            self._streams[gen.request_id] = opened
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="offgrid-engine-watchdog", daemon=True)
                self._watchdog.start()
        if gen.cancelled:
            opened.shut()
        return response

    def _call(self, fn, *, retries: int, cancel: threading.Event | None = None) -> httpx.Response:
        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, _Busy))

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _Busy):
                return exc.delay
            return wait_exponential(multiplier=0.2, max=2.0)(state)

        stop_event = cancel or threading.Event()
        try:
            for attempt in Retrying(retry=retry_if_exception(retryable), stop=stop_after_attempt(retries),
                                    wait=wait, sleep=lambda s: stop_event.wait(s), reraise=True):
                with attempt:
                    if stop_event.is_set():
                        raise OffgridError("cancelled")
                    response = fn()
                    self._reached = True
                    return response
        except Exception as exc:
            raise self._explain(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _other_schema_style(self, body: dict[str, Any], response: httpx.Response) -> bool:
        """An engine that refused OpenAI's ``json_schema`` form (llama-cpp-python's server takes
        ``json_object`` with a ``schema``): switch this backend to the other form, once."""
        sent = (body.get("response_format") or {}).get("type")
        message = self.redact(_engine_message(response)).lower()
        if (response.status_code in (400, 422, 500) and sent == "json_schema"  # that server says it with a 500 and self.schema_style == "json_schema"
                and ("response_format" in message or "json_schema" in message)):
            self.schema_style = "json_object"
            return True
        return False

    def _raise_for(self, response: httpx.Response) -> None:
        status, message = response.status_code, self.redact(_engine_message(response))
        if status in (429, 503):
            delay = _retry_after(response)
            busy = _Busy(status, delay, f"The engine at {self.public_url} is busy ({status}: {message}).")
            if delay > MAX_RETRY_AFTER_S:
                raise EngineBusyError(f"{busy} It asks to wait {delay:.0f} s; try again later.")
            raise busy
        if status in (401, 403):
            raise EngineUnavailableError(f"The engine at {self.public_url} refused the API key ({status}). Set "
                                         "OFFGRID_ENGINE_API_KEY or c.OffgridApp.engine_api_key.")
        if status == 400 or status == 422:
            if "context" in message.lower() and ("length" in message.lower() or "exceed" in message.lower()):
                raise ContextOverflowError(f"The engine at {self.public_url} says the prompt is too long: {message}")
            raise InvalidRequestError(f"The engine at {self.public_url} refused the request: {message}")
        if status == 404:
            raise EngineUnavailableError(f"The engine at {self.public_url} answered 404 ({message}). Check the model "
                                         "name and that the URL is the API's base (…/v1).")
        raise EngineUnavailableError(f"The engine at {self.public_url} failed ({status}: {message}).")

    def _parse(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise EngineUnavailableError(f"The engine at {self.public_url} sent a malformed stream event "
                                         f"({self.redact(data[:80])!r}). Nothing was stored.") from None
        if not isinstance(chunk, dict):
            raise EngineUnavailableError(f"The engine at {self.public_url} sent a stream event that is not an "
                                         "object. Nothing was stored.")
        if chunk.get("error"):
            error = chunk["error"]
            said = str(error.get("message") if isinstance(error, dict) else error)[:300]
            raise EngineUnavailableError(f"The engine at {self.public_url} failed mid-reply: {self.redact(said)}")
        return chunk

    def _explain(self, exc: BaseException) -> OffgridError:
        """*exc* as an error a person can act on, naming the engine's URL (never its key)."""
        if isinstance(exc, _Busy):
            return EngineBusyError(f"{exc} It still was after {BUSY_RETRIES} tries; try again later.")
        if isinstance(exc, OffgridError):
            return type(exc)(self.redact(str(exc))) if self._secrets and any(
                s in str(exc) for s in self._secrets) else exc
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return EngineUnavailableError(f"The engine at {self.public_url} is not reachable ({type(exc).__name__}). "
                                          "Is it running? (OFFGRID_ENGINE_URL / c.OffgridApp.engine_url)")
        if isinstance(exc, httpx.ReadTimeout):  # (the watchdog's own message, whichever fired first)
            return self._silence()
        if isinstance(exc, httpx.TimeoutException):
            return EngineUnavailableError(f"The engine at {self.public_url} stopped answering "
                                          f"({type(exc).__name__}). Nothing was stored.")
        if isinstance(exc, (httpx.HTTPError, httpx.StreamError)):
            return EngineUnavailableError(f"The connection to the engine at {self.public_url} broke "
                                          f"({type(exc).__name__}). Nothing was stored; try again.")
        return EngineUnavailableError(f"The engine at {self.public_url} failed: {type(exc).__name__}: "
                                      f"{self.redact(str(exc))[:300]}")
