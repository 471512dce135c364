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

import ctypes
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from .backend import Generation, GenerationParams, QueueBackend
from .errors import ContextOverflowError, InvalidRequestError, OffgridError
from . import tools
from .llamacpp import LlamaModel, grammar, grammar_for, tool_grammar
from .models import ModelInfo, resolve_model
from .threads import ThreadTuner

log = logging.getLogger(__name__)

MB = 1 << 20
TOKEN_COUNT_CACHE = 8192  # per-message token counts kept for fitting long histories


def available_cores() -> int:
    """Cores this process may run on (llama-cpp-python's default is half of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


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


class Engine(QueueBackend):
    """One model in this process, one engine thread (a ``Llama`` is not thread-safe), one FIFO queue."""

    slots = 1

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
        super().__init__(queue_timeout=queue_timeout, max_queue=max_queue, defaults=defaults)
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = n_threads or available_cores()
        self.n_batch = n_batch
        self.chat_format = chat_format
        self.kv = KVCache(kv_cache_bytes)
        self.tuner = ThreadTuner(self.n_threads)

        self._model: ModelInfo | None = None
        self._llm: LlamaModel | None = None
        self._owner: str | None = None  # session whose conversation is in the context
        self._owner_dirty = False
        self._loaded: ModelInfo | None = None
        self._abort_flag = False  # read by llama.cpp's abort callback during prompt evaluation
        self._token_counts: OrderedDict[tuple[str, str], int] = OrderedDict()  # (model, message digest) -> tokens
        self._overhead = 8.0  # template tokens per message, learnt from each fitted prompt
        self._grammars: dict[str, Any] = {}  # GBNF text -> llama-cpp-python grammar, for tool calls
        self._grammars_lock = threading.Lock()

    # -- the backend contract -------------------------------------------------------
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

    def _resolve(self, model: str | os.PathLike) -> ModelInfo:
        return resolve_model(model)

    def _interrupt(self, gen: Generation) -> None:
        self._abort_flag = True

    def _queue_extra(self) -> dict[str, Any]:
        return {"cache": self.kv.stats()}

    def describe(self) -> dict[str, Any]:
        try:
            m = self.model
        except OffgridError as exc:
            return {"kind": "llama.cpp", "loaded": False, "error": str(exc)}
        return {
            "kind": "llama.cpp", "name": m.name, "path": str(m.path), "source": m.source,
            "size_bytes": m.size_bytes, "loaded": self.loaded, "n_ctx": self.n_ctx, "n_threads": self.n_threads,
            "decode_threads": self.tuner.current,
            "chat_format": getattr(self._llm, "chat_format", self.chat_format),
        }

    def models(self) -> list[dict[str, Any]]:
        """The model this engine runs (other GGUFs are named by path)."""
        desc = self.describe()
        return [] if "error" in desc else [{"id": desc["name"], "path": desc["path"], "size_bytes": desc["size_bytes"]}]

    def switch_model(self, path: str | os.PathLike | None) -> ModelInfo:
        """Use another GGUF from the next request on (checked now, loaded lazily)."""
        info = resolve_model(path)
        with self._cv:
            self.model_path = path
            self._model = info  # the engine thread swaps models before the next request
        return info

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
        calls = tools.offered(params.tools or [], params.tool_choice)
        if calls:  # the tools go into the system prompt, and the grammar allows a call (or an answer)
            messages = tools.for_template(messages, tools.instructions(calls, params.tool_choice))
            sampling["grammar"] = self._tool_grammar(calls, params)
        else:
            messages = tools.for_template(messages)  # earlier calls in the history, as the model wrote them
            if params.response_format is not None:  # the chat handler turns it into a llama.cpp grammar
                sampling["response_format"] = params.response_format
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

    def _tool_grammar(self, calls: list[dict], params: GenerationParams) -> Any:
        forced = params.tool_choice == "required" or isinstance(params.tool_choice, dict)
        answer = None
        if params.response_format is not None:
            answer = params.response_format.get("schema") or {"type": "object"}
        text = tool_grammar(tools.call_schema(calls), answer, answer=not forced)
        with self._grammars_lock:  # the caller's thread checks, the engine thread uses
            cached = self._grammars.pop(text, None) or grammar(text)
            self._grammars[text] = cached  # most recently used last
            while len(self._grammars) > 64:
                self._grammars.pop(next(iter(self._grammars)))
        return cached

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

    def _check(self, params: GenerationParams) -> None:
        schema = (params.response_format or {}).get("schema")
        if schema is not None:
            grammar_for(schema)  # a construct llama.cpp's grammars cannot express is the caller's 400, now
        calls = tools.offered(params.tools or [], params.tool_choice)
        if calls:
            self._tool_grammar(calls, params)  # the same for a tool's parameters

    # -- one request -------------------------------------------------------------
    def _execute(self, gen: Generation) -> None:
        self._abort_flag = gen.cancelled
        try:
            self._run_one(gen)
        finally:
            self._abort_flag = False

    def _run_one(self, gen: Generation) -> None:
        start = gen.started_mono
        wait_ms = (start - gen.submitted_mono) * 1000
        gen._emit("start")
        text_parts: list[str] = []
        calls = tools.offered(gen.params.tools or [], gen.params.tool_choice)
        held: list[str] | None = [] if calls else None  # a reply that may be a call is shown once it is not
        tool_calls: list[dict] = []
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
                        if held is None:
                            gen._emit("token", choice["text"])
                        else:
                            held.append(choice["text"])
                            start_text = "".join(held).lstrip()
                            if start_text and not start_text.startswith("{"):  # plain text: an answer
                                gen._emit("token", "".join(held))
                                held = None
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
            if held is not None:  # it started with "{": a call, or a JSON answer
                call = tools.parse_call("".join(text_parts), calls) if finish == "stop" else None
                if call is not None:
                    tool_calls, text_parts = [call], []
                elif held:
                    gen._emit("token", "".join(held))
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
        result.tool_calls = tool_calls
        self._finish(gen, result, error)


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
