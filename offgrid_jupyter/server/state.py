"""What the server extension holds: the engine, the store, the keys, the idempotency record."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..engine import Engine
from ..stats import RequestLog
from ..store import Store

IDEMPOTENCY_KEEP = 1000  # chat results remembered for replays of retried requests


@dataclass
class ServerState:
    engine: Engine
    store: Store
    request_log: RequestLog
    api_key: str | None
    kernel_key: str
    max_body_bytes: int
    log: logging.Logger | Any = None
    _done: OrderedDict = field(default_factory=OrderedDict)
    running: dict[str, Any] = field(default_factory=dict)  # request id -> Generation, for cancel

    def key_matches(self, presented: str) -> bool:
        """Constant-time comparison against the configured API key and the kernels' key."""
        ok = False
        for key in (self.api_key, self.kernel_key):
            if key:
                ok |= hmac.compare_digest(presented.encode(), key.encode())
        return ok

    async def once(self, key: str | None, run: Callable[[], Awaitable[Any]]) -> Any:
        """Run *run* once per idempotency key: a retry with the same key gets the first
        run's result (waiting for it if it is still running) instead of a second turn.
        A run that failed is forgotten, so its retry runs again."""
        if not key:
            return await run()
        pending = self._done.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._done[key] = future
        while len(self._done) > IDEMPOTENCY_KEEP:
            self._done.popitem(last=False)
        try:
            result = await run()
        except BaseException as exc:
            self._done.pop(key, None)
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        future.set_result(result)
        return result
