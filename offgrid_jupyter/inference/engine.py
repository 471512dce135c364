"""The in-process inference engine: one model, one engine thread, continuous batching.

One ``Engine`` per process owns one loaded GGUF. A ``Llama`` is not thread-safe, so a
single engine thread owns it; callers get a :class:`Generation` handle that streams text
deltas and ends with a :class:`GenerationResult`. Up to ``n_parallel`` requests are served at
once, decoded together in one llama.cpp context (see :mod:`offgrid_jupyter.batching`); the
rest wait in the FIFO queue of :class:`~offgrid_jupyter.backend.QueueBackend`, with its bound,
timeout and statistics. A request for another model waits until the running ones end.

This module turns a request into a prompt: the model's own chat template, the oldest turns
dropped to fit the context (in about one formatting), tools and JSON schemas turned into
grammars. Per-session KV reuse and the batching itself are in ``batching.py``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from . import toolcalls
from .backend import QueueBackend
from .generation import Generation, GenerationParams
from .batching import Batcher, KVCache, Slot
from .completion import CompletionRequest, cache_key, prompt_tokens
from .kvdisk import KVDisk, fingerprint
from ..errors import (ContextOverflowError, EngineBusyError, InvalidRequestError, ModelError, OffgridError,
                      UnusableModelError)
from .llamacpp import LlamaModel, grammar, grammar_for, tool_grammar
from .models import ModelInfo, resolve_model
from .threads import ThreadTuner, available_cores

log = logging.getLogger(__name__)

MB = 1 << 20
TOKEN_COUNT_CACHE = 8192  # per-message token counts kept for fitting long histories
CELLS_PER_SEQUENCE = 512  # KV cells a sequence should have for a prompt and a reply (default n_parallel)
MAX_PARALLEL = 8  # the default's ceiling: 8 rows a step already fill 2 cores (bench/concurrency.py)


def default_parallel(n_ctx: int) -> int:
    """The sequences decoded together when n_parallel is not given: one per 512 cells of the context,
    at most 8 (4,096 cells: 8). The cache is unified, so a sequence costs no KV memory of its own,
    only its share of the logits and bookkeeping (measured: 1.3 MB each); the cells a request needs
    are reserved at admission, so more sequences than fit simply wait there. With 4 by default, 8
    notebooks at once got 1.10x one-at-a-time instead of 1.50x with 8 (bench/concurrency.py)."""
    return max(1, min(MAX_PARALLEL, n_ctx // CELLS_PER_SEQUENCE))
PREFILL_STALL = 0.5  # seconds of prompt a step may read while others decode: bounds their longest stall
COMPLETION_CTX = 1024  # KV cells of the inline completions' own sequence (prompt + suggestion)
KV_DISK_BYTES = 2048 * MB  # the session snapshots kept on disk (kvdisk.py), at most
MAX_URGENT = 8  # inline completions waiting at once (each keystroke replaces its file's previous one)


class Engine(QueueBackend):
    """One model in this process, one engine thread, up to ``n_parallel`` requests decoded together."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_parallel: int | None = None,
        prefill_stall: float = PREFILL_STALL,
        chat_format: str | None = None,
        queue_timeout: float = 1800.0,
        max_queue: int = 64,
        kv_cache_bytes: int = 512 * MB,
        defaults: GenerationParams | None = None,
        tune_threads: bool = True,
        completion_ctx: int = COMPLETION_CTX,
        prompt_lookup: bool = True,
        kv_dir: str | os.PathLike | None = None,
        kv_disk_bytes: int = KV_DISK_BYTES,
    ):
        super().__init__(queue_timeout=queue_timeout, max_queue=max_queue, defaults=defaults)
        if n_parallel is None and isinstance(n_ctx, int) and not isinstance(n_ctx, bool):
            n_parallel = default_parallel(n_ctx)
        for name, value, low, high in (("n_ctx", n_ctx, 64, 1 << 22), ("n_parallel", n_parallel, 1, 64),
                                       ("n_batch", n_batch, 8, 1 << 16), ("completion_ctx", completion_ctx, 0, 1 << 16)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidRequestError(f"{name} must be an integer from {low} to {high}, got {value!r}.")
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.completion_ctx = completion_ctx  # 0: no inline completions (no reserved sequence)
        self._prompt_lookup = bool(prompt_lookup)  # drafts from the context (speculative.py)
        self._batcher: Batcher | None = None
        self._urgent: deque[Generation] = deque()  # inline completions: never behind the chats' FIFO
        self.n_threads = n_threads or available_cores()
        self.n_parallel = self.slots = n_parallel
        self.prefill_stall = float(prefill_stall)
        self.n_batch = max(n_batch, n_parallel + 16)  # a step: every decoding token and some prompt
        self.chat_format = chat_format
        self.kv = KVCache(kv_cache_bytes)
        self.disk: KVDisk | None = None
        if kv_dir is not None and kv_disk_bytes > 0:
            try:
                self.disk = KVDisk(kv_dir, kv_disk_bytes)
            except OSError as exc:  # a read-only data directory: snapshots stay in memory
                log.warning("offgrid engine: no KV snapshots on disk (%s): %s", kv_dir, exc)
        self.tuner = ThreadTuner(self.n_threads, tune=tune_threads)

        self._model: ModelInfo | None = None
        self._llm: LlamaModel | None = None
        self._batcher: Batcher | None = None
        self._loaded: ModelInfo | None = None
        self._token_counts: OrderedDict[tuple[str, str], int] = OrderedDict()  # (model, message digest) -> tokens
        self._overhead = 8.0  # template tokens per message, learnt from each fitted prompt
        self._grammars: dict[str, Any] = {}  # GBNF text -> llama-cpp-python grammar, for tool calls
        self._grammars_lock = threading.Lock()
        self._forgotten: set[str] = set()  # deleted sessions whose cells the engine thread drops

    @property
    def prompt_lookup(self) -> bool:
        """Whether replies are drafted from their context (prompt-lookup decoding, speculative.py);
        set it to turn drafting on or off from the next request on."""
        return self._prompt_lookup

    @prompt_lookup.setter
    def prompt_lookup(self, on: bool) -> None:
        self._prompt_lookup = bool(on)
        if self._batcher is not None:
            self._batcher.draft = self._prompt_lookup

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
        """A model a request names: checked now (never loaded here), a 400 naming the path if unusable."""
        try:
            return resolve_model(model)
        except ModelError as exc:
            raise UnusableModelError(str(exc)) from None

    def _interrupt(self, gen: Generation) -> None:
        batcher = self._batcher
        if batcher is not None:
            batcher.interrupt(gen)

    def _queue_extra(self) -> dict[str, Any]:
        batcher = self._batcher
        drafted, kept = (batcher.drafted, batcher.accepted) if batcher is not None else (0, 0)
        return {"cache": {**self.kv.stats(), **({"disk": self.disk.stats()} if self.disk is not None else {})},
                "drafts": {"drafted": drafted, "accepted": kept, "rate": round(kept / drafted, 4) if drafted else 0.0}}

    def describe(self) -> dict[str, Any]:
        try:
            m = self.model
        except OffgridError as exc:
            return {"kind": "llama.cpp", "loaded": False, "error": str(exc)}
        return {
            "kind": "llama.cpp", "name": m.name, "path": str(m.path), "source": m.source,
            "size_bytes": m.size_bytes, "loaded": self.loaded, "n_ctx": self.n_ctx, "n_threads": self.n_threads,
            "n_parallel": self.n_parallel, "completion_ctx": self.completion_ctx, "decode_threads": self.tuner.current,
            "prompt_lookup": self.prompt_lookup,
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
        """*info* in memory (it replaces the loaded model). A file llama.cpp cannot load leaves the
        model that was loaded in place (loaded again: there is memory for one at a time), and
        fails the request that named it with a 400; the configured model's failure stays a 503."""
        if self._llm is not None and self._loaded == info:
            return self._llm
        previous = self._loaded
        self._unload()
        try:
            llm = self._open(info)
        except ModelError as exc:
            if previous is not None:
                try:
                    self._llm, self._loaded = self._open(previous), previous
                    self._batcher = self._new_batcher(self._llm)
                except ModelError:
                    log.exception("offgrid engine: could not load %s again", previous.path)
            if info != self._model:
                raise UnusableModelError(str(exc)) from None
            raise
        self._llm, self._loaded = llm, info
        self._batcher = self._new_batcher(llm)
        if self.disk is not None:
            self.disk.model = fingerprint(info.path)  # a snapshot of another model is never loaded
        return llm

    def _open(self, info: ModelInfo) -> LlamaModel:
        extra = 1 if self.completion_ctx else 0  # the inline completions' sequence and cells
        return LlamaModel(str(info.path), n_ctx=self.n_ctx + self.completion_ctx, n_batch=self.n_batch,
                          n_threads=self.n_threads, n_parallel=self.n_parallel + extra, chat_format=self.chat_format,
                          should_abort=lambda: self._batcher is not None and self._batcher.aborting)

    def _new_batcher(self, llm: LlamaModel) -> Batcher:
        return Batcher(llm, self.kv, self.tuner, n_threads=self.n_threads, stall=self.prefill_stall,
                       done=self._slot_done, n_ctx=self.n_ctx, reserved=bool(self.completion_ctx),
                       draft=self.prompt_lookup, disk=self.disk)

    def _unload(self) -> None:
        if self._llm is not None:
            self._llm.close()
        self._llm = self._loaded = self._batcher = None
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
        calls = toolcalls.offered(params.tools or [], params.tool_choice)
        if calls:  # the tools go into the system prompt, and the grammar allows a call (or an answer)
            messages = toolcalls.for_template(messages, toolcalls.instructions(calls, params.tool_choice))
            sampling["grammar"] = self._tool_grammar(calls, params)
        else:
            messages = toolcalls.for_template(messages)  # earlier calls in the history, as the model wrote them
            if params.response_format is not None:  # the chat handler turns it into a llama.cpp grammar
                sampling["response_format"] = params.response_format
        budget = self.n_ctx - min(params.max_tokens, max(64, self.n_ctx // 8))
        tokens = [self._count(llm, m) for m in messages]  # the text alone; the template adds ~overhead each
        cost = [t + self._overhead for t in tokens]
        keep = [i == len(messages) - 1 or m["role"] == "system" for i, m in enumerate(messages)]
        fixed = sum(c for c, k in zip(cost, keep) if k)
        if fixed > budget:
            raise self._overflow(int(fixed))
        order = [i for i, k in enumerate(keep) if not k]  # the droppable ones, oldest first

        def attempt(drop: int) -> tuple[dict, int]:
            gone = set(order[:drop])
            kept = [i for i in range(len(messages)) if i not in gone]
            kwargs = llm.format([messages[i] for i in kept], **sampling)
            n = len(kwargs["prompt"])
            self._overhead = max(0.0, (n - sum(tokens[i] for i in kept)) / len(kept))
            return kwargs, n

        drop, excess = 0, sum(cost) - budget
        while True:
            while excess > 0 and drop < len(order):
                excess -= cost[order[drop]]
                drop += 1
            kwargs, n = attempt(drop)
            if n <= budget:
                break
            if drop == len(order):
                raise self._overflow(n)
            excess = max(n - budget, 1)  # the estimate was short: drop more, by the counts again
        if drop:
            # The estimate may have dropped more than needed: the overhead it used was learnt per message
            # from the last prompt, template's fixed part (a default system prompt) included, so after a
            # one-message prompt a long history lost 600 tokens it had room for, and its next turn shared
            # no prefix with this one (no KV reuse: 17 s instead of 0.3). This prompt's overhead is
            # nearly the true one: the counts once more, and one more formatting if fewer drops fit.
            again = [t + self._overhead for t in tokens]
            fewer, excess = 0, sum(again) - budget
            while excess > 0 and fewer < drop:
                excess -= again[order[fewer]]
                fewer += 1
            if fewer < drop:
                candidate, m = attempt(fewer)
                if m <= budget:
                    kwargs = candidate
        return kwargs

    def _tool_grammar(self, calls: list[dict], params: GenerationParams) -> Any:
        forced = params.tool_choice == "required" or isinstance(params.tool_choice, dict)
        answer = None
        if params.response_format is not None:
            answer = params.response_format.get("schema") or {"type": "object"}
        text = tool_grammar(toolcalls.call_schema(calls), answer, answer=not forced)
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

    # -- inline completions -----------------------------------------------------------------
    def complete_inline(self, request: CompletionRequest) -> Generation:
        """Start an inline completion (a raw prompt, greedy, nothing stored but its statistics,
        source "completion"): it never waits in the chats' queue; it joins the next decode step in
        its own sequence. A newer request for the same file replaces one still waiting."""
        request.check()
        if not self.completion_ctx:
            raise InvalidRequestError("Inline completions are off for this engine (completion_ctx is 0).")
        params = self.params(max_tokens=request.max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0, seed=0)
        gen = Generation(self, [], None, params, "completion", self.model)
        gen.completion, gen.cache_key = request, cache_key(request.path)
        with self._cv:
            if self._closed:
                raise OffgridError("The engine has been closed.")
            for old in [g for g in self._urgent if g.cache_key == gen.cache_key]:
                self._urgent.remove(old)
                self._finish_unstarted(old, "cancelled")  # superseded by the newer keystroke
            if len(self._urgent) >= MAX_URGENT:
                raise EngineBusyError(f"{MAX_URGENT} inline completions are waiting already; try again shortly.")
            self._urgent.append(gen)
            self._ensure_threads()
            self._cv.notify()
        return gen

    def _withdraw(self, gen: Generation, reason: str) -> bool:
        with self._cv:
            if gen in self._urgent:
                self._urgent.remove(gen)
                self._finish_unstarted(gen, reason)
                return True
        return super()._withdraw(gen, reason)

    def close(self) -> None:
        with self._cv:
            for gen in list(self._urgent):
                self._finish_unstarted(gen, "cancelled")
            self._urgent.clear()
        super().close()
        if self.disk is not None:
            self.disk.flush()  # the engine thread handed its conversations over as it ended

    def forget(self, session_id: str) -> None:
        """A session was deleted: its snapshot leaves the disk (and the memory LRU, on the engine
        thread, before the next request starts)."""
        if self.disk is not None:
            self.disk.forget(session_id)
        with self._cv:
            self._forgotten.add(session_id)
            self._cv.notify_all()

    def _completion_start(self, llm: LlamaModel, gen: Generation) -> None:
        """Admit an inline completion into the reserved sequence: its prompt fits its own cells."""
        request: CompletionRequest = gen.completion
        budget = self.completion_ctx - min(request.max_tokens, self.completion_ctx // 2)
        prompt = prompt_tokens(llm, request, budget)
        if not prompt:  # nothing before the cursor and no BOS: nothing to continue (an empty batch never ends)
            self._end(gen, error=None, prompt=0, finish="stop", now=time.monotonic())
            return
        kwargs = {"prompt": prompt, "stop": request.stops(), "temperature": 0.0, "top_k": 1, "top_p": 1.0,
                  "repeat_penalty": 1.0, "seed": 0}
        limit = max(1, min(request.max_tokens, self.completion_ctx - len(prompt)))
        self._batcher.admit(gen, kwargs, limit, urgent=True)

    def _check(self, params: GenerationParams) -> None:
        schema = (params.response_format or {}).get("schema")
        if schema is not None:
            grammar_for(schema)  # a construct llama.cpp's grammars cannot express is the caller's 400, now
        calls = toolcalls.offered(params.tools or [], params.tool_choice)
        if calls:
            self._tool_grammar(calls, params)  # the same for a tool's parameters


    # -- the engine thread ----------------------------------------------------------------
    def _ensure_threads(self) -> None:
        """One engine thread serves every slot (a Llama is not thread-safe)."""
        self._threads = [t for t in self._threads if t.is_alive()]
        if not self._threads:
            thread = threading.Thread(target=self._run, name="offgrid-engine", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                idle = not self._pending and not self._urgent and not self._busy()
                forgotten, self._forgotten = self._forgotten, set()
            self._drop(forgotten)
            if idle and self._batcher is not None:
                self._batcher.persist()  # nothing runs: the conversations in the cache go to the disk
            with self._cv:
                while (not self._closed and not self._pending and not self._urgent and not self._busy()
                       and not self._forgotten):
                    self._cv.wait()
                if self._closed:
                    break
                if self._forgotten:
                    continue
                gen = self._admissible()
            if gen is not None:
                self._start(gen)  # new requests join before the next step
            elif self._busy():
                self._step()
            else:  # pragma: no cover - a head that cannot start with nothing running cannot happen
                time.sleep(0.01)
        if self._batcher is not None:
            self._batcher.cancel_all()
            self._batcher.persist()

    def _drop(self, sessions: set[str]) -> None:
        """Forget deleted sessions' cells (engine thread)."""
        for session in sessions:
            self.kv.discard(session)
            if self._batcher is not None:
                self._batcher.forget(session)

    def _busy(self) -> bool:
        return self._batcher is not None and bool(self._batcher.active)

    def _admissible(self) -> Generation | None:
        """The first inline completion, else the queue's first request, taken out of its queue, if
        it can start now (under the lock)."""
        for queue, free in ((self._urgent, "reserved_free"), (self._pending, "free")):
            if not queue:
                continue
            gen = queue[0]
            if self._busy():
                same_model = self._llm is not None and self._loaded == gen.model
                if not same_model or not getattr(self._batcher, free):
                    continue  # another model waits for the running requests to end; FIFO behind it
            queue.popleft()
            break
        else:
            return None
        gen.started_mono = time.monotonic()
        gen.state = "running"
        self._running.append(gen)
        return gen

    def _start(self, gen: Generation) -> None:
        gen._emit("start")
        try:
            if self._llm is None or self._loaded != gen.model:
                gen._emit("loading", {"model": gen.model.name, "size_bytes": gen.model.size_bytes})
            llm = self._load(gen.model)
            if gen.completion is not None:
                self._completion_start(llm, gen)
                return
            kwargs = self._fit(llm, gen.messages, gen.params)
            # a reply stops where the context ends ("length"), never with llama.cpp out of KV cells
            limit = max(1, min(gen.params.max_tokens, self.n_ctx - len(kwargs["prompt"])))
            self._batcher.admit(gen, kwargs, limit, toolcalls.offered(gen.params.tools or [], gen.params.tool_choice))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, the engine survives
            self._end(gen, error=exc, prompt=0)

    def _step(self) -> None:
        try:
            self._batcher.step()
        except Exception as exc:  # noqa: BLE001 - unexpected: the running requests end, the engine survives
            log.exception("offgrid engine: a decode step failed")
            self._batcher.fail_all(exc)

    def _slot_done(self, slot: Slot) -> None:
        """A slot ended (on the engine thread): resolve its request."""
        now = time.monotonic()
        gen = slot.gen
        call = None
        if slot.calls and slot.finish == "stop":  # a reply that started with "{": a call, or a JSON answer
            call = toolcalls.parse_call("".join(slot.text) + slot.pending if slot.deciding else "", slot.calls)
        text = "" if call else "".join(slot.text)
        self._end(gen, error=slot.error, prompt=len(slot.prompt), cached=slot.cached, completion=len(slot.sampled),
                  text=text, finish=slot.finish, ttft=slot.ttft, now=now, tool_calls=[call] if call else [])

    def _end(self, gen: Generation, *, error: BaseException | None, prompt: int, cached: int = 0,
             completion: int = 0, text: str = "", finish: str = "error", ttft: float | None = None,
             now: float | None = None, tool_calls: list | None = None) -> None:
        now = now or time.monotonic()
        start = gen.started_mono
        result = self._result(gen, text, "error" if error else finish, (start - gen.submitted_mono) * 1000,
                              prompt=prompt, cached=cached, completion=completion,
                              ttft=None if ttft is None else (ttft - start) * 1000, total_ms=(now - start) * 1000,
                              error=type(error).__name__ if error else None,
                              decode_s=(now - ttft) if ttft else 0.0)
        result.tool_calls = tool_calls or []
        with self._cv:
            if gen in self._running:
                self._running.remove(gen)
            self._cv.notify_all()
        self._finish(gen, result, error)
