"""A generation: its parameters, its result, and the one handle every surface consumes.

A backend turns messages into a :class:`Generation`, a handle that streams ``queued``/``start``/
``loading``/``token`` events and ends with a :class:`GenerationResult` (or the request's error).
The tool rounds (``chat/rounds.py``) and a turn sent to a Jupyter server (``kernel/remote.py``)
are handles too. :class:`Handle` derives everything a consumer uses from two primitives a
handle implements, ``_pull`` (blocking, for a thread) and ``_apull`` (for asyncio):

- ``events()``: one ``(kind, payload)`` at a time, ending with ``("complete", result)``;
  iterating the handle yields the text deltas;
- ``batches(interval)``: lists of events at most once per *interval* (and at once when the
  request ends), so a display that redraws is woken a few times a second, not once per token;
- ``wait()``: the result, without waking the caller per token (a 2-core machine's cores stay
  the model's);
- ``aevents()``/``wait_async()``: the same on an event loop, holding no thread;
- ``listen(callback)``: every event as it happens, for a second surface following a turn that
  another one consumes (a chat panel showing a cell's turn).

Whatever way it is consumed, a consumer that stops before the end (closes the iterator, is
interrupted, its task cancelled) cancels the request: that guard is written once, here. A failed
request raises its error from whichever method consumes it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

from ..errors import InvalidRequestError, QueueTimeoutError
from .structured import normalize
from .toolcalls import check_tools

log = logging.getLogger(__name__)

Event = tuple  # (kind, payload)

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
    tools: list | None = None  # OpenAI's function specs: see toolcalls.py
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



def drain(q: queue.SimpleQueue) -> list[Event]:
    """Every event waiting in *q* now, without blocking."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


class Handle:
    """The consumer's side of any generation (see the module docstring). A handle implements
    ``cancel()``, ``state`` (queued | running | done), ``_pull`` and ``_apull``; ``listen`` feeds
    ``self._listeners``."""

    request_id: str | None = None
    model: Any = None

    def __init__(self) -> None:
        self._listeners = Listeners()

    # -- what a handle implements ------------------------------------------------------------
    @property
    def state(self) -> str:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def _pull(self, timeout: float | None, *, gather: bool, repeat_queued: bool = False) -> list[Event]:
        """The events that happened. Returns at once when some are waiting; else waits up to
        *timeout* (None: until the request ends) for the first, and with *gather* for the end
        or the timeout, whichever comes first. ``("error", exc)`` or ``("complete", result)``
        is the last event of a request. *repeat_queued*: say the queue position again after
        each wait that found nothing (a keep-alive for streaming clients)."""
        raise NotImplementedError

    async def _apull(self, timeout: float | None, *, gather: bool, repeat_queued: bool = False) -> list[Event]:
        """:meth:`_pull` on an event loop: it waits there, holding no thread."""
        raise NotImplementedError

    # -- derived: every consumer ----------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state == "done"

    def listen(self, callback: Callable[[str, Any], None]) -> Callable[[], None]:
        """Also hand every event to *callback(kind, payload)* as it happens (on the thread that
        emits it: keep it short). Returns a function that stops it."""
        return self._listeners.add(callback)

    def _outcome(self) -> Any:
        """Once done: the result, or the request's error raised (for a consumer that comes after
        another one took the events)."""
        raise NotImplementedError

    def _ended(self, batch: list[Event]) -> list[Event]:
        """*batch*, or the end itself when the events were taken by an earlier consumer."""
        if not batch and self.done:
            return [("complete", self._outcome())]
        return batch

    def events(self, poll_interval: float = 0.5, *, repeat_queued: bool = False) -> Iterator[Event]:
        finished = False
        try:
            while not finished:
                batch = self._pull(poll_interval, gather=False, repeat_queued=repeat_queued)
                for kind, payload in self._ended(batch):
                    finished = kind in ("complete", "error")
                    if kind == "error":
                        raise payload
                    yield kind, payload
                    if finished:
                        return
        finally:
            if not finished:
                self.cancel()

    def __iter__(self) -> Iterator[str]:
        for kind, payload in self.events():
            if kind == "token":
                yield payload

    def batches(self, interval: float = 0.1, *, heartbeat: bool = False) -> Iterator[list[Event]]:
        """Lists of events at most once per *interval*; with *heartbeat*, an empty list every
        *interval* when nothing happened (to show a waiting time that grows)."""
        finished = False
        try:
            while not finished:
                batch = self._ended(self._pull(interval, gather=True))
                if batch and batch[-1][0] == "error":
                    finished = True
                    raise batch[-1][1]
                finished = bool(batch) and batch[-1][0] == "complete"
                if batch or heartbeat:
                    yield batch
        finally:
            if not finished:
                self.cancel()

    def wait(self) -> Any:
        """Block until the request ends; its result (or its error)."""
        try:
            while not self.done:
                batch = self._pull(None, gather=True)
                if batch and batch[-1][0] in ("complete", "error"):
                    break
            return self._outcome()
        except BaseException:
            self._give_up()
            raise

    async def aevents(self, poll_interval: float = 0.5, *, repeat_queued: bool = False) -> AsyncIterator[Event]:
        finished = False
        try:
            while not finished:
                batch = await self._apull(poll_interval, gather=False, repeat_queued=repeat_queued)
                for kind, payload in self._ended(batch):
                    finished = kind in ("complete", "error")
                    if kind == "error":
                        raise payload
                    yield kind, payload
                    if finished:
                        return
        finally:
            if not finished:
                self.cancel()

    async def wait_async(self) -> Any:
        """:meth:`wait` for asyncio: no thread is held while the request waits or runs."""
        try:
            while not self.done:
                batch = await self._apull(None, gather=True)
                if batch and batch[-1][0] in ("complete", "error"):
                    break
            return self._outcome()
        except BaseException:  # cancelled (the client went away), interrupted, or timed out in the queue
            self._give_up()
            raise

    def _give_up(self) -> None:
        """The waiter stopped waiting: the request goes too, unless it already ended."""
        if not self.done:
            self.cancel()


class Generation(Handle):
    """Handle on one queued/running request of a :class:`~offgrid_jupyter.inference.backend.QueueBackend`.

    Events come from the backend's worker (``_emit``) through a queue; the end is also one
    Future, so a waiter blocks on it (or awaits it) instead of on every token. While queued,
    ``("queued", position)`` is said whenever the position changes, and the queue's deadline
    is enforced by whoever waits (QueueTimeoutError)."""

    def __init__(self, engine: Any, messages: list[dict], session_id: str | None, params: GenerationParams,
                 source: str, model: ModelRef):
        super().__init__()
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
        self._state = "queued"  # queued | running | done
        self.result: GenerationResult | None = None
        self._cancel = threading.Event()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._finished: Future = Future()  # resolved with the result (or the error) when done
        self._said_position: int | None = None
        self._quiet = False  # the last pull found nothing (repeat_queued says the position again)
        self.completion: Any = None  # an inline completion's request (completion.py): a raw prompt, no chat
        self.cache_key: str | None = None  # whose KV cells it reuses and leaves (default: its session's)

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value

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

    def _outcome(self) -> GenerationResult:
        error = self._finished.exception()
        if error is not None:
            raise error
        return self._finished.result()

    # -- the two primitives ------------------------------------------------------------------------
    def _queued(self, repeat_queued: bool) -> list[Event]:
        if self._state != "queued":
            return []
        pos = self.position
        if pos != self._said_position or (repeat_queued and self._quiet):
            self._said_position, self._quiet = pos, False
            return [("queued", pos)]
        return []

    def _after_wait(self, batch: list[Event]) -> list[Event]:
        if not batch:
            self._quiet = True
            self._check_deadline()
        return batch

    def _pull(self, timeout: float | None, *, gather: bool, repeat_queued: bool = False) -> list[Event]:
        said = self._queued(repeat_queued)
        if said:
            return said
        batch = drain(self._events)
        if batch and not gather:
            return batch
        wait = self._queue_wait(timeout)
        if gather:
            wait_futures([self._finished], wait)
        else:
            try:
                batch.append(self._events.get(timeout=wait))
            except queue.Empty:
                pass
        return self._after_wait(batch + drain(self._events))

    async def _apull(self, timeout: float | None, *, gather: bool, repeat_queued: bool = False) -> list[Event]:
        said = self._queued(repeat_queued)
        if said:
            return said
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def heard(kind: str, _payload: Any) -> None:  # on the backend's thread
            if not gather or kind in ("complete", "error"):
                loop.call_soon_threadsafe(wake.set)

        stop = self.listen(heard)  # before looking, so nothing emitted meanwhile is missed
        try:
            batch = drain(self._events)
            if not (self._finished.done() if gather else batch):
                try:
                    await asyncio.wait_for(wake.wait(), self._queue_wait(timeout))
                except asyncio.TimeoutError:
                    pass
                batch += drain(self._events)
        finally:
            stop()
        return self._after_wait(batch)

    def _queue_wait(self, interval: float | None) -> float | None:
        """How long a waiter may block: *interval*, but never past the queue
        deadline while queued. Past the deadline a request that has just
        started is waited for at *interval* pace."""
        if self._state != "queued":
            return interval
        remaining = self.submitted_mono + self.engine.queue_timeout - time.monotonic()
        if remaining <= 0:
            return interval if interval is not None else 0.05
        return remaining if interval is None else min(interval, remaining)

    def _check_deadline(self) -> None:
        """Raise QueueTimeoutError if the request is still queued past its deadline."""
        if (self._state == "queued" and time.monotonic() >= self.submitted_mono + self.engine.queue_timeout
                and self.engine._withdraw(self, "timeout")):
            raise QueueTimeoutError(
                f"Waited {self.engine.queue_timeout:.0f} s in the generation queue without being served "
                "(another generation is still running). Try again later or raise the queue timeout."
            )

    # -- the backend's side ---------------------------------------------------------------------------
    def _emit(self, kind: str, payload: Any = None) -> None:
        self._events.put((kind, payload))
        if kind == "error":
            self._finished.set_exception(payload)
        elif kind == "complete":
            self._finished.set_result(payload)
        self._listeners(kind, payload)
