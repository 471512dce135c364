"""The rounds of a turn that offers tools: generate; if the reply is a call, run the tool; again.

A turn that offers tools runs *rounds* (:class:`Rounds`): generate; if the reply is a call, run
the function where the turn's consumer runs (in the kernel for a cell or the panel, on the
server for a server tool), append the call and its result, and generate again, until a final
answer or ``max_rounds``. To the magic, the panel and the server's routes the rounds are one
generation handle (:class:`~offgrid_jupyter.inference.generation.Handle`) with the usual contract
(events, batches, aevents, wait, cancel, listen) plus ``round_start``/``tool_start``/``tool_end``
events, so none of them needs to know.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from typing import Any, Iterator

from ..errors import InvalidRequestError
from ..inference.generation import Handle
from ..inference.toolcalls import check_tools, openai_call
from .tools import Tool

MAX_ROUNDS_LIMIT = 32


class Rounds(Handle):
    """A turn's rounds as one generation handle (see the module docstring).

    Construct it with the first round's messages; it queues round 1 at once. Its consumer
    (events, batches, aevents, wait or wait_async) drives it: when a round ends with a call,
    the consumer's thread runs the tool (the async consumer runs it on *executor*), then
    the next round is queued. ``calls`` lists what ran; ``steps`` the assistant/tool
    message pairs the model saw, for the store."""

    def __init__(self, backend: Any, messages: list[dict], tools: list[Tool], *, tool_choice: Any = "auto",
                 max_rounds: int = 4, session_id: str | None = None, source: str = "api",
                 model: str | None = None, params: dict[str, Any] | None = None, executor: Any = None):
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or not 1 <= max_rounds <= MAX_ROUNDS_LIMIT:
            raise InvalidRequestError(f"max_rounds must be an integer from 1 to {MAX_ROUNDS_LIMIT}, got {max_rounds!r}.")
        super().__init__()
        self.backend = backend
        self.tools = {t.name: t for t in tools}
        self.specs, self.choice = check_tools([t.spec() for t in tools], tool_choice)
        self.max_rounds = max_rounds
        self.messages = list(messages)
        self.session_id, self.source, self.model_name = session_id, source, model
        self.params = {k: v for k, v in (params or {}).items() if k not in ("tools", "tool_choice")}
        self.executor = executor
        self.calls: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.results: list[Any] = []
        self.result: Any = None
        self.note: str | None = None
        self.round = 0
        self.started_mono = time.monotonic()
        self._cancel = threading.Event()
        self._driving: Iterator | None = None  # between rounds: the driver's events still to hand out
        self._adriving: Any = None
        self._announced = 0  # rounds whose round_start was emitted
        self.gen = self._queue_round()
        self.request_id = self.gen.request_id
        self.model = self.gen.model

    # -- what consumers read -----------------------------------------------------------------
    @property
    def state(self) -> str:
        """Done once the last round's result is in; between rounds (a call running) it is running."""
        if self.result is not None:
            return "done"
        return "running" if self.gen.state == "done" else self.gen.state

    def _outcome(self) -> Any:
        if self.result is None:
            self.gen._outcome()  # a round's error is the turn's
        return self.result

    @property
    def position(self) -> int:
        return self.gen.position

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop: the round generating stops within a token, no further round starts."""
        self._cancel.set()
        self.gen.cancel()

    # -- the rounds ------------------------------------------------------------------------------
    def _queue_round(self):
        self.round += 1
        choice = self.choice if self.round == 1 or self.choice in ("auto", "none") else "auto"
        gen = self.backend.generate(self.messages, session_id=self.session_id, source=self.source,
                                    model=self.model_name, tools=self.specs, tool_choice=choice, **self.params)

        def forward(kind: str, payload: Any) -> None:
            if kind not in ("complete", "error"):  # the rounds' own end is announced by the driver
                self._listeners(kind, payload)

        gen.listen(forward)
        return gen

    def _round_start(self) -> tuple[str, Any] | None:
        if self._announced >= self.round:
            return None
        self._announced = self.round
        return self._announce(("round_start", {"round": self.round, "max_rounds": self.max_rounds}))

    def _announce(self, event: tuple[str, Any]) -> tuple[str, Any]:
        self._listeners(*event)
        return event

    def _after(self, result: Any) -> Iterator[tuple[str, Any]]:
        """After a round: ``("event", e)`` items to show and ``("call", fn)`` items for the
        driver to run (the driver sends the outcome back), ending with the complete event."""
        if not self.results or self.results[-1] is not result:  # (again after an interrupt mid-call)
            self.results.append(result)
        calls = list(getattr(result, "tool_calls", None) or [])
        if not calls or self.cancelled or result.finish_reason in ("cancelled", "error"):
            yield "event", self._complete(result)
            return
        for call in calls:
            tool = self.tools.get(call["name"])
            yield "event", self._announce(("tool_start", {"tool_name": call["name"], "arguments": call["arguments"],
                                                          "round": self.round}))
            if tool is None:  # an engine may answer with a tool we did not offer
                outcome = {"result": f"Error: no tool named {call['name']!r}", "error": "unknown tool",
                           "value": None, "duration_ms": 0.0}
            else:
                outcome = yield "call", functools.partial(tool.run, call["arguments"])
            record = {"id": call["id"], "name": call["name"], "arguments": call["arguments"],
                      "result": outcome["result"], "error": outcome["error"],
                      "duration_ms": outcome["duration_ms"], "round": self.round}
            self.calls.append(record)
            self.steps.append(record)
            self.messages += [{"role": "assistant", "content": "", "tool_calls": [openai_call(call)]},
                              {"role": "tool", "tool_call_id": call["id"], "content": outcome["result"]}]
            end = {"tool_name": call["name"], "duration_ms": outcome["duration_ms"], "round": self.round}
            end.update({"error": outcome["error"]} if outcome["error"] else {"result": outcome["result"]})
            yield "event", self._announce(("tool_end", end))
        if self.round >= self.max_rounds:
            self.note = (f"Stopped after {self.max_rounds} round{'s' * (self.max_rounds != 1)}: the model was still "
                         "calling tools. Raise --max-rounds (or the profile's max_rounds) to let it go on.")
            yield "event", self._complete(result)
            return
        if self.cancelled:
            yield "event", self._complete(result)
            return
        self.gen = self._queue_round()
        yield "event", self._round_start()

    def _complete(self, last: Any) -> tuple[str, Any]:
        rs = self.results
        usage = {k: sum(r.usage[k] for r in rs) for k in ("prompt_tokens", "cached_tokens", "completion_tokens",
                                                           "total_tokens")}
        finish = "cancelled" if self.cancelled and last.finish_reason != "error" else last.finish_reason
        text = last.text if not getattr(last, "tool_calls", None) else ""
        if finish == "cancelled" and self.calls and not text:
            self.note = self.note or f"Stopped after {len(self.calls)} tool call{'s' * (len(self.calls) != 1)}."
        self.result = dataclasses.replace(
            last, text=text, finish_reason=finish, usage=usage, queue_stats=rs[0].queue_stats,
            timings={"ttft_ms": rs[0].timings["ttft_ms"],
                     "total_ms": round((time.monotonic() - self.started_mono) * 1000, 3),
                     "tokens_per_second": last.timings["tokens_per_second"]},
            tool_calls=[{"name": c["name"], "arguments": c["arguments"]} for c in self.calls],
            tool_results=[{"tool_name": c["name"], "result": c["result"]} for c in self.calls],
            rounds=len(rs), note=self.note)
        return self._announce(("complete", self.result))

    # -- drivers -------------------------------------------------------------------------------------
    def _drive(self, result: Any) -> Iterator[tuple[str, Any]]:
        """Follow :meth:`_after`, running each call on this thread; yields its events."""
        steps = self._after(result)
        outcome = None
        while True:
            try:
                kind, item = steps.send(outcome)
            except StopIteration:
                return
            outcome = None
            if kind == "call":
                try:
                    outcome = item()
                except KeyboardInterrupt:  # the kernel's Stop while a tool runs: the turn stops there
                    self.cancel()
                    outcome = {"result": "Error: stopped by the user while running", "error": "KeyboardInterrupt",
                               "value": None, "duration_ms": 0.0}
            elif item is not None:
                yield item

    async def _adrive(self, result: Any):
        loop = asyncio.get_running_loop()
        steps = self._after(result)
        outcome = None
        while True:
            try:
                kind, item = steps.send(outcome)
            except StopIteration:
                return
            outcome = None
            if kind == "call":
                outcome = await loop.run_in_executor(self.executor, item)
            elif item is not None:
                yield item

    # -- the handle's two primitives: a round's events, and between rounds the calls ----------------
    # Between rounds, each pull hands out one event of the driver, so a consumer shows
    # "calling add(…)" before the call runs (on the consumer's thread, inside the next pull).
    def _pull(self, timeout: float | None, *, gather: bool, repeat_queued: bool = False) -> list:
        if self._driving is not None:
            event = next(self._driving, None)
            if event is not None:
                return [event]
            self._driving = None
        start = self._round_start()
        if start:
            return [start]
        batch = self.gen._pull(timeout, gather=gather, repeat_queued=repeat_queued)
        if batch and batch[-1][0] == "complete":  # a round ended: its calls run on this thread
            self._driving = self._drive(batch[-1][1])
            return batch[:-1] + [e for e in [next(self._driving, None)] if e is not None]
        return batch

    async def _apull(self, timeout: float | None, *, gather: bool, repeat_queued: bool = False) -> list:
        if self._adriving is not None:
            event = await anext(self._adriving, None)
            if event is not None:
                return [event]
            self._adriving = None
        start = self._round_start()
        if start:
            return [start]
        batch = await self.gen._apull(timeout, gather=gather, repeat_queued=repeat_queued)
        if batch and batch[-1][0] == "complete":  # the calls run on the executor, never the event loop
            self._adriving = self._adrive(batch[-1][1])
            return batch[:-1] + [e for e in [await anext(self._adriving, None)] if e is not None]
        return batch
