"""One chat turn, the same for every surface (cell magic, chat panel, server route).

A turn is atomic as far as the conversation is concerned: the user message is
stored first, then the reply is generated, then the reply is stored with its
usage and provenance. If generation fails, or is stopped before it produced any
text, the user message is taken back out, so a session never keeps a question
without an answer. A stopped reply that has text is kept, with finish_reason
``cancelled``. The question and a mark naming this process are stored in one
transaction, and the reply and the mark's removal in another, so a process that
dies mid-turn leaves a mark from which the next start repairs the session.

Turns on one session take turns, first come first served: a second turn waits
until the first has stored its reply, so two askers never interleave their
messages. The wait is a :class:`concurrent.futures.Future` per waiter, so a
thread can block on it (the magic, the panel) and the server can await it on its
event loop: a crowd of requests waiting for one session holds no thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..inference.backend import Backend
from ..inference.generation import Generation, GenerationResult
from ..errors import (InvalidRequestError, QueueTimeoutError, ReplyCutError, ReplyInvalidError, TurnCancelledError,
                      UnknownProfileError, UnknownToolError)
from ..inference.models import ModelInfo
from ..inference.structured import check_reply, normalize
from . import attachments
from .store import Message, Store
from .rounds import Rounds
from .tools import Tool
from ..retrieval.rag import DEFAULT_K, MAX_K, with_sources
from ..validation import check_name, check_text

DEFAULT_ROUNDS = 4  # a turn's rounds when neither the turn nor its profile says


@dataclass
class TurnResult:
    session_id: str | None  # None for a one-shot turn (nothing stored)
    session_name: str | None
    user_message: Message | None
    reply: Message | None
    result: GenerationResult
    model_sha256: str
    sources: list[dict[str, Any]] = field(default_factory=list)  # what retrieval gave the model

    def provenance(self) -> dict[str, Any]:
        """What a notebook output records about where its text came from."""
        r = self.result
        out = {
            "model": r.model, "model_sha256": self.model_sha256, "session_id": self.session_id,
            "message_id": self.reply.id if self.reply else None, "request_id": r.request_id,
            "params": r.params, "usage": r.usage, "timings": r.timings, "queue_stats": r.queue_stats,
            "finish_reason": r.finish_reason,
        }
        if self.sources:
            out["sources"] = self.sources
        if r.tool_calls:  # the calls the turn's rounds made, with what each returned
            out["rounds"] = r.rounds
            out["tool_calls"] = [{**c, "result": res["result"]} for c, res in zip(r.tool_calls, r.tool_results)]
        return out


# -- one FIFO lock per session, for threads and for asyncio alike ---------------------------
class _Waiters:
    __slots__ = ("held", "queue")

    def __init__(self) -> None:
        self.held = False
        self.queue: deque[Future] = deque()


_sessions: dict[str, _Waiters] = {}
_guard = threading.Lock()


def claim(session_id: str) -> Future:
    """A future that resolves when this caller holds *session_id*'s turn (at once if free).
    Cancel it to stop waiting; once it resolved, :func:`release` must follow."""
    fut: Future = Future()
    with _guard:
        waiters = _sessions.setdefault(session_id, _Waiters())
        if waiters.held:
            waiters.queue.append(fut)
        else:
            waiters.held = True
            fut.set_result(True)
    return fut


def release(session_id: str) -> None:
    """Hand the session to the next waiter that still wants it."""
    with _guard:
        waiters = _sessions[session_id]
        while waiters.queue:
            nxt = waiters.queue.popleft()
            if nxt.set_running_or_notify_cancel():  # False: that waiter gave up
                nxt.set_result(True)
                return
        del _sessions[session_id]


def give_up(session_id: str, fut: Future) -> None:
    """The caller no longer wants the turn: leave the queue, or release if it was granted."""
    with _guard:
        if fut.cancel():
            waiters = _sessions.get(session_id)
            if waiters is not None and fut in waiters.queue:
                waiters.queue.remove(fut)
            return
    release(session_id)


def held(session_id: str) -> bool:
    """Whether a turn of *session_id* is running in this process (holding the session)."""
    with _guard:
        waiters = _sessions.get(session_id)
        return waiters is not None and waiters.held


def waiting(session_id: str | None = None) -> Any:
    """Turns waiting for *session_id* (not counting the one that holds it), or for
    every session: ``{session_id: count}`` of those with any waiting."""
    with _guard:
        counts = {sid: sum(not f.cancelled() for f in w.queue) for sid, w in _sessions.items()
                  if session_id is None or sid == session_id}
    if session_id is not None:
        return counts.get(session_id, 0)
    return {sid: n for sid, n in counts.items() if n}


def _hash_soon(model: ModelInfo) -> None:
    # the digest is needed when the reply is stored; computing it while the model
    # generates keeps a large GGUF's first turn from waiting seconds for it
    threading.Thread(target=model.sha256, name="offgrid-sha256", daemon=True).start()


Run = Callable[..., Awaitable[Any]]  # runs a short blocking call off the event loop


class ChatTurn:
    """One turn. Construct (checks the request, blocks on nothing), then either

    - ``start()`` … ``finish()`` from a thread (they block), or
    - ``await start_async(run)`` … ``await finish_async(run)`` on an event loop, where
      *run(fn, *args)* runs the short store calls off the loop;

    between the two, iterate ``generation``. ``cancel()`` works in every phase:
    waiting for the session (start raises :class:`TurnCancelledError`, nothing
    stored), queued or generating (the partial reply is kept if it has text).

    ``replace`` is the id of an earlier user message whose turn this one
    replaces (a re-run notebook cell).
    """

    def __init__(self, engine: Backend, store: Store, session: str | None, content: str, *,
                 source: str, params: dict[str, Any] | None = None, system_prompt: str | None = None,
                 model: str | None = None, metadata: dict | None = None, replace: str | None = None,
                 history: bool = True, tools: list[Tool] | None = None, tool_choice: Any = None,
                 max_rounds: int | None = None, find_tools: Callable[[list[str]], list[Tool]] | None = None,
                 tool_executor: Any = None, rag: dict[str, Any] | None = None,
                 context: list[dict[str, Any]] | None = None):
        if history and session is None:
            raise ValueError("a turn with history needs a session")
        engine.params(**(params or {}))  # a bad parameter fails before anything is stored
        check_text(content, "The message")
        self.engine, self.store = engine, store
        self.session, self.content, self.source = session, content, source
        self.params, self.system_prompt, self.model = params or {}, system_prompt, model
        self.metadata, self.replace, self.history = metadata, replace, history
        # tools: offered this turn (None: the session's profile's, found by *find_tools*)
        self.tools, self.tool_choice, self.max_rounds = tools, tool_choice, max_rounds
        self.find_tools, self.tool_executor = find_tools, tool_executor
        # retrieval: {"collection": NAME or None for all, "k": N}; the excerpts it found (rag.Hit)
        self.rag = _check_rag(rag)
        # attached variables, cells, selections (chat/attachments.py), fitted when the turn starts
        self.attachments = attachments.check(context)
        self.context_note: str | None = None  # what fitting cut or left out
        self.sources: list[Any] = []
        self.user_message: Message | None = None
        self.session_id: str | None = None
        self.session_name: str | None = None
        self.generation: Generation | None = None
        self._mark: str | None = None
        self._claim: Future | None = None
        self._claimed: str | None = None  # the session id whose turn we wait for / hold
        self._cancelled = False
        self._state_lock = threading.Lock()
        self._held = ExitStack()  # released when the turn is over: the session's turn
        self._response_format: dict | None = None  # a constrained reply is kept only whole

    # -- phase 1: wait for the session, store the question, queue the generation -------------
    def start(self) -> "ChatTurn":
        if self.history:
            sid = self.store.get(self.session, messages=False).id
            fut = self._wait_for(sid)
            try:
                fut.result(timeout=self.engine.queue_timeout)
            except CancelledError:
                raise self._cancelled_error() from None
            except FutureTimeout:
                give_up(sid, fut)
                raise self._timeout_error() from None
            except BaseException:  # KeyboardInterrupt while waiting
                give_up(sid, fut)
                raise
        self._begin()
        return self

    async def start_async(self, run: Run, prepare: Run | None = None) -> "ChatTurn":
        """*run* runs the store's calls; *prepare* (default: *run*) runs what may take long or wait
        on the network: retrieval, checking the tools' and the schema's grammars, and handing the
        request to the backend (an engine's model list). Neither runs on the event loop."""
        if self.history:
            sid = (await run(lambda: self.store.get(self.session, messages=False))).id
            fut = self._wait_for(sid)
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), self.engine.queue_timeout)
            except asyncio.TimeoutError:
                give_up(sid, fut)
                raise self._timeout_error() from None
            except (asyncio.CancelledError, CancelledError):
                give_up(sid, fut)
                if self._cancelled:
                    raise self._cancelled_error() from None
                raise
        request = await run(self._store_question)
        try:
            await (prepare or run)(self._queue, *request)
        except BaseException:
            await run(self._rollback)
            raise
        return self

    def _wait_for(self, sid: str) -> Future:
        with self._state_lock:
            if self._cancelled:
                raise self._cancelled_error()
            self._claim = claim(sid)
        self._claimed = sid
        return self._claim

    def _begin(self) -> None:
        request = self._store_question()
        try:
            self._queue(*request)
        except BaseException:
            self._rollback()
            raise

    def _store_question(self) -> tuple:
        """Short and blocking: store the question with its mark; the request to queue."""
        attached = self._fitted()
        if not self.history:
            messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
                {"role": "user", "content": attachments.with_context(self.content, attached)}]
            return messages, self.params, self.model, self.tools or [], self.max_rounds
        sid = self._claimed
        self._held.callback(release, sid)  # the session's turn is ours until the reply is stored
        try:
            if self._cancelled:
                raise self._cancelled_error()
            metadata = self.metadata
            if attached:  # the record of what the model was shown with this message
                metadata = {**(metadata or {}), "context": attached,
                            **({"context_note": self.context_note} if self.context_note else {})}
            self.user_message, self._mark = self.store.begin_turn(
                sid, self.content, metadata=metadata, replace=self.replace)
            sess = self.store.get(sid, messages=True)
            self.session_id, self.session_name = sess.id, sess.name
            messages = sess.chat_messages()
            params, model, tools, rounds = self._with_profile(sess, messages)  # (a tool it lacks: 400)
        except BaseException:
            self._rollback()  # the question goes back out (and the session's turn is released)
            raise
        return messages, params, model, tools, rounds

    def _fitted(self) -> list[dict[str, Any]]:
        """This turn's attachments within their share of the model's context window."""
        if not self.attachments:
            return []
        n_ctx = self.engine.describe().get("n_ctx") or 4096
        fitted, self.context_note = attachments.fit(self.attachments, int(n_ctx * attachments.SHARE))
        return fitted

    def _queue(self, messages: list[dict], params: dict[str, Any], model: str | None, tools: list[Tool],
               rounds: int | None) -> None:
        """Retrieve (with --rag) and queue the generation; the caller rolls back if this raises."""
        self._response_format = normalize(params.get("response_format"))
        if self.rag is not None:
            messages[-1] = {**messages[-1], "content": self._retrieved(messages[-1]["content"])}
        if tools and self.tool_choice != "none":
            gen = Rounds(self.engine, messages, tools, tool_choice=self.tool_choice or "auto",
                         max_rounds=rounds or DEFAULT_ROUNDS, session_id=self.session_id, source=self.source,
                         model=model, params=params, executor=self.tool_executor)
        else:
            gen = self.engine.generate(messages, session_id=self.session_id, source=self.source, model=model,
                                       **params)
        with self._state_lock:
            self.generation = gen
            if self._cancelled:
                gen.cancel()
        _hash_soon(gen.model)

    def _with_profile(self, sess: Any, messages: list[dict]) -> tuple[dict[str, Any], str | None, list[Tool], int | None]:
        """The session's profile applied: its system prompt when the session has none (put in
        *messages*), its sampling defaults under this turn's own values, its model unless this
        turn names one, its tools and max rounds unless this turn offers its own. A profile
        deleted since the session was made is simply not applied."""
        params, model, tools, rounds = self.params, self.model, self.tools or [], self.max_rounds
        if not sess.profile:
            return params, model, tools, rounds
        try:
            profile = self.store.profiles.get(sess.profile)
        except UnknownProfileError:
            return params, model, tools, rounds
        if profile.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": profile.system_prompt})
        own = {k: v for k, v in params.items() if v is not None}
        if self.tools is None and profile.tools:
            if self.find_tools is None:
                raise UnknownToolError(f"Profile {profile.name!r} offers tools ({', '.join(profile.tools)}), which "
                                       "cannot run here.")
            tools = self.find_tools(profile.tools)
        return {**profile.params, **own}, model or profile.model, tools, rounds or profile.max_rounds

    def _retrieved(self, question: str) -> str:
        """The question as the model reads it: the collection's best excerpts first, numbered for
        citation, within about 40% of the model's context (the stored question stays as asked)."""
        hits = self.store.library.search(question, self.rag["collection"], self.rag["k"])
        n_ctx = self.engine.describe().get("n_ctx") or 4096
        text, self.sources = with_sources(question, hits, budget_chars=int(n_ctx * 0.4 * 3.5))
        return text

    def _cancelled_error(self) -> TurnCancelledError:
        return TurnCancelledError(f"The turn in session {self.session!r} was stopped before it began.")

    def _timeout_error(self) -> QueueTimeoutError:
        return QueueTimeoutError(f"Another turn in session {self.session!r} is still running after "
                                 f"{self.engine.queue_timeout:.0f} s. Try again later.")

    # -- any time ----------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the turn: stop waiting for the session, leave the queue, or stop generating."""
        with self._state_lock:
            self._cancelled = True
            if self._claim is not None and self.generation is None:
                self._claim.cancel()  # only succeeds while still waiting
            gen = self.generation
        if gen is not None:
            gen.cancel()

    def abort(self) -> None:
        """Give up on the turn: stop the generation and take the user message back out."""
        if self.generation is not None and self.generation.state != "done":
            self.generation.cancel()
        self._rollback()

    # -- phase 2: wait for the reply, store it -------------------------------------------------
    def finish(self) -> TurnResult:
        """Wait for the generation to end and store the reply.

        An interrupt (KeyboardInterrupt) while waiting stops the generation and
        keeps what it produced; the result's finish_reason says ``cancelled``."""
        try:
            try:
                result = self.generation.wait()
            except KeyboardInterrupt:
                result = self.generation.wait()  # wait() has cancelled it: this ends within a token
        except BaseException:
            self._rollback()
            raise
        return self._end(result)

    async def finish_async(self, run: Run) -> TurnResult:
        try:
            result = await self.generation.wait_async()
        except BaseException:
            await run(self._rollback)
            raise
        return await run(self._end, result)

    def _end(self, result: GenerationResult) -> TurnResult:
        reply = None
        steps = getattr(self.generation, "steps", None) or []  # the tool calls the rounds made
        rf = self._response_format
        if rf is not None and result.finish_reason in ("stop", "length", "cancelled"):
            # a constrained reply is kept only whole: cut, stopped, not JSON or off the schema, it goes
            if result.finish_reason == "cancelled":
                self._rollback()
                return TurnResult(self.session_id, self.session_name, None, None, result,
                                  self.generation.model.sha256(), [h.source() for h in self.sources])
            try:
                check_reply(result.text, result.finish_reason, rf)
            except (ReplyCutError, ReplyInvalidError) as exc:
                self._rollback()
                exc.text = result.text  # what the model wrote, for a caller that keeps it (-o VAR)
                raise
        try:
            if self._mark is not None:
                text = result.text if result.text.strip() else (
                    result.note or "(no answer after the tool calls)" if steps else "")
                if text:
                    metadata = {"request_id": result.request_id, "model": result.model, "source": result.source,
                                "params": result.params, "timings": result.timings,
                                "queue_stats": result.queue_stats}
                    if steps:
                        metadata.update(rounds=result.rounds, note=result.note)
                    if self.sources:
                        metadata["sources"] = [h.source() for h in self.sources]
                    reply = self.store.end_turn(
                        self._mark, self.session_id, text, steps=steps, usage=result.usage,
                        finish_reason=result.finish_reason, tool_calls=result.tool_calls,
                        tool_results=result.tool_results, metadata=metadata)
                    self._mark = None
                else:
                    self._rollback()
        finally:
            self._held.close()
        return TurnResult(self.session_id, self.session_name, self.user_message, reply, result,
                          self.generation.model.sha256(), [h.source() for h in self.sources])

    def _rollback(self) -> None:
        try:
            if self._mark is not None and self.user_message is not None:
                self.store.abandon_turn(self._mark, self.user_message.session_id, self.user_message.id)
            self._mark, self.user_message = None, None
        finally:
            self._held.close()


def _check_rag(rag: Any) -> dict[str, Any] | None:
    """``None`` (no retrieval), or ``{"collection": NAME | None, "k": N}`` checked."""
    if rag is None or rag is False:
        return None
    spec = {"collection": None, "k": DEFAULT_K, **(rag if isinstance(rag, dict) else {})}
    if spec["collection"] is not None:
        check_name(spec["collection"])
    k = spec["k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidRequestError(f"k must be an integer from 1 to {MAX_K}, got {k!r}.")
    return {"collection": spec["collection"], "k": k}
