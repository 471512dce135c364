"""The generating routes: ``sessions/{ref}/chat``, ``chat/completions`` and ``generation/cancel``.

Nothing here holds a thread while it waits. A turn waits for its session on a
future, for the engine on the engine's wake-ups (:meth:`Generation.aevents`),
and only its short store calls go to the extension's thread pool. So a crowd of
requests on one session cannot starve the pool that stores the reply the crowd
is waiting for (the deadlock this replaced), and ``/stats`` or ``/health``
answer at once throughout.

A chat runs as a :class:`SharedTurn`, not inside the request that started it:
a retry with the same ``Idempotency-Key`` (same session, same body) joins it, as
Server-Sent Events replayed from the start and then live, or as the final JSON,
whichever form the retry asks for. A turn is cancelled when the last request
that wants it goes away (so a client that disconnects cancels its turn, or its
place in a queue, unless a retry is waiting for the answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from tornado import web
from jupyter_server.auth.decorator import authorized

from ..errors import GenerationNotFoundError, IdempotencyConflictError, InvalidRequestError, OffgridError
from ..inference.toolcalls import openai_call
from ..chat import turns
from ..chat.edits import Task, parse
from ..chat.turns import ChatTurn, TurnResult
from .base import OffgridHandler
from .state import ServerState

WAITING_AFTER = 0.3  # s a streamed turn may take to begin before the client is told it waits
WAITING_EVERY = 5.0  # s between the `waiting` events after that
PARAMS = ("max_tokens", "temperature", "seed", "top_p", "top_k", "repeat_penalty", "response_format")
KEY_CHARS = set(map(chr, range(0x21, 0x7F)))


def result_payload(r, model_sha256: str) -> dict[str, Any]:
    out = {"text": r.text, "finish_reason": r.finish_reason, "model": r.model, "model_sha256": model_sha256,
           "request_id": r.request_id, "params": r.params, "usage": r.usage, "timings": r.timings,
           "queue_stats": r.queue_stats, "started_at": r.started_at}
    if r.tool_calls:  # a turn that called tools: seed 002's shapes, and how many rounds it took
        out.update(tool_calls=r.tool_calls, tool_results=r.tool_results, rounds=r.rounds, note=r.note)
    return out


def turn_payload(outcome: TurnResult) -> dict[str, Any]:
    return {"session_id": outcome.session_id, "session_name": outcome.session_name,
            "message": outcome.user_message.to_dict() if outcome.user_message else None,
            "response": outcome.reply.to_dict() if outcome.reply else None,
            **result_payload(outcome.result, outcome.model_sha256),
            **({"sources": outcome.sources} if outcome.sources else {})}


def _retrieved(fut: asyncio.Future) -> None:
    if fut.done() and not fut.cancelled():
        fut.exception()  # an error nobody awaited is not "never retrieved"


class SharedTurn:
    """One server-side turn, shared by every request that wants it (see the module docstring)."""

    def __init__(self, turn: ChatTurn, state: ServerState, fingerprint: str, scope: tuple | None,
                 shape: Any = None):
        loop = asyncio.get_running_loop()
        self.turn, self.state, self.fingerprint, self.scope = turn, state, fingerprint, scope
        self.shape = shape  # what the complete payload gains (a proposal), made on the store's threads
        self.log: list[tuple[str, Any]] = []  # the events so far; compacted once the turn is over
        self.started: asyncio.Future = loop.create_future()  # {request_id, session_id}, or the error
        self.result: asyncio.Future = loop.create_future()  # the turn payload, or the error
        self._tick: asyncio.Future = loop.create_future()  # resolved at every new event
        self.interested = 0
        self.task: asyncio.Task | None = None

    @property
    def finished(self) -> bool:
        return self.result.done()

    def begin(self, run, prepare) -> None:
        self.task = asyncio.ensure_future(self._pump(run, prepare))

    def want(self) -> None:
        self.interested += 1

    def unwant(self) -> None:
        self.interested -= 1
        if self.interested <= 0 and not self.finished:
            self.turn.cancel()

    def cancel(self) -> None:
        self.turn.cancel()

    def _append(self, kind: str, data: Any) -> None:
        self.log.append((kind, data))
        tick, self._tick = self._tick, asyncio.get_running_loop().create_future()
        tick.set_result(None)

    async def follow(self) -> AsyncIterator[tuple[str, Any]]:
        """Every event of the turn: those so far, then the rest as they come."""
        log, i = self.log, 0
        while True:
            while i < len(log):
                yield log[i]
                i += 1
            if self.finished:
                return
            await asyncio.shield(self._tick)

    async def _pump(self, run, prepare) -> None:
        turn = self.turn
        ident: dict[str, Any] = {}
        try:
            await turn.start_async(run, prepare)
            gen = turn.generation
            ident = {"request_id": gen.request_id, "session_id": turn.session_id}
            self.state.running[gen.request_id] = self
            if turn.session_id is not None:
                self.state.session_turns[turn.session_id] = self  # (GET sessions/{ref}/turn follows it)
            self.started.set_result(ident)
            async with aclosing(gen.aevents(poll_interval=2.0, repeat_queued=True)) as events:
                async for kind, payload in events:
                    if kind == "complete":
                        break
                    self._append(kind, {"position": payload, **ident} if kind == "queued" else
                                 {"delta": payload} if kind == "token" else {**(payload or {}), **ident})
            payload = turn_payload(await turn.finish_async(run))
            if self.shape is not None:
                payload = await run(self.shape, payload)
        except BaseException as exc:  # noqa: BLE001 - every request waiting on this turn gets the error
            if turn.generation is not None:
                await run(turn.abort)
            error = exc if isinstance(exc, OffgridError) else OffgridError(f"The turn failed: {exc!r}")
            for fut in (self.started, self.result):
                if not fut.done():
                    fut.set_exception(error)
                    _retrieved(fut)
            self._append("error", {"message": str(error), "type": type(error).__name__, "code": error.code})
            if self.scope is not None:  # nothing was stored: a retry runs again
                self.state.forget(self.scope, self)
            if not isinstance(exc, Exception):
                raise
        else:
            self._append("complete", payload)
            self.result.set_result(payload)
            rounds = [e for e in self.log if e[0] in ("round_start", "tool_start", "tool_end")]  # a replay shows them
            self.log = [("start", ident), *rounds, ("token", {"delta": payload["text"]}), ("complete", payload)]
        finally:
            self.state.running.pop(ident.get("request_id"), None)
            if self.state.session_turns.get(ident.get("session_id")) is self:
                del self.state.session_turns[ident["session_id"]]


class ChatHandler(OffgridHandler):
    """One atomic turn: the question is stored, the reply generated, then stored."""

    spec_path = "/sessions/{ref}/chat"

    @web.authenticated
    @authorized
    async def post(self, ref: str) -> None:
        data = await self.body()
        stream = data.pop("stream", False)
        key = self._idempotency_key()
        session = await self.run(lambda: self.state.store.get(ref, messages=False))  # 404 before anything else
        fingerprint = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        scope = (self.kind, session.id, key)
        shared = self.state.keyed.get(scope) if key else None
        if shared is not None and shared.fingerprint != fingerprint:
            raise IdempotencyConflictError(f"Idempotency-Key {key!r} was already used for a different request on "
                                           "this session. Use a new key for a new request.")
        if shared is None:
            turn = await self.slow(lambda: self.new_turn(session.id, data))  # (checks a schema's grammar)
            shared = self.state.keyed.get(scope) if key else None  # (a retry may have begun it meanwhile)
            if shared is not None and shared.fingerprint != fingerprint:
                raise IdempotencyConflictError(f"Idempotency-Key {key!r} was already used for a different request "
                                               "on this session. Use a new key for a new request.")
        if shared is None:
            shared = SharedTurn(turn, self.state, fingerprint, scope if key else None, self.shaper(data))
            if key:
                self.state.remember(scope, shared)
            shared.begin(self.run, self.slow)
        self._shared = shared
        shared.want()
        try:
            if stream:
                await self._while_waiting(shared, session.id)
            try:
                await asyncio.shield(shared.started)  # failing before the turn began: a real HTTP status
            except OffgridError as exc:
                if not self._headers_written:
                    raise
                await self.event("error", {"message": str(exc), "type": type(exc).__name__, "code": exc.code})
                self.end_events()  # (the stream had begun with `waiting`: the error is its last event)
                return
            if stream:
                if not self._headers_written:
                    self.start_events()
                async for kind, payload in shared.follow():
                    await self.event(kind, payload)
                    if self._gone:
                        break
                self.end_events()
            else:
                self.send(200, await asyncio.shield(shared.result))
        finally:
            self.gone()

    kind = "chat"  # (scopes Idempotency-Keys)

    def new_turn(self, session_id: str, data: dict[str, Any]) -> ChatTurn:
        """The turn the body asks for (in the slow pool: the checks may build a grammar)."""
        return ChatTurn(
            self.state.engine, self.state.store, session_id, data["message"], source="server",
            params={k: data[k] for k in PARAMS if k in data}, metadata=data.get("metadata"),
            replace=data.get("replace_message_id"), tool_choice=data.get("tool_choice"),
            find_tools=self.state.find_tools, tool_executor=self.state.tool_pool,
            rag={"collection": data.get("collection"), "k": data.get("rag_k", 5)}
            if data.get("rag") or data.get("collection") else None, context=data.get("context"))

    def shaper(self, data: dict[str, Any]) -> Any:
        """What the complete payload gains (None: nothing)."""
        return None

    async def _while_waiting(self, shared: "SharedTurn", session_id: str) -> None:
        """A streamed turn that has not begun within WAITING_AFTER s is waiting for its session's
        running turn (or the engine's queue): say so at once, and every WAITING_EVERY s, so the
        client can tell its user why (and follow that turn: GET sessions/{ref}/turn)."""
        waited = 0.0
        step = WAITING_AFTER
        while not shared.started.done():
            await asyncio.wait([shared.started], timeout=step)
            if shared.started.done() or self._gone:
                return
            waited += step
            step = WAITING_EVERY
            if not self._headers_written:
                self.start_events()
            held = turns.held(session_id)
            await self.event("waiting", {
                "session_id": session_id, "waited_s": round(waited, 1),
                "reason": "another turn of this session is still running (a notebook cell, the panel or another "
                          "client); this one starts when it ends" if held else
                          "the request is being prepared (retrieval, or the engine's model list)"})

    def _idempotency_key(self) -> str | None:
        key = self.request.headers.get("Idempotency-Key")
        if key is not None and not (0 < len(key) <= 200 and set(key) <= KEY_CHARS):
            raise InvalidRequestError("Idempotency-Key must be 1-200 printable ASCII characters (e.g. a UUID).")
        return key

    def gone(self) -> None:
        shared, self._shared = getattr(self, "_shared", None), None
        if shared is not None:
            shared.unwant()


class ProposalHandler(ChatHandler):
    """A fix, an edit or new cells for a notebook (chat/edits.py): a turn of the session whose
    reply is constrained to a proposal, which the complete event carries parsed and checked."""

    spec_path = "/sessions/{ref}/proposals"
    kind = "proposal"

    def new_turn(self, session_id: str, data: dict[str, Any]) -> ChatTurn:
        task = self._task(data)
        n_ctx = self.state.engine.describe().get("n_ctx") or 4096
        task.check_fits(n_ctx)
        params = {"max_tokens": task.max_tokens(n_ctx), "temperature": 0.0,
                  **{k: data[k] for k in PARAMS if data.get(k) is not None}, "response_format": task.response_format()}
        return ChatTurn(self.state.engine, self.state.store, session_id, task.message(), source=task.kind,
                        params=params, metadata=task.metadata(), context=task.attachments() + (data.get("context") or []))

    @staticmethod
    def _task(data: dict[str, Any]) -> Task:
        return Task(data["task"], data.get("source") or "", data.get("cell_label") or "the cell",
                    error=data.get("error"), instruction=data.get("instruction"),
                    language=data.get("language") or "python", cell_id=data.get("cell_id")).check()

    def shaper(self, data: dict[str, Any]) -> Any:
        task = self._task(data)

        def shape(payload: dict[str, Any]) -> dict[str, Any]:
            if payload["finish_reason"] == "cancelled" or not payload.get("response"):
                return {**payload, "proposal": None}
            return {**payload, "proposal": parse(payload["text"], task).to_dict()}

        return shape


class TurnHandler(OffgridHandler):
    """Follow the turn running on a session (a cell's, another client's): its events from the start."""

    spec_path = "/sessions/{ref}/turn"

    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        session = await self.run(lambda: self.state.store.get(ref, messages=False))  # 404 for no such session
        shared = self.state.session_turns.get(session.id)
        if shared is None or shared.finished:
            self.send(204)
            return
        self.start_events()
        async for kind, payload in shared.follow():  # an observer: leaving never cancels the turn
            await self.event(kind, payload)
            if self._gone:
                break
        self.end_events()


class CancelHandler(OffgridHandler):
    """Stop a turn by request id; its answer still ends with the kept partial turn."""

    spec_path = "/generation/cancel"

    @web.authenticated
    @authorized
    async def post(self) -> None:
        request_id = (await self.body())["request_id"]
        running = self.state.running.get(request_id)
        if running is None:
            raise GenerationNotFoundError(f"No generation {request_id[:60]!r} is running (it may have ended).")
        running.cancel()
        self.send(200, {"request_id": request_id, "cancelled": True})


class OpenAIChatHandler(OffgridHandler):
    """``POST chat/completions`` in OpenAI's shape, on the same shared model (stateless)."""

    spec_path = "/chat/completions"

    @web.authenticated
    @authorized
    async def post(self) -> None:
        data = await self.body()
        params = {k: data[k] for k in (*PARAMS, "tools", "tool_choice") if k in data}
        if "max_completion_tokens" in data:
            params["max_tokens"] = data["max_completion_tokens"]
        messages = data["messages"]
        if data.get("system_prompt"):  # offgrid extension: a one-shot cell's --system
            messages = [{"role": "system", "content": data["system_prompt"]}, *messages]
        gen = await self.slow(lambda: self.state.engine.generate(  # (tools' grammars; an engine's models)
            messages, source="openai", session_id=data.get("session_id"), **params))
        self._gen = gen
        if self._gone:  # the client left while the request was being prepared
            gen.cancel()
        self.state.running[gen.request_id] = gen
        created = int(time.time())
        ident = "chatcmpl-" + gen.request_id.removeprefix("req-")
        model = gen.model.name
        try:
            if not data.get("stream"):
                result = await gen.wait_async()
                message: dict[str, Any] = {"role": "assistant", "content": result.text}
                if result.tool_calls:  # for the client to run, as OpenAI does
                    message = {"role": "assistant", "content": None,
                               "tool_calls": [openai_call(c) for c in result.tool_calls]}
                self.send(200, {"id": ident, "object": "chat.completion", "created": created, "model": model,
                                "choices": [{"index": 0, "message": message, "finish_reason": _openai_finish(result)}],
                                "usage": _openai_usage(result.usage)})
                return
            await self._stream(gen, ident, created, model)
        finally:
            self.state.running.pop(gen.request_id, None)

    async def _stream(self, gen, ident: str, created: int, model: str) -> None:
        self.start_events()

        def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

        await self.event(None, chunk({"role": "assistant", "content": ""}))
        try:
            async with aclosing(gen.aevents(poll_interval=2.0)) as events:
                async for kind, payload in events:
                    if self._gone:
                        break
                    if kind == "token":
                        await self.event(None, chunk({"content": payload}))
                    elif kind == "complete":
                        if payload.tool_calls:
                            await self.event(None, chunk({"tool_calls": [
                                {"index": i, **openai_call(c)} for i, c in enumerate(payload.tool_calls)]}))
                        await self.event(None, chunk({}, _openai_finish(payload)))
                        # OpenAI's usage chunk, plus our full result under a key OpenAI clients ignore
                        await self.event(None, {**chunk({}), "choices": [], "usage": _openai_usage(payload.usage),
                                                "offgrid": result_payload(payload, gen.model.sha256())})
        except OffgridError as exc:
            await self.event(None, {"error": {"message": str(exc), "type": type(exc).__name__, "code": exc.code}})
        await self.event(None, "[DONE]")
        self.end_events()

    def gone(self) -> None:
        gen = getattr(self, "_gen", None)
        if gen is not None and gen.state != "done":
            gen.cancel()


def _openai_finish(result) -> str:
    if result.tool_calls:
        return "tool_calls"
    return result.finish_reason if result.finish_reason in ("stop", "length") else "stop"


def _openai_usage(usage: dict) -> dict:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}
