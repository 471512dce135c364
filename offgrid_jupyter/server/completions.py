"""``POST /v1/completions/inline``: ghost text as you type, on the shared model.

Thin over the backend's ``complete_inline`` (``inference/completion.py`` says what the prompt is
and where a suggestion ends): the request never waits behind a chat, and a client that goes away
(the editor's next keystroke aborts its fetch) cancels it, so the model stops within one step.
"""

from __future__ import annotations

import time

from tornado import web
from jupyter_server.auth.decorator import authorized

from ..inference.completion import DEFAULT_TOKENS, CompletionRequest, answer
from .base import OffgridHandler


class InlineCompletionHandler(OffgridHandler):
    spec_path = "/completions/inline"
    _gen = None

    @web.authenticated
    @authorized
    async def post(self) -> None:
        started = time.monotonic()
        data = await self.body()  # types and bounds checked against openapi.json: a 400 naming the field
        request = CompletionRequest(prefix=data["prefix"], suffix=data.get("suffix") or "",
                                    language=data.get("language") or "python", path=data.get("path"),
                                    context=data.get("context"), max_tokens=data.get("max_tokens") or DEFAULT_TOKENS)
        backend = self.state.completer or self.state.engine
        self._gen = await self.slow(backend.complete_inline, request)  # checks it, then starts at once
        if self._gone:
            self._gen.cancel()
            return
        self.send(200, answer(request, await self._gen.wait_async(), started))

    def gone(self) -> None:
        if self._gen is not None:
            self._gen.cancel()
