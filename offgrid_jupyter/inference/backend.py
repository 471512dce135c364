"""Where generation runs: the contract every backend keeps, and the queue they share.

A *backend* turns a list of chat messages into a
:class:`~offgrid_jupyter.inference.generation.Generation` (see ``generation.py``). Turns, the magic, the
chat panel, the server's routes and the statistics only ever talk to this
contract (:class:`Backend`), so they do not care whether the tokens come from
llama.cpp in this process (:class:`~offgrid_jupyter.inference.engine.Engine`) or from an
OpenAI-compatible inference server
(:class:`~offgrid_jupyter.inference.openai_engine.OpenAIEngine`).

:class:`QueueBackend` is the part both share: a FIFO queue with a bound and a
timeout, ``slots`` requests served at once (1 for the in-process model, which is
not thread-safe; several for a server that batches by itself), cancellation,
queue statistics and the recorders that persist every request. A backend adds
``_execute(gen)`` (run one request, emit its events, resolve it) and describes
its model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Any, Callable, Protocol

from ..errors import EngineBusyError, InvalidRequestError, OffgridError, QueueTimeoutError
from .generation import Generation, GenerationParams, GenerationResult, ModelRef
from .toolcalls import check_tool_messages

log = logging.getLogger(__name__)

QUEUED_THRESHOLD_MS = 10.0  # a request that waited longer than this "was queued"


class Backend(Protocol):
    """Where generation runs. Everything above the model talks to this and nothing else."""

    queue_timeout: float
    recorders: list[Callable[[dict], None]]

    @property
    def model(self) -> ModelRef: ...

    @property
    def loaded(self) -> bool: ...

    def generate(self, messages: list[dict], *, session_id: str | None = None, source: str = "api",
                 model: str | None = None, **params: Any) -> Generation: ...

    def _check(self, params: GenerationParams) -> None:
        """Refuse, before queueing, parameters this backend cannot honour (a 400 naming them)."""

    def params(self, **overrides: Any) -> GenerationParams: ...

    def complete(self, messages: list[dict], **kwargs: Any) -> GenerationResult: ...

    def status(self) -> dict[str, Any]: ...

    def busy_session_ids(self) -> set[str]: ...

    def stats(self) -> dict[str, Any]: ...

    def describe(self) -> dict[str, Any]: ...

    def models(self) -> list[dict[str, Any]]: ...

    def switch_model(self, name: str | None) -> ModelRef: ...

    def close(self) -> None: ...


class QueueBackend:
    """A FIFO queue served by ``slots`` worker threads; subclasses run one request in
    :meth:`_execute`, and say what a cancel of a running request does in :meth:`_interrupt`."""

    slots = 1

    def __init__(self, *, queue_timeout: float = 1800.0, max_queue: int = 64,
                 defaults: GenerationParams | None = None):
        self.queue_timeout = float(queue_timeout)
        self.max_queue = int(max_queue)
        self.defaults = defaults or GenerationParams()
        self.recorders: list[Callable[[dict], None]] = []
        self._cv = threading.Condition()
        self._pending: deque[Generation] = deque()
        self._running: list[Generation] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._waits = {"count": 0, "total_ms": 0.0, "max_ms": 0.0, "queued": 0}

    # -- to implement ------------------------------------------------------------------
    @property
    def model(self) -> ModelRef:
        raise NotImplementedError

    def _resolve(self, model: str) -> ModelRef:
        """The model a request names (``model=`` of :meth:`generate`), checked now."""
        raise NotImplementedError

    def _execute(self, gen: Generation) -> None:
        """Run *gen* (its state is "running"): emit its events, then resolve it with
        :meth:`_finish`. Runs on a worker thread; must not raise."""
        raise NotImplementedError

    def _interrupt(self, gen: Generation) -> None:
        """*gen* is running and was cancelled: make :meth:`_execute` notice soon."""

    def _queue_extra(self) -> dict[str, Any]:
        """More of :meth:`stats`: the backend's own KV cache figures (none here: an engine
        that keeps its cache to itself reports zeros, so every figure stays a number)."""
        return {"cache": {"entries": 0, "bytes": 0, "max_bytes": 0, "hits": 0, "misses": 0, "hit_rate": 0.0,
                          "tokens_reused": 0, "evictions": 0}}

    # -- public API ------------------------------------------------------------
    def generate(self, messages: list[dict], *, session_id: str | None = None, source: str = "api",
                 model: str | None = None, **params: Any) -> Generation:
        """Queue a chat generation; returns a :class:`Generation` to iterate.
        *model* runs this one request on another model."""
        msgs = check_messages(messages)
        info = self._resolve(model) if model else self.model  # a missing model is the caller's error, now
        checked = self.params(**params)
        self._check(checked)
        gen = Generation(self, msgs, session_id, checked, source, info)
        with self._cv:
            if self._closed:
                raise OffgridError("The engine has been closed.")
            if len(self._pending) >= self.max_queue:
                raise EngineBusyError(
                    f"The generation queue is full ({self.max_queue} waiting). Try again shortly, "
                    "or raise the queue bound (max_queue)."
                )
            gen.position_at_entry = len(self._pending) + (1 if len(self._running) >= self.slots else 0)
            self._pending.append(gen)
            self._ensure_threads()
            self._cv.notify()
        return gen

    def _check(self, params: GenerationParams) -> None:
        """Refuse, before queueing, parameters this backend cannot honour (a 400 naming them)."""

    def params(self, **overrides: Any) -> GenerationParams:
        """The defaults with *overrides* (None means default), validated."""
        merged = {**asdict(self.defaults), **{k: v for k, v in overrides.items() if v is not None}}
        unknown = set(merged) - set(asdict(self.defaults))
        if unknown:
            raise InvalidRequestError(f"Unknown generation parameter(s): {', '.join(sorted(unknown))}.")
        return GenerationParams(**merged).validate()

    def complete(self, messages: list[dict], **kwargs: Any) -> GenerationResult:
        """Generate and wait; the blocking form of :meth:`generate`."""
        return self.generate(messages, **kwargs).wait()

    def status(self) -> dict[str, Any]:
        with self._cv:
            running = [g for g in self._running if g.completion is None]  # inline completions are not turns
            return {
                "generating_session_id": running[0].session_id if running else None,
                "generating_request_id": running[0].request_id if running else None,
                "generating": [{"session_id": g.session_id, "request_id": g.request_id} for g in running],
                "queued_session_ids": [g.session_id for g in self._pending],
            }

    def busy_session_ids(self) -> set[str]:
        with self._cv:
            ids = {g.session_id for g in self._running} | {g.session_id for g in self._pending}
        ids.discard(None)
        return ids

    def stats(self) -> dict[str, Any]:
        with self._cv:
            waits = dict(self._waits)
            queue_stats = {
                "generating": bool(self._running),
                "running": len(self._running),
                "slots": self.slots,
                "queued": len(self._pending),
                "max_queue": self.max_queue,
                "total_waits": waits["queued"],
                "requests": waits["count"],
                "avg_queue_wait_ms": round(waits["total_ms"] / waits["count"], 3) if waits["count"] else 0.0,
                "max_queue_wait_ms": round(waits["max_ms"], 3),
            }
        return {"queue": queue_stats, **self._queue_extra(), "model": self.describe()}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for gen in list(self._pending):
                self._finish_unstarted(gen, "cancelled")
            self._pending.clear()
            running = list(self._running)
            self._cv.notify_all()
        for gen in running:
            gen._cancel.set()
            self._interrupt(gen)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    # -- queue internals -----------------------------------------------------------
    def _ensure_threads(self) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        busy = len(self._running) + len(self._pending)
        while len(self._threads) < min(self.slots, busy):
            thread = threading.Thread(target=self._run, name=f"offgrid-engine-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _position_of(self, gen: Generation) -> int:
        with self._cv:
            try:
                return self._pending.index(gen) + (1 if len(self._running) >= self.slots else 0)
            except ValueError:
                return 0

    def _withdraw(self, gen: Generation, reason: str) -> bool:
        """Take a request out of the queue if it has not started. True if withdrawn."""
        with self._cv:
            if gen.state == "running":
                running = gen in self._running
            elif gen.state == "done" or gen not in self._pending:
                return False
            else:
                self._pending.remove(gen)
                self._finish_unstarted(gen, reason)
                return True
        if running and reason == "cancelled":
            self._interrupt(gen)
        return False

    def _finish_unstarted(self, gen: Generation, reason: str) -> None:
        """Resolve a request that never ran (cancelled or timed out in the queue)."""
        wait_ms = (time.monotonic() - gen.submitted_mono) * 1000
        gen.state = "done"
        error = QueueTimeoutError.__name__ if reason == "timeout" else None
        result = self._result(gen, "", "cancelled" if reason == "cancelled" else "error", wait_ms,
                              prompt=0, cached=0, completion=0, ttft=None, total_ms=0.0, error=error)
        if reason == "timeout":
            result.error = "queue timeout"
        gen.result = result
        self._record(result)
        gen._emit("complete", result)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                gen = self._pending.popleft()
                gen.started_mono = time.monotonic()
                gen.state = "running"
                self._running.append(gen)
            try:
                self._execute(gen)
            except BaseException:  # never let a worker die
                log.exception("offgrid engine: unexpected failure")
            finally:
                with self._cv:
                    self._running.remove(gen)

    def _finish(self, gen: Generation, result: GenerationResult, error: BaseException | None) -> None:
        """Resolve a request that ran: record it, then hand over its result or its error."""
        if error is not None:
            result.error = str(error)
        gen.result = result
        gen.state = "done"
        self._record(result)
        if error is not None:
            gen._emit("error", error if isinstance(error, OffgridError)
                      else OffgridError(f"Generation failed: {type(error).__name__}: {error}"))
        else:
            gen._emit("complete", result)

    def _result(self, gen: Generation, text: str, finish: str, wait_ms: float, *, prompt: int, cached: int,
                completion: int, ttft: float | None, total_ms: float, error: str | None,
                decode_s: float = 0.0) -> GenerationResult:
        with self._cv:
            self._waits["count"] += 1
            self._waits["total_ms"] += wait_ms
            self._waits["max_ms"] = max(self._waits["max_ms"], wait_ms)
            self._waits["queued"] += wait_ms > QUEUED_THRESHOLD_MS
        tps = (completion - 1) / decode_s if completion > 1 and decode_s > 0 else 0.0
        return GenerationResult(
            request_id=gen.request_id, session_id=gen.session_id, model=gen.model.name, text=text,
            finish_reason=finish,
            usage={"prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion,
                   "total_tokens": prompt + completion},
            timings={"ttft_ms": round(ttft, 3) if ttft is not None else None, "total_ms": round(total_ms, 3),
                     "tokens_per_second": round(tps, 3)},
            queue_stats={"was_queued": wait_ms > QUEUED_THRESHOLD_MS, "queue_wait_ms": round(wait_ms, 3),
                         "queue_position": gen.position_at_entry, "generation_ms": round(total_ms, 3)},
            params=gen.params.record(), started_at=gen.submitted_at, source=gen.source, error_type=error,
        )

    def _record(self, result: GenerationResult) -> None:
        record = result.metrics_record()
        for recorder in list(self.recorders):
            try:
                recorder(record)
            except Exception:  # a broken recorder must not break generation
                log.exception("offgrid engine: metrics recorder failed")


def check_messages(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise InvalidRequestError(f"messages[{i}] needs a role of system, user, assistant or tool.")
        out.append(check_tool_messages(i, m))  # content, and OpenAI's tool_calls / tool_call_id
    return out

