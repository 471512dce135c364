"""What the server extension holds: the engine, the store, the keys, the turns in flight."""

from __future__ import annotations

import hmac
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..inference.backend import Backend
from ..retrieval.chunking import Limits
from ..stats import RequestLog
from ..chat.store import Store
from ..errors import UnknownToolError
from ..chat.tools import Tool

if TYPE_CHECKING:
    from .chat import SharedTurn

IDEMPOTENCY_KEEP = 1000  # finished turns remembered for replays of retried requests
STORE_THREADS = 2  # short store calls only: nothing that waits for a turn runs here
TOOL_THREADS = 4  # server tools running at once (the rest wait their turn in the pool's queue)
PREPARE_THREADS = 4  # requests being checked and handed to the backend at once (see ServerState.prepare_pool)


@dataclass
class ServerState:
    engine: Backend
    store: Store
    request_log: RequestLog
    api_key: str | None
    kernel_key: str
    max_body_bytes: int
    log: logging.Logger | Any = None
    completer: Backend | None = None  # inline completions' own engine (c.OffgridApp.completion_model), else None
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="offgrid-store"))
    keyed: OrderedDict[tuple, "SharedTurn"] = field(default_factory=OrderedDict)  # (route, session, key) -> turn
    running: dict[str, "SharedTurn"] = field(default_factory=dict)  # request id -> turn, for cancel
    session_turns: dict[str, "SharedTurn"] = field(default_factory=dict)  # session id -> its running turn
    tools: dict[str, Tool] = field(default_factory=dict)  # c.OffgridApp.tools, by name
    embedding_model: str | None = None  # c.OffgridApp.embedding_model, resolved
    learn_limits: Limits = field(default_factory=Limits)  # c.OffgridApp.learn_limits
    tool_pool: ThreadPoolExecutor = field(  # server tools run here: user code, never on the loop or the store pool
        default_factory=lambda: ThreadPoolExecutor(TOOL_THREADS, thread_name_prefix="offgrid-tool"))
    # what may take long or wait on the network before a request is queued: checking its tools and schema
    # (grammars), retrieval, an engine's model list, a model file named by a profile. Never the loop's
    # business, nor the store pool's (a hanging engine would stall every route that reads the store)
    prepare_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="offgrid-prepare"))

    def find_tools(self, names: list[str]) -> list[Tool]:
        """A profile's tools among the server's (c.OffgridApp.tools); a missing one is a 400."""
        missing = [n for n in names if n not in self.tools]
        if missing:
            raise UnknownToolError(f"The session's profile offers {', '.join(missing)}, which this server does not "
                                   f"have: add it to c.OffgridApp.tools (it has: {', '.join(self.tools) or 'none'}).")
        return [self.tools[n] for n in names]

    def key_matches(self, presented: str) -> bool:
        """Constant-time comparison against the configured API key and the kernels' key."""
        ok = False
        for key in (self.api_key, self.kernel_key):
            if key:
                ok |= hmac.compare_digest(presented.encode(), key.encode())
        return ok

    def remember(self, scope: tuple, turn: "SharedTurn") -> None:
        self.keyed[scope] = turn
        while len(self.keyed) > IDEMPOTENCY_KEEP:
            self.keyed.popitem(last=False)

    def forget(self, scope: tuple, turn: "SharedTurn") -> None:
        if self.keyed.get(scope) is turn:
            del self.keyed[scope]

    def close(self) -> None:
        self.request_log.close()
        self.engine.close()
        if self.completer is not None and self.completer is not self.engine:
            self.completer.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.tool_pool.shutdown(wait=False, cancel_futures=True)
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)
