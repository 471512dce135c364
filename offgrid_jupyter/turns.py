"""One chat turn, the same for every surface (cell magic, chat panel, server route).

A turn is atomic as far as the conversation is concerned: the user message is
stored first, then the reply is generated, then the reply is stored with its
usage and provenance. Turns on one session take turns: a second turn waits until
the first has stored its reply, so two askers never interleave their messages. If generation fails, or is stopped before it produced any
text, the user message is taken back out, so a session never keeps a question
without an answer. A stopped reply that has text is kept, with finish_reason
``cancelled``.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from .engine import Engine, Generation, GenerationResult
from .errors import QueueTimeoutError
from .models import ModelInfo
from .store import Message, Store


@dataclass
class TurnResult:
    session_id: str | None  # None for a one-shot turn (nothing stored)
    session_name: str | None
    user_message: Message | None
    reply: Message | None
    result: GenerationResult
    model_sha256: str

    def provenance(self) -> dict[str, Any]:
        """What a notebook output records about where its text came from."""
        r = self.result
        return {
            "model": r.model, "model_sha256": self.model_sha256, "session_id": self.session_id,
            "message_id": self.reply.id if self.reply else None, "request_id": r.request_id,
            "params": r.params, "usage": r.usage, "timings": r.timings, "queue_stats": r.queue_stats,
            "finish_reason": r.finish_reason,
        }


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _session_lock(session_ref: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(session_ref, threading.Lock())


def _hash_soon(model: ModelInfo) -> None:
    # the digest is needed when the reply is stored; computing it while the model
    # generates keeps a large GGUF's first turn from waiting seconds for it
    threading.Thread(target=model.sha256, name="offgrid-sha256", daemon=True).start()


class ChatTurn:
    """Start a turn: store the user message (unless one-shot) and queue the generation.

    ``replace`` is the id of an earlier user message whose turn this one
    replaces (a re-run notebook cell). Iterate ``generation`` for the text (or
    call ``cancel()``), then call :meth:`finish`.
    """

    def __init__(self, engine: Engine, store: Store, session: str | None, content: str, *,
                 source: str, params: dict[str, Any] | None = None, system_prompt: str | None = None,
                 model: str | None = None, metadata: dict | None = None, replace: str | None = None,
                 history: bool = True):
        self.engine, self.store = engine, store
        engine.params(**(params or {}))  # a bad parameter fails before anything is stored
        self._held = ExitStack()  # released when the turn is over: the session's lock, its busy mark
        self.user_message: Message | None = None
        self.session_id = self.session_name = None
        if history:
            if session is None:
                raise ValueError("a turn with history needs a session")
            lock = _session_lock(store.get(session, messages=False).id)
            if not lock.acquire(timeout=engine.queue_timeout):
                raise QueueTimeoutError(f"Another turn in session {session!r} is still running after "
                                        f"{engine.queue_timeout:.0f} s. Try again later.")
            self._held.callback(lock.release)
            try:
                if replace:
                    self.user_message = store.replace_last_turn(session, content, message_id=replace,
                                                                metadata=metadata)
                else:
                    self.user_message = store.add_message(session, "user", content, metadata=metadata)
            except BaseException:
                self._held.close()
                raise
            sess = store.get(self.user_message.session_id)
            self.session_id, self.session_name = sess.id, sess.name
            messages = sess.chat_messages()
        else:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": content}]
        try:
            if self.session_id:
                self._held.enter_context(store.busy(self.session_id))
            self.generation: Generation = engine.generate(
                messages, session_id=self.session_id, source=source, model=model, **(params or {}))
        except BaseException:
            self._rollback()
            raise
        _hash_soon(self.generation.model)

    def cancel(self) -> None:
        self.generation.cancel()

    def abort(self) -> None:
        """Give up on the turn: stop the generation and take the user message back out."""
        if self.generation.state != "done":
            self.generation.cancel()
        self._rollback()

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
        reply = None
        try:
            if result.text.strip() and self.session_id:
                reply = self.store.add_message(
                    self.session_id, "assistant", result.text, usage=result.usage,
                    finish_reason=result.finish_reason,
                    metadata={"request_id": result.request_id, "model": result.model, "source": result.source,
                              "params": result.params, "timings": result.timings,
                              "queue_stats": result.queue_stats})
            elif self.session_id:
                self._rollback()
        finally:
            self._held.close()
        return TurnResult(self.session_id, self.session_name, self.user_message, reply, result,
                          self.generation.model.sha256())

    def _rollback(self) -> None:
        try:
            if self.user_message is not None:
                self.store.delete_turn(self.user_message.session_id, self.user_message.id)
                self.user_message = None
        finally:
            self._held.close()
