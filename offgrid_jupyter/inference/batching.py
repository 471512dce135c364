"""Continuous batching: up to ``n_parallel`` generations decoded together in one llama.cpp context.

Why: decoding one token reads all of the model's weights; decoding one token for each of
eight sequences reads them once too, so eight streams cost little more than one (measured
on 2 cores with the default model: see ``bench/concurrency.py``). llama.cpp's server and
Ollama do the same (slots, ``OLLAMA_NUM_PARALLEL``).

How (engine thread only):

- The context has ``n_parallel`` sequences (:class:`Sequence`, one ``seq_id`` each) in one
  *unified* KV cache of ``n_ctx`` cells: a conversation alone may use the whole context,
  several share it. A request is served in a :class:`Slot` bound to one sequence.
- Every :meth:`Batcher.step` is one ``llama_decode`` over one batch: the last sampled token
  of every generating slot, then as much of the waiting prompts as the step's budget allows
  (while others generate, as many prompt tokens as the measured cost per token fits in the
  stall budget, 0.5 s by default, so a long prompt stalls nobody for much longer than that;
  the whole batch when it is alone). New requests join at the next step.
- Each slot samples from its own rows with its own sampler: the chain llama-cpp-python's
  ``create_completion`` would build (temperature, top-p/top-k, repeat penalty, seed, grammar).
  Text is decoded incrementally (a character split across tokens waits for its last byte);
  stop strings are held back until they can no longer start one.
- In a unified cache every token attends over every occupied cell (masked), so an idle
  conversation left in the cache slows everyone (measured: one stream at 47 instead of
  82 tok/s beside a 1,500-token idle one). So a sequence keeps its session's conversation
  after a turn only while nothing else runs (the common case: one person, turn after turn,
  evaluates only the new tokens); as soon as another request runs beside it, its cells are
  copied out into the engine's byte-bounded LRU of snapshots (``llama_state_seq_get_data``,
  a few ms) and freed, and copied back later into whatever sequence the session then gets
  (``llama_state_seq_set_data`` into that seq_id).
- Admission reserves cells: a slot holds its prompt plus the reply it may still write, so
  concurrent sequences never run out of KV cells mid-reply; a prompt that does not fit beside
  the running ones waits (first come, first served) until they end. (A cache split into one
  stream per sequence, llama.cpp's other mode, would avoid the shared attention but hold
  ``n_ctx`` cells per sequence: 4 sequences of the default model's 4,096 tokens resident
  took 564 MB instead of 208.)
- A failure in one slot (its sampler, its grammar) ends that request only; a failed decode
  step ends the requests in it and leaves the others untouched.
- A decoding slot may add drafted tokens after its last sampled one (prompt-lookup decoding,
  ``speculative.py``): their rows get logits, the slot samples row after row while the sampled
  token is the draft, and the cells of drafts it did not keep leave at once.
- A session's conversation also goes to disk when the engine is idle or when it leaves the cache
  (``kvdisk.py``), and comes back from there when neither a sequence nor the LRU has it (after a
  restart).
- Inline completions (``completion.py``) never wait behind chats: one more sequence is kept for
  them (``reserved``), with cells of their own beyond the chats' ``n_ctx``, so a completion joins
  the next step whatever runs; its prompt is read before any chat's. Its cells are kept under
  the file's key (``Generation.cache_key``) like a session's, so the next keystroke reads only
  the new characters; they stay while someone types, also beside chats, and go to the snapshot
  LRU like any idle conversation after ``COMPLETION_IDLE`` seconds without a keystroke.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from . import toolcalls
from .speculative import Drafter
from ..errors import ContextOverflowError

WAITING, PROMPT, DECODING = "waiting", "prompt", "decoding"  # a slot's phases
ROW_COST = 0.5  # a first guess of a draft row's cost, as a share of a decode step (then measured)
COMPLETION_IDLE = 2.0  # seconds without a keystroke after which a completion's cells leave the cache


class KVSnapshot:
    """A session's conversation copied out of its sequence: its tokens and their KV cells."""

    __slots__ = ("tokens", "data", "nbytes")

    def __init__(self, tokens: np.ndarray, data: ctypes.Array):
        self.tokens = tokens
        self.data = data
        self.nbytes = len(data) + tokens.nbytes


class KVCache:
    """Byte-bounded LRU of per-session KV snapshots (engine thread only)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, KVSnapshot] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0
        self.evictions = 0

    def get(self, key: str) -> KVSnapshot | None:
        snap = self._items.get(key)
        if snap is not None:
            self._items.move_to_end(key)
        return snap

    def put(self, key: str, snap: KVSnapshot) -> None:
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


def _common_prefix(a: Any, b: Any) -> int:
    a, b = np.asarray(a, dtype=np.intc), np.asarray(b, dtype=np.intc)
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _key(tokens: Any) -> tuple[int, int]:
    """Which tokens a snapshot holds, in short (to tell whether the disk has them already)."""
    return len(tokens), hash(np.asarray(tokens, dtype=np.intc).tobytes())


class Sequence:
    """One of the context's sequences: which session's conversation its cells hold."""

    __slots__ = ("id", "owner", "tokens", "dirty", "slot", "used_at", "persisted")

    def __init__(self, seq_id: int):
        self.id = seq_id
        self.owner: str | None = None  # session id whose conversation is in the cells
        self.tokens: list[int] = []  # the tokens whose cells are in the cache
        self.dirty = False  # changed since it was last saved to the snapshot LRU
        self.persisted: Any = None  # _key() of the tokens last handed to the disk (kvdisk.py)
        self.slot: Slot | None = None
        self.used_at = 0.0


class Slot:
    """One request being served in a sequence."""

    def __init__(self, gen: Any, kwargs: dict, limit: int, sampler: Any, order: int, calls: list[dict],
                 urgent: bool = False):
        self.gen, self.kwargs, self.limit, self.sampler, self.order = gen, kwargs, limit, sampler, order
        self.urgent = urgent  # an inline completion, in the reserved sequence
        self.owner: str | None = getattr(gen, "cache_key", None) or gen.session_id  # whose cells these are
        self.prompt: list[int] = list(kwargs["prompt"])
        self.seq: Sequence | None = None
        self.phase = WAITING
        self.cursor = 0  # next prompt token to evaluate
        self.n_past = 0  # tokens of this sequence in the KV cache
        self.cached = 0  # prompt tokens reused from the cache
        self.row = -1  # this step's batch row holding its logits (-1: none); drafts' rows follow it
        self.drafts: list[int] = []  # this step's drafted tokens (speculative.py), after the last sampled one
        self.drafter: Drafter | None = None  # made when decoding starts, if the batcher drafts
        self.sampled: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.text: list[str] = []  # text emitted so far
        self.pending = ""  # decoded text held back (it may begin a stop string, or a tool call)
        self.stops = [s for s in (kwargs.get("stop") or []) if s]
        self.calls = calls  # the tools this reply may call (toolcalls.offered): a reply starting "{" may be one
        self.deciding = bool(self.calls)  # a reply that may be a call is shown once it is not one
        self.ttft: float | None = None
        self.finish: str | None = None
        self.error: BaseException | None = None

    @property
    def reserve(self) -> int:
        """KV cells this slot may come to hold: its prompt and the longest reply it may write."""
        return len(self.prompt) + self.limit


class Batcher:
    """The slots of one loaded model (see the module docstring)."""

    def __init__(self, llm: Any, kv: Any, tuner: Any, *, n_threads: int, stall: float,
                 done: Callable[[Slot], None], n_ctx: int | None = None, reserved: bool = False,
                 draft: bool = True, disk: Any = None):
        self.llm, self.kv, self.tuner = llm, kv, tuner
        self.n_ctx, self.n_batch = n_ctx or llm.n_ctx, llm.n_batch  # the chats' cells (completions have more)
        self.n_threads, self.stall, self.done = n_threads, stall, done
        self.draft = draft  # prompt-lookup decoding (speculative.py)
        self.disk = disk  # session snapshots on disk (kvdisk.py), or None
        self.drafted = self.accepted = 0  # draft tokens put in steps, and sampled as drafted
        # a draft row's time over what a sampled token costs in a decode step (the step's time over its
        # rows: alone, the whole step; beside 7 others, an eighth of it, so a draft that delays them all
        # must be worth that much more); measured in steps with drafts
        self.row_cost = ROW_COST
        self.fixed_row_cost: float | None = None  # set: drafts are priced at this, never measured (tests)
        self.token_cost = 0.004  # seconds per prompt token read in a step (measured; a first guess)
        self.decode_cost = 0.0  # seconds of a decode-only step (measured)
        self.decode_rows = 1  # the rows of that step
        self.seqs = [Sequence(i) for i in range(llm.n_parallel)]
        self.reserved = self.seqs[-1] if reserved else None  # the inline completions' own sequence
        self.chat_seqs = self.seqs[:-1] if reserved else self.seqs
        self.active: list[Slot] = []
        self._order = 0
        self._tuning = False  # the tuner is measuring a run of decode-only steps
        self._retried = False  # a step refused for lack of KV cells goes once more, after evictions
        self.aborting = False  # read by llama.cpp's abort callback while a prompt chunk runs
        self._reading: set[int] = set()  # ids of the generations whose prompt chunk is being decoded

    # -- admission ---------------------------------------------------------------------------
    @property
    def free(self) -> bool:
        """A request may join now: a sequence is free and nobody waits for cells before it."""
        chats = [s for s in self.active if not s.urgent]
        return len(chats) < len(self.chat_seqs) and not any(s.phase == WAITING for s in chats)

    @property
    def reserved_free(self) -> bool:
        """An inline completion may join now (its sequence is not serving another)."""
        return self.reserved is not None and self.reserved.slot is None

    def admit(self, gen: Any, kwargs: dict, limit: int, calls: list[dict] | None = None, *,
              urgent: bool = False) -> Slot:
        if not kwargs["prompt"]:
            raise ValueError("An empty prompt cannot be decoded.")  # its slot would wait for logits forever
        self._order += 1
        slot = Slot(gen, kwargs, limit, self.llm.sampler(kwargs), self._order, calls or [], urgent)
        self.active.append(slot)
        self._place(slot)
        return slot

    def _place(self, slot: Slot) -> bool:
        """Give a waiting slot a sequence and reserve its cells; False while they are not free."""
        seq = self._choose(slot)
        if seq is None:
            return False
        for other in self.seqs:  # idle conversations in the cache cost every token attention: out they go
            if other is not seq and other.slot is None and other.tokens:
                self._evict(other)
        if not slot.urgent and sum(s.slot.reserve for s in self.chat_seqs if s.slot is not None) \
                + slot.reserve > self.n_ctx:
            return False  # the running slots hold the cells: wait for one to end (a completion has its own)
        self._bind(slot, seq)
        return True

    def _choose(self, slot: Slot) -> Sequence | None:
        """The free sequence that serves this prompt best: its session's own (still in the cache),
        else the one sharing the longest prefix with it, else an empty one."""
        if slot.urgent:
            return self.reserved if self.reserved_free else None
        free = [s for s in self.chat_seqs if s.slot is None]
        if not free:
            return None
        session = slot.owner
        own = [s for s in free if session is not None and s.owner == session]
        if own:
            return own[0]
        return max(free, key=lambda s: (_common_prefix(s.tokens, slot.prompt), not s.tokens))

    def _bind(self, slot: Slot, seq: Sequence) -> None:
        llm, session = self.llm, slot.owner
        if seq.owner is not None and seq.owner != session:
            self._save(seq)  # the cells change hands: their session's conversation goes to the LRU first
        if seq.owner != session:
            snap, on_disk = (self.kv.get(session) if session else None), False
            if snap is None and session and not slot.urgent and self.disk is not None:
                snap, on_disk = self._from_disk(session), True
            if snap is not None:
                self.kv.hits += 1
                if _common_prefix(snap.tokens, slot.prompt) > _common_prefix(seq.tokens, slot.prompt):
                    self._evict(seq)
                    if llm.seq_load(seq.id, snap.data):
                        seq.tokens, seq.dirty = list(snap.tokens), False
                        seq.persisted = _key(seq.tokens) if on_disk else None
                    elif on_disk:
                        self.disk.forget(session)  # llama.cpp refused the cells: the file is of no use
            elif session:
                self.kv.misses += 1
        reuse = min(_common_prefix(seq.tokens, slot.prompt), max(0, len(slot.prompt) - 1))
        if reuse < len(seq.tokens):
            llm.seq_rm(seq.id, reuse)
        seq.tokens = list(slot.prompt[:reuse])
        if seq.owner != session:
            seq.persisted = None
        seq.owner, seq.slot, seq.dirty = session, slot, True
        slot.seq, slot.cursor, slot.n_past, slot.cached = seq, reuse, reuse, reuse
        slot.phase = PROMPT
        self.kv.tokens_reused += reuse

    def _evict(self, seq: Sequence) -> None:
        """Free a sequence's cells, saving its session's conversation to the snapshot LRU first."""
        self._save(seq)
        self.llm.seq_rm(seq.id)
        seq.tokens, seq.owner, seq.dirty, seq.persisted = [], None, False, None

    def _save(self, seq: Sequence) -> None:
        """Copy a session's conversation out of its sequence into the snapshot LRU (if it changed),
        and to the disk."""
        if seq.owner and seq.dirty and seq.tokens:
            snap = KVSnapshot(np.asarray(seq.tokens, dtype=np.intc), self.llm.seq_save(seq.id))
            self.kv.put(seq.owner, snap)
            self._to_disk(seq, snap)
        seq.dirty = False

    # -- snapshots on disk (kvdisk.py) --------------------------------------------------------------
    def _to_disk(self, seq: Sequence, snap: KVSnapshot) -> None:
        if self.disk is not None and seq is not self.reserved and seq.persisted != _key(snap.tokens):
            self.disk.save(seq.owner, snap.tokens, snap.data)
            seq.persisted = _key(snap.tokens)

    def persist(self) -> None:
        """Hand the conversations still only in the cache to the disk (when the engine is idle: the
        copy out takes a few ms per thousand tokens; the writing happens on the disk's thread)."""
        if self.disk is None:
            return
        for seq in self.chat_seqs:
            if seq.slot is None and seq.owner and seq.tokens and seq.persisted != _key(seq.tokens):
                self._to_disk(seq, KVSnapshot(np.asarray(seq.tokens, dtype=np.intc), self.llm.seq_save(seq.id)))

    def _from_disk(self, session: str) -> KVSnapshot | None:
        found = self.disk.load(session)
        if found is None:
            return None
        tokens, data = found
        return KVSnapshot(tokens, data)

    def forget(self, session: str) -> None:
        """A deleted session's cells leave its idle sequence without being saved anywhere."""
        for seq in self.chat_seqs:
            if seq.owner == session and seq.slot is None:
                self.llm.seq_rm(seq.id)
                seq.tokens, seq.owner, seq.dirty, seq.persisted = [], None, False, None

    def evict_all(self) -> None:
        for seq in self.seqs:
            if seq.slot is None and seq.tokens:
                self._evict(seq)

    @property
    def chunk(self) -> int:
        """Prompt tokens a step may read while others decode: as many as fit in the stall budget
        at the measured cost per token (at least 16, so a long prompt still moves on)."""
        room = max(0.0, self.stall - self.decode_cost)  # a step also decodes everyone's next token
        return max(16, min(self.n_batch - len(self.seqs), int(room / max(self.token_cost, 1e-5))))

    # -- one step -------------------------------------------------------------------------------
    def _idle_completions(self) -> None:
        """The completions' cells stay in the cache between keystrokes, also while chats run: saving
        them out at each keystroke and back at the next cost 9 ms, and the churn scattered the
        unified cache's cells, which slows every sequence's attention (measured: a chat's step from
        9.3 to 14.2 ms after 12 such rounds). Once nobody has typed for COMPLETION_IDLE seconds, they
        go like any idle conversation's."""
        seq = self.reserved
        if (seq is not None and seq.slot is None and seq.tokens and len(self.active) > 0
                and time.monotonic() - seq.used_at > COMPLETION_IDLE):
            self._evict(seq)

    def step(self) -> None:
        """One llama_decode over every slot that has work; then each samples and streams."""
        for slot in [s for s in self.active if s.gen.cancelled]:
            self._end(slot, "cancelled")  # waiting or reading its prompt: ends now
        self._idle_completions()
        for slot in [s for s in self.active if s.phase == WAITING]:
            if not self._place(slot):
                break  # first come, first served
        llm = self.llm
        llm.clear()
        decoding = [s for s in self.active if s.phase == DECODING]
        reading = sorted((s for s in self.active if s.phase == PROMPT), key=lambda s: (not s.urgent, s.order))
        for i, s in enumerate(decoding):
            s.drafts = self._propose(s, len(decoding) - i - 1)
            s.row = llm.add([s.sampled[-1]] + s.drafts, s.n_past, s.seq.id, True, every=bool(s.drafts))
            s.row -= len(s.drafts)  # the first of its rows
        drafting = any(s.drafts for s in decoding)
        budget = (self.chunk if decoding else self.n_batch) - llm.batched  # alone: the whole batch
        chunked = []
        for s in reading:
            s.row = -1
            if budget <= 0:
                continue
            take = min(budget, len(s.prompt) - s.cursor)
            last = s.cursor + take == len(s.prompt)
            row = llm.add(s.prompt[s.cursor:s.cursor + take], s.cursor, s.seq.id, last)
            s.row = row if last else -1
            s.cursor += take
            budget -= take
            chunked.append(s)
        if not llm.batched:
            return
        full = self.n_threads
        llm.set_threads(self.tuner.threads, full if chunked else self.tuner.threads)
        self._reading = {id(s.gen) for s in chunked}
        self.aborting = any(s.gen.cancelled and not s.urgent for s in chunked)
        started = time.monotonic()
        try:
            rc = llm.decode(abortable=bool(chunked))
        finally:
            self._reading = set()
        if rc != 0:
            self._failed_step(rc, decoding, chunked)
            return
        self._retried = False
        now = time.monotonic()
        if chunked:
            self._tuning = False
            read = llm.batched - len(decoding)  # the step's time, less what its decoding tokens cost
            # the latest measure, not an average: the cost grows with the cells every token attends to
            self.token_cost = max(0.0, now - started - (self.decode_cost if decoding else 0.0)) / max(read, 1)
        elif drafting:  # what its draft rows cost, over a decode step
            rows = llm.batched - len(decoding)
            if self.decode_cost > 0 and self.fixed_row_cost is None:
                per_row = self.decode_cost / self.decode_rows  # what one sampled token costs the machine
                base = self.decode_cost if self.decode_rows == len(decoding) else per_row * len(decoding)
                measured = max(0.0, now - started - base) / rows / per_row
                self.row_cost += 0.3 * (min(measured, 2.0) - self.row_cost)
        else:
            self.decode_cost, self.decode_rows = now - started, len(decoding)
            if not self._tuning:
                self.tuner.start()  # the gap since the last decode-only step is no token time
                self._tuning = True
            threads = self.tuner.token(now)
            if threads is not None:
                llm.set_threads(threads, threads)
        for s in decoding:
            s.n_past += 1
        for s in chunked:
            s.n_past = s.cursor
            s.seq.tokens = s.prompt[:s.cursor]
        for s in decoding:
            if s.drafts:
                self._verify(s, now)
            else:
                self._sample(s, now)
        for s in chunked:
            if s.row >= 0:
                self._sample(s, now)

    # -- drafts ---------------------------------------------------------------------------------
    def _propose(self, slot: Slot, after: int) -> list[int]:
        """The tokens drafted for *slot* this step: within its reply's limit, and leaving room in the
        batch for the *after* slots still to add theirs."""
        if slot.drafter is None:
            return []
        room = min(slot.limit - len(slot.sampled) - 1, self.n_batch - self.llm.batched - after - 1)
        return slot.drafter.propose(room, self.row_cost if self.fixed_row_cost is None else self.fixed_row_cost)

    def _sources(self, slot: Slot) -> list[list[int]]:
        """What a reply may copy besides its context as it stands: a structured reply (JSON) writes
        the code or text it copies inside JSON strings, escaped (a fix's code field holds the cell with
        its newlines as \\n), so the prompt is also indexed as it would be written there."""
        if not slot.kwargs.get("grammar") and not slot.kwargs.get("response_format"):
            return []
        text = self.llm.detokenize(slot.prompt)
        return [self.llm.tokenize(json.dumps(text, ensure_ascii=False)[1:-1])]

    def _verify(self, slot: Slot, now: float) -> None:
        """Sample row after row while the sampled token is the draft (each kept draft is in the cells
        already, and its row's logits give the next token); the rest of the drafts' cells go."""
        drafts, slot.drafts = slot.drafts, []
        kept = 0
        for i in range(len(drafts) + 1):
            token = self._sample(slot, now, slot.row + i)
            if slot.finish is not None or i == len(drafts) or token != drafts[i]:
                break
            kept += 1
            slot.n_past += 1
        if slot.finish is None and kept < len(drafts):
            self.llm.seq_rm(slot.seq.id, slot.n_past)
        self.drafted += len(drafts)
        self.accepted += kept
        slot.drafter.feedback(len(drafts), kept)

    def _failed_step(self, rc: int, decoding: list[Slot], chunked: list[Slot]) -> None:
        """A decode that did not run: aborted (a cancelled prompt; the others simply go again next
        step), or refused (no KV cells: once more after the idle conversations gave theirs back;
        an error): then its requests end."""
        for s in decoding + chunked:  # whatever the step left in the cells goes: positions from n_past
            s.cursor = s.n_past
            self.llm.seq_rm(s.seq.id, s.n_past)
        if rc == 2:  # aborted: the cancelled slots end at the next step's start
            return
        if rc == 1 and not self._retried:
            self._retried = True
            self.evict_all()
            return
        self._retried = False
        error = ContextOverflowError(f"llama.cpp could not decode ({'no room in the KV cache' if rc == 1 else rc}); "
                                     "the requests in this step ended. Try again, or raise n_ctx.")
        for s in decoding + chunked:
            s.error = error
            self._end(s, "error")

    def _sample(self, slot: Slot, now: float, row: int | None = None) -> int | None:
        """Sample the next token from batch row *row* (the slot's own by default) and stream it;
        returns it, or None when the slot failed."""
        try:
            token = slot.sampler.sample(self.llm.ctx, slot.row if row is None else row)
        except Exception as exc:  # noqa: BLE001 - one sequence's failure ends that request only
            slot.error = exc
            self._end(slot, "error")
            return None
        if slot.ttft is None:
            slot.ttft = now
            slot.phase = DECODING
            if self.draft:
                slot.drafter = Drafter(slot.prompt, self._sources(slot))
        if slot.gen.cancelled:
            self._end(slot, "cancelled")
            return token
        if self.llm.is_eog(token):
            self._end(slot, "stop")
            return token
        slot.sampled.append(token)
        if slot.drafter is not None:
            slot.drafter.append(token)
        if self._show(slot, slot.decoder.decode(self.llm.piece(token))):
            self._end(slot, "stop")  # a stop string
        elif len(slot.sampled) >= slot.limit:
            self._end(slot, "length")
        return token

    # -- text ---------------------------------------------------------------------------------------
    def _show(self, slot: Slot, text: str, final: bool = False) -> bool:
        """Emit what can be shown of *text*; True when it ends at a stop string."""
        slot.pending += text
        hit = min((i for i in (slot.pending.find(s) for s in slot.stops) if i >= 0), default=-1)
        if hit >= 0:
            slot.pending = slot.pending[:hit]
            final = True
        if slot.deciding:
            head = slot.pending.lstrip()
            if not head or (head.startswith("{") and not final):
                return hit >= 0  # it may be a call: shown only once it turns out not to be one
            if head.startswith("{") and toolcalls.parse_call(slot.pending, slot.calls) is not None:
                return hit >= 0  # a call: the rounds show it, not the text
            slot.deciding = False
        keep = 0 if final else max((len(p) for s in slot.stops for p in _prefixes(s) if slot.pending.endswith(p)),
                                   default=0)
        out, slot.pending = slot.pending[:len(slot.pending) - keep], slot.pending[len(slot.pending) - keep:]
        if out:
            slot.text.append(out)
            slot.gen._emit("token", out)
        return hit >= 0

    def _end(self, slot: Slot, finish: str) -> None:
        if slot.finish is not None:
            return
        slot.finish = finish
        if finish != "error":
            self._show(slot, slot.decoder.decode(b"", final=True), final=True)
        seq = slot.seq
        if seq is not None:
            seq.slot, seq.used_at = None, time.monotonic()
            if finish == "error":
                self.llm.seq_rm(seq.id)
                seq.tokens, seq.owner, seq.dirty, seq.persisted = [], None, False, None
            else:
                if slot.drafter is not None:
                    self.llm.seq_rm(seq.id, slot.n_past)  # drafts of the last step it did not keep
                seq.tokens = (slot.prompt + slot.sampled)[:slot.n_past]  # what the cells hold
                if len(self.active) > 1 and not slot.urgent:
                    self._evict(seq)  # others decode on: idle cells would slow their attention
                # a completion's stay while its file is typed in (see _idle_completions)
        self.active.remove(slot)
        self.done(slot)

    def interrupt(self, gen: Any) -> None:
        """*gen* was cancelled (any thread): a prompt chunk of it being decoded now is aborted;
        an inline completion's is not: the next keystroke's prompt begins with the same text, and
        aborting each chunk at every keystroke while a chat ran made no progress at all (measured:
        the chat at 3 tok/s instead of 77), whereas a finished chunk stays in its cells."""
        if id(gen) in self._reading and getattr(gen, "completion", None) is None:
            self.aborting = True

    def fail_all(self, error: BaseException) -> None:
        """Something unexpected broke a step: every running request ends with *error* and the
        cache starts clean (its state is unknown)."""
        for slot in list(self.active):
            slot.error = error
            self._end(slot, "error")
        for seq in self.seqs:
            self.llm.seq_rm(seq.id)
            seq.tokens, seq.owner, seq.dirty, seq.persisted = [], None, False, None

    def cancel_all(self) -> None:
        for slot in list(self.active):
            self._end(slot, "cancelled")


def _prefixes(stop: str) -> list[str]:
    return [stop[:i] for i in range(1, len(stop))]
