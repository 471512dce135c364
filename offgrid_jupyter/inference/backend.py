"""Where generation runs: the contract every backend keeps, and the queue they share.

A *backend* turns a list of chat messages into a :class:`Generation`: a handle that
streams ``queued``/``start``/``loading``/``token`` events and ends with a
:class:`GenerationResult` (or raises the request's error). Turns, the magic, the
chat panel, the server's routes and the statistics only ever talk to this
contract (:class:`Backend`), so they do not care whether the tokens come from
llama.cpp in this process (:class:`~offgrid_jupyter.engine.Engine`) or from an
OpenAI-compatible inference server
(:class:`~offgrid_jupyter.openai_engine.OpenAIEngine`).

:class:`QueueBackend` is the part both share: a FIFO queue with a bound and a
timeout, ``slots`` requests served at once (1 for the in-process model, which is
not thread-safe; several for a server that batches by itself), cancellation,
queue statistics and the recorders that persist every request. A backend adds
``_execute(gen)`` (run one request, emit its events, resolve it) and describes
its model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Protocol

from ..errors import EngineBusyError, InvalidRequestError, OffgridError, QueueTimeoutError
from .structured import normalize
from .tools import check_tool_messages, check_tools

log = logging.getLogger(__name__)

QUEUED_THRESHOLD_MS = 10.0  # a request that waited longer than this "was queued"
MAX_TOKENS_LIMIT = 1_000_000  # the context ends a reply long before; a bound keeps numbers sane
MAX_SEED = 2**32 - 2  # llama.cpp seeds are uint32; 2**32 - 1 means "random" to it


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


class ModelRef(Protocol):
    """What a generation knows of its model (a local GGUF's ModelInfo, or an engine's model name)."""

    @property
    def name(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...

    def sha256(self) -> str: ...


@dataclass
class GenerationParams:
    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None
    response_format: dict | None = None  # JSON (any, or a schema): see structured.py
    tools: list | None = None  # OpenAI's function specs: see tools.py
    tool_choice: Any = None  # "auto" (with tools), "none", "required", {"type": "function", "function": {"name"}}

    def validate(self) -> "GenerationParams":
        def number(name: str, low: float, high: float, *, integer: bool = False, low_open: bool = False) -> None:
            value = getattr(self, name)
            kind = "an integer" if integer else "a number"
            ok = (not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
                  and math.isfinite(value) and (low < value if low_open else low <= value) and value <= high)
            if not ok:
                bounds = f"{'above' if low_open else 'from'} {_num(low)} {'up ' if low_open else ''}to {_num(high)}"
                raise InvalidRequestError(f"{name} must be {kind} {bounds}, got {value!r}.")

        number("max_tokens", 1, MAX_TOKENS_LIMIT, integer=True)
        number("temperature", 0, 5)
        number("top_p", 0, 1)
        number("top_k", 0, 100_000, integer=True)
        number("repeat_penalty", 0, 10, low_open=True)
        if self.seed is not None:
            number("seed", 0, MAX_SEED, integer=True)
        self.response_format = normalize(self.response_format)
        self.tools, self.tool_choice = check_tools(self.tools, self.tool_choice)
        return self

    def record(self) -> dict[str, Any]:
        """The parameters as a request's record keeps them (tools by name, not whole schemas)."""
        out = asdict(self)
        if self.tools:
            out["tools"] = [t["function"]["name"] for t in self.tools]
        return out


@dataclass
class GenerationResult:
    request_id: str
    session_id: str | None
    model: str
    text: str
    finish_reason: str  # stop | length | cancelled | error
    usage: dict[str, int]
    timings: dict[str, float]
    queue_stats: dict[str, Any]
    params: dict[str, Any]
    started_at: float  # epoch seconds (UTC) when the request was submitted
    source: str = "api"
    error: str | None = None
    error_type: str | None = None
    # a reply that calls a tool: [{id, name, arguments}] (its text is then empty); after a turn's
    # rounds (tools.Rounds): the calls made, [{name, arguments}], and their [{tool_name, result}]
    tool_calls: list = field(default_factory=list)
    tool_results: list = field(default_factory=list)
    rounds: int = 1
    note: str | None = None  # why the rounds ended without an answer (max_rounds, stopped)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics_record(self) -> dict[str, Any]:
        """The flat per-request record handed to recorders (the stats issue persists these)."""
        return {
            "request_id": self.request_id,
            "session_id": self.session_id,
            "model": self.model,
            "source": self.source,
            "started_at": self.started_at,
            "queue_wait_ms": self.queue_stats["queue_wait_ms"],
            "prompt_tokens": self.usage["prompt_tokens"],
            "cached_tokens": self.usage["cached_tokens"],
            "completion_tokens": self.usage["completion_tokens"],
            "ttft_ms": self.timings["ttft_ms"],
            "total_ms": self.timings["total_ms"],
            "tokens_per_second": self.timings["tokens_per_second"],
            "finish_reason": self.finish_reason,
            "error_type": self.error_type,
        }


def take_batch(q: queue.SimpleQueue) -> list:
    """Every event waiting in *q* now, without blocking; an ``("error", exc)``
    event is raised as *exc*."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    for kind, payload in items:
        if kind == "error":
            raise payload
    return items


class Listeners:
    """Callbacks that see every event of a generation as it happens (see :meth:`Generation.listen`)."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[str, Any], None]] = []

    def add(self, callback: Callable[[str, Any], None]) -> Callable[[], None]:
        """Register *callback*; returns the function that unregisters it."""
        self._callbacks.append(callback)
        return lambda: callback in self._callbacks and self._callbacks.remove(callback)

    def __call__(self, kind: str, payload: Any) -> None:
        for callback in tuple(self._callbacks):
            try:
                callback(kind, payload)
            except Exception:  # a listener must never break the thread that emits
                log.exception("offgrid: a generation listener failed")


class Generation:
    """Handle on one queued/running request. Iterate it for text deltas.

    ``events()`` yields ``(kind, payload)`` tuples: ``("queued", position)`` while
    waiting (again whenever the position changes), ``("start", None)``,
    ``("loading", {model, size_bytes})`` when the model has to be loaded first,
    ``("token", delta)`` and finally ``("complete", GenerationResult)``. A failed
    request raises its error from the iterator after recording it. Closing the
    iterator early (or calling :meth:`cancel`) cancels the request.

    ``aevents()`` and ``wait_async()`` are the same for asyncio code (the server):
    they wait on the event loop, never in a thread of a bounded pool.
    """

    def __init__(self, engine: "QueueBackend", messages: list[dict], session_id: str | None,
                 params: GenerationParams, source: str, model: ModelRef):
        self.engine = engine
        self.model = model
        self.request_id = "req-" + uuid.uuid4().hex[:12]
        self.session_id = session_id
        self.messages = messages
        self.params = params
        self.source = source
        self.submitted_mono = time.monotonic()
        self.submitted_at = time.time()
        self.started_mono: float | None = None
        self.position_at_entry = 0
        self.state = "queued"  # queued | running | done
        self.result: GenerationResult | None = None
        self._cancel = threading.Event()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._finished: Future = Future()  # resolved with the result (or the error) when done
        self._listeners = Listeners()

    # -- consumer side -------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def position(self) -> int:
        """Current queue position (0 once running or done)."""
        return self.engine._position_of(self)

    def cancel(self) -> None:
        """Stop generating within one token (or leave the queue now)."""
        self._cancel.set()
        self.engine._withdraw(self, "cancelled")

    def events(self, poll_interval: float = 0.5, *, repeat_queued: bool = False) -> Iterator[tuple[str, Any]]:
        """See the class docstring; *repeat_queued* repeats ``("queued", position)``
        every *poll_interval* while waiting (a keep-alive for streaming clients)."""
        finished = False
        try:
            last_pos = None
            while True:  # waiting in the queue
                pos = self.position
                if self.state == "queued" and (pos != last_pos or repeat_queued):
                    last_pos = pos
                    yield ("queued", pos)
                try:
                    kind, payload = self._events.get(timeout=self._queue_wait(poll_interval))
                    break
                except queue.Empty:
                    finished = self._check_deadline()
            while True:
                if kind == "error":
                    finished = True
                    raise payload
                if kind == "complete":
                    finished = True
                    yield ("complete", payload)
                    return
                yield (kind, payload)
                kind, payload = self._events.get()
        finally:
            if not finished:
                self.cancel()

    def __iter__(self) -> Iterator[str]:
        for kind, payload in self.events():
            if kind == "token":
                yield payload

    def batches(self, interval: float = 0.1, *, heartbeat: bool = False) -> Iterator[list[tuple[str, Any]]]:
        """Like :meth:`events`, but yields lists of events at most once per
        *interval* (and at once when the request ends), so a consumer that
        redraws a display is woken a few times a second, not once per token.
        With *heartbeat*, an empty list comes every *interval* when nothing
        happened (to show a waiting time that grows)."""
        finished = False
        try:
            last_pos = None
            while True:
                pos = self.position
                if self.state == "queued" and pos != last_pos:
                    last_pos = pos
                    yield [("queued", pos)]
                self._wait_done(self._queue_wait(interval))
                try:
                    batch = take_batch(self._events)
                except BaseException:
                    finished = True
                    raise
                if not batch:
                    finished = self._check_deadline()
                    if heartbeat:
                        yield []
                    continue
                finished = batch[-1][0] == "complete"
                yield batch
                if finished:
                    return
        finally:
            if not finished:
                self.cancel()

    def wait(self) -> GenerationResult:
        """Block until the request ends and return its result (raising its error).

        Unlike iterating, this does not wake the caller once per token, which
        keeps a 2-core machine's cores for the model."""
        try:
            while not self._wait_done(self._queue_wait(None)):
                self._check_deadline()
        except BaseException:
            self._give_up()
            raise
        return self._outcome()

    def _give_up(self) -> None:
        """The waiter stopped waiting (interrupt, cancelled task, queue timeout)."""
        if not self._finished.done():
            self.cancel()

    def _outcome(self) -> GenerationResult:
        error = self._finished.exception()
        if error is not None:
            raise error
        assert self.result is not None
        return self.result

    def _wait_done(self, timeout: float | None) -> bool:
        return bool(wait_futures([self._finished], timeout).done)

    async def aevents(self, poll_interval: float = 0.5, *, repeat_queued: bool = False):
        """:meth:`events` for asyncio: waits on the event loop (woken by the engine
        thread), so any number of waiting requests hold no thread. Leaving the loop
        early (or the task being cancelled) cancels the request."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def waker(_kind: str, _payload: Any) -> None:
            loop.call_soon_threadsafe(wake.set)

        stop_listening = self.listen(waker)
        finished = False
        try:
            last_pos = None
            while True:
                wake.clear()
                try:
                    batch = take_batch(self._events)
                except BaseException:
                    finished = True
                    raise
                for kind, payload in batch:
                    if kind == "complete":
                        finished = True
                    yield kind, payload
                    if finished:
                        return
                if batch:
                    continue
                if self.state == "queued":
                    pos = self.position
                    if pos != last_pos or repeat_queued:
                        last_pos = pos
                        yield "queued", pos
                try:
                    await asyncio.wait_for(wake.wait(), self._queue_wait(poll_interval))
                except asyncio.TimeoutError:
                    finished = self._check_deadline()
        finally:
            stop_listening()
            if not finished:
                self.cancel()

    async def wait_async(self) -> GenerationResult:
        """:meth:`wait` for asyncio: no thread is held while the request waits or runs."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def resolved(_f: Future) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        self._finished.add_done_callback(resolved)
        try:
            while not done.done():
                try:
                    await asyncio.wait_for(asyncio.shield(done), self._queue_wait(None))
                except asyncio.TimeoutError:
                    self._check_deadline()
        except BaseException:  # cancelled (the client went away) or timed out in the queue
            self._give_up()
            raise
        return self._outcome()

    def _queue_wait(self, interval: float | None) -> float | None:
        """How long a waiter may block: *interval*, but never past the queue
        deadline while queued. Past the deadline a request that has just
        started is waited for at *interval* pace."""
        if self.state != "queued":
            return interval
        remaining = self.submitted_mono + self.engine.queue_timeout - time.monotonic()
        if remaining <= 0:
            return interval if interval is not None else 0.05
        return remaining if interval is None else min(interval, remaining)

    def _check_deadline(self) -> bool:
        """Raise QueueTimeoutError if the request is still queued past its deadline."""
        if (self.state == "queued" and time.monotonic() >= self.submitted_mono + self.engine.queue_timeout
                and self.engine._withdraw(self, "timeout")):
            raise QueueTimeoutError(
                f"Waited {self.engine.queue_timeout:.0f} s in the generation queue without being served "
                "(another generation is still running). Try again later or raise the queue timeout."
            )
        return False

    # -- engine side ---------------------------------------------------------
    def _emit(self, kind: str, payload: Any = None) -> None:
        self._events.put((kind, payload))
        if kind in ("complete", "error"):
            if kind == "error":
                self._finished.set_exception(payload)
            else:
                self._finished.set_result(payload)
        self._listeners(kind, payload)

    def listen(self, callback: Callable[[str, Any], None]) -> Callable[[], None]:
        """Also hand every event to *callback(kind, payload)* as it happens (on the
        engine thread: keep it short). Returns a function that stops it. Lets a second
        surface follow a turn that another one consumes (a chat panel showing a cell's turn)."""
        return self._listeners.add(callback)


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
            running = list(self._running)
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


_engine: QueueBackend | None = None
_engine_lock = threading.Lock()


def make_engine(url: str | None = None, **kwargs: Any) -> QueueBackend:
    """A backend from the environment: an OpenAI-compatible engine when *url* or
    ``OFFGRID_ENGINE_URL`` is set (``llama_cpp`` is then never imported), else the
    in-process llama.cpp engine on ``OFFGRID_MODEL`` or the embedded default."""
    from .engine import Engine, engine_settings_from_env

    settings = engine_settings_from_env()
    url = url or os.environ.get("OFFGRID_ENGINE_URL")
    if url:
        from .openai_engine import OpenAIEngine
        from .openai_engine import engine_settings_from_env as remote_settings

        queue_settings = {k: v for k, v in settings.items() if k in ("queue_timeout", "max_queue")}
        return OpenAIEngine(url, **{**queue_settings, **remote_settings(), **kwargs})
    return Engine(**{**settings, **kwargs})


def get_engine(**kwargs: Any) -> QueueBackend:
    """The process-wide backend, created on first call (a local model loads on first use).

    Keyword arguments (and OFFGRID_* environment variables) apply only when it is
    created; ``switch_model`` changes the model later. Its requests are recorded in
    the process-wide store (the usage statistics).
    """
    global _engine
    with _engine_lock:
        if _engine is None:
            from ..stats import attach
            from ..chat.store import get_store

            _engine = make_engine(**kwargs)
            attach(_engine, get_store())  # every request of the process's engine is recorded
        return _engine
