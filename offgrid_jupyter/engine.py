"""The in-process inference engine.

One ``Engine`` per process owns one ``llama_cpp.Llama``. A ``Llama`` is not
thread-safe, so a single engine thread owns it and every request goes through a
FIFO queue; callers get a :class:`Generation` handle that streams text deltas
and ends with a :class:`GenerationResult`.

Per-session KV reuse: the context holds one conversation at a time. When a
request for another session arrives, the current conversation's KV cells are
copied out with llama.cpp's per-sequence state API (a few ms, no logits buffer)
into a byte-bounded LRU, and the new session's snapshot, if any, is copied in.
llama-cpp-python's own prefix matching then evaluates only the new tokens.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .errors import (
    ContextOverflowError,
    EngineBusyError,
    InvalidRequestError,
    OffgridError,
    QueueTimeoutError,
)
from .llamacpp import LlamaModel
from .models import ModelInfo, resolve_model
from .threads import ThreadTuner

log = logging.getLogger(__name__)

QUEUED_THRESHOLD_MS = 10.0  # a request that waited longer than this "was queued"
MB = 1 << 20
MAX_TOKENS_LIMIT = 1_000_000  # the context ends a reply long before; a bound keeps numbers sane
MAX_SEED = 2**32 - 2  # llama.cpp seeds are uint32; 2**32 - 1 means "random" to it
TOKEN_COUNT_CACHE = 8192  # per-message token counts kept for fitting long histories


def available_cores() -> int:
    """Cores this process may run on (llama-cpp-python's default is half of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


@dataclass
class GenerationParams:
    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None

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
        return self


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

    def __init__(self, engine: "Engine", messages: list[dict], session_id: str | None,
                 params: GenerationParams, source: str, model: ModelInfo):
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


class _KVSnapshot:
    __slots__ = ("tokens", "data", "nbytes")

    def __init__(self, tokens: np.ndarray, data: ctypes.Array):
        self.tokens = tokens
        self.data = data
        self.nbytes = len(data) + tokens.nbytes


class KVCache:
    """Byte-bounded LRU of per-session KV snapshots (engine thread only)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, _KVSnapshot] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0
        self.evictions = 0

    def get(self, key: str) -> _KVSnapshot | None:
        snap = self._items.get(key)
        if snap is not None:
            self._items.move_to_end(key)
        return snap

    def put(self, key: str, snap: _KVSnapshot) -> None:
        self.discard(key)
        if snap.nbytes > self.max_bytes:
            return
        self._items[key] = snap
        self.bytes += snap.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1

    def discard(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        return {
            "entries": len(self._items),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0,
            "tokens_reused": self.tokens_reused,
            "evictions": self.evictions,
        }


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class Engine:
    """One model, one engine thread, one FIFO queue."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        chat_format: str | None = None,
        queue_timeout: float = 1800.0,
        max_queue: int = 64,
        kv_cache_bytes: int = 512 * MB,
        defaults: GenerationParams | None = None,
    ):
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = n_threads or available_cores()
        self.n_batch = n_batch
        self.chat_format = chat_format
        self.queue_timeout = float(queue_timeout)
        self.max_queue = int(max_queue)
        self.defaults = defaults or GenerationParams()
        self.kv = KVCache(kv_cache_bytes)
        self.recorders: list[Callable[[dict], None]] = []

        self.tuner = ThreadTuner(self.n_threads)

        self._model: ModelInfo | None = None
        self._llm: LlamaModel | None = None
        self._owner: str | None = None  # session whose conversation is in the context
        self._owner_dirty = False
        self._loaded: ModelInfo | None = None
        self._abort_flag = False  # read by llama.cpp's abort callback during prompt evaluation
        self._token_counts: OrderedDict[tuple[str, str], int] = OrderedDict()  # (model, message digest) -> tokens
        self._overhead = 8.0  # template tokens per message, learnt from each fitted prompt

        self._cv = threading.Condition()
        self._pending: deque[Generation] = deque()
        self._current: Generation | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._waits = {"count": 0, "total_ms": 0.0, "max_ms": 0.0, "queued": 0}

    # -- public API ------------------------------------------------------------
    @property
    def model(self) -> ModelInfo:
        """The resolved (checked, not necessarily loaded) model."""
        if self._model is None:
            self._model = resolve_model(self.model_path)
        return self._model

    @property
    def loaded(self) -> bool:
        """True when the configured model is the one in memory."""
        return self._llm is not None and self._loaded == self._model

    def generate(self, messages: list[dict], *, session_id: str | None = None, source: str = "api",
                 model: str | os.PathLike | None = None, **params: Any) -> Generation:
        """Queue a chat generation; returns a :class:`Generation` to iterate.

        *model* runs this one request on another GGUF (the engine reloads when
        consecutive requests want different models)."""
        msgs = self._check_messages(messages)
        # resolve now: a missing model is the caller's error, raised here, not in the thread
        info = resolve_model(model) if model else self.model
        gen = Generation(self, msgs, session_id, self.params(**params), source, info)
        with self._cv:
            if self._closed:
                raise OffgridError("The engine has been closed.")
            if len(self._pending) >= self.max_queue:
                raise EngineBusyError(
                    f"The generation queue is full ({self.max_queue} waiting). Try again shortly, "
                    "or raise the queue bound (max_queue)."
                )
            gen.position_at_entry = len(self._pending) + (1 if self._current is not None else 0)
            self._pending.append(gen)
            self._ensure_thread()
            self._cv.notify_all()
        return gen

    def params(self, **overrides: Any) -> GenerationParams:
        """The engine's defaults with *overrides* (None means default), validated."""
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
            current = self._current
            return {
                "generating_session_id": current.session_id if current else None,
                "generating_request_id": current.request_id if current else None,
                "queued_session_ids": [g.session_id for g in self._pending],
            }

    def busy_session_ids(self) -> set[str]:
        st = self.status()
        ids = set(st["queued_session_ids"])
        ids.add(st["generating_session_id"])
        ids.discard(None)
        return ids

    def stats(self) -> dict[str, Any]:
        with self._cv:
            waits = dict(self._waits)
            queue_stats = {
                "generating": self._current is not None,
                "queued": len(self._pending),
                "max_queue": self.max_queue,
                "total_waits": waits["queued"],
                "requests": waits["count"],
                "avg_queue_wait_ms": round(waits["total_ms"] / waits["count"], 3) if waits["count"] else 0.0,
                "max_queue_wait_ms": round(waits["max_ms"], 3),
            }
        return {"queue": queue_stats, "cache": self.kv.stats(), "model": self.describe()}

    def describe(self) -> dict[str, Any]:
        try:
            m = self.model
        except OffgridError as exc:
            return {"loaded": False, "error": str(exc)}
        return {
            "name": m.name, "path": str(m.path), "source": m.source, "size_bytes": m.size_bytes,
            "loaded": self.loaded, "n_ctx": self.n_ctx, "n_threads": self.n_threads,
            "decode_threads": self.tuner.current,
            "chat_format": getattr(self._llm, "chat_format", self.chat_format),
        }

    def switch_model(self, path: str | os.PathLike | None) -> ModelInfo:
        """Use another GGUF from the next request on (checked now, loaded lazily)."""
        info = resolve_model(path)
        with self._cv:
            self.model_path = path
            self._model = info  # the engine thread swaps models before the next request
        return info

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for gen in list(self._pending):
                self._finish_unstarted(gen, "cancelled")
            self._pending.clear()
            if self._current is not None:
                self._current._cancel.set()
                self._abort_flag = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # -- queue internals -----------------------------------------------------------
    def _check_messages(self, messages: list[dict]) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list of {role, content} objects.")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise InvalidRequestError(f"messages[{i}] needs a role of system, user, assistant or tool.")
            if not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}].content must be a string.")
            out.append({"role": m["role"], "content": m["content"]})
        return out

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="offgrid-engine", daemon=True)
            self._thread.start()

    def _position_of(self, gen: Generation) -> int:
        with self._cv:
            try:
                return self._pending.index(gen) + (1 if self._current is not None else 0)
            except ValueError:
                return 0

    def _withdraw(self, gen: Generation, reason: str) -> bool:
        """Take a request out of the queue if it has not started. True if withdrawn."""
        with self._cv:
            if gen.state == "running":
                if self._current is gen and reason == "cancelled":
                    self._abort_flag = True
                return False
            if gen.state == "done" or gen not in self._pending:
                return False
            self._pending.remove(gen)
            self._finish_unstarted(gen, reason)
            return True

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
                self._current = gen
                self._abort_flag = gen.cancelled
            try:
                self._execute(gen)
            except BaseException:  # never let the engine thread die
                log.exception("offgrid engine: unexpected failure")
            finally:
                with self._cv:
                    self._current = None
                    self._abort_flag = False

    # -- the model ------------------------------------------------------------------
    def _load(self, info: ModelInfo) -> LlamaModel:
        if self._llm is not None and self._loaded == info:
            return self._llm
        self._unload()
        llm = LlamaModel(str(info.path), n_ctx=self.n_ctx, n_batch=self.n_batch, n_threads=self.n_threads,
                         chat_format=self.chat_format, should_abort=lambda: self._abort_flag)
        self._llm, self._loaded, self._owner = llm, info, None
        return llm

    def _unload(self) -> None:
        if self._llm is not None:
            self._llm.close()
        self._llm = None
        self._loaded = None
        self._owner = None
        self.kv.clear()

    def _count(self, llm: LlamaModel, message: dict) -> int:
        """Tokens of one message's text (cached: a long history is tokenized once, not per turn)."""
        key = (str(self._loaded.path) if self._loaded else "",
               hashlib.blake2b(f"{message['role']}\0{message['content']}".encode("utf-8", "surrogatepass"),
                               digest_size=16).hexdigest())
        n = self._token_counts.get(key)
        if n is None:
            n = len(llm.tokenize(message["content"]))
            self._token_counts[key] = n
            if len(self._token_counts) > TOKEN_COUNT_CACHE:
                self._token_counts.popitem(last=False)
        else:
            self._token_counts.move_to_end(key)
        return n

    def _fit(self, llm: LlamaModel, messages: list[dict], params: GenerationParams) -> dict:
        """Format the prompt, dropping the oldest turns (never the system prompt or the
        last message) until it leaves room for at least a short reply.

        Linear, not quadratic: per-message token counts (cached) choose how many turns
        to drop, and the chosen prompt is formatted once (rarely twice); a message that
        cannot fit even alone is refused before the history is formatted at all."""
        sampling = dict(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k, repeat_penalty=params.repeat_penalty, seed=params.seed)
        budget = self.n_ctx - min(params.max_tokens, max(64, self.n_ctx // 8))
        tokens = [self._count(llm, m) for m in messages]  # the text alone; the template adds ~overhead each
        cost = [t + self._overhead for t in tokens]
        keep = [i == len(messages) - 1 or m["role"] == "system" for i, m in enumerate(messages)]
        fixed = sum(c for c, k in zip(cost, keep) if k)
        if fixed > budget:
            raise self._overflow(int(fixed))
        droppable = [i for i, k in enumerate(keep) if not k]  # oldest first
        dropped: set[int] = set()
        excess = sum(cost) - budget
        while True:
            while excess > 0 and droppable:
                i = droppable.pop(0)
                dropped.add(i)
                excess -= cost[i]
            kept = [i for i in range(len(messages)) if i not in dropped]
            kwargs = llm.format([messages[i] for i in kept], **sampling)
            n = len(kwargs["prompt"])
            self._overhead = max(0.0, (n - sum(tokens[i] for i in kept)) / len(kept))
            if n <= budget:
                return kwargs
            if not droppable:
                raise self._overflow(n)
            excess = max(n - budget, 1)  # the estimate was short: drop more, by the counts again

    def _overflow(self, tokens: int) -> ContextOverflowError:
        return ContextOverflowError(
            f"The prompt is {tokens} tokens, more than the {self.n_ctx}-token context allows with room for a "
            "reply. Shorten the message or raise n_ctx.")

    def _prepare_kv(self, llm: LlamaModel, session_id: str | None, prompt: list[int]) -> int:
        """Put the best available KV state for this prompt in the context; return
        how many prompt tokens will be reused."""
        tokens = np.asarray(prompt, dtype=np.intc)
        if session_id != self._owner:
            if self._owner is not None and self._owner_dirty and len(llm.tokens) > 0:
                self.kv.put(self._owner, _KVSnapshot(*llm.snapshot()))
            snap = self.kv.get(session_id) if session_id else None
            if snap is not None:
                if _common_prefix(snap.tokens, tokens) > _common_prefix(llm.tokens, tokens):
                    llm.restore(snap.tokens, snap.data)  # on failure the context starts clean
                self.kv.hits += 1
            elif session_id:
                self.kv.misses += 1
            self._owner = session_id
        self._owner_dirty = True
        reused = min(_common_prefix(llm.tokens, tokens), max(0, len(prompt) - 1))
        self.kv.tokens_reused += reused
        return reused

    # -- one request -------------------------------------------------------------
    def _execute(self, gen: Generation) -> None:
        start = gen.started_mono
        wait_ms = (start - gen.submitted_mono) * 1000
        gen._emit("start")
        text_parts: list[str] = []
        prompt_n = cached = completion_n = 0
        ttft = None
        finish = "error"
        error: BaseException | None = None
        try:
            if self._llm is None or self._loaded != gen.model:
                gen._emit("loading", {"model": gen.model.name, "size_bytes": gen.model.size_bytes})
            llm = self._load(gen.model)
            kwargs = self._fit(llm, gen.messages, gen.params)
            prompt_n = len(kwargs["prompt"])
            # a reply stops where the context ends ("length"), never with llama.cpp out of KV cells
            # (llama-cpp-python skips its own max_tokens check while a character is incomplete,
            # so the hook below enforces the limit too)
            limit = kwargs["max_tokens"] = max(1, min(gen.params.max_tokens, self.n_ctx - prompt_n))
            at_limit = False
            cached = self._prepare_kv(llm, gen.session_id, kwargs["prompt"])
            sampled: list[int] = []
            tuner = self.tuner

            def on_token(tok: int) -> bool:
                # Sees every sampled token: counts them, stamps time to first token,
                # stops within one token on cancel, and lets the tuner pick threads.
                nonlocal ttft, at_limit
                now = time.monotonic()
                if ttft is None:
                    ttft = now
                    llm.set_abort(False)  # prompt done: no per-node callback while decoding
                if gen.cancelled:
                    return False
                if len(sampled) >= limit:
                    at_limit = True
                    return False
                sampled.append(tok)
                threads = tuner.token(now)
                if threads is not None:
                    llm.set_threads(threads, tuner.current)
                return True

            decode = tuner.start()
            llm.set_threads(decode, tuner.current)
            llm.set_abort(True)
            try:
                for chunk in llm.stream(kwargs, on_token):
                    choice = chunk["choices"][0]
                    if choice["text"]:
                        text_parts.append(choice["text"])
                        gen._emit("token", choice["text"])
                    if choice["finish_reason"]:
                        finish = choice["finish_reason"]
                    if gen.cancelled:
                        break
            except RuntimeError:
                if not gen.cancelled:  # a real decode failure, not our abort
                    raise
            finally:
                llm.set_abort(False)
            # generation ends at the first end-of-generation token: only the last can be one
            completion_n = len(sampled) - bool(sampled and llm.is_eog(sampled[-1]))
            if at_limit:
                finish = "length"
            if gen.cancelled:
                finish = "cancelled"
        except Exception as exc:  # noqa: BLE001 - reported to the caller, engine survives
            error = exc
            finish = "error"
            self._owner = None  # context state unknown: do not trust it for this session
            if self._llm is not None:
                self._llm.reset()
        total_ms = (time.monotonic() - start) * 1000
        ttft_ms = None if ttft is None else (ttft - start) * 1000
        result = self._result(gen, "".join(text_parts), finish, wait_ms, prompt=prompt_n, cached=cached,
                              completion=completion_n, ttft=ttft_ms, total_ms=total_ms,
                              error=type(error).__name__ if error else None,
                              decode_s=(time.monotonic() - ttft) if ttft else 0.0)
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
            params=asdict(gen.params), started_at=gen.submitted_at, source=gen.source, error_type=error,
        )

    def _record(self, result: GenerationResult) -> None:
        record = result.metrics_record()
        for recorder in list(self.recorders):
            try:
                recorder(record)
            except Exception:  # a broken recorder must not break generation
                log.exception("offgrid engine: metrics recorder failed")


_engine: Engine | None = None
_engine_lock = threading.Lock()


def engine_settings_from_env() -> dict[str, Any]:
    """Engine keyword arguments from OFFGRID_* environment variables."""
    out: dict[str, Any] = {}
    for env, key, cast in (("OFFGRID_N_CTX", "n_ctx", int), ("OFFGRID_THREADS", "n_threads", int),
                           ("OFFGRID_CHAT_FORMAT", "chat_format", str),
                           ("OFFGRID_QUEUE_TIMEOUT", "queue_timeout", float),
                           ("OFFGRID_MAX_QUEUE", "max_queue", int),
                           ("OFFGRID_KV_CACHE_MB", "kv_cache_bytes", lambda v: int(float(v) * MB))):
        value = os.environ.get(env)
        if value:
            try:
                out[key] = cast(value)
            except ValueError as exc:
                raise InvalidRequestError(f"{env}={value!r} is not valid: {exc}.") from exc
    return out


def get_engine(**kwargs: Any) -> Engine:
    """The process-wide engine, created on first call (model loads on first use).

    Keyword arguments (and OFFGRID_* environment variables) apply only when the
    engine is created; use :meth:`Engine.switch_model` to change the model later.
    Its requests are recorded in the process-wide store (the usage statistics).
    """
    global _engine
    with _engine_lock:
        if _engine is None:
            from .stats import attach
            from .store import get_store

            _engine = Engine(**{**engine_settings_from_env(), **kwargs})
            attach(_engine, get_store())  # every request of the process's engine is recorded
        return _engine
